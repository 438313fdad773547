"""A run killed with SIGKILL (no handler runs, nothing is flushed) mid-training and mid-checkpoint,
then resumed in a new process, ends with the same global adapter, bit for bit, as a run never
interrupted. The interrupted runs are `fedsdr run` processes of their own, the uninterrupted one
runs in the test's process (`fedsdr.cli.main`, which spares a process start: ~12 s of imports on a
2-core CPU); all on one torch thread.

The kill points are exact: FEDSDR_TEST_PAUSE_AT stops the process there (`runs.pause_for_tests`)
and says so on stderr; the test then kills it. `trained:2:1`: round 2, client 1 has trained and
saved its local state (as have the clients sampled before it), nothing is aggregated. `checkpoint:2`: round 2's
metrics are written, its checkpoint folder is half-written (adapter and server_state.json, not
the tensors).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from safetensors.numpy import load_file

from fedsdr.cli import main
from fedsdr.runs import LOCK_NAME, RunDir

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # as the processes' OMP/MKL_NUM_THREADS=1

ROUNDS = 3
COMMON = [f"federation.rounds={ROUNDS}", "eval.generate=false", "eval.clients=false", "train.local_steps=2"]
CASES = {
    "fedavg": ("smoke.toml", ["federation.algorithm=fedavg"]),
    "fedadam": ("smoke.toml", ["federation.algorithm=fedadam"]),
    "scaffold": ("smoke.toml", ["federation.algorithm=scaffold"]),
    "fedsdr": ("smoke-fedsdr.toml", []),
}
LIMIT = 300  # seconds a single fedsdr process may take before the test gives up on it


def _env(pause: str | None = None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "FEDSDR_PROGRESS": "0", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("FEDSDR_TEST_PAUSE_AT", None)
    if pause:
        env["FEDSDR_TEST_PAUSE_AT"] = pause
    return env


def _fedsdr(args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "fedsdr.cli", *args], env=_env(), capture_output=True, text=True,
                          timeout=LIMIT)
    assert done.returncode == 0, done.stderr[-3000:]


def _kill_at(args: list[str], point: str) -> None:
    """Run `fedsdr ARGS` until it reaches `point`, then SIGKILL it."""
    proc = subprocess.Popen([sys.executable, "-m", "fedsdr.cli", *args], env=_env(point), text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    watchdog = threading.Timer(LIMIT, proc.kill)
    watchdog.start()
    seen: list[str] = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if line.strip() == f"FEDSDR_TEST_PAUSED {point}":
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"never reached {point}:\n" + "".join(seen)[-3000:]


def _tensors(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every safetensors file of a run's checkpoints and client disks, by relative path."""
    return {str(p.relative_to(folder)): load_file(str(p)) for p in sorted(folder.rglob("*.safetensors"))}


def _assert_identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray], what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), f"{what}: {key} differs"


@pytest.mark.parametrize("algorithm", [  # about a minute each on 2 busy cores: FedAvg alone by default
    "fedavg",
    pytest.param("fedsdr", marks=pytest.mark.slow),
    pytest.param("fedadam", marks=pytest.mark.slow),
    pytest.param("scaffold", marks=pytest.mark.slow),
])
def test_sigkill_mid_training_and_mid_checkpoint_then_resume_gives_the_same_adapter(tmp_path: Path,
                                                                                    algorithm: str) -> None:
    config, own = CASES[algorithm]
    sets = [x for item in (*COMMON, *own) for x in ("--set", item)]
    start = ["run", "--config", str(ROOT / "configs" / config), *sets]
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert main([*start, "--out", str(full)]) == 0

    _kill_at([*start, "--out", str(killed)], "trained:2:1")  # mid-training of round 2
    run = RunDir(killed)
    assert run.last_checkpoint() == 1
    if algorithm in ("scaffold", "fedsdr"):  # round-2 local state is on disk: a resume must not use it
        assert list((killed / "clients").glob("client-*/*/round-002*"))

    _kill_at(["run", "--resume", "--out", str(killed)], "checkpoint:2")  # mid-checkpoint of round 2
    assert run.last_checkpoint() == 1
    half = list((killed / "checkpoints").glob(".round-002.tmp-*"))
    assert len(half) == 1 and (half[0] / "server_state.json").exists()
    assert not (half[0] / "server_state.safetensors").exists()
    assert {r["round"] for r in run.read_metrics()} >= {2}  # round 2's rows were written before the kill
    assert (killed / LOCK_NAME).exists()  # the killed holder's lock file: it must not block the resume

    _fedsdr(["run", "--resume", "--out", str(killed)])
    final = f"checkpoints/round-{ROUNDS:03d}/adapter_model.safetensors"
    a, b = _tensors(full), _tensors(killed)
    assert final in a and a.keys() == b.keys()  # no half checkpoint, no stray client state left
    for path in a:  # the global adapter, the strategy's state, every client's local state
        _assert_identical(a[path], b[path], path)
    assert (full / final).read_bytes() == (killed / final).read_bytes()
    rows = [[(r["round"], r["scope"], r["kind"], r.get("loss"), r.get("train_loss")) for r in RunDir(f).read_metrics()]
            for f in (full, killed)]
    assert rows[0] == rows[1]
