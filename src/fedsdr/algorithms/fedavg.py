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
from fedsdr.algorithms.one_adapter import train_global_adapter
from fedsdr.config import RunConfig
from fedsdr.models.adapters import AdapterState


class FedAvg(Algorithm):
    name = "fedavg"

    def strategy(self, cfg: RunConfig) -> Strategy:
        return FlowerFedAvg(**sampling_kwargs(cfg))

    def train(self, session: ClientSession, global_state: AdapterState, server_round: int,
              config: dict[str, Any], local_state: LocalState, received: dict[str, AdapterState]) -> TrainResult:
        """K local steps from the global adapter, on raw data or (Algorithm + FedSD) the distilled set."""
        return train_global_adapter(session, self.global_adapter, global_state, server_round,
                                    proximal_mu=proximal_mu(config), **self.round_plan(session))

    def round_plan(self, session: ClientSession) -> dict[str, Any]:
        """`train_global_adapter`'s steps (and pool, seed scope) for a round: K steps on the
        client's own data, seeded by its client id."""
        return {"steps": session.cfg.train.local_steps}
