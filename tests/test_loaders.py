"""User data loaders: every format gives the same `Record`s; every bad input names file, line, field."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fedsdr.data.loaders import load_records
from fedsdr.data.schema import DataError, Record, dumps_records

ROWS: list[dict[str, Any]] = [
    {
        "id": "r1",
        "instruction": "Add 2 and 3.",
        "input": "",
        "output": "5",
        "domain": "arithmetic",
        "answer": "5",
        "scorer": "numeric",
    },
    {
        "id": "r2",
        "instruction": "Sort these words.",
        "input": "pear apple",
        "output": "apple pear",
        "domain": "word_sorting",
        "answer": "apple pear",
        "scorer": "exact",
    },
    {
        "id": "r3",
        "instruction": "Explain what a café's load-bearing wall does.",
        "input": "",
        "output": "It carries the weight of the floors above.",
        "domain": "construction",
        "answer": None,
        "scorer": None,
    },
]

EXPECTED = [
    Record(
        id="r1",
        instruction="Add 2 and 3.",
        output="5",
        domain="arithmetic",
        answer="5",
        scorer="numeric",
    ),
    Record(
        id="r2",
        instruction="Sort these words.",
        input="pear apple",
        output="apple pear",
        domain="word_sorting",
        answer="apple pear",
        scorer="exact",
    ),
    Record(
        id="r3",
        instruction="Explain what a café's load-bearing wall does.",
        output="It carries the weight of the floors above.",
        domain="construction",
    ),
]


# --- writers -------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def write_json(path: Path, rows: list[Any]) -> Path:
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def write_json_data(path: Path, rows: list[Any]) -> Path:
    path.write_text(json.dumps({"version": 1, "data": rows}, ensure_ascii=False), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_datasets(path: Path, rows: list[dict[str, Any]]) -> Path:
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


WRITERS: dict[str, tuple[str, Callable[[Path, list[Any]], Path]]] = {
    "jsonl": ("data.jsonl", write_jsonl),
    "json-list": ("data.json", write_json),
    "json-data": ("data.json", write_json_data),
    "csv": ("data.csv", write_csv),
    "parquet": ("data.parquet", write_parquet),
    "datasets": ("data_ds", write_datasets),
}


def write(kind: str, tmp_path: Path, rows: list[Any]) -> Path:
    name, writer = WRITERS[kind]
    return writer(tmp_path / name, rows)


def load_error(path: Path | str, **kwargs: Any) -> str:
    with pytest.raises(DataError) as info:
        load_records(str(path), **kwargs)
    return str(info.value)


# --- good inputs ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(WRITERS))
def test_every_format_gives_the_same_records(kind: str, tmp_path: Path) -> None:
    path = write(kind, tmp_path, ROWS)
    records = load_records(str(path))
    assert records == EXPECTED
    assert all(isinstance(r, Record) for r in records)


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_field_mapping(kind: str, tmp_path: Path) -> None:
    rows = [
        {
            "key": r["id"],
            "question": r["instruction"],
            "context": r["input"],
            "response": r["output"],
            "category": r["domain"],
            "gold": r["answer"],
            "check": r["scorer"],
        }
        for r in ROWS
    ]
    path = write(kind, tmp_path, rows)
    fields = {
        "id": "key",
        "instruction": "question",
        "input": "context",
        "output": "response",
        "domain": "category",
        "answer": "gold",
        "scorer": "check",
    }
    assert load_records(str(path), fields=fields) == EXPECTED


def test_partial_field_mapping_keeps_other_defaults(tmp_path: Path) -> None:
    rows = [
        {"id": "a", "question": "Q1?", "response": "A1", "category": "faq"},
        {"id": "b", "question": "Q2?", "response": "A2", "category": "math"},
    ]
    path = write_jsonl(tmp_path / "mapped.jsonl", rows)
    records = load_records(
        str(path), fields={"instruction": "question", "output": "response", "domain": "category"}
    )
    assert records == [
        Record(id="a", instruction="Q1?", output="A1", domain="faq"),
        Record(id="b", instruction="Q2?", output="A2", domain="math"),
    ]


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_default_domain_and_generated_ids(kind: str, tmp_path: Path) -> None:
    rows = [{"instruction": f"Q{i}", "output": f"A{i}"} for i in range(3)]
    path = write(kind, tmp_path, rows)
    records = load_records(str(path), default_domain="general")
    assert [r.domain for r in records] == ["general"] * 3
    assert len({r.id for r in records}) == 3
    assert load_records(str(path))[0].domain == "default"


def test_answer_without_scorer_gets_exact(tmp_path: Path) -> None:
    rows = [
        {"id": "a", "instruction": "2+2?", "output": "4", "answer": "4"},
        {"id": "b", "instruction": "3+3?", "output": "6", "answer": "6", "scorer": "numeric"},
        {"id": "c", "instruction": "Tell me a story.", "output": "Once upon a time."},
    ]
    records = load_records(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    assert [(r.answer, r.scorer) for r in records] == [
        ("4", "exact"),
        ("6", "numeric"),
        (None, None),
    ]
    assert [r.verifiable for r in records] == [True, True, False]


def test_answer_without_scorer_csv_empty_cell(tmp_path: Path) -> None:
    rows = [{"id": "a", "instruction": "2+2?", "output": "4", "answer": "4", "scorer": ""}]
    (record,) = load_records(str(write_csv(tmp_path / "d.csv", rows)))
    assert (record.answer, record.scorer) == ("4", "exact")


def test_numbers_are_read_as_text(tmp_path: Path) -> None:
    rows = [{"id": 7, "instruction": "2+2?", "output": 4, "answer": 4}]
    (record,) = load_records(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    assert (record.id, record.output, record.answer) == ("7", "4", "4")


def test_blank_jsonl_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(
        "\n" + json.dumps(ROWS[0]) + "\n\n   \n" + json.dumps(ROWS[1]) + "\n", encoding="utf-8"
    )
    assert load_records(str(path)) == EXPECTED[:2]


def test_meta_is_kept(tmp_path: Path) -> None:
    rows = [{"id": "a", "instruction": "q", "output": "a", "meta": {"tests": ["assert f()"]}}]
    (record,) = load_records(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    assert record.meta == {"tests": ["assert f()"]}


def test_explicit_format_overrides_extension(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    write_jsonl(path, ROWS)
    assert load_records(str(path), fmt="jsonl") == EXPECTED


@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\x85"])
def test_jsonl_round_trip_with_unicode_line_separators(sep: str, tmp_path: Path) -> None:
    records = [
        Record(id="a", instruction="q", output=f"first{sep}second"),
        Record(id="b", instruction="q", output="x"),
    ]
    path = tmp_path / "d.jsonl"
    path.write_text(dumps_records(records), encoding="utf-8")
    assert load_records(str(path)) == records


# --- bad inputs ----------------------------------------------------------------------------


def test_missing_field_jsonl(tmp_path: Path) -> None:
    rows = [dict(ROWS[0]), {k: v for k, v in ROWS[1].items() if k != "output"}, dict(ROWS[2])]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    msg = load_error(path)
    assert str(path) in msg
    assert f"{path}:2" in msg
    assert "output" in msg


def test_missing_mapped_field_names_the_source_column(tmp_path: Path) -> None:
    rows = [{"question": "Q", "answer_text": "A"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    msg = load_error(path, fields={"instruction": "question", "output": "response"})
    assert f"{path}:1" in msg
    assert "response" in msg


def test_missing_field_json_names_record(tmp_path: Path) -> None:
    rows = [dict(ROWS[0]), {k: v for k, v in ROWS[1].items() if k != "instruction"}]
    path = write_json(tmp_path / "d.json", rows)
    msg = load_error(path)
    assert str(path) in msg
    assert "record 1" in msg
    assert "instruction" in msg


def test_missing_column_csv(tmp_path: Path) -> None:
    rows = [{k: v for k, v in r.items() if k != "output"} for r in ROWS]
    path = write_csv(tmp_path / "d.csv", rows)
    msg = load_error(path)
    assert f"{path}:2" in msg  # line 1 is the header
    assert "output" in msg


def test_null_field_parquet_names_row(tmp_path: Path) -> None:
    rows = [dict(r) for r in ROWS]
    rows[1]["output"] = None
    path = write_parquet(tmp_path / "d.parquet", rows)
    msg = load_error(path)
    assert str(path) in msg
    assert "row 1" in msg
    assert "output" in msg


def test_missing_field_datasets_folder_names_row(tmp_path: Path) -> None:
    rows = [dict(r) for r in ROWS]
    rows[2]["output"] = None
    path = write_datasets(tmp_path / "ds", rows)
    msg = load_error(path)
    assert str(path) in msg
    assert "row 2" in msg
    assert "output" in msg


@pytest.mark.parametrize("empty", ["", "   ", "\n\t"])
def test_empty_output_jsonl(empty: str, tmp_path: Path) -> None:
    rows = [dict(r) for r in ROWS]
    rows[1]["output"] = empty
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    msg = load_error(path)
    assert f"{path}:2" in msg
    assert "output" in msg
    assert "empty" in msg


def test_empty_output_csv_cell(tmp_path: Path) -> None:
    rows = [dict(r) for r in ROWS]
    rows[2]["output"] = ""
    path = write_csv(tmp_path / "d.csv", rows)
    msg = load_error(path)
    assert f"{path}:4" in msg
    assert "output" in msg


def test_empty_instruction(tmp_path: Path) -> None:
    rows = [dict(ROWS[0], instruction=" ")]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    msg = load_error(path)
    assert f"{path}:1" in msg
    assert "instruction" in msg


@pytest.mark.parametrize(
    ("value", "type_name"), [(["a", "b"], "list"), ({"text": "a"}, "dict"), (True, "bool")]
)
def test_wrong_type_jsonl(value: Any, type_name: str, tmp_path: Path) -> None:
    rows = [dict(r) for r in ROWS]
    rows[1]["output"] = value
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    msg = load_error(path)
    assert f"{path}:2" in msg
    assert "output" in msg
    assert type_name in msg


def test_wrong_type_optional_field(tmp_path: Path) -> None:
    rows = [dict(ROWS[0], domain=["a"])]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    msg = load_error(path)
    assert f"{path}:1" in msg
    assert "domain" in msg


def test_wrong_type_json_record(tmp_path: Path) -> None:
    rows = [dict(r) for r in ROWS]
    rows[2]["output"] = {"text": "a"}
    path = write_json(tmp_path / "d.json", rows)
    msg = load_error(path)
    assert str(path) in msg
    assert "record 2" in msg
    assert "output" in msg


def test_row_that_is_not_an_object(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], ["q", "a"]])
    msg = load_error(path)
    assert f"{path}:2" in msg
    assert "list" in msg


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(r, ensure_ascii=False).encode("utf-8") for r in ROWS[:2]]
    lines.append(json.dumps(dict(ROWS[2], id="r3"), ensure_ascii=False).encode("latin-1"))
    path.write_bytes(b"\n".join(lines) + b"\n")
    msg = load_error(path)
    assert str(path) in msg
    assert f"{path}:3" in msg
    assert "UTF-8" in msg


def test_not_utf8_csv(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes("id,instruction,output\nr1,q,a\nr2,caf\u00e9,b\n".encode("latin-1"))
    msg = load_error(path)
    assert f"{path}:3" in msg
    assert "UTF-8" in msg


def test_invalid_json_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps(ROWS[0]) + "\n" + '{"id": "r2", "instruction": "q",\n', encoding="utf-8"
    )
    msg = load_error(path)
    assert f"{path}:2" in msg
    assert "invalid JSON" in msg


def test_invalid_json_file(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(
        '[\n {"id": "a", "instruction": "q", "output": "a"},\n {oops}\n]\n', encoding="utf-8"
    )
    msg = load_error(path)
    assert f"{path}:3" in msg
    assert "invalid JSON" in msg


@pytest.mark.parametrize("content", ['{"a": 1}', '{"a": [], "b": []}', '"text"', "3"])
def test_json_without_a_record_list(content: str, tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(content, encoding="utf-8")
    msg = load_error(path)
    assert str(path) in msg
    assert "list" in msg


@pytest.mark.parametrize("kind", ["jsonl", "json-list", "csv", "parquet"])
def test_duplicate_id(kind: str, tmp_path: Path) -> None:
    rows = [dict(r) for r in ROWS]
    rows[2]["id"] = "r1"
    path = write(kind, tmp_path, rows)
    msg = load_error(path)
    assert str(path) in msg
    assert "duplicate id" in msg
    assert "'r1'" in msg
    assert "0" in msg and "2" in msg  # the two clashing records


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("hello\n", encoding="utf-8")
    msg = load_error(path)
    assert str(path) in msg
    assert ".txt" in msg


def test_unknown_explicit_format(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    msg = load_error(path, fmt="xml")
    assert str(path) in msg
    assert "xml" in msg


@pytest.mark.parametrize(
    "name", ["missing.jsonl", "missing.json", "missing.csv", "missing.parquet"]
)
def test_missing_file(name: str, tmp_path: Path) -> None:
    path = tmp_path / name
    msg = load_error(path)
    assert str(path) in msg
    assert "not found" in msg


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.json", "empty.csv", "empty.parquet"])
def test_empty_file(name: str, tmp_path: Path) -> None:
    path = tmp_path / name
    path.write_bytes(b"")
    msg = load_error(path)
    assert str(path) in msg


def test_blank_jsonl_and_header_only_csv_have_no_records(tmp_path: Path) -> None:
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n\n", encoding="utf-8")
    assert "no records" in load_error(blank)
    header = tmp_path / "header.csv"
    header.write_text("id,instruction,output\n", encoding="utf-8")
    assert "no records" in load_error(header)
    empty_list = tmp_path / "empty.json"
    empty_list.write_text('{"data": []}', encoding="utf-8")
    assert "no records" in load_error(empty_list)


def test_corrupt_parquet(tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"this is not parquet at all")
    msg = load_error(path)
    assert str(path) in msg
    assert "Parquet" in msg
