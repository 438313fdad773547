"""The keyword under which a transformers model's forward takes its KV cache.

transformers renamed `past_key_values` to `cache` during 5.x (5.24 takes `cache` and still maps
the old name, with a deprecation warning, until 5.40; 5.17 knows only `past_key_values` and
silently drops `cache` into its `**kwargs`, so a cache passed under the new name would stay
empty). Every call that hands a model a cache asks here, so both sides of the rename work.
"""

from __future__ import annotations

import functools
import inspect

import torch


@functools.cache
def _keyword_of(forward_owner: type) -> str:
    params = inspect.signature(forward_owner.forward).parameters  # follows the decorators' __wrapped__
    return "cache" if "cache" in params else "past_key_values"


def cache_kwarg(model: torch.nn.Module) -> str:
    """`"cache"` or `"past_key_values"`: the name `model`'s forward takes its KV cache under.

    `model` is a causal LM, its decoder body, or a PEFT model wrapping one (whose own forward
    only passes keyword arguments on, so the wrapped model's signature is the one that counts)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _keyword_of(type(base))


def with_cache(model: torch.nn.Module, cache: object) -> dict[str, object]:
    """Keyword arguments that hand `cache` to `model`'s forward: `model(**with_cache(model, c), ...)`."""
    return {cache_kwarg(model): cache}
