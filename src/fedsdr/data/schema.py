"""The one record schema every loader produces and every later stage consumes."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

REQUIRED_FIELDS = ("instruction", "output")
TEXT_FIELDS = ("id", "instruction", "input", "output", "domain", "answer", "scorer")
CHOICE_SCORER = "choice"


class DataError(ValueError):
    """Bad input data; the message names the file, line and field."""


def _letter(i: int) -> str:
    return chr(ord("A") + i) if i < 26 else str(i)


def resolve_choice(record_id: str, choices: tuple[str, ...], answer: str | None) -> int:
    """Index of the right choice named by `answer`: its text (exact, then ignoring case and
    surrounding whitespace), else a letter "A", "B"... (also "(B)", "B." or "B)"), else a 0-based
    index "0", "1"... Raises DataError naming the record when it names none."""
    if answer is None or not answer.strip():
        raise DataError(f"record {record_id!r}: a multiple-choice record needs an answer naming a choice")
    if answer in choices:
        return choices.index(answer)
    folded = [c.strip().casefold() for c in choices]
    key = answer.strip().casefold()
    if key in folded:
        return folded.index(key)
    letter = answer.strip().strip("().").strip().upper()
    if len(letter) == 1 and "A" <= letter <= "Z" and ord(letter) - ord("A") < len(choices):
        return ord(letter) - ord("A")
    if answer.strip().isdigit() and int(answer.strip()) < len(choices):
        return int(answer.strip())
    shown = ", ".join(f"{_letter(i)}={c!r}" for i, c in enumerate(choices[:6]))
    more = ", ..." if len(choices) > 6 else ""
    raise DataError(
        f"record {record_id!r}: answer {answer!r} names none of its {len(choices)} choices "
        f"({shown}{more}); give the choice's text, its letter (A, B, ...) or its 0-based index"
    )


@dataclass(frozen=True)
class Record:
    """One instruction example.

    id: unique within its dataset.
    instruction: the task given to the model.
    output: the reference response (what supervised fine-tuning trains on).
    domain: task family (e.g. "arithmetic", "code"); drives partitioning and per-domain metrics.
    input: optional extra context appended to the instruction.
    answer: optional verifiable final answer; when set, `scorer` names how to check it. For a
        multiple-choice record: the right choice's text, letter ("A", "B"...) or index ("0"...).
    scorer: name of a scorer in `fedsdr.scoring` ("exact", "numeric", "reasoning_gym",
        "humaneval", "choice", ...); None means open-ended (ROUGE-L).
    meta: JSON-serialisable extras a scorer needs (reasoning-gym entry, unit tests...).
    choices: optional answer options of a multiple-choice record (scorer "choice"), ranked by
        log-likelihood at evaluation; the answer is resolved to `choice_index` on construction.
    """

    id: str
    instruction: str
    output: str
    domain: str = "default"
    input: str = ""
    answer: str | None = None
    scorer: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    choices: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.choices is not None:
            if isinstance(self.choices, str) or not all(isinstance(c, str) for c in self.choices):
                raise DataError(f"record {self.id!r}: choices must be a list of strings")
            object.__setattr__(self, "choices", tuple(self.choices))
        index = None
        if self.scorer == CHOICE_SCORER:
            if not self.choices or len(self.choices) < 2:
                raise DataError(f"record {self.id!r}: scorer 'choice' needs at least two choices")
            if any(not c.strip() for c in self.choices):
                raise DataError(f"record {self.id!r}: a choice is empty")
            index = resolve_choice(self.id, self.choices, self.answer)
        object.__setattr__(self, "_choice_index", index)

    @property
    def choice_index(self) -> int | None:
        """Index of the right choice of a multiple-choice record (None otherwise)."""
        return self._choice_index  # type: ignore[attr-defined]

    @property
    def is_choice(self) -> bool:
        """Whether the record is scored by log-likelihood over its choices."""
        return self.scorer == CHOICE_SCORER

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
        data = asdict(self)
        if data["choices"] is None:
            del data["choices"]  # records without choices keep their old JSON form
        else:
            data["choices"] = list(data["choices"])
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        return cls(**data)


def dumps_records(records: list[Record]) -> str:
    """JSONL text for a list of records."""
    return "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in records)
