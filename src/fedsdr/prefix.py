"""The tokens every row of an evaluation starts with, run through the model once.

Chat templates open every conversation the same way: SmolLM2's adds a default system turn
("You are a helpful AI assistant named SmolLM...") and the user turn's header, about 20 tokens
of the quickstart's ~130 per record. Scoring reference responses needs the whole sequence in
the forward pass, so every batch used to recompute those tokens. Here their keys and values are
computed once per call (with the adapters as they are), and each batch starts from them: the
batch's forward covers only what follows. Attention sees the same keys and values, so the
losses are those of the full forward up to rounding (matmuls of another shape).

Only a prefix that ends before the first scored position of every row is shared (its hidden
states are then never needed), and only on models whose cache is a plain per-layer key/value
store (`DynamicLayer`); anything else takes the full forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from fedsdr.kv import with_cache

MIN_SHARED = 4  # shorter prefixes are not worth a forward of their own


@dataclass(frozen=True)
class SharedPrefix:
    """Keys and values of the first `length` tokens, per layer, for one row."""

    length: int
    keys: list[torch.Tensor]  # per layer: (1, kv heads, length, head dim)
    values: list[torch.Tensor]

    def cache(self, rows: int, config: object) -> DynamicCache:
        """A fresh cache holding the prefix for `rows` rows (one copy per row: DynamicCache stores
        what it is given by concatenation)."""
        return self.fill(DynamicCache(config=config), rows)

    def fill(self, cache: DynamicCache, rows: int) -> DynamicCache:
        """Put the prefix, for `rows` rows, into the empty `cache` (any DynamicCache); return it."""
        for layer, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            cache.update(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1), layer)
        return cache


def shareable_length(input_ids: Sequence[Sequence[int]], first_scored: Sequence[int]) -> int:
    """Length of the longest prefix all rows share that ends before every row's first scored
    position (a row's `first_scored` is the index of the first token whose NLL is taken; its
    prediction comes from the position before, which must stay in the row's own forward)."""
    if not input_ids:
        return 0
    limit = min(min(first_scored) - 1, min(len(ids) for ids in input_ids) - 1)
    first = input_ids[0]
    n = 0
    while n < limit and all(ids[n] == first[n] for ids in input_ids):
        n += 1
    return n


@torch.no_grad()
def shared_prefix(body: torch.nn.Module, ids: Sequence[int], autocast: Callable,
                  device: torch.device) -> SharedPrefix | None:
    """Run `ids` through `body` (a decoder body or a causal LM) once under `autocast`; None when
    the prefix is too short to be worth it or the model's cache is not a plain key/value store."""
    if len(ids) < MIN_SHARED:
        return None
    config = getattr(body, "config", None)
    cache = DynamicCache(config=config)
    with autocast():
        body(input_ids=torch.tensor([list(ids)], device=device), **with_cache(body, cache), use_cache=True)
    layers = getattr(cache, "layers", [])
    if not layers or any(type(layer) is not DynamicLayer or layer.get_seq_length() != len(ids) for layer in layers):
        return None
    return SharedPrefix(len(ids), [layer.keys for layer in layers], [layer.values for layer in layers])
