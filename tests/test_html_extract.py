"""Unit tests of one page → document: URL resolution, image candidates, encodings, blocks, main content."""

from __future__ import annotations

import pytest

from m3w.pipeline.html_extract import (
    PageOptions,
    PageSkip,
    decode_html,
    extract_page,
    largest_candidate,
    parse_srcset,
    resolve_url,
)

PAGE_URL = "https://news.example.com/world/2024/story.html"
PROSE = (
    "The council met on Tuesday evening, and after a long debate, it voted to rebuild the old harbour wall, "
    "which storms had damaged twice in the last decade, at a cost shared by the town and the region."
)


def page(body: str, head: str = "", url: str = PAGE_URL, **options) -> list[dict]:
    html = f"<html><head>{head}</head><body>{body}</body></html>"
    return extract_page(html, url, PageOptions(**options)).nodes


def images(body: str, head: str = "", **kw) -> list[str]:
    return [
        n["url"] for n in page(f"<article><p>{PROSE}</p>{body}</article>", head, **kw) if n["kind"] == "image"
    ]


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("photo.jpg", "https://news.example.com/world/2024/photo.jpg"),
        ("../img/a.png", "https://news.example.com/world/img/a.png"),
        ("../../../../x.jpg", "https://news.example.com/x.jpg"),
        ("/abs/b.jpg", "https://news.example.com/abs/b.jpg"),
        ("//cdn.example.net/c.jpg", "https://cdn.example.net/c.jpg"),
        ("http://other.org/d.jpg?x=1#f", "http://other.org/d.jpg?x=1#f"),
        ("  spaced.jpg  ", "https://news.example.com/world/2024/spaced.jpg"),
        ("data:image/png;base64,AAAA", None),
        ("javascript:void(0)", None),
        ("ftp://host/e.jpg", None),
        ("", None),
    ],
)
def test_resolve_url_rfc3986(ref, expected):
    assert resolve_url(PAGE_URL, ref) == expected


def test_base_href_wins_over_page_url_and_is_itself_resolved():
    head = '<base href="/static/v2/">'
    assert images('<img src="pic.jpg" width="600">', head) == ["https://news.example.com/static/v2/pic.jpg"]
    head = '<base href="https://cdn.example.org/assets/">'
    assert images('<img src="../pic.jpg">', head) == ["https://cdn.example.org/pic.jpg"]


def test_srcset_largest_by_width_then_density():
    cands = parse_srcset("a.jpg 320w, b.jpg 1280w, c.jpg 640w")
    assert largest_candidate(cands) == "b.jpg"
    assert largest_candidate(parse_srcset("a.jpg, b.jpg 2x, c.jpg 1.5x")) == "b.jpg"
    # URLs with commas inside (image CDNs) survive when candidates are separated by ", ".
    cands = parse_srcset("https://cdn.x/w_300,h_200/a.jpg 300w, https://cdn.x/w_900,h_600/a.jpg 900w")
    assert largest_candidate(cands) == "https://cdn.x/w_900,h_600/a.jpg"
    assert largest_candidate(parse_srcset("a.jpg 100w,b.jpg 200w")) == "b.jpg"
    assert images('<img src="small.jpg" srcset="m.jpg 600w, l.jpg 1200w">') == [
        "https://news.example.com/world/2024/l.jpg"
    ]


def test_picture_sources_compete_with_img():
    body = (
        '<picture><source srcset="p-800.webp 800w, p-1600.webp 1600w" type="image/webp">'
        '<source data-srcset="q-400.jpg 400w"><img src="fallback.jpg" alt="A harbour"></picture>'
    )
    assert images(body) == ["https://news.example.com/world/2024/p-1600.webp"]


@pytest.mark.parametrize("attr", ["data-src", "data-lazy-src", "data-original"])
def test_lazy_load_attributes_beat_placeholder_src(attr):
    body = f'<img src="data:image/gif;base64,R0lGOD" {attr}="/media/real.jpg">'
    assert images(body) == ["https://news.example.com/media/real.jpg"]


def test_data_srcset_is_used():
    body = '<img src="/ph.gif" data-srcset="/m/a-300.jpg 300w, /m/a-900.jpg 900w">'
    assert images(body) == ["https://news.example.com/m/a-900.jpg"]


def test_data_uris_tracking_pixels_icons_are_skipped_and_counted():
    # Photos whose names merely contain a junk word are kept.
    assert images('<img src="/img/pixel-7-review.jpg"><img src="/music/tracks/cover.jpg">') == [
        "https://news.example.com/img/pixel-7-review.jpg",
        "https://news.example.com/music/tracks/cover.jpg",
    ]
    body = (
        '<img src="data:image/png;base64,iVBORw0KGgo=">'
        '<img src="https://stats.example.com/pixel.gif" width="1" height="1">'
        '<img src="https://www.facebook.com/tr?id=1&ev=PageView">'
        '<img src="/img/logo.png"><img src="/icons/share.svg"><img src="/img/spacer.gif">'
        '<img src="/photos/harbour.jpg" width="800" height="533">'
    )
    html = f"<html><body><article><p>{PROSE}</p>{body}</article></body></html>"
    result = extract_page(html, PAGE_URL)
    assert [n["url"] for n in result.nodes if n["kind"] == "image"] == [
        "https://news.example.com/photos/harbour.jpg"
    ]
    drops = result.image_drops
    assert drops["data_uri"] == 1 and drops["tracking"] == 3 and drops["icon"] == 2


def test_image_metadata_alt_title_figcaption_size():
    body = (
        '<figure><img src="/h.jpg" alt=" The  harbour " title="Wall" width="1024" style="height: 683px">'
        "<figcaption>The rebuilt <b>harbour</b> wall.</figcaption></figure>"
    )
    nodes = page(f"<article><p>{PROSE}</p>{body}</article>")
    image = next(n for n in nodes if n["kind"] == "image")
    assert image["alt"] == "The harbour" and image["title"] == "Wall"
    assert image["figcaption"] == "The rebuilt harbour wall."
    assert (image["width"], image["height"]) == (1024, 683)
    caption = next(n for n in nodes if n.get("block") == "caption")
    assert caption["text"] == "The rebuilt harbour wall."
    assert caption["node_index"] == image["node_index"] + 1


def test_video_sources_become_video_nodes():
    body = '<video poster="p.jpg" width="640"><source src="/v/clip.mp4" type="video/mp4"></video>'
    nodes = page(f"<article><p>{PROSE}</p>{body}</article>")
    video = [n for n in nodes if n["kind"] == "video"]
    assert video and video[0]["url"] == "https://news.example.com/v/clip.mp4" and video[0]["width"] == 640


def test_blocks_order_whitespace_and_line_breaks():
    body = (
        "<article><h1>Harbour  wall\nrebuilt</h1><p>First <b>bold</b>   and <i>italic</i> words,"
        " plenty of them to count as prose for the content scorer here.</p>"
        "<p>Line one<br>line two</p><ul><li>Item with enough words to stay in the list</li></ul>"
        "<table><tr><td>Cell text</td></tr></table><blockquote>A quote</blockquote><pre>x = 1\n  y = 2</pre>"
        "<script>var junk = 1;</script><style>p{}</style><noscript>no</noscript><template>t</template>"
        "<div hidden>secret</div><p style='display: none'>gone</p><span aria-hidden='true'>icon</span>"
        f"<p>{PROSE}</p></article>"
    )
    nodes = page(body)
    pairs = [(n["block"], n["text"]) for n in nodes]
    assert pairs[0] == ("heading", "Harbour wall rebuilt")
    assert pairs[1][1].startswith("First bold and italic words,")
    assert ("paragraph", "Line one\nline two") in pairs
    assert ("list_item", "Item with enough words to stay in the list") in pairs
    assert ("table_cell", "Cell text") in pairs
    assert ("quote", "A quote") in pairs
    assert ("code", "x = 1\n  y = 2") in pairs
    text = " ".join(t for _, t in pairs)
    for junk in ("junk", "secret", "gone", "icon", "no", "p{}"):
        assert junk not in text.split()
    assert [n["node_index"] for n in nodes] == list(range(len(nodes)))
    assert [n["dom_index"] for n in nodes] == sorted(n["dom_index"] for n in nodes)


def test_main_content_drops_furniture_and_keeps_content_tables():
    teaser = "".join(f"<li><a href='/s{i}'>Another story about something else {i}</a></li>" for i in range(8))
    body = (
        "<header><a href='/'>Example News</a><nav><a href='/w'>World</a><a href='/s'>Sport</a></nav></header>"
        "<div class='cookie-banner'>We use cookies to improve your experience on this site.</div>"
        "<main><h1>The wall</h1><img src='/p/lead.jpg' width='900'>"
        f"<p>{PROSE}</p><table><tr><td>{PROSE} Table prose.</td><td><img src='/p/t.jpg'></td></tr></table>"
        f"<div class='share-bar'><a href='/fb'>Share on Facebook</a></div><p>{PROSE} End.</p></main>"
        f"<aside><h2>Most read</h2><ul>{teaser}</ul></aside>"
        "<div id='comments'><p>Great article, thanks for writing it, I learned a lot today.</p></div>"
        "<footer><p>Copyright Example News. All rights reserved, everywhere, always.</p></footer>"
    )
    nodes = page(body)
    text = " ".join(n.get("text") or "" for n in nodes)
    assert "The wall" in text and "Table prose." in text and "End." in text
    for furniture in (
        "Example News",
        "Sport",
        "cookies",
        "Share on",
        "Another story",
        "Great article",
        "Copyright",
    ):
        assert furniture not in text
    assert [n["url"] for n in nodes if n["kind"] == "image"] == [
        "https://news.example.com/p/lead.jpg",
        "https://news.example.com/p/t.jpg",
    ]


def test_og_image_title_lang():
    head = (
        '<title> The  wall </title><meta property="og:image" content="/og/lead.jpg">'
        '<meta name="twitter:image" content="https://x.example/tw.jpg">'
    )
    html = f"<html lang='en-GB'><head>{head}</head><body><p>{PROSE}</p></body></html>"
    result = extract_page(html, PAGE_URL)
    assert result.og_image == "https://news.example.com/og/lead.jpg"
    assert result.title == "The wall" and result.lang == "en-GB"


def test_pathological_nesting_is_a_counted_skip_not_a_crash():
    html = "<html><body>" + "<div>" * 5000 + "deep" + "</div>" * 5000 + "</body></html>"
    with pytest.raises(PageSkip) as info:
        extract_page(html, PAGE_URL)
    assert info.value.reason == "nesting"


JAPANESE = "<html><head><title>日本語のページ</title>{meta}</head><body><p>東京都の天気は晴れです。吉田カバンのヘッドポーター。</p></body></html>"


@pytest.mark.parametrize("codec", ["shift_jis", "euc_jp", "cp932"])
def test_japanese_encodings_from_meta_header_and_detection(codec):
    html = JAPANESE.format(meta=f'<meta http-equiv="Content-Type" content="text/html; charset={codec}">')
    text, used = decode_html(html.encode(codec, errors="strict"))
    assert "東京都の天気は晴れです" in text and "\ufffd" not in text
    bare = JAPANESE.format(meta="") * 5  # no declaration at all: detected
    text, used = decode_html(bare.encode(codec), http_charset=None)
    assert "東京都の天気は晴れです" in text
    text, used = decode_html(bare.encode(codec), http_charset=codec.replace("_", "-"))
    assert "ヘッドポーター" in text


def test_decoding_bom_latin1_label_and_undecodable():
    assert decode_html(b"\xef\xbb\xbf<p>caf\xc3\xa9</p>", "iso-8859-1")[0] == "<p>café</p>"
    # Servers label UTF-8 pages iso-8859-1 all the time: valid UTF-8 wins.
    assert decode_html("<p>café</p>".encode(), "iso-8859-1") == ("<p>café</p>", "utf-8")
    assert decode_html("<p>café</p>".encode("cp1252"), "iso-8859-1")[0] == "<p>café</p>"
    assert decode_html(b"<p>caf\xe9</p>", "utf-8")[0]  # one bad byte is tolerated, not fatal
    with pytest.raises(PageSkip) as info:
        decode_html(bytes(range(128, 256)) * 200, "utf-8")
    assert info.value.reason == "undecodable"
