"""Filtering rules: when a rewrite is unusable, the training target falls back to the raw output.

Rules run in a fixed order and the first that fires names the fallback reason:
degenerate, leak, inflation, answer_inconsistent.
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
    from fedsdr.scoring import repeated_ngram_rate

    if cfg.degenerate and (
        not rewrite.strip() or truncated or repeated_ngram_rate(rewrite, 4) > cfg.max_repeat_rate
    ):
        return "degenerate"
    if cfg.leak:
        lowered = rewrite.lower()
        if any(p.lower() in lowered for p in cfg.leak_phrases if p):
            return "leak"
    if cfg.inflation and length_ratio(rewrite, record.output) > cfg.max_length_ratio:
        return "inflation"
    if cfg.answer_consistency and record.verifiable:
        if consistent is None:
            consistent = is_consistent(record, rewrite)
        if not consistent:
            return "answer_inconsistent"
    return None
