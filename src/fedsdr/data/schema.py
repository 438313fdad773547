"""The one record schema every loader produces and every later stage consumes."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

REQUIRED_FIELDS = ("instruction", "output")
TEXT_FIELDS = ("id", "instruction", "input", "output", "domain", "answer", "scorer")


class DataError(ValueError):
    """Bad input data; the message names the file, line and field."""


@dataclass(frozen=True)
class Record:
    """One instruction example.

    id: unique within its dataset.
    instruction: the task given to the model.
    output: the reference response (what supervised fine-tuning trains on).
    domain: task family (e.g. "arithmetic", "code"); drives partitioning and per-domain metrics.
    input: optional extra context appended to the instruction.
    answer: optional verifiable final answer; when set, `scorer` names how to check it.
    scorer: name of a scorer in `fedsdr.scoring` ("exact", "numeric", "reasoning_gym",
        "humaneval", ...); None means open-ended (ROUGE-L).
    meta: JSON-serialisable extras a scorer needs (reasoning-gym entry, unit tests...).
    """

    id: str
    instruction: str
    output: str
    domain: str = "default"
    input: str = ""
    answer: str | None = None
    scorer: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def prompt(self) -> str:
        """The user turn: instruction, then the optional input."""
        return f"{self.instruction}\n\n{self.input}" if self.input else self.instruction

    @property
    def verifiable(self) -> bool:
        return self.scorer is not None

    def replace(self, **changes: Any) -> Record:
        data = asdict(self)
        data.update(changes)
        return Record(**data)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        return cls(**data)


def dumps_records(records: list[Record]) -> str:
    """JSONL text for a list of records."""
    return "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in records)
