"""Filtering rules: when a rewrite is unusable, the training target falls back to the raw output.

Rules run in a fixed order and the first that fires names the fallback reason:
degenerate, leak, inflation, answer_inconsistent. Profile "paper" keeps every rewrite but
empty ones (reason degenerate) and leaks; profile "safe" runs every rule switched on.
"""

from __future__ import annotations

from fedsdr.config import FilterConfig
from fedsdr.data.schema import Record

REASONS = ("degenerate", "leak", "inflation", "answer_inconsistent")

def length_ratio(rewrite: str, reference: str) -> float:
    """words(rewrite) / max(1, words(reference))."""
    from fedsdr.scoring import word_count

    return word_count(rewrite) / max(1, word_count(reference))


def is_consistent(record: Record, text: str) -> bool | None:
    """Does the task scorer accept `text` for `record`? None when the record is open-ended."""
    if not record.verifiable:
        return None
    from fedsdr.scoring import score

    return score(record, text) is True


def check_rewrite(
    record: Record,
    rewrite: str,
    truncated: bool,
    cfg: FilterConfig,
    *,
    consistent: bool | None = None,
) -> str | None:
    """The first fallback reason that fires, or None when the rewrite is kept.

    `consistent` may carry an already computed `is_consistent(record, rewrite)`, so the
    (possibly slow) scorer is not run twice.
    """
    from fedsdr.scoring import repeated_ngram_rate, word_count

    leaks = cfg.leak and any(p.lower() in rewrite.lower() for p in cfg.leak_phrases if p)
    if cfg.profile == "paper":
        return "degenerate" if not rewrite.strip() else "leak" if leaks else None
    if cfg.degenerate and (
        not rewrite.strip() or truncated or repeated_ngram_rate(rewrite, 4) > cfg.max_repeat_rate
    ):
        return "degenerate"
    if leaks:
        return "leak"
    reference_words = max(cfg.inflation_floor, word_count(record.output))
    if cfg.inflation and word_count(rewrite) > cfg.max_length_ratio * reference_words:
        return "inflation"
    if cfg.answer_consistency and record.verifiable:
        if consistent is None:
            consistent = is_consistent(record, rewrite)
        if not consistent:
            return "answer_inconsistent"
    return None
