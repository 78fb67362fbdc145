"""Corpus-wide dedup at Common Crawl scale, from the cached per-unit signals (see `pipeline/filters/signals.py`).

Rules, in their order of application (each document-level rule acts on the documents the previous ones kept):

1. same page URL, 2. identical normalised text, 3. identical non-empty set of image URLs, 4. MinHash near
   duplicates (LSH candidates whose estimated Jaccard similarity reaches the threshold, then connected
   components): of each group the newest fetch stays (ties: the larger doc_id, compared on its first 8 bytes,
   then the later position in the corpus); the others go, their reason naming the copy that stays;
5. image URLs found in more than K documents of the corpus: only those image nodes go (OBELICS's K = 10);
6. paragraphs found in more than N documents of one domain: every copy goes.

Rules 5 and 6 count every document, dropped or not, and are applied by the decide step to the nodes that the
quality filters kept. Keys are 64-bit hashes: two different URLs, texts or paragraphs share one with
probability ~2^-64.

How it scales (`run.py` draws the task graph): a map task per unit writes each rule's keys hash-partitioned;
one reduce task per (rule, partition) reads only its partition of every map file; only integers travel between
tasks, until `names` writes the reasons; each unit ends with its own drop list, which is all its decide step
reads. Partition counts follow the corpus (`DedupConfig.reducer_rows` key rows per task), so memory per task
does not grow with it; `plan.py` turns the measured per-row costs into what a whole crawl needs.
"""

from m3w.pipeline.dedup.drops import UnitDrops, load_unit_drops
from m3w.pipeline.dedup.keys import DOCUMENT_RULES, DOMAIN_PARAGRAPH, IMAGE_FREQUENCY, RULES
from m3w.pipeline.dedup.layout import SignalsUnit
from m3w.pipeline.dedup.run import DedupError, DedupRun, run_dedup

__all__ = [
    "DOCUMENT_RULES",
    "DOMAIN_PARAGRAPH",
    "IMAGE_FREQUENCY",
    "RULES",
    "DedupError",
    "DedupRun",
    "SignalsUnit",
    "UnitDrops",
    "load_unit_drops",
    "run_dedup",
]
