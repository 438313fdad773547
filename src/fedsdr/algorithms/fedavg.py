"""FedAvg (McMahan et al., 2017): clients run local SGD steps from the global adapter; the
server takes the example-weighted mean: theta <- sum_k n_k / n * theta_k.

The client step is shared by every single-adapter algorithm (FedProx's proximal term arrives
as "proximal-mu" in the round's config, the FedOpt family changes only the server), with or
without FedSD's distilled data.
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.serverapp.strategy import Strategy

from fedsdr.algorithms.base import (
    Algorithm,
    ClientSession,
    LocalState,
    TrainResult,
    proximal_mu,
    sampling_kwargs,
)
from fedsdr.algorithms.one_adapter import train_adapter, train_examples
from fedsdr.config import RunConfig
from fedsdr.models.adapters import AdapterState


class FedAvg(Algorithm):
    name = "fedavg"

    def strategy(self, cfg: RunConfig) -> Strategy:
        return FlowerFedAvg(**sampling_kwargs(cfg))

    def train(self, session: ClientSession, global_state: AdapterState, server_round: int,
              config: dict[str, Any], local_state: LocalState, received: dict[str, AdapterState]) -> TrainResult:
        """K local steps from the global adapter, on raw data or (Algorithm + FedSD) the distilled set."""
        adapter = self.global_adapter
        examples, dropped, metrics = train_examples(session, server_round, adapter, global_state)
        trained = train_adapter(session, adapter, global_state, examples, server_round,
                                steps=session.cfg.train.local_steps, proximal_mu=proximal_mu(config))
        metrics.update(trained.metrics, dropped_too_long=float(dropped))
        return TrainResult(trained.state, len(examples), metrics)
