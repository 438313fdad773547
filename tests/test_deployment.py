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
import shutil
import subprocess
import tomllib
from pathlib import Path

from deploy_utils import (
    BIN,
    DOMAINS,
    REPO,
    Processes,
    free_port,
    needs_flower_executables,
    wait_for_port,
    wait_run_complete,
    write_silos,
)

from fedsdr.config import load_config
from fedsdr.data.federated import load_silo_data

CONFIG = REPO / "configs" / "smoke-fedsdr.toml"  # FedSDR: exercises the clients' state dirs too
FEDERATION = "fedsdr-loopback"
RUN_TIMEOUT_S = 150

pytestmark = needs_flower_executables


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

    rows = wait_run_complete(out, procs, RUN_TIMEOUT_S)
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
        # The silo's own disk holds its LoRA-S and its distilled data, in this run's own folder.
        run_state = state / (out / "run-id").read_text(encoding="utf-8").strip()
        assert (run_state / f"client-{k}/smooth/round-001/adapter_model.safetensors").exists()
        assert list((run_state / f"client-{k}/distill").glob("*.jsonl"))
    # No silo text reached the server's output.
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in {".json", ".jsonl"}:
            assert "Private answer" not in path.read_text(errors="replace"), path
