"""Flower app components for a real deployment (`flwr run` against a SuperLink).

pyproject.toml names them: `serverapp = "fedsdr.federation.apps:server_app"`,
`clientapp = "fedsdr.federation.apps:client_app"`. Run config keys:
  fedsdr-config   path of the fedsdr TOML config on the SuperLink's machine
  set             overrides as `fedsdr run --set` takes them, space-separated:
                  --run-config "set='federation.rounds=5 lora.r=16'"
  out-dir         where the server writes metrics and checkpoints (default runs/deployment)
  resume          true to continue from the last checkpoint in out-dir
Each SuperNode passes its own silo in its node config:
  --node-config "partition-id=0 num-partitions=2 data-path='/data/silo.jsonl' state-dir='/var/lib/fedsdr'"
The data file never leaves the SuperNode; only adapter tensors and numbers travel. A SuperNode
keeps each run's local state (FedSDR's LoRA-S, SCAFFOLD's c_i, distilled sets) apart, in
`state-dir/<run-id>/client-K/` (<run-id>: the server's out-dir/run-id, the same after a resume).
"""

from __future__ import annotations

import shlex
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedsdr.config import load_config
from fedsdr.federation.client import client_app
from fedsdr.federation.server import Server
from fedsdr.runs import RunDir

server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    run_config = context.run_config
    cfg = load_config(str(run_config["fedsdr-config"]), shlex.split(str(run_config.get("set", ""))))
    run = RunDir(Path(str(run_config.get("out-dir", "runs/deployment"))))
    resume = bool(run_config.get("resume", False))
    with run.lock():  # one ServerApp per out-dir
        if resume:
            run.verify_checkpoint()
        else:
            run.clear()  # a new run reuses nothing of an earlier one (and gets a new run id)
            run.write_config(cfg)
        Server(cfg, run).run_rounds(grid, resume=resume)


__all__ = ["client_app", "server_app"]
