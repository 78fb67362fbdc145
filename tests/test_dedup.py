"""Corpus-wide dedup on real pages (the postlight articles extracted from the webcorpus), with planted copies.

One corpus holds every plant, in five units, so the rules are also shown to work across units (not per worker):
near duplicates (a few words changed), an exact copy, a refetch of the same URL, a copy of a page's image set,
an image URL in K+1 documents and one in exactly K, and paragraphs repeated within one domain. Its decisions
equal those of a plain-Python statement of the rules (`reference_dedup`), with one partition per rule or many,
one worker or two, and after a dedup killed halfway is resumed.
"""

from __future__ import annotations

import datetime as dt
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import ROOT

from m3w.config import load_config
from m3w.pipeline.dedup import load_unit_drops, plan, run_dedup
from m3w.pipeline.dedup.keys import date_key, group_partition, hash_partition, id_key
from m3w.pipeline.dedup.layout import Layout, SignalsUnit, plan_layout
from m3w.pipeline.dedup.pairs import cluster_file, cluster_round
from m3w.pipeline.dedup.reduce import bucket_pairs
from m3w.pipeline.filter import EXCLUDED_DIR, run_filter
from m3w.pipeline.filters import FilterConfig
from m3w.pipeline.filters.config import DedupConfig
from m3w.pipeline.filters.signals import minhash_signature
from m3w.pipeline.io import name_of
from m3w.schemas.documents import DOCUMENT_SCHEMA, document_files, iter_documents
from m3w.schemas.filter_cache import BAND_KEYS_SCHEMA, EDGES_SCHEMA, LABELS_SCHEMA, read_parts, write_parts

K = 10
# Only dedup: the quality filters are off so that every drop here is a dedup decision.
DEDUP_ONLY = ["image.enabled=false", "paragraph.enabled=false", "document.enabled=false"]
NEAR_DUPLICATES = 5


def _words(doc: dict) -> int:
    return sum(len((n.get("text") or "").split()) for n in doc["nodes"] if n["kind"] == "text")


def _images(doc: dict) -> list[str]:
    return [n["url"] for n in doc["nodes"] if n["kind"] == "image"]


def _change_words(doc: dict, n_changes: int) -> dict:
    """A copy with `n_changes` words replaced, spread over the page (an edited re-post)."""
    nodes = [dict(n) for n in doc["nodes"] if n["kind"] == "text"]  # and no images: not an image-set copy
    long_nodes = [n for n in nodes if len((n.get("text") or "").split()) > 10]
    for i in range(n_changes):
        node = long_nodes[i * len(long_nodes) // n_changes]
        words = node["text"].split()
        words[len(words) // 2] = f"edited{i}"
        node["text"] = " ".join(words)
    return {**doc, "nodes": nodes}


def _plant(doc: dict, suffix: str, **changes) -> dict:
    # The query goes before any #fragment: after it, it would be part of the fragment (the original's URL).
    page = doc["url"].split("#", 1)[0]
    return {
        **doc,
        "doc_id": f"{doc['doc_id']}-{suffix}",
        "url": f"{page}{'&' if '?' in page else '?'}copy={suffix}",
        "fetch_date": "2030-01-01T00:00:00Z",
        **changes,
    }


@pytest.fixture(scope="module")
def corpus(webcorpus_documents, tmp_path_factory, ray_address):
    src = next(webcorpus_documents.glob("postlight_parser*.parquet"))
    pages = [d for d in iter_documents(src) if d["fetch_date"] and _words(d) >= 300 and _images(d)]
    # Distinct image sets, so that sharing one extra image never makes two sets equal.
    seen, articles = set(), []
    for doc in pages:
        key = frozenset(_images(doc))
        if key not in seen:
            seen.add(key)
            articles.append(doc)
    assert len(articles) >= 41
    frequent, at_limit = (
        "https://cdn.example.net/shared/frequent.jpg",
        "https://cdn.example.net/shared/at-limit.jpg",
    )
    originals = []
    for i, doc in enumerate(articles[:36]):
        extra = frequent if i < K + 1 else at_limit if i < 2 * K + 1 else None
        if extra:
            doc = {**doc, "nodes": [*doc["nodes"], {"kind": "image", "node_index": 10_000, "url": extra}]}
        originals.append(doc)

    near = [
        _plant(_change_words(d, 3), f"near{i}") for i, d in enumerate(articles[25 : 25 + NEAR_DUPLICATES])
    ]
    exact = _plant(articles[31], "exact")
    refetch = {
        **articles[32],
        "doc_id": articles[32]["doc_id"] + "-refetch",
        "fetch_date": "2031-01-01T00:00:00Z",
    }
    caption = {
        "kind": "text",
        "node_index": 0,
        "text": "Photos from the event, in the order they were taken.",
    }
    image_set = _plant(
        articles[33], "imageset", nodes=[caption, *(n for n in articles[33]["nodes"] if n["kind"] == "image")]
    )
    # Paragraph boilerplate: p3 in 3 pages of one domain (goes), p2 in 2 of them (stays), p3 once on another
    # domain (stays there). The pages are other real articles, not in `originals`.
    p3, p2 = [
        n["text"] for n in articles[35]["nodes"] if n["kind"] == "text" and len(n["text"].split()) > 12
    ][:2]
    plan = [
        ("boilerplate.example", [p3, p2]),
        ("boilerplate.example", [p3, p2]),
        ("boilerplate.example", [p3]),
        ("other.example", [p3]),
    ]
    domain_pages = []
    for i, (doc, (domain, shared)) in enumerate(zip(articles[36:], plan)):
        extra = [{"kind": "text", "node_index": 20_000 + j, "text": t} for j, t in enumerate(shared)]
        domain_pages.append(
            {**doc, "url": f"https://{domain}/{i}", "domain": domain, "nodes": [*doc["nodes"], *extra]}
        )

    docs_dir = tmp_path_factory.mktemp("dedup_docs")
    plants = [*near, exact, refetch, image_set, *domain_pages]
    units = {
        "originals-a": originals[:12],
        "originals-b": originals[12:24],
        "originals-c": originals[24:],
        "plants-a": plants[:4],
        "plants-b": plants[4:],
    }
    for name, rows in units.items():
        pq.write_table(pa.Table.from_pylist(rows, schema=DOCUMENT_SCHEMA), docs_dir / f"{name}.parquet")
    out = tmp_path_factory.mktemp("dedup_out")
    summary = run_filter(docs_dir, out, load_config(FilterConfig, None, DEDUP_ONLY), ray_address=ray_address)
    assert summary["failed"] == 0, summary["failures"]
    excluded = [
        r for f in sorted((out / EXCLUDED_DIR).glob("*.parquet")) for r in pq.read_table(f).to_pylist()
    ]
    return {
        "articles": articles,
        "near": near,
        "exact": exact,
        "refetch": refetch,
        "image_set": image_set,
        "domain_pages": domain_pages,
        "p3": p3,
        "p2": p2,
        "frequent": frequent,
        "at_limit": at_limit,
        "excluded": excluded,
        "docs_dir": docs_dir,
        "out": out,
        "kept": {d["doc_id"]: d for d in iter_documents(out)},
        "summary": summary,
    }


def _doc_drops(corpus: dict, rule: str) -> dict[str, str]:
    return {
        e["doc_id"]: e["reason"]
        for e in corpus["excluded"]
        if e["level"] == "document" and e["filter"] == rule
    }


def test_minhash_catches_planted_near_duplicates_and_keeps_distinct_pages(corpus):
    for original, copy in zip(corpus["articles"][25:], corpus["near"]):
        text = "\n".join(n["text"] for n in original["nodes"] if n["kind"] == "text")
        edited = "\n".join(n["text"] for n in copy["nodes"] if n["kind"] == "text")
        assert text != edited
        cfg = FilterConfig()
        jaccard = (minhash_signature(text, cfg) == minhash_signature(edited, cfg)).mean()
        assert 0.8 <= jaccard < 1.0
    dropped = _doc_drops(corpus, "dedup.near_duplicate")
    originals = {d["doc_id"] for d in corpus["articles"][25 : 25 + NEAR_DUPLICATES]}
    # Exactly the planted pairs: the older fetch goes, naming the newer copy it duplicates; no distinct
    # real article is taken for a near duplicate of another.
    assert set(dropped) == originals
    for original, copy in zip(corpus["articles"][25:], corpus["near"]):
        assert copy["doc_id"] in dropped[original["doc_id"]] and copy["doc_id"] in corpus["kept"]


def test_exact_text_same_url_and_same_image_set_keep_the_newest(corpus):
    articles = corpus["articles"]
    planted = {
        "dedup.exact_text": (articles[31], corpus["exact"]),
        "dedup.same_url": (articles[32], corpus["refetch"]),
        "dedup.same_image_set": (articles[33], corpus["image_set"]),
    }
    everything = {d["doc_id"]: d for d in iter_documents(corpus["docs_dir"])}
    keys = {
        "dedup.exact_text": lambda d: " ".join(
            n.get("text") or "" for n in d["nodes"] if n["kind"] == "text"
        ),
        "dedup.same_url": lambda d: d["url"],
        "dedup.same_image_set": lambda d: sorted(set(_images(d))),
    }
    for rule, (original, newer) in planted.items():
        drops = _doc_drops(corpus, rule)
        assert drops[original["doc_id"]].endswith(
            f"as {newer['doc_id']} (fetched {newer['fetch_date']}, kept)"
        )
        assert newer["doc_id"] in corpus["kept"]
        # Any other drop (real duplicates among the postlight pages) names an identical, newer, kept page.
        for doc_id, reason in drops.items():
            kept_id = reason.split(" as ")[1].split(" ")[0]
            dropped, kept = everything[doc_id], everything[kept_id]
            assert keys[rule](dropped) == keys[rule](kept) and kept["fetch_date"] >= dropped["fetch_date"]


def test_image_url_frequency_removes_only_urls_above_k(corpus):
    image_drops = [e for e in corpus["excluded"] if e["filter"] == "dedup.image_url_frequency"]
    assert {e["content"] for e in image_drops} == {corpus["frequent"]}
    assert len(image_drops) == K + 1 and all(
        e["reason"] == f"URL in {K + 1} documents > {K}" for e in image_drops
    )
    kept_urls = [url for d in corpus["kept"].values() for url in _images(d)]
    assert kept_urls.count(corpus["at_limit"]) == K  # exactly K documents: all kept
    assert corpus["frequent"] not in kept_urls
    # Unlike OBELICS's published code, every other image survives the rule.
    counts = corpus["summary"]["counts"]
    assert counts["out.images"] == counts["in.images"] - (K + 1) - sum(
        v
        for k, v in counts.items()
        if k.startswith("drop.dedup.") and k.endswith(".images") and "frequency" not in k
    )
    assert counts["out.images"] > 100


def test_paragraphs_repeated_more_than_twice_within_a_domain(corpus):
    drops = [e for e in corpus["excluded"] if e["filter"] == "dedup.domain_paragraph"]
    pages = corpus["domain_pages"]
    p3_drops = [e for e in drops if e["content"] == corpus["p3"][:1000]]
    assert {e["doc_id"] for e in p3_drops} == {p["doc_id"] for p in pages[:3]}  # 3 pages of one domain
    assert all(e["reason"] == "in 3 documents of boilerplate.example > 2" for e in p3_drops)
    assert not [e for e in drops if e["content"] == corpus["p2"][:1000]]  # 2 pages: kept
    other = corpus["kept"][pages[3]["doc_id"]]  # the same paragraph once on another domain stays
    assert corpus["p3"] in [n.get("text") for n in other["nodes"]]
    assert corpus["p2"] in [n.get("text") for n in corpus["kept"][pages[1]["doc_id"]]["nodes"]]


# ------------------------------------------------------------------------------------------------ reference


def _when(fetch_date: str | None) -> tuple:
    """A fetch date's place in time: missing < unreadable < any ISO 8601 date."""
    if not fetch_date:
        return (0,)
    try:
        when = dt.datetime.fromisoformat(fetch_date.replace("Z", "+00:00"))
    except ValueError:
        return (1,)
    return (2, when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc))


def reference_dedup(docs_dir: Path, signals_dir: Path, cfg: DedupConfig) -> set[tuple]:
    """The dedup rules stated from first principles, in plain Python over the whole corpus at once: the
    excluded rows (doc_id, level, node_index, filter, reason) that a dedup-only filter run must write."""
    docs, pages = [], []
    for unit in document_files(docs_dir):
        (signals,) = signals_dir.glob(f"{Path(unit).stem}.*.parquet")
        docs += pq.read_table(signals).to_pylist()
        pages += iter_documents(unit)
    newest = lambda i: (_when(docs[i]["fetch_date"]), docs[i]["doc_id"], i)  # noqa: E731
    gone: dict[int, tuple[str, str]] = {}

    def keep_newest(members: list[int], rule: str, what: str) -> None:
        alive = [i for i in members if i not in gone]
        if len(alive) < 2:
            return
        kept = max(alive, key=newest)
        for i in alive:
            if i != kept:
                gone[i] = (
                    rule,
                    f"{what} {docs[kept]['doc_id']} (fetched {docs[kept]['fetch_date'] or '?'}, kept)",
                )

    for rule, column, what in (
        ("dedup.same_url", "url_hash", "same URL as"),
        ("dedup.exact_text", "text_hash", "same text as"),
        ("dedup.same_image_set", "image_set_hash", "same set of image URLs as"),
    ):
        groups = defaultdict(list)
        for i, d in enumerate(docs):
            if d[column] is not None:
                groups[d[column]].append(i)
        for members in groups.values():
            keep_newest(members, rule, what)

    parent = list(range(len(docs)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for band in range(cfg.minhash_bands):
        buckets = defaultdict(list)
        for i, d in enumerate(docs):
            if d["bands"]:
                buckets[d["bands"][band]].append(i)
        for rows in buckets.values():
            for x, a in enumerate(rows[:200]):
                for b in rows[x + 1 :]:
                    similar = np.mean(np.equal(docs[a]["signature"], docs[b]["signature"]))
                    if a not in gone and b not in gone and similar >= cfg.minhash_threshold:
                        parent[root(a)] = root(b)
    components = defaultdict(list)
    for i in range(len(docs)):
        components[root(i)].append(i)
    for members in components.values():
        keep_newest(members, "dedup.near_duplicate", f"MinHash Jaccard ≥ {cfg.minhash_threshold} with")

    with_url, with_paragraph = defaultdict(set), defaultdict(set)
    for i, (d, page) in enumerate(zip(docs, pages)):
        for node in page["nodes"]:
            if node["kind"] == "image" and node.get("url"):
                with_url[node["url"]].add(i)
        for node in d["nodes"]:
            with_paragraph[(d["domain"], node["hash"])].add(i)
    rows = set()
    for i, (d, page) in enumerate(zip(docs, pages)):
        if i in gone:
            rows.add((d["doc_id"], "document", None, *gone[i]))
            continue
        for node in page["nodes"]:
            n = len(with_url[node.get("url")]) if node["kind"] == "image" else 0
            if n > cfg.image_url_max_docs:
                reason = f"URL in {n} documents > {cfg.image_url_max_docs}"
                rows.add((d["doc_id"], "image", node["node_index"], "dedup.image_url_frequency", reason))
        for node in d["nodes"]:
            n = len(with_paragraph[(d["domain"], node["hash"])])
            if n > cfg.paragraph_max_docs_per_domain:
                reason = f"in {n} documents of {d['domain']} > {cfg.paragraph_max_docs_per_domain}"
                rows.add((d["doc_id"], "paragraph", node["node_index"], "dedup.domain_paragraph", reason))
    return rows


def dedup_rows(out: Path) -> set[tuple]:
    return {
        (e["doc_id"], e["level"], e["node_index"], e["filter"], e["reason"])
        for f in sorted((out / EXCLUDED_DIR).glob("*.parquet"))
        for e in pq.read_table(f).to_pylist()
        if e["filter"].startswith("dedup.")
    }


def outputs(out: Path) -> dict[str, bytes]:
    files = [*out.glob("*.parquet"), *(out / EXCLUDED_DIR).glob("*.parquet")]
    return {str(f.relative_to(out)): f.read_bytes() for f in sorted(files)}


def test_decisions_equal_the_rules_stated_in_plain_python(corpus):
    cfg = load_config(FilterConfig, None, DEDUP_ONLY).dedup
    expected = reference_dedup(corpus["docs_dir"], corpus["out"] / "_cache" / "signals", cfg)
    assert {r[3] for r in expected} == {
        "dedup.same_url",
        "dedup.exact_text",
        "dedup.same_image_set",
        "dedup.near_duplicate",
        "dedup.image_url_frequency",
        "dedup.domain_paragraph",
    }
    assert dedup_rows(corpus["out"]) == expected


def test_many_partitions_and_one_worker_give_the_same_bytes_and_a_killed_dedup_resumes(
    corpus, tmp_path, ray_address
):
    """The corpus fixture ran with one partition per rule, one unit group and two workers; here every rule has
    7 partitions, units are cut into 4 groups and one worker decides: the outputs are the same bytes."""
    config = load_config(
        FilterConfig, None, [*DEDUP_ONLY, "dedup.num_partitions=7", "dedup.group_documents=12"]
    )
    out = tmp_path / "out"
    summary = run_filter(corpus["docs_dir"], out, config, workers=1, ray_address=ray_address)
    assert summary["failed"] == 0, summary["failures"]
    assert outputs(out) == outputs(corpus["out"])
    tasks = {t["phase"]: 0 for t in summary["dedup_tasks"]}
    for t in summary["dedup_tasks"]:
        tasks[t["phase"]] += 1
    assert tasks == {
        "map": 5,
        "dedup.same_url": 7,
        "dedup.exact_text": 7,
        "dedup.same_image_set": 7,
        "bands": 7,
        "images": 7,
        "paragraphs": 7,
        "verify_a": 4,
        "verify_b": 4,
        "cluster": 8,  # two rounds: labels settle in one, the next changes nothing
        "names": 4,
        "collect": 4,
    }
    (directory,) = (out / "_cache" / "dedup").iterdir()
    drops = {p.name: p.read_bytes() for p in (directory / "drops").iterdir()}
    assert len(drops) == 5

    # A dedup killed halfway: some tasks finished (marker written), one wrote its output but no marker, one
    # left a torn output, the rest never ran. The re-run redoes exactly the unfinished tasks.
    (directory / "_done").unlink()
    markers = sorted((directory / "_tasks").iterdir())
    unfinished = [m for m in markers if m.name.split(".")[0] in ("verify_b", "cluster", "names", "collect")]
    for marker in unfinished:
        marker.unlink()
    (directory / "verify_b" / "00001.out.parts").write_bytes(b"torn")
    for path in (directory / "drops").iterdir():
        path.unlink()
    shutil.rmtree(out / "_manifest")
    resumed = run_filter(corpus["docs_dir"], out, config, workers=2, ray_address=ray_address)
    assert resumed["failed"] == 0 and not resumed["dedup_cached"]
    redone = {t["phase"] for t in resumed["dedup_tasks"] if not t.get("skipped")}
    assert redone == {"verify_b", "cluster", "names", "collect"}
    assert sum(not t.get("skipped") for t in resumed["dedup_tasks"]) == len(unfinished)
    assert {p.name: p.read_bytes() for p in (directory / "drops").iterdir()} == drops
    assert outputs(out) == outputs(corpus["out"])
    again = run_filter(corpus["docs_dir"], out, config, ray_address=ray_address)
    assert again["dedup_cached"] and again["skipped"] == 5


def test_partitioned_files_and_drop_lists_go_through_fsspec(corpus):
    """The same dedup with its cache on a non-local fsspec filesystem (memory://, in this process) writes the
    same drop lists as the corpus run did on local disk."""
    config = load_config(FilterConfig, None, DEDUP_ONLY).dedup
    units = []
    for signals in sorted((corpus["out"] / "_cache" / "signals").glob("*.parquet")):
        table = pq.read_table(signals)
        lengths = [len(pc.list_flatten(table[c])) for c in ("bands", "images", "nodes")]
        units.append(SignalsUnit(signals.name.split(".")[0], str(signals), table.num_rows, *lengths))
    remote = run_dedup(units, config, "memory://m3w-dedup", in_process=True)
    (local,) = (corpus["out"] / "_cache" / "dedup").iterdir()
    assert name_of(remote.directory) == local.name  # same corpus and config: same decisions key
    for unit in units:
        assert load_unit_drops(remote.drops_file(unit.name)) == load_unit_drops(
            str(local / "drops" / f"{unit.name}.parquet")
        )
    assert sum(len(load_unit_drops(remote.drops_file(u.name)).documents) for u in units) >= 8


def test_partition_counts_follow_the_corpus_or_the_config():
    """`num_partitions: 0` gives each kind of key one reduce task per `reducer_rows` rows; N gives N to all, as
    the shipped filters.yaml says (issue 13, defect 5: it said "one per MinHash band", which no code did)."""
    shipped = (ROOT / "m3w" / "configs" / "filters.yaml").read_text()
    (line,) = [line for line in shipped.splitlines() if line.strip().startswith("num_partitions:")]
    assert "0 = one per `reducer_rows` key rows of that kind" in line and "one per MinHash band" not in line
    units = [SignalsUnit(f"u{i}", f"/x/u{i}.parquet", 1000, 14_000, 3_000, 37_000) for i in range(10)]
    auto = plan_layout("/x", units, DedupConfig(reducer_rows=50_000, group_documents=3_000))
    assert auto.partitions == {
        "dedup.same_url": 1,
        "dedup.exact_text": 1,
        "dedup.same_image_set": 1,
        "bands": 3,
        "images": 1,
        "paragraphs": 8,
    }
    assert auto.group_starts == (0, 3, 6, 9)
    fixed = plan_layout("/x", units, DedupConfig(num_partitions=5, same_url=False, near_duplicates=False))
    assert fixed.exact == ("dedup.exact_text", "dedup.same_image_set")
    assert set(fixed.partitions.values()) == {5} and fixed.partitions["bands"] == 5


def test_readme_states_what_a_crawl_needs_from_the_plan():
    """README's "Scale" table is `m3w.pipeline.dedup.plan`'s output (141 M and 41 B documents), and the plan
    has costs for every kind of reduce task a dedup run makes."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split("<!-- scale-plan -->\n", 1)[1].split("\n<!-- /scale-plan -->", 1)[0]
    assert table == plan.markdown()
    layout = plan_layout("/x", [SignalsUnit("u", "/x/u.parquet", 1000)], DedupConfig())
    assert set(plan.MEASURED["rows_per_document"]) == set(layout.partitions)


# ------------------------------------------------------------------------------------------------ pieces


def test_bucket_pairs_pair_each_head_member_with_every_later_member():
    rng = np.random.default_rng(0)
    key = np.sort(rng.integers(0, 6, 300))
    gid = np.arange(300, dtype=np.int64)
    a, b = bucket_pairs(key, gid, head=20)
    expected = set()
    for k in np.unique(key):
        rows = gid[key == k].tolist()
        expected |= {(x, y) for i, x in enumerate(rows[:20]) for y in rows[i + 1 :]}
    assert len(a) == len(expected) and set(zip(a.tolist(), b.tolist())) == expected


def test_clustering_rounds_find_each_components_newest_document(tmp_path):
    """The rounds of `cluster_round`, run by hand over 4 unit groups, on a random graph with a 40-node chain:
    each node ends labelled with the newest (date, id key, gid) node of its component, as union-find says."""
    rng = np.random.default_rng(1)
    layout = Layout(str(tmp_path), units=12, exact=(), partitions={}, group_starts=(0, 3, 6, 9))
    nodes = np.unique((rng.integers(0, 12, 400) << 32) + rng.integers(0, 50, 400))
    a, b = rng.choice(nodes, 150), rng.choice(nodes, 150)
    chain = rng.choice(nodes, 40, replace=False)
    a, b = np.concatenate([a, chain[:-1]]), np.concatenate([b, chain[1:]])
    a, b = a[a != b], b[a != b]
    date = dict(
        zip(nodes.tolist(), rng.integers(0, 3, len(nodes)).tolist())
    )  # ties, so id keys and gids count
    idk = dict(zip(nodes.tolist(), rng.integers(0, 2, len(nodes)).tolist()))
    u, v = np.concatenate([a, b]), np.concatenate([b, a])
    edges = pa.Table.from_arrays(
        [
            u,
            v,
            np.array([date[x] for x in u.tolist()]),
            np.array([idk[x] for x in u.tolist()]),
            np.array([date[x] for x in v.tolist()]),
            np.array([idk[x] for x in v.tolist()]),
        ],
        schema=EDGES_SCHEMA,
    )
    for g in range(layout.groups):  # as if verify_b of group 0 had found every edge
        mine = edges if g == 0 else edges.slice(0, 0)
        write_parts(
            layout.group_file("verify_b", g), mine, group_partition(mine["node"].to_numpy(), layout.starts), 4
        )
    rounds = 0
    while sum(cluster_round(layout, g, rounds)["messages"] for g in range(4)):
        rounds += 1
    assert rounds >= 3  # the chain needs several
    state = read_parts([cluster_file(layout, g, rounds, "state") for g in range(4)], 0, 1, LABELS_SCHEMA)
    found = dict(zip(state["node"].to_pylist(), state["best"].to_pylist()))

    parent = {x: x for x in found}

    def root(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x

    for x, y in zip(a.tolist(), b.tolist()):
        parent[root(x)] = root(y)
    members = defaultdict(list)
    for x in found:
        members[root(x)].append(x)
    for group in members.values():
        newest = max(group, key=lambda x: (date[x], idk[x], x))
        assert all(found[x] == newest for x in group)


def test_newest_order_and_partitions():
    dates = ["", "2008-10-294T05:21:46-0700", "2019-01-01T00:00:00Z", "2019-01-01T00:00:00.5Z", "2020-01-01"]
    assert [date_key(d) for d in dates] == sorted(date_key(d) for d in dates)
    ids = ["0abc", "0abd", "9", "a", "ab", "abc", "f" * 40]
    assert [id_key(i) for i in ids] == sorted(id_key(i) for i in ids)
    keys = np.random.default_rng(2).integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, 10_000)
    keys = np.sort(keys.view(np.uint64)).view(np.int64)
    part = hash_partition(keys, 7)
    assert part.min() == 0 and part.max() == 6 and np.all(np.diff(part) >= 0)  # ranges of the hash space
    assert np.bincount(part).min() > 1200


def test_partitioned_file_round_trip(tmp_path):
    table = pa.table({"key": np.arange(10, dtype=np.int64), "gid": np.arange(10, dtype=np.int64) * 3})
    table = table.cast(BAND_KEYS_SCHEMA)
    part = np.array([3, 0, 3, 3, 1, 0, 3, 1, 1, 3])
    urls = [str(tmp_path / "a.parts"), str(tmp_path / "b.parts")]
    write_parts(urls[0], table, part, 5)
    write_parts(urls[1], table.slice(0, 0), part[:0], 5)  # nothing at all
    for k in range(5):
        got = read_parts(urls, k, 5, BAND_KEYS_SCHEMA)
        assert got["key"].to_pylist() == [i for i in range(10) if part[i] == k]
    with pytest.raises(ValueError, match="has 5 partitions, expected 4"):
        read_parts(urls, 0, 4, BAND_KEYS_SCHEMA)
