"""One module per algorithm: its client hook and its server strategy."""

from __future__ import annotations

from fedsdr.algorithms.base import Algorithm, ClientSession, TrainResult, derive_seed
from fedsdr.algorithms.fedavg import FedAvg
from fedsdr.algorithms.fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi
from fedsdr.algorithms.fedprox import FedProx
from fedsdr.algorithms.fedsdr import FedSDR

ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad, FedSDR)
}


def get_algorithm(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]()
    except KeyError:
        raise ValueError(f"federation.algorithm: unknown {name!r}; choose from {sorted(ALGORITHMS)}") from None


__all__ = ["ALGORITHMS", "Algorithm", "ClientSession", "TrainResult", "derive_seed", "get_algorithm"]
