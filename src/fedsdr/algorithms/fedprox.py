"""FedProx (Li et al., 2020): FedAvg whose clients minimise
L_k(theta) + mu/2 * ||theta - theta_global||^2. Flower's FedProx sends mu to the clients as
"proximal-mu" in each round's config; every client stream that receives it adds the term
(`fedsdr.train.Stream.proximal_loss`), FedSDR's LoRA-R stream included."""

from __future__ import annotations

from flwr.serverapp.strategy import FedProx as FlowerFedProx
from flwr.serverapp.strategy import Strategy

from fedsdr.algorithms.base import sampling_kwargs
from fedsdr.algorithms.fedavg import FedAvg
from fedsdr.config import RunConfig


class FedProx(FedAvg):
    name = "fedprox"

    def strategy(self, cfg: RunConfig) -> Strategy:
        return FlowerFedProx(**sampling_kwargs(cfg), proximal_mu=cfg.federation.proximal_mu)
