"""`fedsdr eval`: lm-evaluation-harness on a run's global and personalized models, offline, on a
local-file task and the tiny model. Skipped where the optional extra is not installed."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

pytest.importorskip("lm_eval")

from fedsdr.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ITEMS = [
    ("What is 2 + 2?", ["3", "4", "5"], 1),
    ("The capital of France is", ["Paris", "Rome", "Berlin"], 0),
    ("Which one is a colour?", ["table", "blue", "seven"], 1),
    ("Water freezes at", ["0 degrees", "50 degrees", "90 degrees"], 0),
    ("A cat is an", ["animal", "planet", "number"], 0),
    ("The opposite of hot is", ["warm", "cold", "loud"], 1),
]


@pytest.fixture(scope="module")
def fedsdr_run(tmp_path_factory, one_torch_thread) -> Path:  # noqa: ANN001
    run = tmp_path_factory.mktemp("lm-eval") / "run"
    assert main(["run", "--config", str(ROOT / "configs/smoke-fedsdr.toml"), "--out", str(run),
                 "--set", "federation.rounds=1"]) == 0
    return run


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:  # noqa: ANN001
    """An lm-eval multiple-choice task that reads a local JSONL file (no hub)."""
    folder = tmp_path_factory.mktemp("tasks")
    data = folder / "mytask.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                            for q, c, a in ITEMS), encoding="utf-8")
    (folder / "mytask.yaml").write_text(
        "task: mytask\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {json.dumps(str(data))}\n"
        f"  cache_dir: {json.dumps(str(folder / 'hf-cache'))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n"
        "metadata:\n  version: 1.0\n",
        encoding="utf-8",
    )
    return folder


def _loglikelihoods(path: Path) -> list[list[float]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == len(ITEMS) and {r["task"] for r in rows} == {"mytask"}
    rows.sort(key=lambda r: r["doc_id"])
    return [[resp[0][0] for resp in r["resps"]] for r in rows]  # per choice: [[loglik, is_greedy]]


def test_eval_global_and_personalized(fedsdr_run: Path, task_dir: Path, capsys) -> None:  # noqa: ANN001
    common = ["--tasks", "mytask", "--include-path", str(task_dir), "--log-samples"]
    assert main(["eval", str(fedsdr_run), *common]) == 0
    table = capsys.readouterr().out
    assert "|Tasks |Version|Filter|n-shot|Metric|" in table and "|mytask|" in table
    assert main(["eval", str(fedsdr_run), *common, "--client", "0", "--round", "1"]) == 0
    assert "client 0 personalized" in capsys.readouterr().out

    out = fedsdr_run / "lm-eval"
    for name, client in (("round-001", None), ("round-001-client-0", 0)):
        results = json.loads((out / f"{name}.json").read_text(encoding="utf-8"))
        acc = results["results"]["mytask"]["acc,none"]
        assert 0.0 <= acc <= 1.0
        assert results["n-samples"]["mytask"]["effective"] == len(ITEMS)
        assert results["fedsdr"]["round"] == 1 and results["fedsdr"]["client"] == client
        assert "samples" not in results  # those go to the .samples.jsonl file
    assert list(json.loads((out / "round-001.json").read_text())["fedsdr"]["adapters"]) == ["rectify"]
    assert list(json.loads((out / "round-001-client-0.json").read_text())["fedsdr"]["adapters"]) == [
        "rectify", "smooth"]

    # LoRA-S of client 0 is active in the personalized model: every choice scores differently
    global_ll = _loglikelihoods(out / "round-001.samples.jsonl")
    personal_ll = _loglikelihoods(out / "round-001-client-0.samples.jsonl")
    assert all(len(g) == 3 for g in global_ll)
    assert all(abs(g - p) > 1e-6 for gs, ps in zip(global_ll, personal_ll, strict=True)
               for g, p in zip(gs, ps, strict=True))


def test_eval_limit_and_api(fedsdr_run: Path, task_dir: Path) -> None:
    from fedsdr.lm_eval_bridge import run_lm_eval

    results = run_lm_eval(fedsdr_run, ["mytask"], limit=2, include_path=str(task_dir), batch_size=2,
                          verbose=False)
    assert results["n-samples"]["mytask"]["effective"] == 2
    assert "samples" not in results  # log_samples is off by default
    assert results["results"]["mytask"]["alias"] == "mytask"
    written = json.loads((fedsdr_run / "lm-eval/round-001.json").read_text(encoding="utf-8"))
    assert written["n-samples"]["mytask"]["effective"] == 2


def test_eval_errors(fedsdr_run: Path, task_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:  # noqa: ANN001
    # --client on an algorithm without local adapters: the same run relabelled FedAvg
    fedavg = tmp_path / "fedavg"
    (fedavg / "checkpoints").mkdir(parents=True)
    cfg = json.loads((fedsdr_run / "config.json").read_text(encoding="utf-8"))
    cfg["federation"]["algorithm"] = "fedavg"
    (fedavg / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    ckpt = fedsdr_run / "checkpoints/round-001"
    (fedavg / "checkpoints/round-001").symlink_to(ckpt, target_is_directory=True)
    capsys.readouterr()
    assert main(["eval", str(fedavg), "--tasks", "mytask", "--client", "0"]) == 2
    assert "keeps no local adapter" in capsys.readouterr().err

    # a run without checkpoints
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    assert main(["eval", str(empty), "--tasks", "mytask"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["eval", str(fedsdr_run), "--tasks", "mytask", "--round", "7"]) == 2
    assert "round 7" in capsys.readouterr().err

    # a client that has no adapter, a task lm-eval does not know
    assert main(["eval", str(fedsdr_run), "--tasks", "mytask", "--client", "9"]) == 2
    assert "no smooth adapter" in capsys.readouterr().err
    assert main(["eval", str(fedsdr_run), "--tasks", "no_such_task_xyz"]) == 2
    assert "no_such_task_xyz" in capsys.readouterr().err

    # lm-eval not installed: the error says how to install it
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    assert main(["eval", str(fedsdr_run), "--tasks", "mytask"]) == 2
    assert "pip install -e '.[lm-eval]'" in capsys.readouterr().err
