"""Choosing the in-context support examples: random (seeded per query) or RICES.

RICES (Yang et al. 2022, used by Flamingo): the support examples are the query's nearest neighbours in the
pool by cosine similarity of the vision encoder's pooled features, ordered with the most similar *last*, i.e.
closest to the query in the prompt.
"""

from __future__ import annotations

import random

import torch

from m3w.pipeline.io import stable_hash
from m3w.trainer.fewshot.data import Example


def _excluding(pool: list[Example], query: Example) -> list[int]:
    # The query itself is never its own support example (when support and query come from one split).
    return [i for i, ex in enumerate(pool) if not (ex.id == query.id and ex.image == query.image)]


def random_support(pool: list[Example], query: Example, k: int, seed: int) -> list[Example]:
    """k examples drawn without replacement, seeded by (seed, query id): the same prompt in every run."""
    candidates = _excluding(pool, query)
    if k > len(candidates):
        raise ValueError(f"{k} support examples asked for, only {len(candidates)} in the pool")
    rng = random.Random(stable_hash([seed, query.id]))
    return [pool[i] for i in rng.sample(candidates, k)]


def rices_order(
    query_feature: torch.Tensor, pool_features: torch.Tensor, k: int, allowed: list[int]
) -> list[int]:
    """Indices of the k pool items most similar to the query, least similar first, most similar last."""
    q = torch.nn.functional.normalize(query_feature.float().flatten(), dim=0)
    p = torch.nn.functional.normalize(pool_features.float().flatten(1), dim=1)
    sims = p[allowed] @ q
    k = min(k, len(allowed))
    top = torch.topk(sims, k).indices.tolist()  # most similar first
    return [allowed[i] for i in reversed(top)]


def rices_support(
    pool: list[Example], pool_features: torch.Tensor, query: Example, query_feature: torch.Tensor, k: int
) -> list[Example]:
    allowed = _excluding(pool, query)
    if k > len(allowed):
        raise ValueError(f"{k} support examples asked for, only {len(allowed)} in the pool")
    return [pool[i] for i in rices_order(query_feature, pool_features, k, allowed)]
