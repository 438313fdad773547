"""The single-adapter algorithms whose server strategy can aggregate any global adapter, by
config name: what `federation.algorithm` names for one adapter, and what
`federation.server_strategy` names for algorithms that also keep local adapters (FedSDR)."""

from __future__ import annotations

from flwr.serverapp.strategy import Strategy

from fedsdr.algorithms.base import Algorithm
from fedsdr.algorithms.fedavg import FedAvg
from fedsdr.algorithms.fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi
from fedsdr.algorithms.fedprox import FedProx
from fedsdr.algorithms.robust import Bulyan, FedMedian, FedTrimmedAvg, Krum, MultiKrum
from fedsdr.config import ConfigError, RunConfig

SINGLE_ADAPTER: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad,
                              FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan)
}


def server_strategy(cfg: RunConfig) -> Strategy:
    """The strategy named by `federation.server_strategy`."""
    name = cfg.federation.server_strategy
    if name not in SINGLE_ADAPTER:
        raise ConfigError(f"federation.server_strategy: unknown {name!r}; choose from {sorted(SINGLE_ADAPTER)}")
    return SINGLE_ADAPTER[name]().strategy(cfg)
