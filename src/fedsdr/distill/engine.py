"""FedSD rewriting: each record is answered again by the model, then filtered.

The training target is the rewrite unless a filter fires; then it is the raw output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedsdr.config import DistillConfig, FilterConfig
from fedsdr.data.schema import Record
from fedsdr.distill.filters import check_rewrite, is_consistent, length_ratio
from fedsdr.distill.prompt import build_rewrite_messages

if TYPE_CHECKING:  # torch is imported only when rewriting runs, not with the config
    from fedsdr.generation import GenerationStats


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


def rewrite_records(
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
    rows = [
        _choose_target(record, out.text.strip(), not out.finished, cfg.filters, is_consistent(record, out.text.strip()))
        for record, out in zip(records, outputs, strict=True)
    ]
    return rows


def _choose_target(record: Record, rewrite: str, truncated: bool, filters: FilterConfig,
                   consistent: bool | None) -> DistilledRow:
    fallback = check_rewrite(record, rewrite, truncated, filters, consistent=consistent)
    return DistilledRow(
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


def refilter(rows: Sequence[DistilledRow], filters: FilterConfig) -> list[DistilledRow]:
    """The same rewrites with each training target chosen again under `filters` (the rewrite
    cache is keyed by the generation alone, so both filter profiles share one rewriting pass)."""
    return [_choose_target(r.record, r.rewrite, r.truncated, filters, r.consistent_rewrite) for r in rows]


def distilled_set(rows: Sequence[DistilledRow]) -> list[Record]:
    """The distilled training set: each record with `output` replaced by its target."""
    return [row.record.replace(output=row.target) for row in rows]
