"""FedSD: federated self-distillation as a data transform (rewrite, filter, diagnose, cache)."""

from fedsdr.distill.cache import cache_key, cache_paths, load_or_rewrite
from fedsdr.distill.diagnostics import render_table, summarize
from fedsdr.distill.engine import (
    DistillConfig,
    DistilledRow,
    distilled_set,
    refilter,
    rewrite_records,
)
from fedsdr.distill.filters import REASONS, FilterConfig, check_rewrite
from fedsdr.distill.prompt import RewriteTemplate, build_rewrite_messages

__all__ = [
    "REASONS",
    "DistillConfig",
    "DistilledRow",
    "FilterConfig",
    "RewriteTemplate",
    "build_rewrite_messages",
    "cache_key",
    "cache_paths",
    "check_rewrite",
    "rewrite_records",
    "distilled_set",
    "refilter",
    "load_or_rewrite",
    "render_table",
    "summarize",
]
