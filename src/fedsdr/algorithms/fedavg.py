"""FedAvg (McMahan et al., 2017): clients run local SGD steps from the global adapter; the
server takes the example-weighted mean: theta <- sum_k n_k / n * theta_k.

The client step is shared by every single-adapter algorithm (FedProx's proximal term arrives
as "proximal-mu" in the round's config, the FedOpt family changes only the server), with or
without FedSD's distilled data.
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.serverapp.strategy import Strategy

from fedsdr.algorithms.base import (
    Algorithm,
    ClientSession,
    LocalState,
    TrainResult,
    derive_seed,
    proximal_mu,
    sampling_kwargs,
)
from fedsdr.algorithms.fedsd import client_distilled_set, diagnostic_metrics
from fedsdr.config import RunConfig
from fedsdr.console import task
from fedsdr.models.adapters import (
    AdapterState,
    activate,
    adapter_parameters,
    get_adapter_state,
    set_adapter_state,
)
from fedsdr.train import make_stream, sft_steps


class FedAvg(Algorithm):
    name = "fedavg"

    def strategy(self, cfg: RunConfig) -> Strategy:
        return FlowerFedAvg(**sampling_kwargs(cfg))

    def train(self, session: ClientSession, global_state: AdapterState, server_round: int,
              config: dict[str, Any], local_state: LocalState, received: dict[str, AdapterState]) -> TrainResult:
        cfg, model, adapter = session.cfg, session.model, self.global_adapter
        metrics: dict[str, float] = {}
        if cfg.distill.enabled:  # Algorithm + FedSD: train on the distilled set
            records = client_distilled_set(session, server_round, adapter, global_state)
            examples, dropped = session.encoded(f"distilled-{session.distilled_from_round}", records)
            metrics.update(diagnostic_metrics(session))
        else:
            examples, dropped = session.raw_examples()
        set_adapter_state(model, adapter, global_state)
        activate(model, [adapter], trainable=[adapter])
        stream = make_stream(
            examples, adapter_parameters(model, adapter), cfg.train,
            seed=derive_seed(cfg.seed, "batches", server_round, session.client_id),
            proximal_mu=proximal_mu(config),
        )
        torch.manual_seed(derive_seed(cfg.seed, "dropout", server_round, session.client_id))
        steps = cfg.train.local_steps
        with task(f"client {session.client_id}: local steps", steps) as advance:
            stats = sft_steps(
                model, stream, cfg.train, steps=steps, first_step=(server_round - 1) * steps,
                total_steps=cfg.federation.rounds * steps, pad_id=session.tokenizer.pad_token_id,
                autocast=session.runtime.autocast, on_step=lambda step, loss: advance(1),
            )
        metrics.update(train_loss=stats.mean_loss, steps=float(steps), tokens=float(stats.tokens),
                       seconds=stats.seconds, dropped_too_long=float(dropped))
        return TrainResult(get_adapter_state(model, adapter), len(examples), metrics)
