"""One module per algorithm: its client hook and its server strategy. The registry below is
the only place that lists them."""

from __future__ import annotations

from fedsdr.algorithms.aggregators import SINGLE_ADAPTER, server_strategy
from fedsdr.algorithms.base import Algorithm, ClientSession, LocalState, TrainResult, derive_seed
from fedsdr.algorithms.centralized import Centralized
from fedsdr.algorithms.feddpa import FedDPA
from fedsdr.algorithms.fedsdr import FedSDR
from fedsdr.algorithms.local import LocalOnly
from fedsdr.algorithms.scaffold import Scaffold
from fedsdr.config import ConfigError, RunConfig

ALGORITHMS: dict[str, type[Algorithm]] = {
    **SINGLE_ADAPTER,
    **{cls.name: cls for cls in (FedSDR, Scaffold, FedDPA, LocalOnly, Centralized)},
}


def get_algorithm(cfg: RunConfig) -> Algorithm:
    """The algorithm `federation.algorithm` names (its server strategy checked too)."""
    name = cfg.federation.algorithm
    if name not in ALGORITHMS:
        raise ConfigError(f"federation.algorithm: unknown {name!r}; choose from {sorted(ALGORITHMS)}")
    if cfg.federation.server_strategy not in SINGLE_ADAPTER:
        server_strategy(cfg)  # raises the error that names the key
    return ALGORITHMS[name]()


__all__ = ["ALGORITHMS", "Algorithm", "ClientSession", "LocalState", "TrainResult", "derive_seed", "get_algorithm"]
