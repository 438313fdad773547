"""The server side of a run: Flower's strategy drives the rounds; this loop adds evaluation,
metrics, checkpoints and resume around `configure_train` / `aggregate_train`."""

from __future__ import annotations

import random
import time
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsdr import dp, report
from fedsdr.algorithms import Algorithm, derive_seed, get_algorithm
from fedsdr.config import RunConfig
from fedsdr.console import console, task
from fedsdr.data.federated import build_federated_data
from fedsdr.evaluate import Evaluator, check_references, suite_sets
from fedsdr.federation.messages import unpack_evaluation
from fedsdr.federation.validation import Rejection, validate_replies
from fedsdr.io import atomic_dir
from fedsdr.models.adapters import (
    activate,
    adds_nothing,
    arrayrecord_nbytes,
    fresh_adapter_state,
    from_arrayrecord,
    load_adapter_file,
    set_adapter_state,
    to_arrayrecord,
    write_peft_adapter,
)
from fedsdr.models.cache import resolve_cache_dir
from fedsdr.models.loading import shared_model
from fedsdr.report.summary import largest
from fedsdr.runs import RunDir, client_name, read_server_state, write_server_state


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    """The strategy's mutable state (FedOpt moments, FedAvgM momentum...; a DP wrapper's clipping
    norm, and its wrapped strategy's state under dp.WRAPPED), for checkpoints."""
    if (inner := dp.wrapped(strategy)) is not None:
        return {**dp.wrapper_state(strategy), **{dp.WRAPPED + k: v for k, v in strategy_state(inner).items()}}
    return {k: v for k, v in vars(strategy).items() if not callable(v)}


def restore_strategy_state(strategy: Strategy, state: dict[str, Any]) -> None:
    """Put back what `strategy_state` saved."""
    if (inner := dp.wrapped(strategy)) is not None:
        restore_strategy_state(inner, {k.removeprefix(dp.WRAPPED): v for k, v in state.items() if k.startswith(dp.WRAPPED)})
        state = {k: v for k, v in state.items() if not k.startswith(dp.WRAPPED)}
    vars(strategy).update(state)


class Server:
    def __init__(self, cfg: RunConfig, run: RunDir) -> None:
        self.cfg = cfg
        self.run = run
        self.algorithm: Algorithm = get_algorithm(cfg)
        self.strategy = dp.wrap(cfg, self.algorithm.strategy(cfg))  # federation.dp: Flower's DP wrapper
        self.spec = self.algorithm.adapters(cfg)[0]
        self.model, self.tokenizer, self.runtime, self.source = shared_model(
            cfg.model, cfg.lora, self.algorithm.adapters(cfg), cfg.seed
        )
        data = build_federated_data(cfg.data, cfg.partition, cfg.seed)
        self.eval_sets = {"global_test": data.global_test, **suite_sets(cfg)}
        self.self_check = check_references(cfg, [*data.global_test, *(r for c in data.clients for r in c.train + c.test)])
        self.evaluator = Evaluator(self.model, self.tokenizer, self.runtime.autocast, cfg.eval, self.source,
                                   cfg.data.system_prompt, cfg.seed, resolve_cache_dir(cfg.model.cache_dir or None))

    def base_config(self, server_round: int = 0) -> ConfigRecord:
        return ConfigRecord({
            "fedsdr-config": self.cfg.to_json(),
            "client-state-root": str(self.run.clients),
            "run-id": self.run.run_id(),  # a deployed SuperNode keeps this run's state apart under it
            "generate": self.cfg.eval.generates_at(server_round, self.cfg.federation.rounds),
        })

    # evaluation -------------------------------------------------------------
    def evaluate_global(self, server_round: int, arrays: ArrayRecord) -> list[dict[str, Any]]:
        """The global model on the global held-out set and the held-out suites; its predictions
        go to the run's predictions.jsonl."""
        state = from_arrayrecord(arrays)
        set_adapter_state(self.model, self.spec.name, state)
        activate(self.model, [self.spec.name], trainable=[])
        generate = self.cfg.eval.generates_at(server_round, self.cfg.federation.rounds)
        rows, predictions = [], []
        for split, records in self.eval_sets.items():
            if split != "global_test" and not generate:
                continue  # held-out suites are evaluated at the generation rounds
            result, preds = self.evaluator(records, generate=generate, base_model=adds_nothing(state),
                                           progress=f"server: {split}")
            where = {"round": server_round, "scope": "global", "model": "global", "split": split}
            rows.append({**where, "kind": "eval", **result.pop("all", {}), "generated": generate, "domains": result})
            predictions.extend({**where, **p} for p in preds)
        self.run.append_predictions(predictions)
        return rows

    def evaluate_clients(self, grid: Grid, server_round: int, arrays: ArrayRecord) -> list[dict[str, Any]]:
        if not self.cfg.eval.clients or self.cfg.federation.fraction_evaluate == 0:
            return []
        random.seed(derive_seed(self.cfg.seed, "sample-eval", server_round))
        messages = self.strategy.configure_evaluate(server_round, arrays, self.base_config(server_round), grid)
        generate = self.cfg.eval.generates_at(server_round, self.cfg.federation.rounds)
        keyed = []
        replies = list(grid.send_and_receive(messages, timeout=self.cfg.federation.round_timeout))
        for reply in replies:
            if reply.has_error():
                console.print(f"[yellow]round {server_round}: evaluation failed[/] on node "
                              f"{reply.metadata.src_node_id}: {reply.error.reason}")
                continue
            evaluation, ident = unpack_evaluation(reply.content)
            cid = int(ident["partition-id"])
            for (label, split), result in evaluation.items():
                keyed.append(((label, split, cid), {
                    "round": server_round, "scope": client_name(cid), "kind": "eval", "model": label,
                    "split": split, **result.pop("all", {}), "generated": generate, "domains": result,
                }))
        return [row for _, row in sorted(keyed, key=lambda item: item[0])]

    # rounds ----------------------------------------------------------------
    def train_round(self, grid: Grid, server_round: int, arrays: ArrayRecord) -> tuple[ArrayRecord, list[dict]]:
        """Sample, train, validate every reply, aggregate the valid ones. With fewer than
        `min_train_clients` valid replies the global adapter stays as it was."""
        cfg = self.cfg
        wait_for_nodes(grid, cfg.partition.num_clients, cfg.federation.round_timeout)
        random.seed(derive_seed(cfg.seed, "sample-train", server_round))  # Flower samples with `random`
        messages = list(self.strategy.configure_train(server_round, arrays, self.base_config(server_round), grid))
        # what a sampled client downloads: every ArrayRecord its message carries (none, or more
        # than the global adapter, for some strategies)
        bytes_down = max((sum(arrayrecord_nbytes(r) for r in m.content.array_records.values()) for m in messages),
                         default=0)
        replies = list(grid.send_and_receive(messages, timeout=cfg.federation.round_timeout))
        answered = {m.metadata.src_node_id for m in replies}
        accepted, rejections = validate_replies(replies, arrays, cfg.partition.num_clients, cfg.federation,
                                                uploads_global=self.algorithm.uploads_global)
        rows = [self.rejected_row(server_round, r) for r in rejections]
        rows += [self.rejected_row(server_round, Rejection(
                     m.metadata.dst_node_id, None, f"no reply within federation.round_timeout={cfg.federation.round_timeout} s"))
                 for m in messages if m.metadata.dst_node_id not in answered]
        # Aggregate in a fixed order so the result does not depend on reply arrival order.
        accepted.sort(key=lambda m: int(m.content["metrics"]["partition-id"]))
        client_rows = []
        for reply in accepted:
            figures = dict(reply.content["metrics"])
            cid = int(figures.pop("partition-id"))
            client_rows.append({
                "round": server_round, "scope": client_name(cid), "kind": "train",
                "num_examples": figures.pop("num-examples"),
                "bytes_up": sum(arrayrecord_nbytes(r) for r in reply.content.array_records.values()),
                "bytes_down": bytes_down, **figures,
            })
        # (never more replies than the strategy asked for: one trainer per round needs one)
        if len(accepted) < max(1, min(cfg.federation.min_train_clients, cfg.partition.num_clients, len(messages))):
            console.print(f"[red]round {server_round}[/]: {len(accepted)} valid replies, fewer than "
                          f"federation.min_train_clients; the global adapter stays as it was")
            rows.append({"round": server_round, "scope": "global", "kind": "rejected",
                         "reason": f"{len(accepted)} valid replies < min_train_clients; round not aggregated"})
            return arrays, client_rows + rows
        privacy = dp.round_fields(cfg, self.strategy, server_round)  # this round's clipping norm
        if privacy:  # Flower's DP noise draws from numpy's global generator: seeded, a run replays
            np.random.seed(derive_seed(cfg.seed, "dp-noise", server_round))
        new_arrays, _ = self.strategy.aggregate_train(server_round, accepted)
        if new_arrays is None:
            raise RuntimeError(f"round {server_round}: aggregation produced no adapter")
        new_arrays = in_dtypes_of(new_arrays, arrays)
        weights = np.array([r["num_examples"] for r in client_rows], dtype=float)
        client_rows.append({
            "round": server_round, "scope": "global", "kind": "train",
            "train_loss": float(np.average([r["train_loss"] for r in client_rows], weights=weights)),
            "clients": len(client_rows), "num_examples": int(weights.sum()),
            "bytes_up": sum(r["bytes_up"] for r in client_rows), "bytes_down": bytes_down * len(messages),
            "seconds": max(r["seconds"] for r in client_rows), **privacy,
            **largest(client_rows, "device_peak_mb"),
        })
        return new_arrays, client_rows + rows

    @staticmethod
    def rejected_row(server_round: int, rejection: Rejection) -> dict[str, Any]:
        # A reply without a readable partition id is known by the node it came from.
        scope = client_name(rejection.partition_id) if rejection.partition_id is not None else f"node-{rejection.node_id}"
        console.print(f"[yellow]round {server_round}: rejected[/] {scope} (node {rejection.node_id}): {rejection.reason}")
        return {"round": server_round, "scope": scope, "kind": "rejected", "node": rejection.node_id,
                "reason": rejection.reason}

    def checkpoint(self, server_round: int, arrays: ArrayRecord) -> None:
        """The global adapter and the strategy's state, in one folder that appears atomically."""
        with atomic_dir(self.run.checkpoint_dir(server_round)) as folder:
            write_peft_adapter(folder, from_arrayrecord(arrays), self.spec, self.cfg.lora, self.source)
            write_server_state(folder, strategy_state(self.strategy))

    def initial_arrays(self) -> ArrayRecord:
        state = fresh_adapter_state(self.model, self.spec.name, derive_seed(self.cfg.seed, "global-init"))
        return to_arrayrecord(state)

    def restore(self, last_round: int) -> ArrayRecord:
        folder = self.run.checkpoint_dir(last_round)
        restore_strategy_state(self.strategy, read_server_state(folder))
        return to_arrayrecord(load_adapter_file(folder))

    def run_rounds(self, grid: Grid, resume: bool = False) -> dict[str, Any]:
        cfg, run = self.cfg, self.run
        start = run.last_checkpoint() if resume else 0
        if start:
            run.truncate(start)
            arrays = self.restore(start)
            console.print(f"[bold]resuming[/] after round {start} from {run.checkpoint_dir(start)}")
        else:
            arrays = self.initial_arrays()
            run.truncate(-1)
            rows = [*self.evaluate_global(0, arrays), *self.evaluate_clients(grid, 0, arrays)]
            run.append_metrics(rows)
            report.print_round(cfg, 0, rows)
        t0 = time.perf_counter()
        with task(f"{cfg.name}: rounds", cfg.federation.rounds) as advance:
            advance(start)
            for server_round in range(start + 1, cfg.federation.rounds + 1):
                arrays, train_rows = self.train_round(grid, server_round, arrays)
                eval_rows = [*self.evaluate_global(server_round, arrays),
                             *self.evaluate_clients(grid, server_round, arrays)
                             ] if cfg.eval.evaluates_at(server_round, cfg.federation.rounds) else []
                run.append_metrics(train_rows + eval_rows)
                self.checkpoint(server_round, arrays)  # after the metrics: a complete round
                report.print_round(cfg, server_round, train_rows + eval_rows)
                advance(1)
        summary = report.summarize(cfg, run.read_metrics())
        summary["seconds_this_session"] = time.perf_counter() - t0
        summary["scorer_self_check"] = self.self_check
        summary.update(dp.run_summary(run.read_metrics()))
        run.write_summary(summary)
        return summary


def wait_for_nodes(grid: Grid, wanted: int, timeout: float | None) -> None:
    """Wait until `wanted` nodes are connected, at most `timeout` seconds (None: do not wait;
    the strategy then waits for its min_available_nodes)."""
    deadline = time.monotonic() + (timeout or 0)
    while len(list(grid.get_node_ids())) < wanted and time.monotonic() < deadline:
        time.sleep(1)


def in_dtypes_of(new: ArrayRecord, old: ArrayRecord) -> ArrayRecord:
    """`new` with each array in the dtype `old` has under that key. Flower's FedOpt strategies
    (FedAdam, FedYogi, FedAdagrad, FedAvgM) compute in float64 and return float64 arrays; the
    adapter is float32, and every client's float32 reply would then be rejected by the dtype
    check of the next round. The strategy keeps its own float64 state; only what is sent back
    out, checkpointed and evaluated takes the adapter's dtype."""
    wanted = {k: old[k].dtype for k, v in new.items() if k in old and v.dtype != old[k].dtype}
    if not wanted:  # (Array.dtype is read from the header: nothing is deserialized to check)
        return new
    return ArrayRecord({k: Array(np.ascontiguousarray(v.numpy().astype(wanted[k]))) if k in wanted else v
                        for k, v in new.items()})
