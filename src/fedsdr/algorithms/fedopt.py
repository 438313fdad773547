"""Server-optimizer variants of FedAvg: the clients are FedAvg's, the server treats the mean
client delta as a pseudo-gradient.

FedAvgM (Hsu et al., 2019): server momentum. FedAdam / FedYogi / FedAdagrad (Reddi et al.,
2021): adaptive server optimizers with learning rate eta and adaptivity tau.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAdagrad as FlowerFedAdagrad
from flwr.serverapp.strategy import FedAdam as FlowerFedAdam
from flwr.serverapp.strategy import FedAvgM as FlowerFedAvgM
from flwr.serverapp.strategy import FedYogi as FlowerFedYogi
from flwr.serverapp.strategy import Strategy

from fedsdr.algorithms.base import sampling_kwargs
from fedsdr.algorithms.fedavg import FedAvg
from fedsdr.config import RunConfig


class FedAvgM(FedAvg):
    name = "fedavgm"

    def strategy(self, cfg: RunConfig) -> Strategy:
        fed = cfg.federation
        return FlowerFedAvgM(**sampling_kwargs(cfg), server_learning_rate=fed.server_lr, server_momentum=fed.server_momentum)


def _fedopt_kwargs(cfg: RunConfig) -> dict[str, float]:
    fed = cfg.federation
    return {"eta": fed.eta, "eta_l": cfg.train.lr, "tau": fed.tau}


class FedAdam(FedAvg):
    name = "fedadam"

    def strategy(self, cfg: RunConfig) -> Strategy:
        fed = cfg.federation
        return FlowerFedAdam(**sampling_kwargs(cfg), **_fedopt_kwargs(cfg), beta_1=fed.beta_1, beta_2=fed.beta_2)


class FedYogi(FedAvg):
    name = "fedyogi"

    def strategy(self, cfg: RunConfig) -> Strategy:
        fed = cfg.federation
        return FlowerFedYogi(**sampling_kwargs(cfg), **_fedopt_kwargs(cfg), beta_1=fed.beta_1, beta_2=fed.beta_2)


class FedAdagrad(FedAvg):
    name = "fedadagrad"

    def strategy(self, cfg: RunConfig) -> Strategy:
        return FlowerFedAdagrad(**sampling_kwargs(cfg), **_fedopt_kwargs(cfg))
