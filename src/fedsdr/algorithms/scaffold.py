"""SCAFFOLD (Karimireddy et al., 2020), option II, with control variates on the adapter's parameters.

The server holds the global adapter x and the control variate c; client i holds its own c_i
(zeros at first; kept on its disk, never sent). In a round, each sampled client i in S starts
from y_i = x and takes K corrected local steps with learning rate eta_l, then

    y_i <- y_i - eta_l * (d_i(y_i) + c - c_i)          (K steps)
    c_i+ = c_i - c + (x - y_i) / (K * eta_l)            (K * eta_l: the sum of the steps' learning rates)

where d_i is the local optimizer's direction (`federation.scaffold_correction = "step"`, the
default). Under SGD d_i is the gradient g_i and this is the paper's step; under AdamW it is
AdamW's update, and c_i+ = the mean of d_i: the correction and what it corrects are in the same
units. "gradient" adds c - c_i to the clipped gradient before AdamW instead (the paper's step
read literally; its option II c_i, ~ +-1 per element under Adam, then outweighs the gradient).

and sends y_i (ArrayRecord "arrays") and delta c_i = c_i+ - c_i (ArrayRecord "control"). Over
the |S| replies, uniformly as in the paper (not weighted by examples), with N clients in all:

    x <- x + eta_g * mean_S(y_i - x)                     (eta_g: `federation.server_lr`, 1 by default)
    c <- c + |S| / N * mean_S(delta c_i)

Each client downloads x and c and uploads y_i and delta c_i: twice FedAvg's bytes. With FedSD
the clients train on their distilled sets.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.serverapp.strategy import Strategy
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy

from fedsdr.algorithms.base import (
    Algorithm,
    ClientSession,
    LocalState,
    TrainResult,
    sampling_kwargs,
)
from fedsdr.algorithms.one_adapter import train_adapter, train_examples
from fedsdr.config import RunConfig
from fedsdr.models.adapters import AdapterState, from_arrayrecord, get_adapter_state, to_arrayrecord
from fedsdr.train import Stream

CONTROL = "control"  # the ArrayRecord with c (to the client) or delta c_i (to the server); c_i on disk


class ScaffoldStrategy(FlowerFedAvg):
    """Flower's FedAvg sampling, with SCAFFOLD's server side: every training message also
    carries c as the ArrayRecord "control"; `aggregate_train` updates x and c as above.
    `control` (c) and `round_start` (x of the round in progress) are state the server
    checkpoints."""

    def __init__(self, *, num_clients: int, server_lr: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_clients = num_clients  # N
        self.server_lr = server_lr  # eta_g
        self.control: dict[str, np.ndarray] | None = None  # c, zeros on the first round
        self.round_start: dict[str, np.ndarray] | None = None  # x

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        self.round_start = from_arrayrecord(arrays)
        if self.control is None:
            self.control = {k: np.zeros_like(v) for k, v in self.round_start.items()}
        messages = list(super().configure_train(server_round, arrays, config, grid))
        control = to_arrayrecord(self.control)
        for message in messages:
            message.content[CONTROL] = control
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.round_start is None or self.control is None:
            return None, None
        x, c = self.round_start, self.control
        contents = []
        for message in replies:  # a reply without y_i and delta c_i over x's keys is left out of S
            content = None if message.has_error() else message.content
            if content is not None and all(name in content.array_records and set(content[name]) == set(x)
                                           for name in ("arrays", CONTROL)):
                contents.append(content)
            else:
                log(WARNING, "SCAFFOLD: reply from node %s lacks 'arrays' or 'control'; not aggregated",
                    message.metadata.src_node_id)
        if not contents:
            return None, None
        ys = [from_arrayrecord(content["arrays"]) for content in contents]
        deltas = [from_arrayrecord(content[CONTROL]) for content in contents]
        share = len(contents) / self.num_clients  # |S| / N

        def mean(states: list[AdapterState], key: str) -> np.ndarray:
            return np.mean([s[key].astype(np.float64) for s in states], axis=0)

        new_x = {k: (x[k] + self.server_lr * (mean(ys, k) - x[k])).astype(x[k].dtype) for k in x}
        self.control = {k: (c[k] + share * mean(deltas, k)).astype(c[k].dtype) for k in c}
        return to_arrayrecord(new_x), self.train_metrics_aggr_fn(contents, self.weighted_by_key)


def correct_steps(stream: Stream, keys: list[str], correction: AdapterState, where: str) -> None:
    """Hook the stream's optimizer so every step adds `correction` (by state key, `keys` naming
    the stream's parameters in order): "step": p <- p - lr * correction after the optimizer's
    step; "gradient": grad p <- grad p + correction just before it (after clipping)."""
    tensors = {p: torch.from_numpy(np.ascontiguousarray(correction[k])).to(p.device, p.dtype)
               for k, p in zip(keys, stream.params, strict=True)}

    @torch.no_grad()
    def after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p in tensors:
                    p.add_(tensors[p], alpha=-group["lr"])

    @torch.no_grad()
    def before_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for p, t in tensors.items():
            p.grad = t.clone() if p.grad is None else p.grad.add_(t)

    if where == "step":
        stream.optimizer.register_step_post_hook(after_step)
    elif where == "gradient":
        stream.optimizer.register_step_pre_hook(before_step)
    else:
        raise ValueError(f"federation.scaffold_correction: unknown {where!r}")


class Scaffold(Algorithm):
    name = "scaffold"

    def strategy(self, cfg: RunConfig) -> Strategy:
        return ScaffoldStrategy(**sampling_kwargs(cfg), num_clients=cfg.partition.num_clients,
                                server_lr=cfg.federation.server_lr)

    # c_i: the client's local state, on its own disk as safetensors --------------------------
    def load_local_state(self, session: ClientSession, held: LocalState, server_round: int) -> LocalState:
        """c_i from memory, else its latest copy on the client's disk, else zeros."""
        state = super().load_local_state(session, held, server_round)
        saved = session.disk.last_local_tensors(CONTROL, server_round - 1)
        if CONTROL in held:
            state[CONTROL] = held[CONTROL]
        elif saved is not None:
            state[CONTROL] = load_numpy(str(saved))
        else:
            state[CONTROL] = {k: np.zeros_like(v) for k, v in get_adapter_state(session.model,
                                                                                self.global_adapter).items()}
        return state

    def save_local_state(self, session: ClientSession, server_round: int, state: LocalState) -> None:
        super().save_local_state(session, server_round, state)
        path = session.disk.local_tensors(CONTROL, server_round)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        save_numpy({k: np.ascontiguousarray(v) for k, v in state[CONTROL].items()}, str(partial))
        partial.replace(path)  # atomic: a crash never leaves half a c_i

    # the client's round -------------------------------------------------------------------
    def train(self, session: ClientSession, global_state: AdapterState, server_round: int,
              config: dict[str, Any], local_state: LocalState, received: dict[str, AdapterState]) -> TrainResult:
        if CONTROL not in received:
            raise ValueError("SCAFFOLD: the training message carries no server control variate 'control'")
        cfg, adapter = session.cfg, self.global_adapter
        c, c_i = received[CONTROL], local_state[CONTROL]
        examples, dropped, metrics = train_examples(session, server_round, adapter, global_state)
        correction = {k: c[k] - c_i[k] for k in c}
        result = train_adapter(
            session, adapter, global_state, examples, server_round, steps=cfg.train.local_steps,
            on_stream=lambda stream, keys: correct_steps(stream, keys, correction, cfg.federation.scaffold_correction),
        )
        x, y = global_state, result.state
        new_c_i = {k: (c_i[k].astype(np.float64) - c[k] + (x[k].astype(np.float64) - y[k]) / result.lr_sum)
                   .astype(c_i[k].dtype) for k in c_i}
        delta = {k: new_c_i[k] - c_i[k] for k in c_i}
        return TrainResult(y, len(examples), {**metrics, **result.metrics, "dropped_too_long": float(dropped)},
                           local_state={CONTROL: new_c_i}, extra={CONTROL: delta})
