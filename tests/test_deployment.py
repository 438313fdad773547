"""A real Flower deployment on loopback: one SuperLink, two SuperNodes (one data silo each),
`flwr run` of this app, and the checks that the run went through end to end.

Each SuperNode reads only its own JSONL file (node config `data-path`) and keeps FedSDR's
LoRA-S and its distilled data in its own folder (`state-dir`); the server writes metrics and
the global adapter to `out-dir`. Every process this test starts (and whatever those started:
SuperExec, ServerApp, ClientApp) is stopped at teardown, also when the test fails.
About 1-1.5 minutes on a 2-core CPU machine (most of it process and model start-up).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import psutil
import pytest

from fedsdr.config import load_config
from fedsdr.data.federated import load_silo_data

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: flwr, flower-superlink, flower-superexec...
CONFIG = REPO / "configs" / "smoke-fedsdr.toml"  # FedSDR: exercises the clients' state dirs too
FEDERATION = "fedsdr-loopback"
DOMAINS = ("cooking", "maritime-law")
RECORDS_PER_SILO = 12
RUN_TIMEOUT_S = 150

pytestmark = pytest.mark.skipif(
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

    def check_alive(self) -> None:
        for proc, log in self.procs:
            if proc.poll() is not None:
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


def run_complete(out: Path) -> bool:
    rows = read_rows(out / "metrics.jsonl")
    have = {(r["round"], r["scope"], r["kind"]) for r in rows}
    needed = {(0, "global", "eval"), (1, "global", "eval"), (1, "client-0", "train"),
              (1, "client-1", "train"), (1, "client-1", "eval"), (1, "client-0", "eval")}
    return needed <= have and (out / "checkpoints/round-001/adapter_model.safetensors").exists()


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
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


@pytest.fixture
def procs(tmp_path: Path, env: dict[str, str]):
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


def test_loopback_deployment(tmp_path: Path, env: dict[str, str], procs: Processes) -> None:
    app_config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    missing = {"fedsdr-config", "out-dir"} - set(app_config.get("config", {}))
    assert not missing, (
        f"pyproject.toml [tool.flwr.app.config] must declare {sorted(missing)}: "
        "the SuperLink rejects run-config keys it does not declare"
    )

    # The app as `flwr run` ships it: only pyproject.toml (the code is installed in the venv).
    # A copy, also because `flwr run` rewrites a legacy [tool.flwr.federations] section.
    app = tmp_path / "app"
    app.mkdir()
    shutil.copy(REPO / "pyproject.toml", app / "pyproject.toml")

    link_port = free_port()
    (Path(env["FLWR_HOME"]) / "config.toml").write_text(
        f'[superlink]\ndefault = "{FEDERATION}"\n\n'
        f'[superlink.{FEDERATION}]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    # The smoke config, two silos, one round, rank 2: set as Flower users do, with --run-config.
    overrides = "partition.num_clients=2 federation.rounds=1 lora.r=2"
    cfg = load_config(str(CONFIG), overrides.split())
    silos = write_silos(tmp_path)
    states = [tmp_path / f"state-{k}" for k in range(2)]
    out = tmp_path / "out"

    procs.start("superlink", [
        str(BIN / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
        "--host", "127.0.0.1", "--port", str(link_port),
    ])
    wait_for_port(link_port, procs)
    for k in range(2):
        procs.start(f"supernode-{k}", [
            str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}",
            "--host", "127.0.0.1", "--port", str(free_port()),
            "--node-config",
            f"partition-id={k} num-partitions=2 data-path='{silos[k]}' state-dir='{states[k]}'",
        ])

    started = subprocess.run(
        [str(BIN / "flwr"), "run", str(app), FEDERATION,
         "--run-config", f"fedsdr-config='{CONFIG}' set='{overrides}' out-dir='{out}'"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90,
    )
    assert started.returncode == 0 and "Successfully started run" in started.stdout, (
        f"flwr run failed ({started.returncode}):\n{started.stdout}\n{started.stderr}\n{procs.logs()}"
    )

    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not run_complete(out):
        procs.check_alive()
        if time.monotonic() > deadline:
            pytest.fail(f"run incomplete after {RUN_TIMEOUT_S} s; metrics: "
                        f"{read_rows(out / 'metrics.jsonl')}\n{procs.logs()}")
        time.sleep(1)

    rows = read_rows(out / "metrics.jsonl")
    assert (out / "checkpoints/round-001/adapter_model.safetensors").stat().st_size > 0
    assert json.loads((out / "config.json").read_text()) == json.loads(cfg.to_json())  # overrides applied
    assert json.loads((out / "checkpoints/round-001/adapter_config.json").read_text())["r"] == 2
    assert {r["round"] for r in rows if r["scope"] == "global" and r["kind"] == "eval"} == {0, 1}
    for k, (silo, state) in enumerate(zip(silos, states, strict=True)):
        data = load_silo_data(str(silo), k, cfg.data, cfg.seed)
        assert data.train and data.test
        train = [r for r in rows if r["scope"] == f"client-{k}" and r["kind"] == "train"]
        assert [r["num_examples"] for r in train] == [len(data.train)]
        evals = [r for r in rows if r["scope"] == f"client-{k}" and r["kind"] == "eval"]
        assert {r["num_examples"] for r in evals} == {len(data.test)}
        assert set(evals[0]["domains"]) == {DOMAINS[k]}  # each client evaluated its own silo
        # The silo's own disk holds its LoRA-S and its distilled data.
        assert (state / f"client-{k}/smooth/round-001/adapter_model.safetensors").exists()
        assert list((state / f"client-{k}/distill").glob("*.jsonl"))
    # No silo text reached the server's output.
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in {".json", ".jsonl"}:
            assert "Private answer" not in path.read_text(errors="replace"), path
