"""FedAvg (McMahan et al., 2017): clients run local SGD steps from the global adapter; the
server takes the example-weighted mean: theta <- sum_k n_k / n * theta_k.

The client step is shared by every single-adapter algorithm (FedProx adds its proximal term,
the FedOpt family changes only the server), with or without FedSD's distilled data.
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.serverapp.strategy import Strategy

from fedsdr import progress
from fedsdr.algorithms.base import (
    Algorithm,
    ClientSession,
    TrainResult,
    derive_seed,
    sampling_kwargs,
)
from fedsdr.algorithms.fedsd import distill_metrics, distilled_training_records
from fedsdr.config import RunConfig
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

    def proximal_mu(self, config: dict[str, Any]) -> float:
        return 0.0

    def train(self, session: ClientSession, global_state: AdapterState, server_round: int,
              config: dict[str, Any], client_state: dict[str, Any]) -> TrainResult:
        cfg, model, adapter = session.cfg, session.model, self.global_adapter
        metrics: dict[str, float] = {}
        if cfg.distill.enabled:  # Algorithm + FedSD: train on the distilled set
            records = distilled_training_records(session, server_round, adapter, global_state)
            examples, dropped = session.encoded(f"distilled-{session.distill_key}", records)
            metrics.update(distill_metrics(session))
        else:
            examples, dropped = session.raw_examples()
        set_adapter_state(model, adapter, global_state)
        activate(model, [adapter], trainable=[adapter])
        stream = make_stream(
            examples, adapter_parameters(model, adapter), cfg.train,
            seed=derive_seed(cfg.seed, "batches", server_round, session.client_id),
        )
        torch.manual_seed(derive_seed(cfg.seed, "dropout", server_round, session.client_id))
        steps = cfg.train.local_steps
        with progress.task(f"client {session.client_id}: local steps", steps) as advance:
            stats = sft_steps(
                model, stream, cfg.train, steps=steps, first_step=(server_round - 1) * steps,
                total_steps=cfg.federation.rounds * steps, pad_id=session.tokenizer.pad_token_id,
                autocast=session.runtime.autocast, proximal_mu=self.proximal_mu(config),
                on_step=lambda step, loss: advance(1),
            )
        metrics.update(train_loss=stats.mean_loss, steps=float(steps), tokens=float(stats.tokens),
                       seconds=stats.seconds, dropped_too_long=float(dropped))
        return TrainResult(get_adapter_state(model, adapter), len(examples), metrics)
