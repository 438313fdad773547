"""Local-only: every client trains its own adapter and nothing is aggregated (a reference point).

Client k keeps theta_k on its own disk across rounds (like FedSDR's LoRA-S; initialised as a
fresh LoRA, B = 0) and each round takes K local steps from it:

    theta_k <- theta_k - eta_l * grad L_k(theta_k)       (K steps)

Nothing crosses the network in training: the server sends an empty ArrayRecord and the client
replies with one (bytes up = bytes down = 0). The global adapter stays at its initialisation,
theta <- theta_0 (B = 0: the base model). Models: global = W0 + theta_0 = W0, client k's
personalized = W0 + theta_k. With FedSD client k trains on its distilled set, rewritten by the
base model (or, on a refresh, by its own model W0 + theta_k).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.serverapp.strategy import Strategy

from fedsdr.algorithms.base import (
    Algorithm,
    ClientSession,
    LocalState,
    TrainResult,
    sampling_kwargs,
)
from fedsdr.algorithms.one_adapter import train_adapter, train_examples
from fedsdr.config import RunConfig
from fedsdr.models.adapters import AdapterSpec, AdapterState

LOCAL = "local"


class KeepGlobal(FlowerFedAvg):
    """Flower's FedAvg sampling; training messages carry no tensors and aggregation returns
    the global adapter it was given, unchanged."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.global_arrays: ArrayRecord | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        self.global_arrays = arrays
        return super().configure_train(server_round, ArrayRecord(), config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        contents = [m.content for m in replies if not m.has_error()]
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key) if contents else None
        return self.global_arrays, metrics


class LocalOnly(Algorithm):
    name = "local"
    uploads_global = False

    def adapters(self, cfg: RunConfig) -> list[AdapterSpec]:
        """The global adapter (never trained) and the client's own."""
        return [AdapterSpec(self.global_adapter, cfg.lora.r, cfg.lora.alpha), AdapterSpec(LOCAL, cfg.lora.r, cfg.lora.alpha)]

    def eval_models(self, cfg: RunConfig) -> dict[str, list[str]]:
        return {"global": [self.global_adapter], "personalized": [LOCAL]}

    def strategy(self, cfg: RunConfig) -> Strategy:
        return KeepGlobal(**sampling_kwargs(cfg))

    def train(self, session: ClientSession, global_state: AdapterState, server_round: int,
              config: dict[str, Any], local_state: LocalState, received: dict[str, AdapterState]) -> TrainResult:
        own = local_state[LOCAL]
        examples, dropped, metrics = train_examples(session, server_round, LOCAL, own)
        result = train_adapter(session, LOCAL, own, examples, server_round, steps=session.cfg.train.local_steps)
        return TrainResult({}, len(examples), {**metrics, **result.metrics, "dropped_too_long": float(dropped)},
                           local_state={LOCAL: result.state})
