"""A small synthetic web, built deterministically, shaped like a Common Crawl crawl.

Pages are realistic in the ways that matter to the pipeline: navigation, footer, sidebar ads, a cookie banner and
related links around an article that interleaves paragraphs and images. Most articles describe Pillow-drawn
pictures (colour, shape, count, position) in their alt text, figcaptions and paragraphs, so a model trained on the
corpus can learn something measurable; others show the real photos of the webcorpus with their captions. Images
come as plain `src`, `srcset`, `<picture>` and lazy-loaded `data-src`; some links are broken. A few pages are there
to be filtered out (duplicates, link lists, other languages, thin pages).

Layout of `out/`:
    site/                                   served over HTTP by demo.run
        crawl-data/CC-MAIN-2099-01/warc.paths.gz
        crawl-data/CC-MAIN-2099-01/segments/<segment>/warc/*.warc.gz   one gzip member per record
        <section>/<page>.html, img/, ads/, static/, video/
    videos.jsonl                            the video-caption table (url, caption)
    eval/{captioning,vqa,classification}/{support,query}/   held-out items in COCO / VQAv2 / image-folder layout
    web.json                                what was built, with counts

Everything depends only on (seed, pages, base_url): the same arguments give byte-identical files.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import io
import json
import os
import random
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from PIL import Image, ImageDraw, ImageEnhance, ImageOps

CRAWL = "CC-MAIN-2099-01"
SEGMENT = "4099000000000.00"
WEBCORPUS = Path(
    os.environ.get("M3W_WEBCORPUS", Path(__file__).resolve().parents[3] / "shared" / "webcorpus")
)
CRAWL_START = datetime(2099, 1, 1, tzinfo=timezone.utc)

COLOURS = {
    "red": (215, 38, 38),
    "green": (34, 150, 60),
    "blue": (40, 80, 215),
    "yellow": (240, 205, 25),
    "purple": (135, 55, 175),
    "orange": (245, 125, 20),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
IMAGE_SIZE = 256
LAZY_PLACEHOLDER = "data:image/gif;base64,R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7"


@dataclass(frozen=True)
class Scene:
    """What a generated picture shows. The caption is the ground truth for every derived eval item."""

    colour: str
    shape: str
    count: int
    position: str

    @property
    def shape_word(self) -> str:
        return self.shape + ("s" if self.count > 1 else "")

    @property
    def caption(self) -> str:
        return f"{COUNT_WORDS[self.count]} {self.colour} {self.shape_word} {POSITIONS[self.position]}"

    @property
    def sentence(self) -> str:
        """The caption as the web's figcaptions write it: "Three red circles on the left." """
        return self.caption[0].upper() + self.caption[1:] + "."


def random_scene(rng: random.Random) -> Scene:
    return Scene(
        rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.randint(1, 4), rng.choice(list(POSITIONS))
    )


def draw_scene(scene: Scene, rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw `scene.count` shapes of one colour inside the half of the canvas named by `scene.position`."""
    background = tuple(rng.randint(236, 252) for _ in range(3))
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    half = size // 2
    region = {
        "left": (0, 0, half, size),
        "right": (half, 0, size, size),
        "top": (0, 0, size, half),
        "bottom": (0, half, size, size),
    }[scene.position]
    x0, y0, x1, y1 = region
    # Shapes sit on a grid inside the region so they never overlap and can be counted.
    cells = [(cx, cy) for cx in range(2) for cy in range(2)]
    rng.shuffle(cells)
    cell_w, cell_h = (x1 - x0) // 2, (y1 - y0) // 2
    base = COLOURS[scene.colour]
    for cx, cy in cells[: scene.count]:
        r = rng.randint(min(cell_w, cell_h) // 3, min(cell_w, cell_h) // 2 - 4)
        mx = x0 + cx * cell_w + cell_w // 2 + rng.randint(-3, 3)
        my = y0 + cy * cell_h + cell_h // 2 + rng.randint(-3, 3)
        fill = tuple(max(0, min(255, c + rng.randint(-15, 15))) for c in base)
        box = (mx - r, my - r, mx + r, my + r)
        if scene.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif scene.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(mx, my - r), (mx - r, my + r), (mx + r, my + r)], fill=fill)
    return img


def png_bytes(img: Image.Image) -> bytes:
    """Lossless, for drawn pictures (flat colours): the fastest zlib level, which is where a web build spends its
    time (level 6, Pillow's default, takes 3x as long for a few % fewer bytes)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def jpeg_bytes(img: Image.Image) -> bytes:
    """For the pictures of a kind (photographs' crops, as the web serves photographs): 20x faster than PNG."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# Fast binding (Frozen, Tsimpoukelli et al. 2021): a page binds made-up names to kinds of picture ("This is a
# dax."), and shows a kind again later under the same name. A kind is one real photograph (any crop of it) or a
# colour and a shape (any count, anywhere). Names are fresh on every page, so only the page itself can tell
# which name a picture has: a model that gets them right learned to bind in context.


@dataclass(frozen=True)
class Kind:
    key: str  # "photo:skimage_coffee" or "shape:red circle"
    photo: Path | None = None
    colour: str = ""
    shape: str = ""


def binding_kinds(webcorpus: Path) -> list[Kind]:
    """Every webcorpus photograph, and every colour × shape."""
    photos = sorted(p for p in (Path(webcorpus) / "photos").iterdir() if p.suffix.lower() in (".png", ".jpg"))
    return [Kind(f"photo:{p.stem}", photo=p) for p in photos] + [
        Kind(f"shape:{c} {s}", colour=c, shape=s) for c in COLOURS for s in SHAPES
    ]


@functools.lru_cache(maxsize=32)
def photo_pixels(path: Path) -> Image.Image:
    """A photograph decoded once (the views crop copies of it)."""
    with Image.open(path) as opened:
        return opened.convert("RGB")


def kind_view(kind: Kind, rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    """A new picture of `kind`: a random square crop of the photograph (55-100% of its shorter side, mirrored
    half the time, brightness ±15%), or the shapes drawn in a random number and place."""
    if kind.photo is None:
        scene = Scene(kind.colour, kind.shape, rng.randint(1, 4), rng.choice(list(POSITIONS)))
        return draw_scene(scene, rng, size)
    img = photo_pixels(kind.photo)
    side = int(min(img.size) * rng.uniform(0.55, 1.0))
    x, y = rng.randint(0, img.width - side), rng.randint(0, img.height - side)
    img = img.crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC)
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    return ImageEnhance.Brightness(img).enhance(rng.uniform(0.85, 1.15))


ONSETS = "bdfgklmnprstvz"
VOWELS = "aeiou"


def made_up_name(rng: random.Random) -> str:
    """Two syllables and a final consonant: "dakop", "mizet"."""
    return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(2)) + rng.choice(ONSETS)


def binding_caption(name: str) -> str:
    return f"This is a {name}."


# ---------------------------------------------------------------------------------------------------------------
# Text. Sentences are assembled from templates and per-page fillers, so pages share style but not paragraphs
# (near-duplicate detection must not mistake the articles for copies of each other).

NAMES = [
    "Ada",
    "Bruno",
    "Chiara",
    "Dmitri",
    "Esther",
    "Farid",
    "Greta",
    "Hiro",
    "Imani",
    "Jonas",
    "Kalani",
    "Lucia",
]
SURNAMES = [
    "Moreau",
    "Okafor",
    "Lindqvist",
    "Tanaka",
    "Alvarez",
    "Novak",
    "Haddad",
    "Brennan",
    "Kowalski",
    "Silva",
]
PLACES = [
    "Lisbon",
    "Tampere",
    "Osaka",
    "Valparaiso",
    "Leeds",
    "Graz",
    "Mombasa",
    "Quebec",
    "Tbilisi",
    "Hobart",
]
TOPICS = [
    "colour theory",
    "visual counting",
    "geometry lessons",
    "poster design",
    "pattern making",
    "art class",
]
INTRO = [
    "Every week {name} {surname} sends us a new set of pictures from a studio in {place}, and this issue is no exception.",
    "Our series on {topic} continues with {n} small drawings that a reader from {place} shared with the team.",
    "Teachers in {place} have used simple shapes for years to help children talk about colour, size and position.",
    "This note collects {n} pictures that {name} drew for a workshop on {topic} held in {place} last spring.",
    "The drawings below were made with nothing more than a ruler, a compass and a handful of bright paints.",
    "When {name} started the project in {year}, the goal was to describe each picture in plain and simple words.",
    "Readers often ask how we choose the pictures for these pages, so here is a short look behind the scenes.",
    "Simple pictures are a good way to practise describing what we see, and that is exactly what this page is about.",
]
FILLER = [
    "The canvas is almost white, which makes the colour stand out clearly from a distance.",
    "Nothing else appears in the frame, so the eye goes straight to the shapes.",
    "{name} says the hardest part was keeping the shapes apart so that they can be counted at a glance.",
    "It took about {n} minutes to paint, and the colours were mixed by hand.",
    "A reader from {place} wrote in to say that her class copied this one on the blackboard.",
    "The rest of the picture is left empty on purpose, because empty space helps the shapes breathe.",
    "We printed this one on thick paper for the exhibition in {place}, where it hung near the entrance.",
    "Some readers see a pattern here, while others see nothing more than a few simple shapes.",
    "If you look closely, the edges are not perfectly straight, which gives the drawing a friendly feel.",
    "This is one of the pictures that children in the {topic} workshop liked the most.",
    "The same idea works with paper cut-outs, which is how {name} first tried it in {year}.",
    "There is no hidden meaning in the picture, and that is exactly why it is useful for teaching.",
]
OUTRO = [
    "Next week we will look at {topic} again, with new pictures from {name} {surname}.",
    "If you would like to send us your own drawings, the address is at the bottom of this page.",
    "Thanks to everyone in {place} who helped with this issue of the series on {topic}.",
    "All pictures on this page may be reused for teaching, as long as you mention where they come from.",
]
DESCRIBE = [
    "In this picture there are {cw} {colour} {shapes} {pos}.",
    "The picture shows {cw} {colour} {shapes}, placed {pos} of a pale canvas.",
    "Here you can see {cw} {colour} {shapes} {pos}.",
    "This drawing has {cw} {colour} {shapes}, all of them {pos}.",
]
DETAIL = [
    "The shapes are {colour}.",
    "Each of the {shapes} is painted {colour}.",
    "There are {cw} {shapes} in total, and they sit {pos}.",
    "Count them: {cw}, all {colour}.",
]
GAME_INTRO = [
    "In this game from the {place} workshop, each kind of thing gets a made-up name, and it keeps that name.",
    "Children in {place} invented these names for the pictures; the same kind of picture always has the same name.",
    "{name} {surname} made up a name for every kind of picture in this set, and the names never change.",
    "A naming game for the {topic} class: learn the names of the pictures, then spot them again further down.",
]
FOREIGN = [
    "Diese Seite ist nur auf Deutsch verfügbar und enthält Hinweise für unsere Leserinnen und Leser in {place}.",
    "Wir haben die Bilder aus dem Archiv entfernt, weil die Rechte abgelaufen sind und niemand sie verlängert hat.",
    "Cette page présente les nouvelles de notre atelier à {place}, avec des dessins faits par les enfants.",
    "Les inscriptions pour le prochain atelier ouvrent lundi matin, et les places sont limitées comme chaque année.",
]


def fill(template: str, rng: random.Random, **extra: str) -> str:
    values = {
        "name": rng.choice(NAMES),
        "surname": rng.choice(SURNAMES),
        "place": rng.choice(PLACES),
        "topic": rng.choice(TOPICS),
        "n": str(rng.randint(3, 40)),
        "year": str(rng.randint(1990, 2098)),
    }
    values.update(extra)
    return template.format(**values)


def paragraph(rng: random.Random, pool: list[str], k: int, **extra: str) -> str:
    return " ".join(fill(t, rng, **extra) for t in rng.sample(pool, k))


def describe(scene: Scene, rng: random.Random) -> str:
    words = {
        "cw": COUNT_WORDS[scene.count],
        "colour": scene.colour,
        "shapes": scene.shape_word,
        "pos": POSITIONS[scene.position],
    }
    first = fill(rng.choice(DESCRIBE), rng, **words)
    return " ".join([first, fill(rng.choice(DETAIL), rng, **words), paragraph(rng, FILLER, 2)])


VQA_QUESTIONS = {
    "colour": ("What colour are the shapes?", lambda s: s.colour),
    "count": ("How many shapes are there?", lambda s: COUNT_WORDS[s.count]),
    "shape": ("What shape is shown in the picture?", lambda s: s.shape),
}
QUIZ_SHARE = 0.5  # shape pictures followed by a quiz question in the VQA eval's own wording


def quiz(scene: Scene, rng: random.Random) -> str:
    question, answer_of = VQA_QUESTIONS[rng.choice(list(VQA_QUESTIONS))]
    return f"Question: {question} Short answer: {answer_of(scene)}."


# ---------------------------------------------------------------------------------------------------------------
# HTML


def esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def img_tag(src: str, alt: str, rng: random.Random) -> str:
    """One of the ways real pages embed an image."""
    style = rng.choices(["plain", "srcset", "lazy", "picture"], weights=[4, 2, 2, 1])[0]
    size = f'width="{IMAGE_SIZE}" height="{IMAGE_SIZE}"'
    if style == "srcset":
        return (
            f'<img src="{src}" srcset="{src}?w=256 256w, {src}?w=512 512w" '
            f'sizes="(max-width: 600px) 100vw, 600px" alt="{esc(alt)}" {size}>'
        )
    if style == "lazy":
        return f'<img src="{LAZY_PLACEHOLDER}" data-src="{src}" loading="lazy" class="lazyload" alt="{esc(alt)}">'
    if style == "picture":
        mime = "image/jpeg" if src.endswith(".jpg") else "image/png"
        return f'<picture><source srcset="{src}" type="{mime}"><img src="{src}" alt="{esc(alt)}"></picture>'
    return f'<img src="{src}" alt="{esc(alt)}" {size}>'


def figure(src: str, alt: str, caption: str | None, rng: random.Random) -> str:
    tag = img_tag(src, alt, rng)
    if caption:
        return f"<figure>{tag}<figcaption>{esc(caption)}</figcaption></figure>"
    return f"<p>{tag}</p>"


SECTIONS = {
    "shapes": "Shapes Weekly",
    "games": "Name Games",
    "photos": "Photo Archive",
    "notes": "Studio Notes",
    "tags": "Tags",
}
# What the crawl holds, by page kind (weights): articles about drawn shapes, naming games (fast binding), photo
# archive pages, and pages the filters should drop (tag lists, other languages, thin pages, duplicates). Naming
# games are the largest share: fast binding is learned from a few thousand games seen, not a few hundred.
PAGE_KINDS = {"shapes": 52, "binding": 136, "photos": 12, "tags": 5, "foreign": 4, "thin": 3, "duplicate": 4}
BINDING_PICTURES = 5  # pictures per naming game: the paper's N = 5 images per M3W window


def page_shell(
    title: str, article: str, related: list[tuple[str, str]], page_id: str, rng: random.Random
) -> str:
    nav = "".join(f'<li><a href="/{s}/">{name}</a></li>' for s, name in SECTIONS.items())
    rel = "".join(f'<li><a href="{href}">{esc(text)}</a></li>' for href, text in related)
    ad = rng.choice(["/ads/banner-728x90.png", "/ads/box-300x250.png"])
    ad_w, ad_h = (728, 90) if "728" in ad else (300, 250)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)} | m3w demo web</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/static/site.css"></head>
<body>
<div id="cookie-banner" class="cookie-consent">We use cookies to improve your experience and to show
personalised ads. <a href="/privacy.html">Privacy policy</a> <button>Accept all</button> <button>Reject</button></div>
<header class="site-header"><a href="/"><img class="logo" src="/static/logo.png" width="120" height="40"
alt="Demo web logo"></a><nav class="main-nav"><ul>{nav}</ul></nav>
<form class="search"><input type="search" placeholder="Search"></form></header>
<main><article class="post">
{article}
</article>
<section class="related-posts"><h3>Related articles</h3><ul>{rel}</ul></section>
</main>
<aside class="sidebar"><div class="ad-slot"><a href="https://ads.example.invalid/click?id={page_id}">
<img src="{ad}" width="{ad_w}" height="{ad_h}" alt="Advertisement"></a></div>
<h4>Newsletter</h4><p>Sign up for our weekly newsletter.</p>
<h4>Popular</h4><ul><li><a href="/shapes/">Most read this week</a></li><li><a href="/tags/">All tags</a></li></ul></aside>
<footer class="site-footer"><p>&copy; 2099 m3w demo web. All rights reserved.</p>
<a href="/terms.html">Terms</a> &middot; <a href="/privacy.html">Privacy</a> &middot; <a href="/contact.html">Contact</a>
<img src="/static/pixel.gif?page={page_id}" width="1" height="1" alt=""></footer>
</body></html>
"""


@dataclass
class Page:
    url: str
    html: str
    kind: str


class WebBuilder:
    def __init__(
        self,
        out: Path,
        base_url: str,
        pages: int,
        seed: int,
        webcorpus: Path = WEBCORPUS,
        binding_questions: int = 200,
    ) -> None:
        self.out = Path(out)
        self.site = self.out / "site"
        self.base_url = base_url.rstrip("/")
        self.pages = pages
        self.seed = seed
        self.webcorpus = Path(webcorpus)
        self.binding_questions = binding_questions
        self.counts: dict[str, int] = {}
        self.photo_rows: list[dict] = []
        self.kinds = binding_kinds(self.webcorpus)
        # every word of the web's own text is taken, so a made-up name is never a word the web uses otherwise
        self.names_taken = {w.lower() for t in INTRO + FILLER + OUTRO + NAMES + PLACES for w in t.split()}

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def write(self, relpath: str, data: bytes) -> None:
        path = self.site / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    # -- assets ------------------------------------------------------------------------------------------------
    def write_static(self) -> None:
        rng = random.Random(self.seed)
        logo = Image.new("RGB", (120, 40), (30, 30, 30))
        ImageDraw.Draw(logo).text((8, 12), "DEMO WEB", fill=(255, 255, 255))
        self.write("static/logo.png", png_bytes(logo))
        self.write(
            "static/pixel.gif",
            bytes.fromhex(
                "47494638396101000100800000000000ffffff21f90401000000002c000000000100010000020144003b"
            ),
        )
        self.write(
            "static/site.css",
            b"body{font-family:sans-serif;max-width:60em;margin:auto}.sidebar{float:right}\n",
        )
        for name, (w, h) in {"banner-728x90": (728, 90), "box-300x250": (300, 250)}.items():
            ad = Image.new("RGB", (w, h), tuple(rng.randint(0, 255) for _ in range(3)))
            ImageDraw.Draw(ad).text(
                (10, h // 2 - 5), "BIG SALE - CLICK HERE - ADVERTISEMENT", fill=(255, 255, 255)
            )
            self.write(f"ads/{name}.png", png_bytes(ad))

    def photos(self) -> list[dict]:
        rows = [
            json.loads(line) for line in (self.webcorpus / "photos.jsonl").read_text().splitlines() if line
        ]
        rows = [r for r in rows if r.get("caption_short")]  # a photo without a caption teaches nothing
        for row in rows:
            src = self.webcorpus / row["file"]
            row["site_path"] = f"img/photos/{src.name}"
            self.write(row["site_path"], src.read_bytes())
        return sorted(rows, key=lambda r: r["file"])

    # -- pages -------------------------------------------------------------------------------------------------
    def shapes_article(self, i: int, rng: random.Random) -> tuple[str, str]:
        scenes = [random_scene(rng) for _ in range(rng.randint(2, 4))]
        title = f"Shape study no. {i}: {scenes[0].colour} {scenes[0].shape_word} and more"
        parts = [
            f"<h1>{esc(title)}</h1>",
            f'<p class="byline">By {rng.choice(NAMES)} {rng.choice(SURNAMES)}</p>',
        ]
        parts.append(f"<p>{esc(paragraph(rng, INTRO, 2, n=str(len(scenes))))}</p>")
        for k, scene in enumerate(scenes):
            name = f"img/shapes/{i:04d}-{k}.png"
            self.write(name, png_bytes(draw_scene(scene, rng)))
            src = f"/{name}"
            if rng.random() < 0.06:  # a broken link: the page names an image the server does not have
                src = f"/img/gone/{i:04d}-{k}.png"
                self.count("broken_images")
            self.count("shape_images")
            if rng.random() < QUIZ_SHARE:
                # a quiz right under the picture, before any words about it: only the picture tells the answer
                parts.append(figure(src, scene.caption, None, rng))
                parts.append(f"<p>{esc(quiz(scene, rng) + ' ' + describe(scene, rng))}</p>")
                self.count("quiz_questions")
                continue
            caption = scene.sentence if rng.random() < 0.7 else None
            parts.append(figure(src, scene.caption, caption, rng))
            parts.append(f"<p>{esc(describe(scene, rng))}</p>")
        parts.append(f"<p>{esc(paragraph(rng, OUTRO, 2))}</p>")
        return title, "\n".join(parts)

    def new_name(self, rng: random.Random) -> str:
        while (name := made_up_name(rng)) in self.names_taken:
            pass
        self.names_taken.add(name)
        return name

    def binding_page(self, i: int, rng: random.Random) -> tuple[str, str]:
        """A naming game: 2-3 kinds get fresh made-up names, then BINDING_PICTURES pictures of them in random
        order (every kind at least once), each followed by "This is a <name>."; an intro and an outro around."""
        kinds = rng.sample(self.kinds, rng.choice([2, 3]))
        names = [self.new_name(rng) for _ in kinds]
        order = list(range(len(kinds))) + [
            rng.randrange(len(kinds)) for _ in range(BINDING_PICTURES - len(kinds))
        ]
        rng.shuffle(order)
        title = f"Name game no. {i}"
        parts = [f"<h1>{esc(title)}</h1>", f"<p>{esc(fill(rng.choice(GAME_INTRO), rng))}</p>"]
        for k, j in enumerate(order):
            name = f"img/names/{i:04d}-{k}.jpg"
            self.write(name, jpeg_bytes(kind_view(kinds[j], rng)))
            self.count("binding_images")
            # no alt text, as on many pages: "Picture 3 of the game" made most of the alt-text pairs noise
            parts.append(figure(f"/{name}", "", None, rng))
            parts.append(f"<p>{esc(binding_caption(names[j]))}</p>")
        parts.append(f"<p>{esc(paragraph(rng, OUTRO, 2))}</p>")
        return title, "\n".join(parts)

    def photo_article(self, i: int, rng: random.Random) -> tuple[str, str]:
        chosen = rng.sample(self.photo_rows, rng.randint(1, 3))
        title = f"From the archive: {chosen[0]['caption_short'].rstrip('.')}"
        parts = [f"<h1>{esc(title)}</h1>", f"<p>{esc(paragraph(rng, INTRO, 2))}</p>"]
        for photo in chosen:
            parts.append(
                figure(f"/{photo['site_path']}", photo["caption_short"], photo["caption_short"], rng)
            )
            about = photo["caption_long"] or photo["caption_short"]
            parts.append(f"<p>{esc(about)} {esc(paragraph(rng, FILLER, 2))}</p>")
            self.count("photo_images")
        parts.append(f"<p>{esc(paragraph(rng, OUTRO, 1))}</p>")
        return title, "\n".join(parts)

    def tag_page(self, i: int, rng: random.Random) -> tuple[str, str]:
        links = "".join(
            f'<li><a href="/shapes/study-{rng.randint(0, 999):04d}.html">Study {k}</a></li>'
            for k in range(30)
        )
        return f"Tag: {rng.choice(TOPICS)} (page {i})", f"<h1>Tagged</h1><ul>{links}</ul>"

    def foreign_page(self, i: int, rng: random.Random) -> tuple[str, str]:
        return f"Atelier {i}", f"<h1>Atelier {i}</h1><p>{esc(paragraph(rng, FOREIGN, 4))}</p>"

    def thin_page(self, i: int, rng: random.Random) -> tuple[str, str]:
        return f"Page {i}", "<h1>Coming soon</h1><p>Click here!!! Subscribe now.</p>"

    def build_pages(self) -> list[Page]:
        rng = random.Random(self.seed)
        self.photo_rows = self.photos()
        makers = {
            "shapes": self.shapes_article,
            "binding": self.binding_page,
            "photos": self.photo_article,
            "tags": self.tag_page,
            "foreign": self.foreign_page,
            "thin": self.thin_page,
        }
        pages: list[Page] = []
        for i in range(self.pages):
            kind = rng.choices(list(PAGE_KINDS), weights=list(PAGE_KINDS.values()))[0]
            if i == self.pages - 2 and "pages.photos" not in self.counts:
                kind = "photos"  # the webcorpus photographs are on every web, however small
            if i == self.pages - 1 and "pages.duplicate" not in self.counts:
                kind = "duplicate"  # every crawl holds copies: a small web gets at least one
            if kind == "duplicate" and pages:
                # The same article under a tracking-parameter URL, as crawls often hold it.
                original = rng.choice([p for p in pages if p.kind == "shapes"] or pages)
                pages.append(Page(f"{original.url}?utm_source=feed&utm_id={i}", original.html, "duplicate"))
                self.count("pages.duplicate")
                continue
            if kind == "duplicate":
                kind = "shapes"
            section = {"shapes": "shapes", "photos": "photos", "tags": "tags", "binding": "games"}.get(
                kind, "notes"
            )
            title, article = makers[kind](i, rng)
            related = [
                (f"/shapes/study-{rng.randint(0, self.pages):04d}.html", f"Shape study no. {k}")
                for k in range(4)
            ]
            path = f"{section}/study-{i:04d}.html"
            html = page_shell(title, article, related, f"{i:04d}", rng)
            self.write(path, html.encode())
            pages.append(Page(f"{self.base_url}/{path}", html, kind))
            self.count(f"pages.{kind}")
        self.count("pages", len(pages))
        return pages

    # -- WARC --------------------------------------------------------------------------------------------------
    def write_warcs(self, pages: list[Page], files: int = 4) -> list[str]:
        from fastwarc.warc import WarcRecord, WarcRecordType

        def record(rtype, uri: str | None, content: bytes, when: datetime, content_type: str) -> bytes:
            rec = WarcRecord()
            rec.init_headers(
                rtype, f"uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'{rtype}:{uri}:{when}')}".encode()
            )
            rec.headers["WARC-Date"] = when.strftime("%Y-%m-%dT%H:%M:%SZ")
            if uri:
                rec.headers["WARC-Target-URI"] = uri
            rec.headers["Content-Type"] = content_type
            rec.set_bytes_content(content)
            buf = io.BytesIO()
            rec.write(buf, checksum_data=True)
            # One gzip member per record, with a fixed mtime: Common Crawl's layout, and reproducible bytes.
            return gzip.compress(buf.getvalue(), mtime=0)

        rel_paths = []
        for f in range(files):
            name = f"CC-MAIN-20990101000000-20990101000000-{f:05d}.warc.gz"
            rel = f"crawl-data/{CRAWL}/segments/{SEGMENT}/warc/{name}"
            chunks = [
                record(
                    WarcRecordType.warcinfo,
                    None,
                    f"software: m3w demo web\r\nisPartOf: {CRAWL}\r\n".encode(),
                    CRAWL_START,
                    "application/warc-fields",
                )
            ]
            for i in range(f, len(pages), files):
                page = pages[i]
                when = CRAWL_START + timedelta(seconds=i)
                host = page.url.split("/")[2]
                path = "/" + page.url.split("/", 3)[3]
                request = (
                    f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: m3w-demo-crawler\r\n\r\n".encode()
                )
                body = page.html.encode()
                response = (
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                chunks.append(
                    record(
                        WarcRecordType.request, page.url, request, when, "application/http; msgtype=request"
                    )
                )
                chunks.append(
                    record(
                        WarcRecordType.response,
                        page.url,
                        response,
                        when,
                        "application/http; msgtype=response",
                    )
                )
            self.write(rel, b"".join(chunks))
            rel_paths.append(rel)
        self.write(
            f"crawl-data/{CRAWL}/warc.paths.gz",
            gzip.compress(("\n".join(rel_paths) + "\n").encode(), mtime=0),
        )
        return rel_paths

    # -- video -------------------------------------------------------------------------------------------------
    def write_videos(self, n: int = 12) -> Path:
        rng = random.Random(self.seed + 2)
        rows = []
        for i in range(n):
            colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
            direction = rng.choice(["left to right", "right to left", "top to bottom", "bottom to top"])
            rel = f"video/clip-{i:02d}.mp4"
            self.write(rel, moving_shape_clip(colour, shape, direction))
            rows.append(
                {"url": f"{self.base_url}/{rel}", "caption": f"a {colour} {shape} moving from {direction}"}
            )
        table = self.out / "videos.jsonl"
        table.write_text("".join(json.dumps(r) + "\n" for r in rows))
        self.count("videos", n)
        return table

    def build(self) -> dict:
        if self.site.exists():
            shutil.rmtree(self.site)
        self.site.mkdir(parents=True)
        self.write_static()
        pages = self.build_pages()
        warcs = self.write_warcs(pages)
        videos = self.write_videos()
        eval_dir = write_eval_sets(
            self.out / "eval",
            self.seed + 1,
            webcorpus=self.webcorpus,
            binding_questions=self.binding_questions,
            taken_names=self.names_taken,
        )
        summary = {
            "base_url": self.base_url,
            "crawl": CRAWL,
            "site": "site",  # paths relative to this file's directory
            "warcs": warcs,
            "warc_paths": f"crawl-data/{CRAWL}/warc.paths.gz",
            "videos": videos.name,
            "eval": eval_dir.name,
            "counts": dict(sorted(self.counts.items())),
        }
        (self.out / "web.json").write_text(json.dumps(summary, indent=1) + "\n")
        return summary


def moving_shape_clip(
    colour: str, shape: str, direction: str, seconds: int = 6, fps: int = 4, size: int = 128
) -> bytes:
    """An MPEG-4 clip of one shape crossing the frame."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.thread_count = 1
        container.metadata["encoder"] = "m3w"
        frames = seconds * fps
        for t in range(frames):
            img = Image.new("RGB", (size, size), (245, 245, 245))
            draw = ImageDraw.Draw(img)
            p = 16 + (size - 32) * t // max(1, frames - 1)
            x, y = {
                "left to right": (p, size // 2),
                "right to left": (size - p, size // 2),
                "top to bottom": (size // 2, p),
                "bottom to top": (size // 2, size - p),
            }[direction]
            box = (x - 14, y - 14, x + 14, y + 14)
            if shape == "circle":
                draw.ellipse(box, fill=COLOURS[colour])
            elif shape == "square":
                draw.rectangle(box, fill=COLOURS[colour])
            else:
                draw.polygon([(x, y - 14), (x - 14, y + 14), (x + 14, y + 14)], fill=COLOURS[colour])
            for packet in stream.encode(av.VideoFrame.from_image(img)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# Held-out evaluation items, in the formats the public benchmarks use, drawn from scenes the web never shows.


def caption_variants(scene: Scene) -> list[str]:
    pos = POSITIONS[scene.position]
    cw = COUNT_WORDS[scene.count]
    return [
        scene.sentence,  # first: the caption-pair format the held-out caption loss is measured in
        f"{cw} {scene.colour} {scene.shape_word}",
        f"{scene.colour} {scene.shape_word} {pos}",
        f"{cw} {scene.shape_word} painted {scene.colour} {pos}",
        f"a drawing of {cw} {scene.colour} {scene.shape_word}",
    ]


BINDING_SHOTS = 8  # support examples per fast-binding question: a k-shot prompt takes the first k


def write_binding_questions(
    root: Path, kinds: list[Kind], rng: random.Random, questions: int, taken_names: set[str]
) -> Path:
    """binding/fast_binding_shots_8_ways_2_all_questions.json + images/: 2-way episodes of fresh pictures and
    fresh names (none the web uses). The support alternates the two kinds in shuffled pairs, so the first 2k
    examples show each kind k times. Each episode is asked twice, with a new picture of each kind: a model that
    cannot tell the pictures apart scores exactly 0.5 on an episode, whichever name it prefers, so the 0-shot
    score is chance without the coin-flip noise of one question per episode (with 100 single questions its
    standard deviation was 0.05, a sixth of the 0.30 gain the demo checks)."""
    out = root / "binding"
    (out / "images").mkdir(parents=True)
    taken = set(taken_names)
    entries = []
    for episode in range(questions // 2):
        pair = rng.sample(kinds, 2)
        names = []
        while len(names) < 2:
            name = made_up_name(rng)
            if name not in taken:
                taken.add(name)
                names.append(name)
        order = [j for _ in range(BINDING_SHOTS // 2) for j in rng.sample([0, 1], 2)]
        support: dict = {}
        for i, j in enumerate(order, 1):
            file_name = f"fast_binding_shots_{BINDING_SHOTS}_ways_2_episode_{episode}_image_{i}.jpg"
            (out / "images" / file_name).write_bytes(jpeg_bytes(kind_view(pair[j], rng)))
            support[f"image_{i}"], support[f"caption_{i}"] = file_name, binding_caption(names[j]).lower()
        for answer in (0, 1):
            q = len(entries)
            file_name = f"fast_binding_shots_{BINDING_SHOTS}_ways_2_id_{q}_question.jpg"
            (out / "images" / file_name).write_bytes(jpeg_bytes(kind_view(pair[answer], rng)))
            entries.append({"question_id": q, **support, "question_image": file_name, "question": "what is this?",
                            "answer": names[answer], "kinds": [k.key for k in pair]})  # fmt: skip
    path = out / f"fast_binding_shots_{BINDING_SHOTS}_ways_2_all_questions.json"
    path.write_text(json.dumps(entries, indent=1))
    return path


def write_eval_sets(
    root: Path,
    seed: int,
    support: int = 36,
    query: int = 36,
    webcorpus: Path = WEBCORPUS,
    binding_questions: int = 200,
    taken_names: set[str] | None = None,
) -> Path:
    """captioning/ (COCO captions JSON), vqa/ (VQAv2 questions + annotations), classification/ (image folders by
    colour), each with a `support` split for in-context examples and a `query` split to score; binding/
    (fast-binding episodes that carry their own support, with names outside `taken_names`)."""
    rng = random.Random(seed)
    if root.exists():
        shutil.rmtree(root)
    write_binding_questions(root, binding_kinds(webcorpus), rng, binding_questions, taken_names or set())
    for split, n in (("support", support), ("query", query)):
        scenes = [random_scene(rng) for _ in range(n)]
        images = [png_bytes(draw_scene(s, rng)) for s in scenes]

        cap_dir = root / "captioning" / split
        (cap_dir / "images").mkdir(parents=True)
        coco = {"images": [], "annotations": []}
        for i, (scene, data) in enumerate(zip(scenes, images)):
            file_name = f"demo_{split}_{i:012d}.png"
            (cap_dir / "images" / file_name).write_bytes(data)
            coco["images"].append(
                {"id": i, "file_name": file_name, "width": IMAGE_SIZE, "height": IMAGE_SIZE}
            )
            for caption in caption_variants(scene):
                coco["annotations"].append(
                    {"id": len(coco["annotations"]), "image_id": i, "caption": caption}
                )
        (cap_dir / "captions.json").write_text(json.dumps(coco, indent=1))

        vqa_dir = root / "vqa" / split
        (vqa_dir / "images").mkdir(parents=True)
        questions, annotations = [], []
        for i, (scene, data) in enumerate(zip(scenes, images)):
            (vqa_dir / "images" / f"demo_{split}_{i:012d}.png").write_bytes(data)
            for q, (kind, (text, answer_of)) in enumerate(VQA_QUESTIONS.items()):
                qid = i * 10 + q
                answer = answer_of(scene)
                questions.append({"image_id": i, "question": text, "question_id": qid})
                # Ten annotators, as in VQAv2; a couple give a paraphrase so the min(#/3, 1) rule matters.
                given = [answer] * 8 + ([str(scene.count)] * 2 if kind == "count" else [answer] * 2)
                annotations.append(
                    {
                        "question_id": qid,
                        "image_id": i,
                        "question_type": kind,
                        "answer_type": "number" if kind == "count" else "other",
                        "multiple_choice_answer": answer,
                        "answers": [
                            {"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                            for k, a in enumerate(given)
                        ],
                    }
                )
        (vqa_dir / "questions.json").write_text(json.dumps({"questions": questions}, indent=1))
        (vqa_dir / "annotations.json").write_text(json.dumps({"annotations": annotations}, indent=1))

        for i, (scene, data) in enumerate(zip(scenes, images)):
            path = root / "classification" / split / scene.colour / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        for colour in COLOURS:  # every class exists in every split, even when no item drew it
            (root / "classification" / split / colour).mkdir(parents=True, exist_ok=True)
    return root


def build_web(
    out: str | Path,
    base_url: str,
    pages: int = 300,
    seed: int = 0,
    webcorpus: Path = WEBCORPUS,
    binding_questions: int = 200,
) -> dict:
    """Build the demo web under `out` for a server at `base_url`. Returns the summary also written to web.json."""
    return WebBuilder(Path(out), base_url, pages, seed, webcorpus, binding_questions).build()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out")
    parser.add_argument(
        "--base-url", required=True, help="where demo.run serves out/site, e.g. http://127.0.0.1:8000"
    )
    parser.add_argument("--pages", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(build_web(args.out, args.base_url, args.pages, args.seed)["counts"], indent=1))


if __name__ == "__main__":
    main()
