"""Bad input stops `fedsdr run` before the model loads, with a message naming the file, line,
field or config key, and no traceback (issue 10, "Bad input, clear errors").

Each case runs the real CLI entry on the smoke config pointed at a bad file in tmp_path; a
tripwire on `load_base_model` fails the test if loading is ever reached. The loader-level
checks of the same messages are in test_loaders.py; here the point is the CLI path and order.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedsdr.cli import main
from fedsdr.data.loaders import load_records
from fedsdr.models import loading
from fedsdr.scoring import SCORERS, record_problem

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "smoke.toml"

GOOD = {"id": "g1", "instruction": "Add 2 and 3.", "output": "5", "domain": "arithmetic",
        "answer": "5", "scorer": "numeric"}
CODE = {"id": "c1", "instruction": "Write add(a, b).", "output": "def add(a, b):\n    return a + b",
        "domain": "code", "scorer": "humaneval"}


def jsonl(*rows: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.fixture(autouse=True)
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading the model at all is a failure: every case must stop before it."""
    monkeypatch.setattr(loading, "load_base_model", lambda *a, **k: pytest.fail("the model was loaded"))


def run_cli(capsys: pytest.CaptureFixture[str], out: Path, *options: str, config: Path = SMOKE) -> str:
    code = main(["run", "--config", str(config), "--out", str(out), *options])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert err.startswith("error: ")
    assert not out.exists()  # nothing written: no run folder, no checkpoints/
    return err


def bad_data(capsys: pytest.CaptureFixture[str], tmp_path: Path, name: str, text: str, *options: str) -> tuple[str, Path]:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    err = run_cli(capsys, tmp_path / "run", "--set", f'data.source="{path}"', *options)
    assert str(path) in err
    return err, path


# --------------------------------------------------------------------------- records a scorer cannot judge


def test_unknown_scorer_names_file_line_field_and_the_known_scorers(capsys, tmp_path: Path) -> None:
    err, path = bad_data(capsys, tmp_path, "data.jsonl", jsonl(GOOD, {**GOOD, "id": "g2", "scorer": "numerc"}))
    assert f"{path}:2:" in err
    assert "field 'scorer'" in err and "unknown scorer 'numerc'" in err
    assert all(name in err for name in SCORERS)
    assert "did you mean 'numeric'?" in err


def test_unknown_scorer_names_the_mapped_csv_column(capsys, tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["instruction", "output", "answer", "grader"])
        writer.writeheader()
        writer.writerow({"instruction": "Say yes.", "output": "yes", "answer": "yes", "grader": "exact"})
        writer.writerow({"instruction": "Say no.", "output": "no", "answer": "no", "grader": "llm-judge"})
    err = run_cli(capsys, tmp_path / "run", "--set", f'data.source="{path}"', "--set", "data.fields.scorer=grader")
    assert f"{path}:3:" in err and "field 'grader'" in err and "'llm-judge'" in err


@pytest.mark.parametrize("answer", ["five", "5 apples and 3 pears", ""])
def test_numeric_scorer_with_an_answer_that_is_no_number(answer: str, capsys, tmp_path: Path) -> None:
    row = {**GOOD, "id": "g2", "answer": answer}
    err, path = bad_data(capsys, tmp_path, "data.jsonl", jsonl(GOOD, GOOD | {"id": "g3"}, row))
    assert f"{path}:3:" in err and "field 'answer'" in err and "numeric" in err


@pytest.mark.parametrize(
    ("meta", "missing"),
    [(None, "test, entry_point"), ({"entry_point": "add"}, "test"), ({"test": "def check(f): pass"}, "entry_point")],
)
def test_humaneval_record_without_tests(meta: dict | None, missing: str, capsys, tmp_path: Path) -> None:
    row = CODE if meta is None else {**CODE, "meta": meta}
    err, path = bad_data(capsys, tmp_path, "data.jsonl", jsonl(GOOD, row))
    assert f"{path}:2:" in err and "field 'meta'" in err and "meta.test" in err
    assert err.rstrip().endswith(f"missing: {missing}")


def test_bad_record_in_the_test_source_stops_too(capsys, tmp_path: Path) -> None:
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text(jsonl(*({**GOOD, "id": f"g{i}"} for i in range(6))), encoding="utf-8")
    test.write_text(jsonl(CODE), encoding="utf-8")
    err = run_cli(capsys, tmp_path / "run", "--set", f'data.source="{train}"', "--set", f'data.test_source="{test}"',
                  "--set", "partition.method=iid")
    assert f"{test}:1:" in err and "humaneval" in err


def test_record_problem_accepts_every_bundled_benchmark_record() -> None:
    from fedsdr.data.benchmark import build_multi_domain

    records = build_multi_domain(4, seed=0)
    assert {r.scorer for r in records} - {None}  # verifiable records are among them
    assert [(r.id, record_problem(r)) for r in records if record_problem(r)] == []


# --------------------------------------------------------------------------- malformed files


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("bad.jsonl", jsonl(GOOD, GOOD | {"id": "g2"}) + '{"id": "g3", "instruction": "x",\n', ":3: invalid JSON"),
        ("bad.json", '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]\n',
         ":3: invalid JSON"),
        ("missing.jsonl", jsonl(GOOD, {"id": "g2", "instruction": "Add 1 and 1."}), ":2: missing field 'output'"),
        ("missing.csv", "id,instruction,output\nr1,Say hi.,hi\nr2,Say bye.,\n", ":3: field 'output' (output) is empty"),
        ("empty.jsonl", "", ": no records (the file is empty)"),
        ("empty.json", "", ": no records (the file is empty)"),
        ("empty.csv", "", ": no records (the file is empty)"),
        ("meta.csv", 'instruction,output,meta\nSay hi.,hi,{not json\n', ":2: field 'meta' is not a JSON object"),
    ],
)
def test_malformed_data_file(name: str, text: str, expected: str, capsys, tmp_path: Path) -> None:
    err, path = bad_data(capsys, tmp_path, name, text)
    assert f"{path}{expected}" in err


# --------------------------------------------------------------------------- long CSV fields


def test_csv_field_over_the_csv_module_limit_loads(tmp_path: Path) -> None:
    """Python's csv refuses fields over 131072 characters by default; a long program or
    document in one cell is legitimate, so the loader raises the limit while it reads."""
    before = csv.field_size_limit()
    long_output = "x" * (before + 10_000)
    path = tmp_path / "long.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["instruction", "output"])
        writer.writeheader()
        writer.writerow({"instruction": "Repeat x.", "output": long_output})
        writer.writerow({"instruction": "Say hi.", "output": "hi"})
    records = load_records(str(path))
    assert [len(r.output) for r in records] == [len(long_output), 2]
    assert csv.field_size_limit() == before  # the process-wide limit is restored


def test_csv_with_a_meta_cell_holding_json_loads_a_code_record(tmp_path: Path) -> None:
    path = tmp_path / "code.csv"
    meta = {"test": "def check(f):\n    assert f(1, 2) == 3", "entry_point": "add"}
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["instruction", "output", "scorer", "meta"])
        writer.writeheader()
        writer.writerow({"instruction": CODE["instruction"], "output": CODE["output"], "scorer": "humaneval",
                         "meta": json.dumps(meta)})
    [record] = load_records(str(path))
    assert record.meta == meta


# --------------------------------------------------------------------------- model name and config


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("smollm2-135m-instrct", "Did you mean 'smollm2-135m-instruct'?"),
        ("smollm-135m", "Did you mean 'smollm2-135m-instruct'?"),
        ("tiny_random", "Did you mean 'tiny-random'?"),
        ("./models/no-such-folder", "folder './models/no-such-folder' not found"),
        ("someone/no-such-model", "not in the Hugging Face cache"),
    ],
)
def test_misspelt_model_name(name: str, expected: str, capsys, tmp_path: Path) -> None:
    err = run_cli(capsys, tmp_path / "run", "--set", f'model.name="{name}"')
    assert "model.name" in err and expected in err


def test_model_name_error_at_load_time_is_a_config_error(tmp_path: Path) -> None:
    from fedsdr.config import ConfigError
    from fedsdr.models.resolve import resolve_model_path

    with pytest.raises(ConfigError, match="model.name"):
        resolve_model_path("tiny-randm", cache_dir=tmp_path)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("extends = 5", "extends must be a config file path in quotes, got int 5"),
        ("extends = ['smoke.toml']", "extends must be a config file path in quotes, got list"),
        ("extends = 'no-such-base.toml'", "extends = 'no-such-base.toml': config file not found"),
    ],
)
def test_bad_extends(line: str, expected: str, capsys, tmp_path: Path) -> None:
    config = tmp_path / "child.toml"
    config.write_text(f'{line}\nname = "child"\n', encoding="utf-8")
    err = run_cli(capsys, tmp_path / "run", config=config)
    assert str(config) in err and expected in err


# --------------------------------------------------------------------------- the installed entry point


def test_the_command_prints_one_line_and_no_traceback(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(jsonl(GOOD, {**GOOD, "id": "g2", "scorer": "regex"}), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "fedsdr.cli", "run", "--config", str(SMOKE), "--out", str(tmp_path / "run"),
         "--set", f'data.source="{path}"'],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: {path}:2: field 'scorer': unknown scorer 'regex' (known scorers: {', '.join(sorted(SCORERS))})"
    )
    assert not (tmp_path / "run").exists()
