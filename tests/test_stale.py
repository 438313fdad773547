"""Nothing stale: `--force` starts clean, compare/grid refuse a folder of another config, one
process per run folder (a lock that a killed process does not leave behind), a SuperNode keeps
each run's state apart, and a corrupt checkpoint is a named error, not a traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, tiny_config
from safetensors.numpy import save_file

from fedsdr.cli import main
from fedsdr.config import ConfigError
from fedsdr.federation.client import client_app
from fedsdr.federation.engine import InProcessGrid, run_inprocess
from fedsdr.grid import load_grid, run_grid
from fedsdr.runs import LOCK_NAME, RunDir, folder_lock, read_server_state, write_server_state

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SMOKE = str(ROOT / "configs" / "smoke.toml")
FEDSD = str(ROOT / "configs" / "smoke-fedsd.toml")
FAST = ["--set", "federation.rounds=1", "--set", "eval.generate=false", "--set", "eval.clients=false"]


def _fake_checkpoint(folder: Path) -> None:
    """A checkpoint folder as the server writes it, without a model: an adapter file and a state."""
    folder.mkdir(parents=True)
    save_file({"lora_A": np.ones((4, 8), np.float32)}, str(folder / "adapter_model.safetensors"))
    write_server_state(folder, {"step": 3, "m": [np.zeros(5, np.float32), np.ones(2, np.float32)]})


def test_forced_rerun_reuses_no_distilled_set_checkpoint_or_metrics(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # `fedsdr distill` leaves each client's distilled set (base-model rewrites) in the folder; a
    # run reading it back would train on it: mark every target so that a reuse shows.
    assert main(["distill", "--config", FEDSD, "--out", str(out)]) == 0
    distilled = out / "clients/client-0/distill/round-000.jsonl"
    rows = [json.loads(line) for line in distilled.read_text().splitlines()]
    distilled.write_text("".join(json.dumps({**r, "target": "STALE-SENTINEL"}) + "\n" for r in rows))
    # ... and an earlier, longer run: a later checkpoint, metrics and files of other commands
    _fake_checkpoint(out / "checkpoints/round-004")
    (out / "metrics.jsonl").write_text('{"round": 4, "scope": "global", "kind": "train", "stale": true}\n')
    (out / "summary.json").write_text('{"rounds": 4}\n')
    (out / "lm-eval").mkdir()
    (out / "lm-eval/round-004.json").write_text("{}")
    (out / "notes.txt").write_text("mine")  # not fedsdr's: kept

    assert main(["run", "--config", FEDSD, "--out", str(out), *FAST]) == 2  # a run is there: --force needed
    assert main(["run", "--config", FEDSD, "--out", str(out), "--force", *FAST]) == 0

    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["round-001"]
    assert "STALE-SENTINEL" not in distilled.read_text() and distilled.read_text().strip()
    rows = RunDir(out).read_metrics()
    assert {r["round"] for r in rows} == {0, 1} and not any(r.get("stale") for r in rows)
    assert json.loads((out / "summary.json").read_text())["rounds"] == 1
    assert not (out / "lm-eval").exists() and not (out / "distill-diagnostics.json").exists()
    assert (out / "notes.txt").read_text() == "mine"
    with folder_lock(out):  # released when the run ended
        pass


def test_run_id_is_kept_and_renewed_by_a_fresh_start(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.write_config(tiny_config())
    first = run.run_id()
    assert RunDir(tmp_path).run_id() == first  # a resume (another process) finds the same id
    run.clear()
    assert RunDir(tmp_path).run_id() != first and (tmp_path / "config.json").exists()


def test_compare_refuses_a_folder_of_another_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "cmp"
    RunDir(root / "smoke").write_config(tiny_config("train.lr=0.123"))
    assert main(["compare", "--config", SMOKE, "--out", str(root)]) == 2
    err = capsys.readouterr().err
    assert str(root / "smoke") in err and "train.lr: 0.123 in the folder" in err
    assert "nothing ran" in err and "another --out" in err and "Traceback" not in err
    assert not (root / "smoke/metrics.jsonl").exists()


def _one_cell_grid(tmp_path: Path) -> Path:
    path = tmp_path / "g.toml"
    path.write_text(f'base = "{SMOKE}"\nseeds = [0]\n[config]\nfederation.rounds = 1\n'
                    'eval.generate = false\neval.clients = false\n[[method]]\nalgorithm = "fedavg"\n')
    return path


def test_grid_refuses_a_cell_of_another_config_or_with_a_corrupt_checkpoint(tmp_path: Path) -> None:
    grid = load_grid(_one_cell_grid(tmp_path))
    cell = RunDir(tmp_path / "out" / grid.cells[0].folder)
    other = json.loads(grid.cells[0].config.to_json())
    other["train"]["lr"] = 0.123
    cell.root.mkdir(parents=True)
    cell.config_path.write_text(json.dumps(other))  # no checkpoint yet: still someone else's run
    with pytest.raises(ConfigError, match=r"(?s)cells/fedavg-seed0: refused: it holds another config \(train\.lr: 0\.123 in the folder.*another --out"):
        run_grid(grid, tmp_path / "out", report=False)
    cell.write_config(grid.cells[0].config)
    _fake_checkpoint(cell.checkpoint_dir(1))
    (cell.checkpoint_dir(1) / "server_state.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ConfigError, match=r"round-001/server_state\.safetensors: unreadable"):
        run_grid(grid, tmp_path / "out", report=False)
    assert not cell.metrics_path.exists()


def test_a_folder_in_use_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    with RunDir(out).lock():
        assert main(["run", "--config", SMOKE, "--out", str(out), *FAST]) == 2
        err = capsys.readouterr().err
        assert str(out) in err and "another fedsdr process" in err and "Traceback" not in err
    with RunDir(tmp_path / "cmp" / "smoke").lock():
        assert main(["compare", "--config", SMOKE, "--out", str(tmp_path / "cmp"), *FAST]) == 2
        assert "another fedsdr process" in capsys.readouterr().err
    grid = load_grid(_one_cell_grid(tmp_path))
    with RunDir(tmp_path / "grid" / grid.cells[0].folder).lock(), \
            pytest.raises(ConfigError, match="another fedsdr process"):
        run_grid(grid, tmp_path / "grid", report=False)
    with folder_lock(tmp_path / "grid"), pytest.raises(ConfigError, match="another fedsdr process"):
        run_grid(grid, tmp_path / "grid", report=False)  # a second grid process on the same folder
    assert not (out / "metrics.jsonl").exists() and not (tmp_path / "grid/cells/fedavg-seed0/metrics.jsonl").exists()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    code = ("import sys, time; from fedsdr.runs import folder_lock\n"
            "with folder_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match="in use"), folder_lock(tmp_path):
            pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert (tmp_path / LOCK_NAME).exists()  # the file stays; the OS lock died with its process
    with folder_lock(tmp_path):
        pass


def test_a_supernode_keeps_each_runs_state_apart(tmp_path: Path) -> None:
    """Two runs on the same SuperNodes (one `state-dir` each): SCAFFOLD's c_i of one run never
    reaches the other; each run's id names its folder."""
    cfg = tiny_config("federation.algorithm=scaffold", "federation.rounds=1", "eval.generate=false",
                      "eval.clients=false")
    state_dir = tmp_path / "supernode"
    runs = [RunDir(tmp_path / "a"), RunDir(tmp_path / "b")]
    for run in runs:
        grid = InProcessGrid(client_app, cfg.partition.num_clients)
        for context in grid.contexts.values():
            context.node_config["state-dir"] = str(state_dir / f"node-{context.node_config['partition-id']}")
        run.write_config(cfg)
        run_inprocess(cfg, run, grid=grid)
    ids = [run.run_id() for run in runs]
    assert ids[0] != ids[1]
    for pid in range(cfg.partition.num_clients):
        node = state_dir / f"node-{pid}"
        assert sorted(p.name for p in node.iterdir()) == sorted(ids)
        for run_id in ids:
            assert (node / run_id / f"client-{pid}/control/round-001.safetensors").exists()
    assert not any(run.clients.exists() for run in runs)  # nothing on the server's disk


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "server_state.safetensors", "server_state.json"])
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_corrupt_checkpoint_is_a_named_error(tmp_path: Path, capsys: pytest.CaptureFixture, name: str,
                                               damage: str) -> None:
    run = RunDir(tmp_path / "run")
    run.write_config(tiny_config())
    _fake_checkpoint(run.checkpoint_dir(1))
    path = run.checkpoint_dir(1) / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x8b\x07 not a file \xff" * 9)
    with pytest.raises(ConfigError, match=f"{name}: (unreadable|does not match)"):
        run.verify_checkpoint()
    if name.startswith("server_state"):
        with pytest.raises(ConfigError, match=name):
            read_server_state(run.checkpoint_dir(1))
    assert main(["run", "--resume", "--out", str(run.root)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "round before" in err and "Traceback" not in err


def test_an_intact_fake_checkpoint_reads_back(tmp_path: Path) -> None:
    _fake_checkpoint(tmp_path / "round-001")
    state = read_server_state(tmp_path / "round-001")
    assert state["step"] == 3 and [a.tolist() for a in state["m"]] == [[0.0] * 5, [1.0, 1.0]]
