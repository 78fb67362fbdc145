"""Document → token sequence → M3W windows, on documents built in the DOCUMENT_SCHEMA node format."""

from __future__ import annotations

from collections import Counter

import pytest

from m3w.pipeline.tokenizer import EOC_TOKEN, MEDIA_TOKEN, load_tokenizer
from m3w.pipeline.windows import WindowConfig, decode, document_sequence, make_windows, window_starts


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def text(i: int, body: str) -> dict:
    return {"kind": "text", "node_index": i, "text": body, "block": "paragraph"}


def image(i: int, url: str) -> dict:
    return {"kind": "image", "node_index": i, "url": url, "alt": None}


def long_document(n_images: int, words_between: int) -> tuple[list[dict], dict[str, str]]:
    nodes, keys = [], {}
    for k in range(n_images):
        nodes.append(text(2 * k, " ".join(f"w{k}x{j}" for j in range(words_between))))
        nodes.append(image(2 * k + 1, f"http://img/{k}.jpg"))
        keys[f"http://img/{k}.jpg"] = f"blob{k}"
    nodes.append(text(2 * n_images, "The end."))
    return nodes, keys


def test_sequence_is_text_eoc_image_and_eoc_at_end(tok):
    nodes = [
        text(0, "A héading — 日本語"),
        text(1, "First paragraph."),
        image(2, "http://img/a.jpg"),
        image(3, "http://img/missing.jpg"),  # not in the store: removed before tokenisation
        text(4, "After the image, a page that literally says <image> and <EOC>."),
        {"kind": "video", "node_index": 5, "url": "http://v/1.mp4"},
        image(6, "http://img/b.jpg"),
    ]
    counts = Counter()
    seq = document_sequence(nodes, {"http://img/a.jpg": "A", "http://img/b.jpg": "B"}, tok, counts)
    expected = (
        "A héading — 日本語\n\nFirst paragraph."
        f"{EOC_TOKEN}{MEDIA_TOKEN}"
        "After the image, a page that literally says  and ."
        f"{EOC_TOKEN}{MEDIA_TOKEN}{EOC_TOKEN}"
    )
    assert decode(tok, seq.ids) == expected
    media_id = tok.convert_tokens_to_ids(MEDIA_TOKEN)
    assert [seq.ids[pos] for pos, _, _ in seq.images] == [media_id, media_id]
    assert seq.ids.count(media_id) == 2  # the page's literal "<image>" did not become a slot
    assert [(node, key) for _, node, key in seq.images] == [(2, "A"), (6, "B")]
    assert counts == {"drop.image_not_stored": 1, "drop.video_node": 1}


def test_window_has_at_most_L_tokens_and_N_images_one_per_image_token(tok):
    nodes, keys = long_document(n_images=9, words_between=3)  # 9 images within the first 256 tokens
    counts = Counter()
    seq = document_sequence(nodes, keys, tok, counts)
    config = WindowConfig(seq_len=256, max_images=5)
    (window,) = list(make_windows("doc", seq, tok, config, counts))
    media_id = tok.convert_tokens_to_ids(MEDIA_TOKEN)
    assert len(window.ids) <= 256
    assert window.ids.count(media_id) == len(window.images) == 5
    first = sorted(pos for pos, _, _ in seq.images if pos >= window.start)[:5]
    assert window.images == [key for pos, _, key in seq.images if pos in first]  # the first five, in order
    assert counts["drop.image_over_max"] == len([p for p, _, _ in seq.images if p >= window.start]) - 5
    dropped_nodes = {node for pos, node, _ in seq.images if pos >= window.start and pos not in first}
    assert not dropped_nodes & set(window.node_indices)
    assert decode(tok, window.ids).count(MEDIA_TOKEN) == 5


def test_window_start_is_seeded_by_seed_and_doc_id_only(tok):
    config = WindowConfig(seed=7)
    starts = [window_starts(f"doc{i}", 5000, config)[0] for i in range(20)]
    assert starts == [window_starts(f"doc{i}", 5000, config)[0] for i in reversed(range(20))][::-1]
    assert len(set(starts)) > 10 and all(0 <= s <= 5000 - 256 for s in starts)
    other_seed = [window_starts(f"doc{i}", 5000, WindowConfig(seed=8))[0] for i in range(20)]
    assert other_seed != starts
    assert window_starts("short", 100, config) == [0]
    assert len(window_starts("doc", 5000, WindowConfig(windows_per_doc=3))) == 3
    assert window_starts("short", 100, WindowConfig(windows_per_doc=3)) == [0]  # one possible window, once


def test_non_overlapping_windows_cover_the_document(tok):
    nodes, keys = long_document(n_images=6, words_between=150)
    counts = Counter()
    seq = document_sequence(nodes, keys, tok, counts)
    config = WindowConfig(non_overlapping=True, skip_imageless=False, max_images=100)
    windows = list(make_windows("doc", seq, tok, config, counts))
    assert [w.start for w in windows] == list(range(0, len(seq.ids), 256))
    assert [t for w in windows for t in w.ids] == seq.ids
    assert [k for w in windows for k in w.images] == [f"blob{k}" for k in range(6)]


def test_imageless_windows_are_skipped_unless_configured(tok):
    nodes, keys = long_document(n_images=1, words_between=2000)  # the image sits after ~2000 words
    counts = Counter()
    seq = document_sequence(nodes, keys, tok, counts)
    config = WindowConfig(non_overlapping=True)
    kept = list(make_windows("doc", seq, tok, config, counts))
    assert len(kept) == 1 and kept[0].images == ["blob0"]
    assert counts["skip.window_without_image"] == len(range(0, len(seq.ids), 256)) - 1
    config.skip_imageless = False
    assert len(list(make_windows("doc", seq, tok, config, Counter()))) == len(range(0, len(seq.ids), 256))


def test_image_aware_start_always_catches_an_image(tok):
    nodes, keys = long_document(n_images=2, words_between=1500)  # images far apart in a long document
    seq = document_sequence(nodes, keys, tok, Counter())
    uniform_hits, image_hits = 0, 0
    for seed in range(30):
        uniform = list(make_windows("doc", seq, tok, WindowConfig(seed=seed), Counter()))
        aware = list(make_windows("doc", seq, tok, WindowConfig(seed=seed, start="image"), Counter()))
        uniform_hits += len(uniform)
        image_hits += len(aware)
        assert all(len(w.ids) <= 256 for w in aware)
    assert image_hits == 30 and uniform_hits < 15
    with pytest.raises(ValueError, match="windows.start"):
        window_starts("doc", 5000, WindowConfig(start="middle"), [100])
