"""FedProx (Li et al., 2020): FedAvg whose clients minimise
L_k(theta) + mu/2 * ||theta - theta_global||^2; Flower's FedProx sends mu as "proximal-mu"."""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedProx as FlowerFedProx
from flwr.serverapp.strategy import Strategy

from fedsdr.algorithms.base import sampling_kwargs
from fedsdr.algorithms.fedavg import FedAvg
from fedsdr.config import RunConfig


class FedProx(FedAvg):
    name = "fedprox"

    def strategy(self, cfg: RunConfig) -> Strategy:
        return FlowerFedProx(**sampling_kwargs(cfg), proximal_mu=cfg.federation.proximal_mu)

    def proximal_mu(self, config: dict[str, Any]) -> float:
        return float(config["proximal-mu"])
