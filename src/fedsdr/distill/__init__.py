"""FedSD: federated self-distillation as a data transform (rewrite, filter, diagnose, cache)."""

from fedsdr.distill.cache import cache_key, cache_paths, load_or_distill
from fedsdr.distill.diagnostics import render_table, summarize
from fedsdr.distill.engine import (
    DistillConfig,
    DistilledRow,
    distill_records,
    distilled_records,
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
    "distill_records",
    "distilled_records",
    "load_or_distill",
    "render_table",
    "summarize",
]
