"""The server side of a run: Flower's strategy drives the rounds; this loop adds evaluation,
metrics, checkpoints and resume around `configure_train` / `aggregate_train`."""

from __future__ import annotations

import random
import time
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsdr import report
from fedsdr.algorithms import Algorithm, derive_seed, get_algorithm
from fedsdr.config import RunConfig
from fedsdr.console import console, task
from fedsdr.data.federated import build_federated_data
from fedsdr.evaluate import evaluate_records
from fedsdr.federation.messages import unpack_evaluation
from fedsdr.models.adapters import (
    activate,
    arrayrecord_nbytes,
    fresh_adapter_state,
    from_arrayrecord,
    load_adapter_file,
    save_peft_adapter,
    set_adapter_state,
    to_arrayrecord,
)
from fedsdr.models.loading import shared_model
from fedsdr.runs import RunDir, client_name, load_server_state, save_server_state


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    """The strategy's mutable state (FedOpt moments, FedAvgM momentum...), for checkpoints."""
    return {k: v for k, v in vars(strategy).items() if not callable(v)}


class Server:
    def __init__(self, cfg: RunConfig, run: RunDir) -> None:
        self.cfg = cfg
        self.run = run
        self.algorithm: Algorithm = get_algorithm(cfg)
        self.strategy = self.algorithm.strategy(cfg)
        self.spec = self.algorithm.adapters(cfg)[0]
        self.model, self.tokenizer, self.runtime, self.source = shared_model(
            cfg.model, cfg.lora, self.algorithm.adapters(cfg), cfg.seed
        )
        self.global_test = build_federated_data(cfg.data, cfg.partition, cfg.seed).global_test

    def base_config(self) -> ConfigRecord:
        return ConfigRecord({
            "fedsdr-config": self.cfg.to_json(),
            "client-state-root": str(self.run.clients),
        })

    # evaluation -------------------------------------------------------------
    def evaluate_global(self, server_round: int, arrays: ArrayRecord) -> dict[str, Any]:
        set_adapter_state(self.model, self.spec.name, from_arrayrecord(arrays))
        activate(self.model, [self.spec.name], trainable=[])
        result = evaluate_records(
            self.model, self.tokenizer, self.global_test, self.cfg.eval, autocast=self.runtime.autocast,
            system_prompt=self.cfg.data.system_prompt, seed=self.cfg.seed, progress="server: global eval",
        )
        overall = result.pop("all", {})
        return {"round": server_round, "scope": "global", "kind": "eval", "model": "global",
                "split": "global_test", **overall, "domains": result}

    def evaluate_clients(self, grid: Grid, server_round: int, arrays: ArrayRecord) -> list[dict[str, Any]]:
        if not self.cfg.eval.clients or self.cfg.federation.fraction_evaluate == 0:
            return []
        random.seed(derive_seed(self.cfg.seed, "sample-eval", server_round))
        messages = self.strategy.configure_evaluate(server_round, arrays, self.base_config(), grid)
        keyed = []
        for reply in _ok(grid.send_and_receive(messages)):
            evaluation, ident = unpack_evaluation(reply.content)
            cid = int(ident["partition-id"])
            for label, result in evaluation.items():
                overall = result.pop("all", {})
                keyed.append(((label, cid), {
                    "round": server_round, "scope": client_name(cid), "kind": "eval", "model": label,
                    "split": "client_test", **overall, "num_examples": ident["num-examples"], "domains": result,
                }))
        return [row for _, row in sorted(keyed, key=lambda item: item[0])]

    # rounds ----------------------------------------------------------------
    def train_round(self, grid: Grid, server_round: int, arrays: ArrayRecord) -> tuple[ArrayRecord, list[dict]]:
        random.seed(derive_seed(self.cfg.seed, "sample-train", server_round))  # Flower samples with `random`
        messages = list(self.strategy.configure_train(server_round, arrays, self.base_config(), grid))
        bytes_down = arrayrecord_nbytes(arrays)
        replies = _ok(grid.send_and_receive(messages))
        if not replies:
            raise RuntimeError(f"round {server_round}: no client replied successfully")
        # Aggregate in a fixed order so the result does not depend on reply arrival order.
        replies.sort(key=lambda m: int(m.content["metrics"]["partition-id"]))
        rows = []
        for reply in replies:
            figures = dict(reply.content["metrics"])
            cid = int(figures.pop("partition-id"))
            rows.append({
                "round": server_round, "scope": client_name(cid), "kind": "train",
                "num_examples": figures.pop("num-examples"),
                "bytes_up": sum(arrayrecord_nbytes(r) for r in reply.content.array_records.values()),
                "bytes_down": bytes_down, **figures,
            })
        new_arrays, _ = self.strategy.aggregate_train(server_round, replies)
        if new_arrays is None:
            raise RuntimeError(f"round {server_round}: aggregation produced no adapter")
        weights = np.array([r["num_examples"] for r in rows], dtype=float)
        rows.append({
            "round": server_round, "scope": "global", "kind": "train",
            "train_loss": float(np.average([r["train_loss"] for r in rows], weights=weights)),
            "clients": len(rows), "num_examples": int(weights.sum()),
            "bytes_up": sum(r["bytes_up"] for r in rows), "bytes_down": bytes_down * len(rows),
            "seconds": max(r["seconds"] for r in rows),
        })
        return new_arrays, rows

    def checkpoint(self, server_round: int, arrays: ArrayRecord) -> None:
        folder = self.run.checkpoint_dir(server_round)
        save_peft_adapter(folder, from_arrayrecord(arrays), self.spec, self.cfg.lora, self.source)
        save_server_state(folder, {"strategy": strategy_state(self.strategy)})

    def initial_arrays(self) -> ArrayRecord:
        state = fresh_adapter_state(self.model, self.spec.name, derive_seed(self.cfg.seed, "global-init"))
        return to_arrayrecord(state)

    def restore(self, last_round: int) -> ArrayRecord:
        folder = self.run.checkpoint_dir(last_round)
        vars(self.strategy).update(load_server_state(folder)["strategy"])
        return to_arrayrecord(load_adapter_file(folder))

    def run_rounds(self, grid: Grid, resume: bool = False) -> dict[str, Any]:
        cfg, run = self.cfg, self.run
        start = run.last_checkpoint() if resume else 0
        if start:
            run.truncate_metrics(start)
            arrays = self.restore(start)
            console.print(f"[bold]resuming[/] after round {start} from {run.checkpoint_dir(start)}")
        else:
            arrays = self.initial_arrays()
            run.truncate_metrics(-1)
            rows = [self.evaluate_global(0, arrays), *self.evaluate_clients(grid, 0, arrays)]
            run.append_metrics(rows)
            report.print_round(cfg, 0, rows)
        t0 = time.perf_counter()
        with task(f"{cfg.name}: rounds", cfg.federation.rounds) as advance:
            advance(start)
            for server_round in range(start + 1, cfg.federation.rounds + 1):
                arrays, train_rows = self.train_round(grid, server_round, arrays)
                eval_rows = [self.evaluate_global(server_round, arrays),
                             *self.evaluate_clients(grid, server_round, arrays)]
                run.append_metrics(train_rows + eval_rows)
                self.checkpoint(server_round, arrays)  # after the metrics: a complete round
                report.print_round(cfg, server_round, train_rows + eval_rows)
                advance(1)
        summary = report.summarize(cfg, run.read_metrics())
        summary["seconds_this_session"] = time.perf_counter() - t0
        run.write_summary(summary)
        return summary


def _ok(replies: Any) -> list[Message]:
    out = []
    for msg in replies:
        if msg.has_error():
            console.print(f"[red]client error[/] node {msg.metadata.src_node_id}: {msg.error.reason}")
        else:
            out.append(msg)
    return out
