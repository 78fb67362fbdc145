"""One HTML page → an interleaved document: ordered text / image / video nodes of its main content.

Three steps, each small:
1. `decode_html`: bytes → str from the BOM, the HTTP charset, the `<meta>` charset, UTF-8, then detection.
2. `_Walker.walk`: one iterative pre-order walk over the lexbor DOM that turns the page into flat *blocks* (a
   paragraph of text, an image, a video), each owned by the innermost block element it sits in. Its per-node loop
   is compiled (`html_walk.pyx`, reading lexbor's structs); what it decides is asked of this module. Furniture
   (nav/aside/footer/menu tags, navigation/banner/complementary roles, class or id words like cookie,
   newsletter, share, related, comments, sidebar; a <header> without the h1) is skipped without walking it,
   unless it holds half the page's text, or a fifth with few links (a "has-sidebar" wrapper around the article).
   Iterative, so pathological nesting cannot blow the stack; a depth cap makes it a counted skip.
3. `_select_main`: a measured main-content choice. Every element gets a balance: characters of prose (blocks of
   >= 25 chars with few links) minus link text and half the short fragments in it; <article>/<main> get a
   bonus. The element with the best balance is the content root, so it grows exactly while growing adds more
   prose than noise, which keeps tables, lists and figures that *are* the content. It is widened to the
   headline's container when that adds little text. Inside it, link lists go, and so does the frame before the
   first and after the last body paragraph (datelines, bylines, photo credits, "read more", author boxes,
   orphaned "Related" headings, trailing teaser thumbnails). The og:image, the page's declared lead image, is
   kept wherever it sits.

Images keep their resolved URL (RFC 3986 against `<base href>`, then the page URL), alt, title, figcaption and
declared size; the largest `srcset` / `<picture><source>` candidate and lazy-load attributes are honoured;
`data:` URIs, tracking pixels, icons, logos and spacers are dropped and counted.
"""

from __future__ import annotations

import codecs
import functools
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

from selectolax.lexbor import LexborHTMLParser, LexborNode

try:
    from m3w.pipeline import html_walk
except ModuleNotFoundError as missing:  # a source tree used without installing it
    raise ImportError(
        "m3w.pipeline.html_walk, the compiled DOM walk, is not built: run `make setup` (or `pip install -e .`)"
    ) from missing


@dataclass
class PageOptions:
    """How one page becomes a document. Defaults are what the quality targets were measured with."""

    max_html_bytes: int = 5_000_000  # pages above this are skipped (counted as skip.too_large)
    max_depth: int = 400  # deeper DOMs are pathological (counted as skip.nesting)
    max_replacement_ratio: float = 0.01  # more U+FFFD than this after decoding → skip.undecodable
    main_content: bool = True  # False keeps every non-hidden block (no boilerplate removal)
    min_image_side: int = 50  # declared width or height below this → an icon, not a content image
    min_paragraph_chars: int = 25  # text blocks shorter than this do not vote for their container


class PageSkip(Exception):
    """A page that yields no document; `reason` becomes the `skip.<reason>` count."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------------- decoding

_CHARSET_ALIASES = {
    # WHATWG encoding standard: these labels mean the superset on the web.
    "iso-8859-1": "cp1252",
    "latin1": "cp1252",
    "latin-1": "cp1252",
    "us-ascii": "cp1252",
    "ascii": "cp1252",
    "iso-8859-9": "cp1254",
    "tis-620": "cp874",
    "shift_jis": "cp932",
    "shift-jis": "cp932",
    "sjis": "cp932",
    "x-sjis": "cp932",
    "ms_kanji": "cp932",
    "windows-31j": "cp932",
    "euc-jp": "euc_jis_2004",
    "x-euc-jp": "euc_jis_2004",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "big5": "big5hkscs",
    "euc-kr": "cp949",
    "ks_c_5601-1987": "cp949",
    "utf-16": "utf-8",  # a <meta> claiming UTF-16 in ASCII-compatible bytes means UTF-8 (WHATWG)
    "unicode": "utf-8",
}
_SINGLE_BYTE_LATIN = {"cp1252", "cp1254", "iso8859-15", "iso-8859-15"}
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([a-zA-Z0-9_.:-]+)""", re.I)
_MARKUP = re.compile(rb"<[A-Za-z!/?]")
_BOMS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))


def normalize_charset(label: str | None) -> str | None:
    """A Python codec name for an HTTP/meta charset label, or None if unknown."""
    if not label:
        return None
    label = label.strip().strip("\"'").lower()
    label = _CHARSET_ALIASES.get(label, label)
    try:
        return codecs.lookup(label).name
    except LookupError:
        return None


_UTF8_CHUNK = 1 << 15


def _strict_decode(body: bytes, codec: str, utf8_as_bytes: bool) -> str | bytes | None:
    """`body` decoded with `codec`, None if it does not decode. UTF-8 wanted as bytes is only validated, a chunk at
    a time: 1.4x faster, and a page never becomes one str (up to 4 bytes a character) beside its bytes."""
    if not (utf8_as_bytes and codec == "utf-8"):
        try:
            return body.decode(codec)
        except UnicodeDecodeError:
            return None
    if body.isascii():
        return body
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with memoryview(body) as view:
            for start in range(0, len(body), _UTF8_CHUNK):
                decoder.decode(view[start : start + _UTF8_CHUNK])
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return None
    return body


def _try_decode(body: bytes, codec: str, max_bad: float, utf8_as_bytes: bool = False) -> str | bytes | None:
    strict = _strict_decode(body, codec, utf8_as_bytes)
    if strict is not None:
        return strict
    text = body.decode(codec, errors="replace")
    # A few bad bytes (a cut multibyte char, one stray byte) are normal on the web; many mean a wrong codec.
    return text if text.count("\ufffd") <= max_bad * max(len(text), 1) else None


def decode_html(
    body: bytes, http_charset: str | None = None, max_bad: float = 0.01, utf8_as_bytes: bool = False
) -> tuple[str | bytes, str]:
    """Decode page bytes: BOM, then HTTP charset, then `<meta>` charset, then UTF-8, then detection.

    Returns (text, codec). With `utf8_as_bytes`, a page found to be UTF-8 comes back as its bytes (BOM removed):
    lexbor parses UTF-8 bytes directly, and decoding them only for the parser to encode them again costs a tenth
    of extraction. Raises PageSkip("undecodable") when no codec yields text with few enough U+FFFD.
    """

    def found(text: str | bytes, codec: str, raw: bytes = body) -> tuple[str | bytes, str]:
        return (raw, codec) if utf8_as_bytes and codec == "utf-8" else (text, codec)

    for bom, codec in _BOMS:
        if body.startswith(bom):
            rest = body[len(bom) :]
            return found(rest.decode(codec, errors="replace"), codec, rest)
    meta = _META_CHARSET.search(body[:4096])
    declared = [
        normalize_charset(http_charset),
        normalize_charset(meta.group(1).decode("ascii") if meta else None),
    ]
    for codec in dict.fromkeys(c for c in declared if c):
        if codec in _SINGLE_BYTE_LATIN and not body.isascii():
            # "iso-8859-1" is the default many servers send for UTF-8 pages: valid UTF-8 wins over it.
            strict = _strict_decode(body, "utf-8", utf8_as_bytes)
            if strict is not None:
                return found(strict, "utf-8")
        text = _try_decode(body, codec, max_bad, utf8_as_bytes)
        if text is not None:
            return found(text, codec)
    text = _try_decode(body, "utf-8", max_bad, utf8_as_bytes)
    if text is not None:
        return found(text, "utf-8")
    if not _MARKUP.search(body, 0, 4096):
        # Detection names a codec for any bytes (16 random ones "are" UTF-16 or cp1006): trust it on markup only.
        raise PageSkip("undecodable", "no declared charset decodes it, and it holds no markup")
    from charset_normalizer import from_bytes

    best = from_bytes(body[:200_000]).best()
    codec = normalize_charset(best.encoding) if best else None
    if codec:
        text = _try_decode(body, codec, max_bad, utf8_as_bytes)
        if text is not None:
            return found(text, codec)
    raise PageSkip("undecodable", f"no charset decodes the page (declared {declared})")


# ---------------------------------------------------------------------------------------------- URLs

_SRCSET_URL = re.compile(r"[\s,]*(\S+)")
_SRCSET_DESCRIPTORS = re.compile(r"[^,(]*(?:\([^)]*\)?[^,(]*)*,?")
_SRCSET_DESCRIPTOR = re.compile(r"(\d*\.?\d+(?:[eE][-+]?\d+)?)([wxh])")


def parse_srcset(srcset: str) -> list[tuple[str, float, str]]:
    """`srcset` → [(url, value, "w" | "x")] by the HTML standard's "parse a srcset attribute": a URL runs to the
    next whitespace, so commas inside it (image CDNs: `/t_fit-760w,f_auto,q_auto/a.jpg 760w`) stay in it, and
    only commas that end it separate candidates. No descriptor means 1x; a candidate with an invalid or repeated
    descriptor is dropped, as browsers drop it."""
    out: list[tuple[str, float, str]] = []
    pos, end = 0, len(srcset)
    while pos < end:
        match = _SRCSET_URL.match(srcset, pos)
        if match is None:
            break
        url, pos = match.group(1), match.end()
        descriptors: list[str] = []
        if url.endswith(","):
            url = url.rstrip(",")
        else:
            region = _SRCSET_DESCRIPTORS.match(srcset, pos)
            pos = region.end()
            descriptors = region.group(0).rstrip(",").split()
        value, unit, kinds = 1.0, "x", ""
        for descriptor in descriptors:
            parsed = _SRCSET_DESCRIPTOR.fullmatch(descriptor)
            if parsed is None or parsed.group(2) in kinds:
                kinds = "!"
                break
            kinds += parsed.group(2)
            if parsed.group(2) != "h":
                value, unit = float(parsed.group(1)), parsed.group(2)
        if url and "!" not in kinds and not ("w" in kinds and "x" in kinds) and value > 0:
            out.append((url, value, unit))
    return out


def largest_candidate(candidates: list[tuple[str, float, str]]) -> str | None:
    """The largest candidate: by width descriptor when any has one, else by density."""
    if not candidates:
        return None
    widths = [c for c in candidates if c[2] == "w"]
    pool = widths or candidates
    return max(pool, key=lambda c: c[1])[0]


def resolve_url(base: str, url: str | None) -> str | None:
    """RFC 3986 resolution of `url` against `base`; None for data:/javascript: and non-http(s) results."""
    if not url:
        return None
    url = url.strip()
    if not url or url.startswith(("data:", "javascript:", "about:", "blob:", "#")):
        return None
    if url.startswith(("http://", "https://")) and "/." not in url and " " not in url:
        return url  # already absolute and normal: skip urljoin, the hot path on image-heavy pages
    try:
        absolute = urljoin(base, url)
        scheme = urlsplit(absolute).scheme
    except ValueError:
        return None
    return absolute if scheme in ("http", "https") else None


# ---------------------------------------------------------------------------------------------- DOM vocabulary

BLOCK_OF_TAG = {
    **{f"h{i}": "heading" for i in range(1, 7)},
    **dict.fromkeys(("li", "dd", "dt"), "list_item"),
    **dict.fromkeys(("figcaption", "caption"), "caption"),
    **dict.fromkeys(("td", "th"), "table_cell"),
    "blockquote": "quote",
    "pre": "code",
    **dict.fromkeys(
        (
            "p", "div", "section", "article", "main", "header", "footer", "address", "center", "body", "ul", "ol",
            "dl", "table", "thead", "tbody", "tfoot", "tr", "figure", "nav", "aside", "hr", "form", "fieldset",
            "details", "summary", "legend", "menu", "hgroup", "picture",
        ),
        "paragraph",
    ),
}  # fmt: skip
SKIP_TAGS = frozenset(
    "script style template svg math iframe frame frameset object embed canvas input select textarea "
    "button option optgroup datalist head title meta link area map audio track dialog param rt rp".split()
)  # rt/rp: ruby readings, printed above the text they annotate, not inline with it
BOILERPLATE_TAGS = frozenset(("nav", "aside", "footer", "menu"))
_TAGS_WITH_MEANING = BOILERPLATE_TAGS | {"header", "article", "main"}
BOILERPLATE_ROLES = frozenset(
    ("navigation", "banner", "contentinfo", "complementary", "search", "menu", "menubar", "dialog", "alert")
)
# class/id values that name page furniture: whole tokens (split on -, _, space, camelCase) for short words,
# substrings for long unambiguous ones ("fi-cookieconsent", "relatedPosts").
_BOILERPLATE_TOKENS = frozenset(
    """nav menu menubar submenu footer share shares comments comment respond pager promo banner popup modal
    overlay toolbar skip skiplink topbar tagcloud tags trending popular mostread moreread jump copyright
    legal""".split()
)
# Grouped by first letters (cookie, consent, comment-?list, comments-?area under "co"): the regex engine tries
# each alternative at every position, so fewer alternatives make this search, run for every new class name, 2x
# faster.
_BOILERPLATE_SUBSTRINGS = re.compile(
    r"a(?:dvert|ffiliate|uthor[-_]?(?:box|bio|info|desc|profile)|bout-?(?:the-?)?author)|breadcrumb|"
    r"co(?:okie|nsent|mment-?list|mments-?area)|dis(?:qus|claimer)|gdpr|login|masthead|"
    r"n(?:ews-?letter|av(?:bar|igation))|outbrain|pagination|re(?:lated|commend)|"
    r"s(?:ide-?bar|ocial|har(?:ing|ebar|e-?buttons)|ponsor|ubscri|ign(?:-?up|in)|abox)|taboola"
)
# Furniture words that win over a content word in the same class value ("related_post", "post-newsletter"):
# what they name is never the article itself.
_STRONG_FURNITURE = re.compile(
    r"related|recommend|outbrain|taboola|news-?letter|cookie|consent|breadcrumb|affiliate"
)
_CONTENT_TOKENS = frozenset(
    "article articlebody content main post entry story hentry postbody storybody".split()
)


def _first_letter_alternation(words: frozenset[str]) -> str:
    """A regex finding any of `words` in a string, grouped by first letter ("b(?:anner)|c(?:omment|ontent)|..."):
    the regex engine tries each alternative at every position, so fewer of them make a search faster. A word
    holding another ("comments", "comment") needs no alternative of its own."""
    by_letter: dict[str, list[str]] = {}
    for word in sorted(w for w in words if not any(other != w and other in w for other in words)):
        by_letter.setdefault(word[0], []).append(re.escape(word[1:]))
    return "|".join(f"{letter}(?:{'|'.join(rests)})" for letter, rests in sorted(by_letter.items()))


# Whether a lower-cased class or id value holds any word _name_verdict looks for, whole or inside a token: three
# in four values (unique ids, generated class names like "css-1x6j0yu") hold none, and need no splitting.
_ANY_NAME_WORD = re.compile(
    _first_letter_alternation(_BOILERPLATE_TOKENS | _CONTENT_TOKENS) + "|" + _BOILERPLATE_SUBSTRINGS.pattern
)
_PLAIN_CLASS = re.compile(r"[\w -]+$")
_UNIT_NAMES = re.compile(r"comment|repl|post|message|answer|review", re.I)  # the units of a thread
_SEPARATORS = r"[\s_\-:./]+"  # _tokens' fast path spells the same set out as str.replace calls and split()
_TOKEN_SPLIT = re.compile(_SEPARATORS + r"|(?<=[a-z])(?=[A-Z])")  # and camelCase boundaries
_HIDDEN_STYLE = re.compile(r"display\s*:\s*none|visibility\s*:\s*hidden", re.I)
_STYLE_SIZE = re.compile(r"(width|height)\s*:\s*(\d+)px", re.I)
_TRACKING_IMAGE = re.compile(
    r"[/_.-](pixel|beacon|spacer|blank|transparent|clear|1x1|track|tracking)\.(gif|png)|"
    r"/(pixel|beacon|track|tracking)([/?]|$)|doubleclick\.net|facebook\.com/tr|google-analytics\.com|"
    r"googletagmanager|scorecardresearch|quantserve|/b/ss/",
    re.I,
)
# Cheap literal scans that must match before the full patterns are tried (most images match neither).
_TRACKING_HINT = re.compile(
    r"pixel|beacon|spacer|blank|transparent|clear|1x1|track|doubleclick|facebook|google|scorecard|quantserve|/b/ss/"
)
_ICON_HINT = re.compile(
    r"logo|icon|sprite|avatar|badge|emoji|emoticon|smilies|button|gravatar|spinner|placeholder"
)
_ICON_IMAGE = re.compile(
    r"(^|[/_.-])(logos?|icons?|favicons?|sprites?|avatars?|badges?|emojis?|emoticons?|smilies|buttons?|"
    r"gravatar|spinner|placeholder)([/_.-]|\d|$)",
    re.I,
)
_JUNK_CLASS = re.compile(r"logo|icon|avatar|emoji|sprite|badge|gravatar|author-?(img|image|photo)", re.I)
_JUNK_FRAME = re.compile(
    r"byline|author|avatar|profile|logo|icon|emoji|badge", re.I
)  # an image's near ancestors
# Where lazy loaders keep the real image while `src` holds a placeholder; the larger variants first.
_LAZY_ATTRS = (
    "data-hi-res-src", "data-src-large", "data-large-file", "data-lazy-src", "data-src", "data-original",
    "data-old-src", "data-lazy", "data-lazy-original", "data-url", "data-orig-file",
)  # fmt: skip
_LAZY_SRCSETS = ("data-srcset", "data-lazy-srcset")
_IMAGE_FILE = re.compile(r"\.(jpe?g|png|webp|gif|avif)$", re.I)
_SIZED_FILE = re.compile(r"[-_](\d{2,4})x(\d{2,4})\.\w+$")  # WordPress & co: photo-150x150.jpg
THUMBNAIL_SIDE = 300  # below this an image linked to a larger version of itself is that version's thumbnail
_LINE_BREAK = "\u2028"
# What the walk does with an element by its tag: skip it with its subtree, or handle it as media or a line break.
# Tags not listed are containers walked into. Non-element nodes other than text (comments, the doctype) are skipped.
_SKIP, _CONTAINER, _SPECIAL = 0, 1, 2
_WALK_ACTION = {
    **dict.fromkeys(SKIP_TAGS, _SKIP),
    **dict.fromkeys(("img", "video", "noscript", "br"), _SPECIAL),
}


def _tokens(value: str, lowered: str) -> set[str]:
    """The lower-cased words of a class or id value (`lowered` is `value.lower()`). Without capitals (nine values
    in ten) it has no camelCase boundaries: the separators become spaces and str.split() (which splits on what the
    pattern's \\s matches) does the rest, 1.5-2x faster than the regex split."""
    if value == lowered:
        return set(
            value.replace("_", " ")
            .replace("-", " ")
            .replace(":", " ")
            .replace(".", " ")
            .replace("/", " ")
            .split()
        )
    return {t.lower() for t in _TOKEN_SPLIT.split(value) if t}


def _int_size(value: str | None) -> int | None:
    if not value:
        return None
    m = re.match(r"\s*(\d+)(?:\.\d+)?\s*(px)?\s*$", value)
    return int(m.group(1)) if m else None


def _clean(text: str | None) -> str | None:
    if not text:
        return None
    text = " ".join(text.split())
    return text or None


# ---------------------------------------------------------------------------------------------- the walk


@dataclass(slots=True)
class _Block:
    kind: str  # text | image | video
    owner: int  # index of the innermost block element holding it
    dom_index: int
    text: str = ""
    block: str = "paragraph"
    link_chars: int = 0
    level: int = 0  # heading level (1-6), 0 otherwise
    linked: bool = False  # an image inside <a>: a teaser thumbnail when it trails the content
    media: dict[str, Any] | None = None
    # An image's <img>, its attributes and any <noscript> <img> fallbacks: its source and figcaption are worked
    # out only if the image is kept (most images of a page are not), by _Walker.resolve_image.
    node: LexborNode | None = None
    attrs: dict[str, str | None] | None = None
    fallbacks: list[LexborNode] | None = None
    # resolve_image found it is no content image: counted once in image_drops, never resolved or counted again.
    dropped: bool = False


@dataclass
class _Page:
    parent: list[int] = field(default_factory=list)
    tag: list[str] = field(default_factory=list)
    content_hint: list[int] = field(default_factory=list)  # 2: article/main/articleBody; 1: content-ish class
    blocks: list[_Block] = field(default_factory=list)
    image_drops: Counter = field(default_factory=Counter)


@functools.lru_cache(maxsize=1 << 16)
def _name_verdict(names: str) -> tuple[bool, bool]:
    """(names furniture, names content) for a class or id value. Cached: class names repeat endlessly within and
    across pages. A content word wins over a furniture word ("entry share", "documentContent__sharingContainer"),
    but not over a strong one ("related_post")."""
    lowered = names.lower()
    if not _ANY_NAME_WORD.search(lowered):
        # A token that equals a word is in the lower-cased value too (str.lower maps ASCII letters alike in a
        # token and in the whole value), as is every substring match.
        return False, False
    tokens = _tokens(names, lowered)
    furniture = bool(tokens & _BOILERPLATE_TOKENS) or bool(_BOILERPLATE_SUBSTRINGS.search(lowered))
    if furniture and _STRONG_FURNITURE.search(lowered):
        return True, False
    return furniture, bool(tokens & _CONTENT_TOKENS)


@functools.lru_cache(maxsize=1 << 16)
def _classify(tag: str, cls: str, id_: str, role: str, itemprop: str) -> tuple[bool, bool, int]:
    """(looks like furniture, is a header, content hint 0/1/2) from an element's tag and attributes. Cached: the
    walk asks once per element with attributes, and a site's templates repeat the same few combinations."""
    role = role.lower()
    hint = 2 if tag in ("article", "main") or role == "main" or itemprop.lower() == "articlebody" else 0
    furniture_name = content_name = False
    for names in (cls, id_):
        if names:
            furniture, content = _name_verdict(names)
            furniture_name = furniture_name or furniture
            content_name = content_name or content
    if not hint and content_name:
        hint = 1
    # Class names mix both ("entry share", "documentContent__sharingContainer"): a content word wins over a
    # furniture word, but not over a furniture tag or role.
    boiler = tag in BOILERPLATE_TAGS or role in BOILERPLATE_ROLES or (not hint and furniture_name)
    return boiler and tag not in ("body", "html"), tag == "header" or role == "banner", hint


def _hidden_by(aria_hidden: str | None, style: str | None) -> bool:
    """Whether an element with these attributes is hidden (one with a `hidden` attribute always is)."""
    return (aria_hidden or "").lower() == "true" or bool(style and _HIDDEN_STYLE.search(style))


# What the compiled walk asks about tags, class names and hidden elements.
_VOCABULARY = html_walk.Vocabulary(
    _WALK_ACTION, _SKIP, _CONTAINER, BLOCK_OF_TAG, _TAGS_WITH_MEANING, _LINE_BREAK,
    _classify, functools.partial(_Block, "text"), _hidden_by,
)  # fmt: skip


class _Walker:
    """Pre-order walk of <body> into blocks. Text accumulates until a block boundary flushes it."""

    def __init__(self, base_url: str, options: PageOptions) -> None:
        self.base_url = base_url
        self.options = options
        self.page = _Page()
        self.dom_index = 0  # of the element being walked, for the media blocks it adds
        self.pieces: list[str] = []  # the pending text of the innermost block element
        self.total_chars = 0
        # The last image's block, and the ids of its <img>, parent and grandparent (to pair a <noscript> with it).
        self._last_image: tuple[_Block, set[int]] | None = None
        self._root: LexborNode | None = None
        self._class_mass: dict[str, bool] = {}  # class → whether elements of that class are half the page

    # -- elements
    def is_furniture(self, node: LexborNode, tag: str, cls: str, boiler: bool) -> bool:
        """Whether to drop the subtree of an element `_classify` calls furniture (`boiler`: by tag, role, class or
        id) or a header. It is dropped unless it holds most of the page's text (a "has-sidebar" wrapper around
        the article), holds the article itself (an <article>, <main>, articleBody or the h1 in a fifth of the
        page's text), or is one of many like it that together are the page (the posts of a forum thread, each
        classed "comment"); a header is dropped unless it holds the h1."""
        if not boiler and node.css_first("h1") is not None:
            return False
        # Measured in C (html_walk.text_size), so dropped regions cost no walk at all.
        chars = html_walk.text_size(node)
        total = self.total_chars
        if chars >= 0.5 * total:
            return False
        if chars >= 0.2 * total:
            if node.css_first("article, main, [itemprop=articleBody], h1") is not None:
                return False
            # A big region with few links is prose mislabelled by its class name, not navigation. Named by a weak
            # word only (a "socialicons-sticky" wrapper around the article), it may hold an article's share of
            # links; by tag, role, a strong word or as a comments area, only a sliver.
            links = sum(html_walk.text_size(a) for a in node.css("a"))
            names = f"{cls} {node.attributes.get('id') or ''}".lower()
            weak_name = (
                tag not in BOILERPLATE_TAGS
                and (node.attributes.get("role") or "").lower() not in BOILERPLATE_ROLES
                and not _STRONG_FURNITURE.search(names)
                and not _UNIT_NAMES.search(names)
            )
            return links > (ARTICLE_LINK_SHARE if weak_name else NAVIGATION_LINK_SHARE) * chars
        if chars >= 50 and tag not in BOILERPLATE_TAGS and _UNIT_NAMES.search(cls):
            return not self._is_page_of_many(cls)
        return True

    def _is_page_of_many(self, cls: str) -> bool:
        """Whether the elements sharing this exact class hold half the page's text (cached per class)."""
        known = self._class_mass.get(cls)
        if known is None:
            known = False
            if _PLAIN_CLASS.match(cls) and self._root is not None:  # a CSS string lexbor parses as written
                mass = sum(html_walk.text_size(n) for n in self._root.css(f'[class="{cls}"]'))
                known = mass >= 0.5 * self.total_chars
            self._class_mass[cls] = known
        return known

    # -- media
    def image(self, node: LexborNode, attrs: dict[str, str | None], owner: int, linked: bool) -> None:
        if not any(value for name, value in attrs.items() if "src" in name or name.startswith("data-")):
            self.page.image_drops["no_url"] += 1  # an empty <img> scripts fill in: its <noscript> pairs with
            return  # the placeholder before it, not with this
        block = _Block("image", owner, self.dom_index, linked=linked, node=node, attrs=attrs)
        self.page.blocks.append(block)
        anchors, ancestor = {node.mem_id}, node.parent
        for _ in range(2):
            if ancestor is None:
                break
            anchors.add(ancestor.mem_id)
            ancestor = ancestor.parent
        self._last_image = (block, anchors)

    def resolve_image(self, block: _Block) -> bool:
        """Work out a kept image block's media (source, size, alt, figcaption); False if it is not a content image
        after all (an icon, a tracking pixel, a data: URI: counted in image_drops). A <noscript> fallback is what
        a browser without scripts shows, so it wins over the placeholder, which keeps its alt and caption when
        the fallback has none."""
        if block.media or block.dropped or block.node is None:
            return bool(block.media)
        media = self._image_media(block.node, block.attrs or {})
        for fallback in block.fallbacks or ():
            real = self._image_media(fallback, fallback.attributes)
            if real is not None and media is None:
                media = real
            elif real is not None:
                media.update(
                    (k, v) for k, v in real.items() if v is not None or k in ("url", "width", "height")
                )
        if media is None:
            block.dropped = True
            return False
        media["figcaption"] = _figcaption(block.node)
        block.media = media
        return True

    def _image_media(self, node: LexborNode, attrs: dict[str, str | None]) -> dict[str, Any] | None:
        """The image an <img> stands for, or None (counted in image_drops) for data: URIs, tracking pixels, icons.

        The source is the largest candidate: `<picture><source>` and srcset by width, then lazy loaders' attributes
        (data-src, data-lazy-src, data-old-src, ...; a lazy image's own src and srcset are its placeholder),
        then src. A thumbnail linked to an image file stands for that image (galleries, lightboxes)."""
        drops = self.page.image_drops
        candidates: list[tuple[str, float, str]] = []
        parent = node.parent
        if parent is not None and parent.tag == "picture":
            for source in parent.iter():
                if source.tag == "source":
                    sattrs = source.attributes
                    for name in ("data-srcset", "data-lazy-srcset", "srcset"):
                        if sattrs.get(name):
                            candidates += parse_srcset(sattrs[name] or "")
                            break
        lazy = False
        for name in _LAZY_SRCSETS:
            if attrs.get(name):
                candidates += parse_srcset(attrs[name] or "")
                lazy = True
        lazy_src = next((v for a in _LAZY_ATTRS if (v := attrs.get(a)) and not v.startswith("data:")), None)
        if not lazy and lazy_src is None and attrs.get("srcset"):
            candidates += parse_srcset(attrs["srcset"] or "")
        candidates = [c for c in candidates if not c[0].startswith("data:")]
        widths = [c for c in candidates if c[2] == "w"]
        chosen_width = None
        if widths:
            raw, best = max(widths, key=lambda c: c[1])[:2]
            chosen_width = int(best)
        elif lazy_src is not None:
            raw = lazy_src
        else:
            raw = largest_candidate(candidates) or attrs.get("src")
        if raw and raw.lstrip().startswith("data:"):
            drops["data_uri"] += 1
            return None
        url = resolve_url(self.base_url, raw)
        if url is None:
            drops["no_url"] += 1
            return None
        width, height = _int_size(attrs.get("width")), _int_size(attrs.get("height"))
        style = attrs.get("style")
        if style:
            for dim, value in _STYLE_SIZE.findall(style):
                if dim.lower() == "width" and width is None:
                    width = int(value)
                elif dim.lower() == "height" and height is None:
                    height = int(value)
        side = self.options.min_image_side
        if (width is not None and width < side) or (height is not None and height < side):
            drops["icon" if (width or 0) > 2 or (height or 0) > 2 else "tracking"] += 1
            return None
        lowered = url.lower()
        if _TRACKING_HINT.search(lowered) and _TRACKING_IMAGE.search(url):
            drops["tracking"] += 1
            return None
        path = lowered.split("?", 1)[0].split("#", 1)[0]
        if (
            (_ICON_HINT.search(path) and _ICON_IMAGE.search(path))
            or path.endswith((".svg", ".ico"))
            or _JUNK_CLASS.search(attrs.get("class") or "")
        ):
            drops["icon"] += 1
            return None
        frame = node.parent
        for _ in range(2):
            if frame is None or not frame.is_element_node:
                break
            frame_attrs = frame.attrs
            if _JUNK_FRAME.search(f"{frame_attrs.sget('class')} {frame_attrs.sget('id')}"):
                drops["icon"] += 1  # a byline photo, an author box, a logo wrapper
                return None
            frame = frame.parent
        larger = self._linked_original(node, path, width, height, chosen_width)
        if larger is not None:
            url, width, height = larger, None, None
        elif chosen_width is not None and chosen_width != width:
            # Report the chosen candidate's size: the declared one is the size it is shown at.
            height = round(height * chosen_width / width) if width and height else None
            width = chosen_width
        return {
            "url": url, "alt": _clean(attrs.get("alt")), "title": _clean(attrs.get("title")),
            "figcaption": None, "width": width, "height": height,
        }  # fmt: skip

    def _linked_original(
        self, node: LexborNode, path: str, width: int | None, height: int | None, chosen_width: int | None
    ) -> str | None:
        """The image file a thumbnail links to (`<a href="photo.jpg"><img src="photo-150x150.jpg"></a>`), when the
        <img> is a thumbnail: shown, or named, under THUMBNAIL_SIDE pixels."""
        link = node.parent
        if link is not None and link.tag == "picture":
            link = link.parent
        if link is None or link.tag != "a":
            return None
        href = link.attributes.get("href") or ""
        if not _IMAGE_FILE.search(href.split("?", 1)[0].split("#", 1)[0]):
            return None
        named = _SIZED_FILE.search(path)
        sides = [v for v in (width, height, chosen_width) if v] or (
            [int(named[1]), int(named[2])] if named else []
        )
        if not sides or max(sides) >= THUMBNAIL_SIDE:
            return None
        target = resolve_url(self.base_url, href)
        return target if target is not None and target.split("?", 1)[0].lower() != path else None

    def noscript(self, node: LexborNode, owner: int, linked: bool) -> bool:
        """A <noscript>: what a browser without scripts shows. A page built inside one (sites that draw
        everything with scripts) is walked like any element: returns True. Otherwise only its images count: the
        real image behind the lazy placeholder just before it, or an image scripts would have inserted."""
        if html_walk.text_size(node) >= max(200, NOSCRIPT_PAGE_SHARE * self.total_chars):
            return True
        for img in node.css("img"):
            previous = node.prev
            while previous is not None and previous.tag == "-text":
                previous = previous.prev
            last = self._last_image
            parent = node.parent
            if (
                last is not None
                and self.page.blocks[-1] is last[0]  # no text between the placeholder and its <noscript>
                and not self.pieces
                and (
                    (previous is not None and previous.mem_id in last[1])
                    or (parent is not None and parent.mem_id in last[1])
                )
            ):
                placeholder = last[0]
                placeholder.fallbacks = [*(placeholder.fallbacks or ()), img]
            else:
                self.image(img, img.attributes, owner, linked)
        return False

    def video(self, node: LexborNode, attrs: dict[str, str | None], owner: int) -> None:
        raw = attrs.get("src") or attrs.get("data-src")
        if not raw:
            for child in node.iter():
                if child.tag == "source" and child.attributes.get("src"):
                    raw = child.attributes["src"]
                    break
        url = resolve_url(self.base_url, raw)
        if url is not None:
            media = {
                "url": url, "alt": None, "title": _clean(attrs.get("title")), "figcaption": _figcaption(node),
                "width": _int_size(attrs.get("width")), "height": _int_size(attrs.get("height")),
            }  # fmt: skip
            self.page.blocks.append(_Block("video", owner, self.dom_index, media=media))

    # -- the walk
    def walk(self, root: LexborNode) -> _Page:
        """The page's blocks. The per-node loop is compiled (m3w/pipeline/html_walk.pyx); it calls back into this
        walker for media, <noscript> and furniture, and into _VOCABULARY for tags, class names and hidden
        elements."""
        self.total_chars = html_walk.text_size(root)
        self._root = root
        page = self.page
        page.tag.append(root.tag or "body")
        page.parent.append(-1)
        page.content_hint.append(0)
        options = self.options
        if not html_walk.walk(
            root, self, _VOCABULARY, page.tag, page.parent, page.content_hint, page.blocks, self.pieces,
            options.max_depth, options.main_content,
        ):  # fmt: skip
            raise PageSkip("nesting", f"DOM deeper than {options.max_depth}")
        return page


def _figcaption(node: LexborNode) -> str | None:
    """The caption of the <figure> (up to 4 levels up) holding this image or video."""
    parent, depth = node.parent, 0
    while parent is not None and depth < 4:
        if parent.tag == "figure":
            caption = parent.css_first("figcaption")
            return _clean(caption.text(separator=" ")) if caption is not None else None
        parent, depth = parent.parent, depth + 1
    return None


# ---------------------------------------------------------------------------------------------- main content


def _select_main(
    page: _Page, options: PageOptions, og_image: str | None, resolve: Callable[[_Block], bool]
) -> list[_Block]:
    n = len(page.tag)
    if not n:
        return []
    parent = page.parent
    if not options.main_content:
        return page.blocks
    # Per element sums over its subtree: each block adds to its owner, then (elements are numbered in pre-order,
    # so a parent's number is below its children's) every element adds into its parent, last to first.
    text_len = [0] * n
    link_len = [0] * n
    has_h1 = [False] * n
    balance = [0.0] * n
    min_chars = options.min_paragraph_chars
    for b in page.blocks:
        if b.kind != "text":
            continue
        e, length = b.owner, len(b.text)
        text_len[e] += length
        link_len[e] += b.link_chars
        if b.level:
            has_h1[e] = has_h1[e] or b.level == 1
        elif length >= min_chars and b.link_chars <= 0.3 * length:
            # Content mass: prose (long, few links) counts for an element, link text and short fragments against
            # it. The best element maximises prose - noise, so it grows exactly while growing adds more prose.
            balance[e] += length - b.link_chars
        else:
            balance[e] -= b.link_chars + 0.5 * (length - b.link_chars)
    for e in range(n - 1, 0, -1):
        if text_len[e]:  # an element without text adds nothing to any sum
            p = parent[e]
            text_len[p] += text_len[e]
            link_len[p] += link_len[e]
            balance[p] += balance[e]
            if has_h1[e]:
                has_h1[p] = True

    def density(e: int) -> float:
        return link_len[e] / text_len[e] if text_len[e] else 0.0

    hints = page.content_hint
    for e in [e for e, hint in enumerate(hints) if hint == 2]:
        if balance[e] > 0:
            balance[e] *= 1.5  # <article>, <main>, itemprop=articleBody: the page says where its content is
    # The best balance, ties going to the stronger content hint, then to the first element.
    best = max(balance)
    top = max((e for e, value in enumerate(balance) if value == best), key=hints.__getitem__)
    listing = balance[top] < FALLBACK_PROSE * text_len[0]
    if listing:
        # Little or no prose anywhere (a listing, a gallery, a results table): everything that is not furniture,
        # teasers included (their summaries are the page's text; short links still go as navigation).
        top = 0
    selected = _widen_to_headline(page, top, text_len, has_h1)

    end = _subtree_end(parent, selected)
    keep = [selected <= b.owner < end for b in page.blocks]
    for i, b in enumerate(page.blocks):
        if not keep[i]:
            continue
        if b.kind == "text" and not b.level:
            # Link lists inside the content ("Read more", tag clouds, related stories) are furniture too.
            if listing and len(b.text) >= LISTING_TEASER_CHARS:
                continue
            if b.link_chars > 0.6 * len(b.text) or (density(b.owner) > 0.6 and text_len[b.owner] < 1000):
                keep[i] = False
        elif b.kind != "text" and density(b.owner) > 0.6 and text_len[b.owner] > 0:
            keep[i] = False  # teaser thumbnails whose captions are links
    _trim_edges(page, keep)
    _drop_announced_sections(page, keep)
    _drop_orphan_headings(page.blocks, keep)
    _keep_lead_image(page.blocks, keep, og_image, resolve)
    return [b for b, k in zip(page.blocks, keep, strict=True) if k]


_DATELINE = re.compile(r"\b(19|20)\d\d\b|\b\d{1,2}:\d\d\b")
_CREDIT = re.compile(
    r"^[\s(\[]*((©|\(c\)|foto|photo|bild|image|credit|quelle|source|fuente|crédit|abbildung)s?\b"
    r"( photos?)?\s*[:/|]|(photo|photograph|picture|image|foto)s? (by|von|de)\b)",
    re.I,
)
# Picture agencies and wire services: a line of a few words that names one is a photo credit ("iStock.com",
# "Augusta National/Getty Images", "aja/PAP"), however the site lays it out.
_AGENCY = re.compile(
    r"\b(i?stock(photo)?(\.com)?|shutterstock|thinkstock|getty ?images|clipdealer|adobe ?stock|fotolia|"
    r"depositphotos|123rf|dreamstime|pixabay|unsplash|pexels|imago|picture[- ]alliance|keystone|bestimage|"
    r"dpa|afp|ap photo|reuters|pap|ansa|efe|epa)\b",
    re.I,
)
CREDIT_WORDS = 5
# Lines that are the site talking, not the article: "follow us" prompts naming a social network, and the
# warnings a broken PHP install prints into the page.
_FOLLOW_PROMPT = re.compile(
    r"(?=.*\b(facebook|twitter|instagram|telegram|whatsapp|youtube|tiktok|linkedin|pinterest)\b)"
    r".*\b(follow|folg|sigue|síguenos|siguenos|suivez|rejoignez|seguici|segue|obserwuj|únete|join|abonn|canal|"
    r"channel|kanal)",
    re.I,
)
FOLLOW_PROMPT_CHARS = 120
# A site's cookie notice and its labelled ads, when no class or id gave them away.
_COOKIE_NOTICE = re.compile(
    r"\b(we (and our partners )?use|wir (verwenden|nutzen|setzen)|nous utilisons|usamos|utilizamos|utilizziamo|"
    r"korzystamy|wij gebruiken|we gebruiken)\b.{0,60}\bcookies\b|"
    r"\b(web)?(site|seite|sitio|sito)\b.{0,20}\b(uses|verwendet|nutzt|benutzt|utilise|utiliza|utilizza|używa|"
    r"gebruikt)\b.{0,40}\bcookies\b|\bcookies\b.{0,40}\b(verwendet|eingesetzt|utilisés|utilizadas|utilizzati)\b",
    re.I,
)
# What a notice says besides "cookies" (a recipe's "we use chocolate cookies" says none of it).
_COOKIE_CONTEXT = re.compile(
    r"website|webseite|browser|experience|erfahrung|consent|zustimm|einwillig|accept|akzept|privacy|datenschutz|"
    r"analy|personali|expérience|navigat|navegación|utente|przeglądar|prywatno|ervaring|toestemming",
    re.I,
)
COOKIE_NOTICE_CHARS = 600  # a notice says it in its first sentence (COOKIE_NOTICE_HEAD chars)
COOKIE_NOTICE_HEAD = 150
_LABELLED_AD = re.compile(
    r"(anzeige|werbung|advertisement|sponsored|publicidad|publicité|pubblicità|reklama)\s*[-–:|]", re.I
)
NOTICE_CHARS = 200
_PHP_WARNING = re.compile(
    r"(warning|notice|deprecated|strict standards|fatal error|parse error)\s*:.* on line \d+", re.I
)
PROSE_CHARS = 80
# Link text share of a big region called furniture above which it is navigation: an article's inline links stay
# under the first; a region named furniture by its tag, role or a strong word gets only the second.
ARTICLE_LINK_SHARE = 0.2
NAVIGATION_LINK_SHARE = 0.1
NOSCRIPT_PAGE_SHARE = 0.4  # a <noscript> holding this share of the page's text is the page, not a fallback
FALLBACK_PROSE = 0.2  # the best element's prose balance, as a share of the page's text, below which none wins
AFTER_REGION_SHARE = 0.15  # see _drop_trailing_regions
LISTING_TEASER_CHARS = 60  # on a listing page, linked text this long is a teaser summary, not navigation


def _is_meta_line(text: str) -> bool:
    """Datelines, "updated" stamps, photo credits, "follow us" prompts, cookie notices, labelled ads and PHP
    warnings: short lines that frame an article but are not its text."""
    if _PHP_WARNING.match(text) or (len(text) < FOLLOW_PROMPT_CHARS and _FOLLOW_PROMPT.match(text)):
        return True
    if len(text) < NOTICE_CHARS and _LABELLED_AD.match(text):
        return True
    if (
        len(text) < COOKIE_NOTICE_CHARS and "ookie" in text
    ):  # a substring test first: most lines say no cookie
        head = text[:COOKIE_NOTICE_HEAD]
        if _COOKIE_NOTICE.search(head) and _COOKIE_CONTEXT.search(text):
            return True
    if len(text) >= 80:
        return False
    words = len(text.split())
    return (
        bool(_CREDIT.match(text))
        or (words <= 8 and bool(_DATELINE.search(text)))
        or (words <= CREDIT_WORDS and bool(_AGENCY.search(text)))
    )


def _trim_edges(page: _Page, keep: list[bool]) -> None:
    """Short text before the first and after the last prose paragraph of the article body is its frame
    (bylines, dates, "share this", author boxes, newsletter prompts), not its text; so are trailing subheadings
    and linked thumbnails ("Read next"). Everything between the first and last body paragraph stays.

    The article body is the container holding the most prose; short lines after it in other containers
    (author boxes, donation and newsletter prompts between the body and the last prose) go too. A plain <p>
    among the body's own paragraphs stays whatever its length: an opening question, a closing greeting."""
    blocks, parent = page.blocks, page.parent
    prose = [
        i for i, b in enumerate(blocks)
        if keep[i] and b.kind == "text" and not b.level and len(b.text) >= PROSE_CHARS
    ]  # fmt: skip
    if not prose:
        return
    mass: Counter = Counter()
    for i in prose:
        mass[parent[blocks[i].owner]] += len(blocks[i].text)
    body = mass.most_common(1)[0][0]

    body_end = _subtree_end(parent, body)

    def in_body(e: int) -> bool:
        return body <= e < body_end

    first, last = prose[0], prose[-1]
    last_in_body = max(i for i in prose if in_body(blocks[i].owner))
    for i, b in enumerate(blocks):
        if not keep[i] or b.kind == "video":
            continue
        if b.kind == "image" or b.level:
            if i > last and (b.linked or b.level > 1):
                keep[i] = False  # "Read next" headings and teaser thumbnails after the article
            continue
        if b.block in ("list_item", "table_cell", "quote", "code") or (
            b.block == "caption" and i and blocks[i - 1].kind == "image" and keep[i - 1]
        ):
            # Lists and tables at the edges are content (ingredients, fact boxes); so is a kept image's caption.
            keep[i] = b.block == "table_cell" or not _is_meta_line(b.text)
            continue
        if (
            parent[b.owner] == body
            and page.tag[b.owner] == "p"
            and not b.link_chars
            and not _is_meta_line(b.text)
        ):
            continue
        if i > last and len(b.text) < 2 * PROSE_CHARS:
            keep[i] = False
        elif i > last_in_body and len(b.text) < 0.75 * PROSE_CHARS and not in_body(b.owner):
            keep[i] = False
        elif (i < first and len(b.text) < PROSE_CHARS) or _is_meta_line(b.text):
            keep[i] = False
    _drop_trailing_regions(page, keep, body, prose, last_in_body, in_body)


# Titles of what pages append to an article, in the languages of the crawl's largest shares. Matched against a
# whole heading or short line (trailing colon and punctuation ignored): they announce sections, not content.
_SECTION_TITLES = re.compile(
    r"(related( articles| stories| posts| content| topics)?|read (more|next|also)|see also|more (on|about) (this|the)"
    r"( topic| story)?|you (may|might) also like|recommended( for you| articles| stories)?|about the author|"
    r"advertisement|sponsored( content)?|subscribe( now)?( to our newsletter)?|newsletter|tags|share( this)?( article| "
    r"post)?|leave a (reply|comment)|comments?|most (read|popular|viewed|shared)( stories| articles)?( in [\w ]+)?|"
    r"popular (posts|stories|articles)|trending( now)?|discover more( [\w ]+)?|"
    r"(meist|viel) gelesen(e artikel)?( in [\w ]+)?|schon gelesen|entdecke (mehr|weitere)( [\w ]+)?|"
    r"mehr zu(m thema| diesem thema| [\w ]+)?|weitere (informationen|artikel|beiträge|themen|nachrichten|news)|zum weiterlesen|"
    r"lesen sie (auch|mehr|dazu)( die folgenden beiträge)?|auch interessant|das könnte sie (auch )?interessieren|"
    r"über (den autor|die autorin)|kontakt|anzeige|werbung|neueste artikel|ähnliche (artikel|beiträge)|"
    r"verwandte (artikel|themen)|empfehlungen|schlagworte|kommentare|teilen|"
    r"(à )?lire aussi|sur le même sujet|articles similaires|en savoir plus|à propos de l'auteur|publicité|"
    r"(también )?te puede interesar|noticias relacionadas|lee también|más información|publicidad|sobre el autor|"
    r"leggi anche|articoli correlati|potrebbe interessarti|pubblicità|"
    r"zobacz (też|także)|czytaj (też|także|więcej)|polecane|reklama|"
    r"lees ook|meer over dit onderwerp|gerelateerde artikelen|leia (também|mais)|veja também|notícias relacionadas|"
    r"publicidade)",
    re.I,
)
SECTION_TITLE_CHARS = 45
_AD_LABELS = re.compile(
    r"advertisement|sponsored( content)?|anzeige|werbung|publicité|publicidad|pubblicità|reklama|publicidade",
    re.I,
)


def _is_section_title(text: str) -> bool:
    return len(text) <= SECTION_TITLE_CHARS and bool(_SECTION_TITLES.fullmatch(text.strip(" :.!?…-–|»«\"'")))


def _drop_announced_sections(page: _Page, keep: list[bool]) -> None:
    """A heading or short line that names an appended section ("Related articles", "Mehr zum Thema", "Über den
    Autor") goes, and so does what follows it up to the next heading or the next paragraph of the article body
    (the container holding most prose), whichever comes first. An ad slot's label ("Advertisement") goes alone."""
    blocks, parent = page.blocks, page.parent
    body_mass: Counter = Counter()
    for i, b in enumerate(blocks):
        if keep[i] and b.kind == "text" and not b.level and len(b.text) >= PROSE_CHARS:
            body_mass[parent[b.owner]] += len(b.text)
    body = body_mass.most_common(1)[0][0] if body_mass else -2
    dropping = False
    for i, b in enumerate(blocks):
        if not keep[i] or b.kind != "text":
            if dropping and keep[i] and b.kind == "image" and b.linked:
                keep[i] = False
            continue
        if _is_section_title(b.text):
            keep[i] = False
            # An ad slot's label goes alone: the article often goes on after the slot, in another container.
            dropping = not _AD_LABELS.fullmatch(b.text.strip(" :.!?…-–|»«\"'"))
            continue
        if b.level or (parent[b.owner] == body and len(b.text) >= PROSE_CHARS):
            dropping = False
        elif dropping:
            keep[i] = False


def _drop_trailing_regions(
    page: _Page, keep: list[bool], body: int, prose: list[int], last_in_body: int, in_body: Any
) -> None:
    """What follows the article body in other containers, when such a container carries little prose of its own
    (under AFTER_REGION_SHARE of the body's), is what follows an article: author boxes, "read more" and "you
    may also like" sections, newsletter and donation prompts. A *region* is the container, one step out of the
    body's line of ancestors, that holds a block. Lists and tables without links stay: facts, ingredients,
    specifications."""
    blocks, parent = page.blocks, page.parent
    body_line = set()
    e = body
    while e >= 0:
        body_line.add(e)
        e = parent[e]

    def region(e: int) -> int:
        while e >= 0 and e not in body_line and parent[e] not in body_line:
            e = parent[e]
        return e

    body_prose = 0
    region_prose: Counter = Counter()
    for i in prose:
        owner = blocks[i].owner
        if in_body(owner):
            body_prose += len(blocks[i].text)
        else:
            region_prose[region(owner)] += len(blocks[i].text)
    for i in range(last_in_body + 1, len(blocks)):
        b = blocks[i]
        if not keep[i] or b.kind != "text" or in_body(b.owner):
            continue
        if b.block in ("list_item", "table_cell", "code", "quote") and not b.link_chars:
            continue
        if region_prose[region(b.owner)] < AFTER_REGION_SHARE * body_prose:
            keep[i] = False


_SIZE_TOKENS = re.compile(
    r"([-_.@](\d{2,4}x\d{0,4}|\d{0,4}x\d{2,4}|s\d{2,4}(-c\d+)?|\d+x|scaled|thumb(nail)?|small|medium|large))+$"
)
_GENERIC_NAMES = frozenset(
    "image img photo picture undefined original default master large full index".split()
)


@functools.lru_cache(maxsize=1024)
def image_identity(url: str) -> str:
    """What makes two URLs the same picture at different sizes: the file name without extension and size
    tokens (`photo-1024x683.jpg`, `photo-s1800-c85.webp`, `/w_1600,c_limit/photo.jpg`); the whole path when the
    name says nothing (`/photos/61979e49/1:1/pass/undefined`). Cached: a page asks for a kept image's identity
    when it looks for its lead image and again when it drops repeated pictures."""
    path = urlsplit(url).path.rstrip("/").lower()
    name = path.rsplit("/", 1)[-1]
    stem = _SIZE_TOKENS.sub("", name.rsplit(".", 1)[0] if "." in name else name)
    return path if len(stem) < 6 or stem in _GENERIC_NAMES else stem


def _keep_lead_image(
    blocks: list[_Block], keep: list[bool], og_image: str | None, resolve: Callable[[_Block], bool]
) -> None:
    """The page's declared lead image (og:image) is content wherever it sits, e.g. in a hero above the article
    container. Matched by `image_identity`: og:image is often another size of the same picture. Only images whose
    attributes mention that identity are resolved to check."""
    if not og_image:
        return
    key = image_identity(og_image)
    for i, b in enumerate(blocks):
        if b.kind != "image":
            continue
        if not keep[i]:
            sources = [
                *(b.attrs or {}).values(),
                *(v for f in b.fallbacks or () for v in f.attributes.values()),
            ]
            if key not in " ".join(v for v in sources if v).lower():
                continue
        if resolve(b) and image_identity(b.media["url"]) == key:
            keep[i] = True
            return


def _drop_orphan_headings(blocks: list[_Block], keep: list[bool]) -> None:
    """A heading (below h1) whose section kept nothing ("Related articles", "Comments") goes with its section."""
    has_content_after = False
    for i in range(len(blocks) - 1, -1, -1):
        b = blocks[i]
        if b.level:
            if keep[i] and b.level > 1 and not has_content_after:
                keep[i] = False
            has_content_after = keep[i]  # a kept subheading is content for the heading above it
        elif keep[i]:
            has_content_after = True


def _subtree_end(parent: list[int], e: int) -> int:
    """One past the last element under `e` (-1: the whole page). Elements are numbered in pre-order, so an
    element's subtree is the run of numbers from its own up to the first element whose parent comes before it."""
    end = e + 1
    while end < len(parent) and parent[end] >= e:
        end += 1
    return end


def _widen_to_headline(page: _Page, top: int, text_len: list[int], has_h1: list[bool]) -> int:
    """Climb from the content root to the ancestor holding the headline (h1), when that adds little text.

    That ancestor is usually the article wrapper with headline, byline and lead image."""
    e = top
    budget = max(0.3 * text_len[top], 400)
    while e > 0 and not has_h1[e]:
        e = page.parent[e]
        if text_len[e] - text_len[top] > budget:
            return top
    return e if e > 0 else top


# ---------------------------------------------------------------------------------------------- page API


@dataclass
class ExtractedPage:
    title: str | None
    lang: str | None
    og_image: str | None
    nodes: list[dict[str, Any]]
    image_drops: Counter


def _head_info(tree: LexborHTMLParser, page_url: str) -> tuple[str, str | None, str | None, str | None]:
    """(base URL, title, lang, og:image) of a page. The first <base href> and <title> and the <meta> tags come from
    one pass of lexbor's selector engine (in document order), not one pass each."""
    base_node = title_node = None
    metas = []
    for node in tree.css("base[href], title, meta[property], meta[name]"):
        tag = node.tag
        if tag == "meta":
            metas.append(node)
        elif tag == "title":
            title_node = node if title_node is None else title_node
        elif base_node is None:
            base_node = node
    base = page_url
    if base_node is not None:
        resolved = resolve_url(page_url, base_node.attributes.get("href"))
        base = resolved or base
    title = _clean(title_node.text()) if title_node is not None else None
    og_image = None
    for meta in metas:
        attrs = meta.attributes
        key = (attrs.get("property") or attrs.get("name") or "").lower()
        if key in ("og:image", "og:image:url", "og:image:secure_url", "twitter:image", "twitter:image:src"):
            og_image = resolve_url(base, attrs.get("content") or attrs.get("value")) or og_image
            if og_image and key.startswith("og:"):
                break
    html = tree.root  # the document element: the parser makes every <html> tag's attributes its own
    lang = _clean(html.attributes.get("lang")) if html is not None and html.tag == "html" else None
    return base, title, lang, og_image


def extract_page(html: str | bytes, page_url: str, options: PageOptions | None = None) -> ExtractedPage:
    """Parse one decoded page (str, or UTF-8 bytes) into ordered nodes (the document's `nodes` column) and page
    metadata."""
    options = options or PageOptions()
    tree = LexborHTMLParser(html)
    # Removed up front (in C) so the text measures used to judge furniture see only visible text. <noscript> stays:
    # it holds the real images of lazy loaders, and sometimes a whole page.
    tree.strip_tags(["script", "style", "template", "svg"])
    base, title, lang, og_image = _head_info(tree, page_url)
    body = tree.body or tree.root
    if body is None:
        raise PageSkip("empty", "no <body>")
    walker = _Walker(base, options)
    page = walker.walk(body)
    selected = _select_main(page, options, og_image, walker.resolve_image)
    blocks = [b for b in selected if b.kind != "image" or walker.resolve_image(b)]
    nodes = []
    seen_images: set[str] = set()
    for b in blocks:
        if b.kind == "image":
            identity = image_identity(b.media["url"])
            if identity in seen_images:  # the same picture again (responsive variants, a lightbox copy)
                page.image_drops["duplicate"] += 1
                continue
            seen_images.add(identity)
        node: dict[str, Any] = {"kind": b.kind, "node_index": len(nodes), "dom_index": b.dom_index}
        if b.kind == "text":
            node.update(text=b.text, block=b.block)
        else:
            node.update(b.media)
        nodes.append(node)
    # Each image is counted once: kept, dropped with its reason, or outside the content (an image the lead-image
    # check resolved and dropped, outside the content, already has its reason).
    in_content = {id(b) for b in selected}
    outside = sum(b.kind == "image" and not b.dropped and id(b) not in in_content for b in page.blocks)
    if outside:
        page.image_drops["outside_content"] += outside
    return ExtractedPage(title=title, lang=lang, og_image=og_image, nodes=nodes, image_drops=page.image_drops)
