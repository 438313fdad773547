"""Filtering rules: when a rewrite is unusable, the training target falls back to the raw output.

Rules run in a fixed order and the first that fires names the fallback reason:
degenerate, leak, inflation, answer_inconsistent.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from fedsdr.data.schema import Record

REASONS = ("degenerate", "leak", "inflation", "answer_inconsistent")

DEFAULT_LEAK_PHRASES = [
    "reference answer",
    "reference response",
    "reference solution",
    "the reference",
    "your response",
    "my response",
    "the provided answer",
    "the provided response",
    "the given answer",
    "the given response",
    "as mentioned in the reference",
    "according to the reference",
]


class FilterConfig(BaseModel):
    """Which fallback rules are on, and their thresholds."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    leak: bool = Field(True, description="Fall back when the rewrite mentions the reference.")
    degenerate: bool = Field(
        True,
        description="Fall back on empty, truncated (no eos within budget) or looping rewrites.",
    )
    inflation: bool = Field(True, description="Fall back when the rewrite is much longer.")
    max_length_ratio: float = Field(
        2.5, gt=0, description="Inflation bound on words(rewrite) / max(1, words(reference))."
    )
    answer_consistency: bool = Field(
        True,
        description="On verifiable records, fall back unless the task scorer accepts the rewrite.",
    )
    max_repeat_rate: float = Field(
        0.5, ge=0, le=1, description="Looping bound on the repeated 4-gram rate of the rewrite."
    )
    leak_phrases: list[str] = Field(
        default_factory=lambda: list(DEFAULT_LEAK_PHRASES),
        description="Case-insensitive phrases that reveal the rewrite is talking about the reference.",
    )


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
