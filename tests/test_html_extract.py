"""Unit tests of one page → document: URL resolution, image candidates, encodings, blocks, main content; and
the failure kinds of issue 16 on real webcorpus pages (lost articles, content images against a hand-checked
truth)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from selectolax.lexbor import LexborHTMLParser

from m3w.pipeline import html_walk
from m3w.pipeline.html_extract import (
    PageOptions,
    PageSkip,
    decode_html,
    extract_page,
    image_identity,
    largest_candidate,
    parse_srcset,
    resolve_url,
)

IMAGE_TRUTH = Path(__file__).parent / "data" / "content_images.json"

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
    assert largest_candidate(parse_srcset("a.jpg 100w,b.jpg 200w")) == "b.jpg"
    assert images('<img src="small.jpg" srcset="m.jpg 600w, l.jpg 1200w">') == [
        "https://news.example.com/world/2024/l.jpg"
    ]


@pytest.mark.parametrize(
    ("srcset", "expected"),
    [
        # A URL runs to whitespace: commas inside it stay (image CDNs), even right before a descriptor's digit.
        (
            "https://res.cloudinary.com/x/image/upload/t_fit-760w,f_auto,q_auto:best/v1/a.jpg 760w, "
            "https://res.cloudinary.com/x/image/upload/t_fit-1520w,f_auto,q_auto:best/v1/a.jpg 1520w",
            [
                (
                    "https://res.cloudinary.com/x/image/upload/t_fit-760w,f_auto,q_auto:best/v1/a.jpg",
                    760.0,
                    "w",
                ),
                (
                    "https://res.cloudinary.com/x/image/upload/t_fit-1520w,f_auto,q_auto:best/v1/a.jpg",
                    1520.0,
                    "w",
                ),
            ],
        ),
        (
            "https://i.x/w_80,h_80/a.jpg 80w,https://i.x/w_800,h_800/a.jpg 800w",
            [("https://i.x/w_80,h_80/a.jpg", 80.0, "w"), ("https://i.x/w_800,h_800/a.jpg", 800.0, "w")],
        ),
        ("  a.jpg,  b.jpg 2x ,c.jpg 3x", [("a.jpg", 1.0, "x"), ("b.jpg", 2.0, "x"), ("c.jpg", 3.0, "x")]),
        ("a.jpg 100w 200h, b.jpg 1.5x", [("a.jpg", 100.0, "w"), ("b.jpg", 1.5, "x")]),
        # Invalid candidates are dropped, as browsers drop them: a repeated or mixed descriptor, garbage.
        ("a.jpg 100w 2x, b.jpg 2x 3x, c.jpg big, d.jpg 300w", [("d.jpg", 300.0, "w")]),
        (",,, ", []),
    ],
)
def test_srcset_is_parsed_by_the_html_standard(srcset, expected):
    assert parse_srcset(srcset) == expected


def test_srcset_urls_with_commas_stay_whole_in_documents():
    body = (
        '<img src="https://res.cloudinary.com/x/image/upload/t_fit-100w,f_auto/v1/a.jpg" '
        'srcset="https://res.cloudinary.com/x/image/upload/t_fit-760w,f_auto,q_auto:best/v1/a.jpg 760w, '
        'https://res.cloudinary.com/x/image/upload/t_fit-1520w,f_auto,q_auto:best/v1/a.jpg 1520w" width="760">'
    )
    nodes = page(f"<article><p>{PROSE}</p>{body}</article>")
    (image,) = [n for n in nodes if n["kind"] == "image"]
    assert image["url"] == "https://res.cloudinary.com/x/image/upload/t_fit-1520w,f_auto,q_auto:best/v1/a.jpg"
    assert image["width"] == 1520  # the chosen candidate's size, not the size it is shown at


def test_picture_sources_compete_with_img():
    body = (
        '<picture><source srcset="p-800.webp 800w, p-1600.webp 1600w" type="image/webp">'
        '<source data-srcset="q-400.jpg 400w"><img src="fallback.jpg" alt="A harbour"></picture>'
    )
    assert images(body) == ["https://news.example.com/world/2024/p-1600.webp"]


@pytest.mark.parametrize("attr", ["data-src", "data-lazy-src", "data-original", "data-old-src", "data-lazy"])
def test_lazy_load_attributes_beat_placeholder_src(attr):
    body = f'<img src="data:image/gif;base64,R0lGOD" {attr}="/media/real.jpg">'
    assert images(body) == ["https://news.example.com/media/real.jpg"]
    # A placeholder that is a real file (a grey square, a blurred preview) loses too.
    body = f'<img class="lazy" src="/img/ph.jpg" srcset="/img/ph.jpg 1x" {attr}="/media/real.jpg">'
    assert images(body) == ["https://news.example.com/media/real.jpg"]


def test_lazy_srcset_beats_the_placeholder():
    body = (
        '<img width="650" src="/uploads/placeholder_grey.jpg" data-lazy-src="/uploads/real-650.jpg" '
        'data-lazy-srcset="/uploads/real-650.jpg 650w, /uploads/real-315x170.jpg 315w">'
    )
    assert images(body) == ["https://news.example.com/uploads/real-650.jpg"]


def test_noscript_fallback_replaces_a_blurred_placeholder():
    # Medium: a 60-px blurred preview, an empty <img> scripts fill, the real image in <noscript>.
    body = (
        '<figure><div class="a"><div class="b"><img src="https://miro.medium.com/max/60/1*abc.png?q=20" '
        'width="540" height="304"></div><img class="c" width="540" height="304"><noscript>'
        '<img src="https://miro.medium.com/max/1080/1*abc.png" width="540" height="304" alt="A chart"></noscript>'
        "</div><figcaption>The chart.</figcaption></figure>"
    )
    nodes = page(f"<article><p>{PROSE}</p>{body}<p>{PROSE}</p></article>")
    (image,) = [n for n in nodes if n["kind"] == "image"]
    assert image["url"] == "https://miro.medium.com/max/1080/1*abc.png"
    assert image["alt"] == "A chart" and image["figcaption"] == "The chart."


def test_noscript_images_without_a_placeholder_count_and_text_does_not():
    body = (
        '<noscript><img src="/photos/inserted-by-script.jpg" alt="x"></noscript>'
        "<noscript>Please enable JavaScript to view the comments.</noscript>"
        '<noscript><img src="https://www.facebook.com/tr?id=1&amp;ev=PageView" width="1" height="1"></noscript>'
    )
    nodes = page(f"<article><p>{PROSE}</p>{body}<p>{PROSE}</p></article>")
    assert [n["url"] for n in nodes if n["kind"] == "image"] == [
        "https://news.example.com/photos/inserted-by-script.jpg"
    ]
    assert "JavaScript" not in " ".join(n.get("text") or "" for n in nodes)


def test_a_page_built_inside_noscript_is_extracted():
    article = f"<h1>The wall</h1><p>{PROSE}</p><p>{PROSE} Again.</p>"
    nodes = page(
        f"<noscript><div id='all'><div class='nav'><a href='/'>Home</a></div>{article}</div></noscript>"
    )
    text = " ".join(n.get("text") or "" for n in nodes)
    assert "The wall" in text and "Again." in text


def test_figure_heavy_list_items_keep_their_pictures():
    items = "".join(
        f'<li><figure><picture><source media="(min-width: 800px)" srcset="/p/{i}-1600.webp 1600w, '
        f'/p/{i}-800.webp 800w"><img src="/p/{i}-400.jpg" alt="Photo {i}"></picture>'
        f"<figcaption>Photo {i} of the harbour, taken from the pier at dawn.</figcaption></figure></li>"
        for i in range(4)
    )
    nodes = page(f"<article><h1>In pictures</h1><p>{PROSE}</p><ul class='gallery'>{items}</ul></article>")
    assert [n["url"] for n in nodes if n["kind"] == "image"] == [
        f"https://news.example.com/p/{i}-1600.webp" for i in range(4)
    ]
    assert [n["figcaption"] for n in nodes if n["kind"] == "image"][0].startswith("Photo 0 of the harbour")


def test_a_thumbnail_linked_to_its_image_stands_for_that_image():
    thumb = '<a href="/uploads/harbour.jpg"><img src="/uploads/harbour-70x70.jpg" width="70" height="70"></a>'
    big = '<a href="/uploads/pier.jpg"><img src="/uploads/pier-1024x683.jpg" width="1024" height="683"></a>'
    page_link = '<a href="/story-2.html"><img src="/uploads/teaser-150x150.jpg" width="150"></a>'
    assert images(thumb + big + page_link + f"<p>{PROSE}</p>") == [
        "https://news.example.com/uploads/harbour.jpg",
        "https://news.example.com/uploads/pier-1024x683.jpg",  # not a thumbnail: kept as shown
        "https://news.example.com/uploads/teaser-150x150.jpg",  # links to a page, not to an image
    ]


def test_the_same_picture_twice_is_one_image():
    body = (
        '<img src="/a/ap_1634-ec3bdb-s1800-c85.webp" width="900">'
        '<div class="enlarge"><img src="/a/ap_1634-ec3bdb-s1200.jpg" width="900"></div>'
        '<img src="/a/other-photo.jpg" width="900">'
    )
    html = f"<html><body><article><p>{PROSE}</p>{body}<p>{PROSE}</p></article></body></html>"
    result = extract_page(html, PAGE_URL)
    assert [n["url"] for n in result.nodes if n["kind"] == "image"] == [
        "https://news.example.com/a/ap_1634-ec3bdb-s1800-c85.webp",
        "https://news.example.com/a/other-photo.jpg",
    ]
    assert result.image_drops["duplicate"] == 1
    assert image_identity("https://x/photos/61979e49/1:1/pass/undefined") != image_identity(
        "https://x/photos/638a0bbf/1:1/pass/undefined"
    )  # a name that says nothing: the path decides


def test_byline_and_author_photos_are_not_content():
    body = (
        '<div class="byline__photo"><img src="/people/jane.jpg" width="100"></div>'
        '<div class="author-box"><span><img src="/people/joe.jpg" width="100"></span></div>'
        '<img src="/photos/harbour.jpg" width="800">'
    )
    assert images(body) == ["https://news.example.com/photos/harbour.jpg"]


def test_ruby_readings_are_not_text():
    nodes = page("<p>子どもへの<ruby>虐待<rt>ぎゃくたい</rt></ruby>をなくすための<ruby>法律<rp>(</rp><rt>ほうりつ</rt>"
                 "<rp>)</rp></ruby>ができました。子どもを守るための新しい法律です。</p>")  # fmt: skip
    assert (
        nodes[0]["text"] == "子どもへの虐待をなくすための法律ができました。子どもを守るための新しい法律です。"
    )


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


@pytest.mark.parametrize("where", ["hero", "article"])
def test_an_image_the_lead_image_check_drops_is_counted_once(where):
    # og:image names a picture shown as a 16 px icon: the lead-image check resolves it, finds an icon and drops it.
    # It is one image, so one count: not "icon" and "outside_content", nor "icon" twice.
    head = '<meta property="og:image" content="https://news.example.com/media/lead-7.jpg">'
    icon = '<img src="/media/lead-7.jpg" width="16" height="16">'
    photo = '<img src="/photos/harbour.jpg" width="800" height="533">'
    hero, inside = (f"<div class=hero>{icon}</div>", "") if where == "hero" else ("", icon)
    html = (
        f"<html><head>{head}</head><body>{hero}<article><p>{PROSE}</p>{inside}{photo}</article></body></html>"
    )
    result = extract_page(html, PAGE_URL)
    assert [n["url"] for n in result.nodes if n["kind"] == "image"] == [
        "https://news.example.com/photos/harbour.jpg"
    ]
    assert dict(result.image_drops) == {"icon": 1}


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


def test_photo_credits_and_boxes_around_the_article_are_not_its_text():
    """Credit lines (agency names, "(Foto: ...)", "Crédits photos :"), author bio boxes, affiliate notes and
    disclaimers, "follow us" prompts, PHP warnings and hyphenated furniture names go; a class naming related
    posts is furniture though it also says "post". Short paragraphs that merely mention an agency or a social
    network in a sentence of their own stay."""
    older = (
        "An older story on the harbour, from the archive of the paper, with a long summary of what it said"
    )
    related = "".join(
        f"<li><a href='/r{i}'>Older story {i}</a><small>{older}.</small></li>" for i in range(3)
    )
    body = (
        f"<article><h1>The wall</h1><figure><img src='/p/wall.jpg' width='900'><figcaption>The harbour wall"
        f"</figcaption></figure><p>iStock.com</p><p>(Foto: ABr)</p><p>Crédits photos : Bestimage</p>"
        f"<p>Augusta National/Getty Images</p><p>{PROSE}</p><p>Reuters reported the vote first, citing two "
        f"council members who asked not to be named.</p><div class='news-letter-section'><p>Sign up: our "
        f"newsletter brings the week's stories to your inbox every Friday morning.</p></div>"
        f"<p>{PROSE} End.</p><div class='affiliate-text'><p>We earn a commission when you buy through links "
        f"on this page, at no cost to you.</p></div><ul class='related_post wp_rp'>{related}</ul>"
        f"<div class='cbx-Author_InfoContainer'><p>Jane Doe covers local politics and the sea for the paper."
        f"</p></div><p>Síguenos en Telegram, Instagram, Facebook y Twitter</p><p class='aawp-disclaimer'>Prices "
        f"last updated on 2 May; links to the shop may earn us a small share of the price.</p><p>He said so on "
        f"Twitter and Facebook, and then again to the council on Friday, in a long speech.</p><br>"
        f"<b>Warning</b>: Creating default object from empty value in <b>/www/wp-includes/classes.php</b> on "
        f"line <b>407</b><br><p>ANZEIGE - Heute mal ausgehen? Wie wäre es mit dem Hafenrestaurant?</p><p>Diese "
        f"Website verwendet Cookies, damit wir dir die bestmögliche Benutzererfahrung bieten können. Wenn du "
        f"weiterliest, stimmst du zu.</p><p>We use chocolate cookies from the harbour bakery for the crust of "
        f"this cake, crushed with butter and pressed into the tin.</p></article>"
    )
    text = " ".join(n.get("text") or "" for n in page(body))
    assert "The harbour wall" in text and "End." in text and "Reuters reported the vote first" in text
    assert "He said so on Twitter and Facebook" in text and "We use chocolate cookies" in text
    for furniture in (
        "iStock",
        "ABr",
        "Bestimage",
        "Getty",
        "newsletter",
        "commission",
        "older story",
        "Jane Doe",
        "Síguenos",
        "Prices last updated",
        "Creating default object",
        "ANZEIGE",
        "verwendet Cookies",
    ):
        assert furniture not in text, furniture


def test_sections_announcing_more_of_the_site_go_and_a_wrapper_named_for_its_share_buttons_stays():
    """Titles like "Most read", "Viel gelesen in Handel", "Mehr zu Klima und Konsum", "Schon gelesen?" announce
    teasers, not content: they go with what follows them. A big region named furniture by a weak word (an
    article inside a "socialicons-sticky" wrapper) is walked though its prose links to sources; a comments area
    or a "related" list of the same size and link share is not."""
    linked = f"{PROSE[:120]} <a href='/src'>{PROSE[120:150]}</a>{PROSE[150:]}"  # a sixth of it linked
    teasers = "".join(f"<p><a href='/t{i}'>Teaser {i}</a> {PROSE}</p>" for i in range(2))
    body = (
        "<header><h1>The wall</h1></header><div class='sidebar'>"
        + "".join(f"<p>Sidebar note {i}: {PROSE}</p>" for i in range(3))
        + f"</div><div id='socialicons-sticky'>{''.join(f'<p>Para {i}. {linked}</p>' for i in range(3))}</div>"
        f"<div id='comments'>{''.join(f'<p>Comment {i}. {linked}</p>' for i in range(3))}</div>"
        f"<div class='related'>{''.join(f'<p>Related {i}. {linked}</p>' for i in range(3))}</div>"
    )
    text = " ".join(n.get("text") or "" for n in page(body))
    assert all(f"Para {i}." in text for i in range(3))
    assert "Comment 0." not in text and "Related 0." not in text
    for title in ("Most read", "Viel gelesen in Handel", "Mehr zu Klima und Konsum", "Schon gelesen?"):
        article = f"<h1>The wall</h1>{f'<p>{PROSE}</p>' * 3}<p>{PROSE} End.</p>"
        nodes = page(f"<article>{article}<div><h3>{title}</h3>{teasers}</div></article>")
        text = " ".join(n.get("text") or "" for n in nodes)
        assert "End." in text and title not in text and "Teaser" not in text, title


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


@pytest.mark.parametrize("declared", ["utf-8", "iso-8859-1", None])
def test_utf8_kept_as_bytes_is_validated_across_chunks(declared):
    """UTF-8 wanted as bytes is validated a chunk at a time, with the verdict decoding the whole page gives: a
    character cut by a chunk border is valid, and damage far past the first chunk counts."""
    page = (
        "<p>" + "é€😀" * 30_000 + "</p>"
    ).encode()  # 270 kB: 3- and 4-byte characters straddle the chunk borders
    damaged = (
        page[:200_000] + b"\xff" * 3_000 + page[200_000:]
    )  # over 1 % bad bytes, all after the first chunk
    one_bad = page[:200_000] + b"\xff" + page[200_000:]
    for body in (page, damaged, one_bad):
        text, codec = decode_html(body, declared)
        assert decode_html(body, declared, utf8_as_bytes=True) == (body if codec == "utf-8" else text, codec)
    assert decode_html(page, declared, utf8_as_bytes=True) == (page, "utf-8")
    assert decode_html(damaged, declared)[1] != "utf-8"


# ---------------------------------------------------------------------------------------------- real pages


def webcorpus_page(webcorpus: Path, record_id: str) -> tuple[str, str | bytes]:
    """(url, decoded html) of one webcorpus record, read at its manifest offset."""
    for line in gzip.open(webcorpus / "manifest.jsonl.gz"):
        entry = json.loads(line)
        if entry["warc_record_id"] == record_id:
            break
    with open(webcorpus / entry["warc_file"], "rb") as f:
        f.seek(entry["warc_offset"])
        record = gzip.decompress(f.read(entry["warc_length"]))
    body = record.split(b"\r\n\r\n", 2)[2].removesuffix(b"\r\n\r\n")
    return entry["target_uri"], decode_html(body, utf8_as_bytes=True)[0]


@pytest.mark.parametrize(
    "record_id",
    [
        "<urn:uuid:76a14ae8-1ab8-5ab5-8bc0-ac6318544a2d>",  # a forum thread: every post classed "comment"
        "<urn:uuid:cb3ab7e7-cfb4-5821-938c-c5701320b479>",  # the article in a "--wsidebar" wrapper
        "<urn:uuid:100767df-8151-5be3-bf67-45a5d8714035>",  # the article in an <aside> inside <main>
        "<urn:uuid:b834b914-1249-5454-b57c-79025a0e8a1d>",  # the whole page inside <noscript>
    ],
)
def test_articles_in_static_html_are_not_lost(webcorpus, record_id):
    url, html = webcorpus_page(webcorpus, record_id)
    truth = {}
    for line in gzip.open(webcorpus / "groundtruth" / "trafilatura_eval.jsonl.gz"):
        page = json.loads(line)
        truth[page["url"].strip()] = page
    text = " ".join(" ".join(n["text"].split()) for n in extract_page(html, url).nodes if n["kind"] == "text")
    snippets = truth[url.strip()]
    assert all(" ".join(s.split()) in text for s in snippets["with"]), text[:500]
    assert not any(" ".join(s.split()) in text for s in snippets["without"])


def test_content_images_match_the_hand_checked_truth(webcorpus):
    """Every image case of issue 16 on real pages (srcset URLs with commas, lazy placeholders and <noscript>
    fallbacks, teaser thumbnails, duplicates): recall and precision of the image nodes, and their order."""
    truth = json.loads(IMAGE_TRUTH.read_text())["pages"]
    assert len(truth) >= 25
    tp = fp = fn = pairs = ordered = 0
    for page in truth:
        url, html = webcorpus_page(webcorpus, page["record_id"])
        got = [image_identity(n["url"]) for n in extract_page(html, url).nodes if n["kind"] == "image"]
        expected = [image_identity(u) for u in page["images"]]
        tp += len(set(got) & set(expected))
        fp += len(set(got) - set(expected))
        fn += len(set(expected) - set(got))
        kept = [u for u in expected if u in got]
        pairs += max(len(kept) - 1, 0)
        ordered += sum(got.index(a) < got.index(b) for a, b in zip(kept, kept[1:]))
    recall, precision = tp / (tp + fn), tp / (tp + fp)
    print(f"\ncontent images: recall {recall:.3f}, precision {precision:.3f}, order {ordered / pairs:.3f}")
    assert recall >= 0.95 and precision >= 0.85 and ordered / pairs >= 0.98


@pytest.mark.parametrize(
    "text",
    [
        b"plain ascii \x1c",
        "\u00a0\u3000Stra\u00dfe \u65e5\u672c \U0001f600\u2028\u205f".encode(),  # Unicode spaces strip, others count
        "\u200bzero width\u200b".encode(),  # U+200B is not a space to str.strip()
        "\u0085next line\u1680".encode(),
        b"\xc3 cut \xe2\x82 sequences \xf0\x9f\x98",  # malformed bytes count as the U+FFFD they decode to
        b"\xc0\xaf overlong \xed\xa0\x80 surrogate \xf4\x90\x80\x80 too large \xff",
    ],
)
def test_text_size_counts_what_stripped_text_holds(text):
    """The compiled walk measures text without making strings; what it counts is the stripped text selectolax
    gives, in code points, whatever the bytes."""
    body = LexborHTMLParser(b"<body><p>" + text + b"</p><p> \xc2\xa0 </p><i>x</i></body>").body
    assert html_walk.text_size(body) == len(body.text(deep=True, strip=True, skip_empty=True))
