"""Read user data (JSONL, JSON, CSV, Parquet, `datasets`) into validated `Record`s.

Every error names the file, the line (or row) and the field.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from fedsdr.data.schema import CHOICE_SCORER, DataError, Record
from fedsdr.scoring import record_problem

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def detect_format(source: str) -> str:
    path = Path(source)
    if path.is_dir():
        return "datasets"
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        if path.exists():
            raise DataError(f"{source}: unknown file type {path.suffix!r}; use one of {sorted(FORMATS)}")
        if source.startswith((".", "/", "~")) or path.suffix:
            raise DataError(f"{source}: file not found")
        return "datasets"  # a hub name such as "tatsu-lab/alpaca"
    return fmt


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    try:
        return raw.decode("utf-8-sig")  # tolerate the byte-order mark spreadsheets write
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {e.start})") from None


def _rows_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    # split on "\n" only: str.splitlines() would also cut at U+2028 inside JSON strings
    for n, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{n}", json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: invalid JSON: {e.msg}") from None


def _rows_json(path: Path) -> Iterator[tuple[str, Any]]:
    text = _read_text(path)
    if not text.strip():
        raise DataError(f"{path}: no records (the file is empty)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a list of records (or an object holding one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of records, got {type(data).__name__}")
    for i, row in enumerate(data):
        yield f"{path}: record {i}", row


# Python's csv refuses fields over 131072 characters by default; a long document or program
# in one cell is legitimate. The largest limit the platform's C long holds (2**31 - 1 on Windows).
_CSV_FIELD_LIMIT = min(sys.maxsize, 2**31 - 1)


def _rows_csv(path: Path) -> Iterator[tuple[str, Any]]:
    reader = csv.DictReader(_read_text(path).splitlines(keepends=True))
    previous = csv.field_size_limit(_CSV_FIELD_LIMIT)  # process-wide: restored after reading
    try:
        rows = []
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                raise DataError(f"{path}:{reader.line_num}: invalid CSV: {e}") from None
            rows.append((f"{path}:{reader.line_num}", row))
    finally:
        csv.field_size_limit(previous)
    yield from rows


def _rows_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read Parquet: {e}") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}: row {i}", row


def _rows_datasets(source: str, split: str) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        if Path(source).is_dir():
            ds = datasets.load_from_disk(source)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        else:
            ds = datasets.load_dataset(source, split=split)
    except Exception as e:
        raise DataError(f"{source}: cannot load as a `datasets` dataset (split {split!r}): {e}") from None
    for i, row in enumerate(ds):
        yield f"{source}[{split}] row {i}", row


def _text(where: str, row: Mapping[str, Any], column: str, logical: str, required: bool) -> str | None:
    value = row.get(column)
    if value is None or (isinstance(value, float) and value != value):  # NaN from pandas/CSV
        if required:
            raise DataError(f"{where}: missing field {column!r} ({logical})")
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise DataError(f"{where}: field {column!r} ({logical}) must be text, got {type(value).__name__}")
    return str(value)


def _choices(where: str, row: Mapping[str, Any], column: str) -> tuple[str, ...] | None:
    """A list of choices: a list/tuple/array of texts, or (CSV) a cell holding a JSON list."""
    value = row.get(column)
    if value is None or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = None
        if not isinstance(value, list):
            raise DataError(f"{where}: field {column!r} (choices) must be a list, or a JSON list in text "
                            '(e.g. ["yes", "no"])')
    if hasattr(value, "tolist") and not isinstance(value, list):  # numpy arrays from pandas/datasets
        value = value.tolist()
    if not isinstance(value, list | tuple):
        raise DataError(f"{where}: field {column!r} (choices) must be a list, got {type(value).__name__}")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, str | int | float):
            raise DataError(f"{where}: field {column!r} (choices) item {i} must be text, got {type(item).__name__}")
        out.append(str(item))
    return tuple(out)


def _meta(where: str, row: Mapping[str, Any]) -> dict[str, Any]:
    """The record's extras: an object, or (CSV) a cell holding a JSON object."""
    value = row.get("meta")
    if value is None or (isinstance(value, float) and value != value) or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: field 'meta' is not a JSON object: {e.msg}") from None
    if not isinstance(value, Mapping):
        raise DataError(f"{where}: field 'meta' must be an object, got {type(value).__name__}")
    return dict(value)


def to_record(where: str, row: Any, fields: Mapping[str, str], default_domain: str, index: int) -> Record:
    """Validate one raw row and map its columns to a `Record`."""
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected an object with fields, got {type(row).__name__}")
    instruction = _text(where, row, fields["instruction"], "instruction", required=True)
    output = _text(where, row, fields["output"], "output", required=True)
    assert instruction is not None and output is not None
    if not instruction.strip():
        raise DataError(f"{where}: field {fields['instruction']!r} (instruction) is empty")
    if not output.strip():
        raise DataError(f"{where}: field {fields['output']!r} (output) is empty")
    answer = _text(where, row, fields["answer"], "answer", required=False)
    scorer = _text(where, row, fields["scorer"], "scorer", required=False)
    choices = _choices(where, row, fields.get("choices", "choices"))
    if choices and not scorer:
        scorer = CHOICE_SCORER
    if answer and not scorer:
        scorer = "exact"
    try:
        record = Record(
            id=_text(where, row, fields["id"], "id", required=False) or f"rec-{index:06d}",
            instruction=instruction,
            input=_text(where, row, fields["input"], "input", required=False) or "",
            output=output,
            domain=_text(where, row, fields["domain"], "domain", required=False) or default_domain,
            answer=answer or None,
            scorer=scorer or None,
            meta=_meta(where, row),
            choices=choices,
        )
    except DataError as e:  # e.g. a multiple-choice answer that names no choice
        raise DataError(f"{where}: {e}") from None
    problem = record_problem(record)  # a record no scorer can judge stops here, not after the model loads
    if problem:
        field, message = problem
        raise DataError(f"{where}: field {fields.get(field, field)!r}: {message}")
    return record


def load_records(
    source: str,
    *,
    fmt: str = "auto",
    fields: Mapping[str, str] | None = None,
    split: str = "train",
    default_domain: str = "default",
) -> list[Record]:
    """Load and validate every record of a file, folder or `datasets` name."""
    names = ("id", "instruction", "input", "output", "domain", "answer", "scorer", "choices")
    fields = {**{k: k for k in names}, **(fields or {})}
    fmt = detect_format(source) if fmt == "auto" else fmt
    readers = {
        "jsonl": lambda: _rows_jsonl(Path(source)),
        "json": lambda: _rows_json(Path(source)),
        "csv": lambda: _rows_csv(Path(source)),
        "parquet": lambda: _rows_parquet(Path(source)),
        "datasets": lambda: _rows_datasets(source, split),
    }
    if fmt not in readers:
        raise DataError(f"{source}: unknown format {fmt!r}; use one of {sorted(readers)}")
    records = [to_record(where, row, fields, default_domain, i) for i, (where, row) in enumerate(readers[fmt]())]
    if not records:
        empty = fmt != "datasets" and Path(source).is_file() and Path(source).stat().st_size == 0
        raise DataError(f"{source}: no records" + (" (the file is empty)" if empty else ""))
    seen: dict[str, int] = {}
    for i, r in enumerate(records):
        if r.id in seen:
            raise DataError(f"{source}: duplicate id {r.id!r} (records {seen[r.id]} and {i})")
        seen[r.id] = i
    return records
