"""FedSD rewriting: each record is answered again by the model, then filtered.

The training target is the rewrite unless a filter fires; then it is the raw output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedsdr.data.schema import Record
from fedsdr.distill.filters import FilterConfig, check_rewrite, is_consistent, length_ratio
from fedsdr.distill.prompt import RewriteTemplate, build_rewrite_messages

if TYPE_CHECKING:  # torch is imported only when rewriting runs, not with the config
    from fedsdr.generation import GenerationStats


class DistillConfig(BaseModel):
    """FedSD: rewriting the clients' data with the model before (or during) training."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = Field(False, description="Train on distilled data (Algorithm + FedSD).")
    refresh_every: int = Field(
        0,
        ge=0,
        description="0: rewrite once before round 1 with the base model; R > 0: rewrite again "
        "with the current global model every R rounds.",
    )
    do_sample: bool = Field(False, description="Sample rewrites instead of greedy decoding.")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature (do_sample only).")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling mass (do_sample only).")
    max_new_tokens_ratio: float = Field(
        2.0, gt=0, description="Token budget per record = ratio * tokens(reference), clamped."
    )
    min_new_tokens: int = Field(32, ge=1, description="Lower clamp of the token budget.")
    max_new_tokens: int = Field(256, ge=1, description="Upper clamp of the token budget.")
    batch_size: int = Field(32, ge=1, description="Rows decoded together (continuous batching).")
    template: RewriteTemplate = Field(
        default_factory=RewriteTemplate, description="Text of the rewrite prompt."
    )
    filters: FilterConfig = Field(
        default_factory=FilterConfig, description="Fallback rules (rewrite -> raw output)."
    )

    @model_validator(mode="after")
    def _check_budget(self) -> DistillConfig:
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError("min_new_tokens must be <= max_new_tokens")
        return self

    def budget(self, reference_tokens: int) -> int:
        """Token budget for a reference of `reference_tokens` tokens."""
        raw = math.ceil(self.max_new_tokens_ratio * reference_tokens)
        return max(self.min_new_tokens, min(self.max_new_tokens, raw))


@dataclass(frozen=True)
class DistilledRow:
    """One record's rewrite and the training target chosen for it.

    fallback: the filter that sent the target back to `raw`, or None (target = rewrite).
    truncated: the rewrite used its whole token budget without reaching eos.
    length_ratio: words(rewrite) / max(1, words(raw)).
    consistent_rewrite / consistent_target: the task scorer's verdict on the rewrite and on
        the target (None for open-ended records).
    """

    id: str
    raw: str
    rewrite: str
    target: str
    fallback: str | None
    truncated: bool
    length_ratio: float
    record: Record
    consistent_rewrite: bool | None = None
    consistent_target: bool | None = None

    @property
    def domain(self) -> str:
        return self.record.domain

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "raw": self.raw,
            "rewrite": self.rewrite,
            "target": self.target,
            "fallback": self.fallback,
            "truncated": self.truncated,
            "length_ratio": self.length_ratio,
            "domain": self.domain,
            "consistent_rewrite": self.consistent_rewrite,
            "consistent_target": self.consistent_target,
            "record": self.record.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DistilledRow:
        fields = {k: v for k, v in data.items() if k not in ("domain", "record")}
        return cls(**fields, record=Record.from_json(data["record"]))


def distill_records(
    model: Any,
    tokenizer: Any,
    records: Sequence[Record],
    cfg: DistillConfig,
    *,
    seed: int,
    progress: str | None = None,
    stats: GenerationStats | None = None,
) -> list[DistilledRow]:
    """Rewrite every record with `model`, filter, and choose each training target."""
    from fedsdr.generation import generate_detailed

    if not records:
        return []
    references = tokenizer([r.output for r in records], add_special_tokens=False)["input_ids"]
    outputs = generate_detailed(
        model,
        tokenizer,
        [build_rewrite_messages(r, cfg.template) for r in records],
        max_new_tokens=[cfg.budget(len(ids)) for ids in references],
        batch_size=cfg.batch_size,
        do_sample=cfg.do_sample,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        seed=seed,
        progress=progress,
        stats=stats,
    )
    rows = []
    for record, out in zip(records, outputs, strict=True):
        rewrite = out.text.strip()
        truncated = not out.finished
        consistent = is_consistent(record, rewrite)
        fallback = check_rewrite(record, rewrite, truncated, cfg.filters, consistent=consistent)
        rows.append(
            DistilledRow(
                id=record.id,
                raw=record.output,
                rewrite=rewrite,
                target=record.output if fallback else rewrite,
                fallback=fallback,
                truncated=truncated,
                length_ratio=length_ratio(rewrite, record.output),
                record=record,
                consistent_rewrite=consistent,
                consistent_target=is_consistent(record, record.output) if fallback else consistent,
            )
        )
    return rows


def distilled_records(rows: Sequence[DistilledRow]) -> list[Record]:
    """The distilled training set: each record with `output` replaced by its target."""
    return [row.record.replace(output=row.target) for row in rows]
