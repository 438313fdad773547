"""Shared helpers of the loopback deployment tests (test_deployment*.py): free ports, the
processes a test starts (stopped with everything they started), the environment Flower's
executables run in, silo files and the metrics the server writes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: flwr, flower-superlink, flower-superexec...
DOMAINS = ("cooking", "maritime-law")
RECORDS_PER_SILO = 12

needs_flower_executables = pytest.mark.skipif(
    sys.platform == "win32" or not (BIN / "flower-superlink").exists(),
    reason="needs the Flower deployment executables (flower-superlink) next to this Python",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, n: int = 60) -> str:
    if not path.exists():
        return f"({path.name}: missing)"
    lines = path.read_text(errors="replace").splitlines()
    return f"--- {path.name} (last {n} lines) ---\n" + "\n".join(lines[-n:])


class Processes:
    """Processes started by the test, each with its log file; `stop_all` ends them and theirs."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd, self.env = cwd, env
        self.procs: list[tuple[subprocess.Popen, Path]] = []

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = self.cwd / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                args, cwd=self.cwd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        self.procs.append((proc, log))
        return proc

    def logs(self) -> str:
        return "\n".join(tail(log) for _, log in self.procs)

    def check_alive(self, *expected_exits: subprocess.Popen) -> None:
        """Fail if a process exited, except those in `expected_exits`."""
        for proc, log in self.procs:
            if proc not in expected_exits and proc.poll() is not None:
                pytest.fail(f"{log.stem} exited with code {proc.returncode}\n{self.logs()}")

    def stop_all(self) -> None:
        # Collect the whole trees first: SuperExec and the ServerApp/ClientApp processes it
        # starts run in sessions of their own and are re-parented once their parent is gone.
        tree: list[psutil.Process] = []
        for proc, _ in self.procs:
            try:
                tree.extend(psutil.Process(proc.pid).children(recursive=True))
            except psutil.NoSuchProcess:
                pass
        for proc, _ in reversed(self.procs):  # SuperNodes first, then the SuperLink
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc, _ in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        _, alive = psutil.wait_procs(tree, timeout=max(0.1, deadline - time.monotonic()))
        for child in alive:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)


def wait_for_port(port: int, procs: Processes, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs.check_alive()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(1)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    pytest.fail(f"nothing listens on 127.0.0.1:{port} after {timeout} s\n{procs.logs()}")


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            break
    return rows


def run_complete(out: Path, client_eval: bool = True) -> bool:
    """Round 1 of a two-client run is fully recorded and its global adapter saved."""
    rows = read_rows(out / "metrics.jsonl")
    have = {(r["round"], r["scope"], r["kind"]) for r in rows}
    needed = {(0, "global", "eval"), (1, "global", "eval"), (1, "client-0", "train"),
              (1, "client-1", "train")}
    if client_eval:
        needed |= {(1, "client-1", "eval"), (1, "client-0", "eval")}
    return needed <= have and (out / "checkpoints/round-001/adapter_model.safetensors").exists()


def wait_run_complete(out: Path, procs: Processes, timeout: float, client_eval: bool = True,
                      expected_exits: tuple[subprocess.Popen, ...] = ()) -> list[dict]:
    """Wait for `run_complete` while the processes (but `expected_exits`) stay up; the rows."""
    deadline = time.monotonic() + timeout
    while not run_complete(out, client_eval):
        procs.check_alive(*expected_exits)
        if time.monotonic() > deadline:
            pytest.fail(f"run incomplete after {timeout} s; metrics: "
                        f"{read_rows(out / 'metrics.jsonl')}\n{procs.logs()}")
        time.sleep(1)
    return read_rows(out / "metrics.jsonl")


def flower_env(tmp_path: Path) -> dict[str, str]:
    """The environment of Flower's executables: a FLWR_HOME of the test's own, offline."""
    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # SuperLink starts flower-superexec
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }


def running_processes(tmp_path: Path, env: dict[str, str]) -> Iterator[Processes]:
    """Body of a test's `procs` fixture: everything started is stopped, also on failure."""
    running = Processes(tmp_path, env)
    try:
        yield running
    finally:
        running.stop_all()


def write_silos(tmp_path: Path) -> list[Path]:
    paths = []
    for k, domain in enumerate(DOMAINS):
        path = tmp_path / f"silo-{k}.jsonl"
        with path.open("w") as f:
            for i in range(RECORDS_PER_SILO):
                f.write(json.dumps({
                    "instruction": f"Private question {i} of silo {k} about {domain}?",
                    "output": f"Private answer {i} of silo {k}: {domain} rule number {i}.",
                    "domain": domain,
                }) + "\n")
        paths.append(path)
    return paths
