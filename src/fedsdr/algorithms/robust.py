"""Byzantine-robust aggregation: FedAvg's clients, Flower's robust server strategies. Each also
aggregates the global adapter of algorithms with local adapters (`federation.server_strategy`).

FedMedian (Yin et al., 2018): coordinate-wise median of the client adapters.
FedTrimmedAvg (Yin et al., 2018): coordinate-wise mean after dropping the `trimmed_beta`
    fraction of largest and smallest values.
Krum / MultiKrum (Blanchard et al., 2017): the client adapter(s) closest, in summed squared
    distance, to their n - f - 2 nearest neighbours (f = `num_malicious_clients`); MultiKrum
    averages the `multikrum_select` best.
Bulyan (El Mhamdi et al., 2018): MultiKrum selection, then a coordinate-wise trimmed mean.
"""

from __future__ import annotations

from flwr.serverapp.strategy import Bulyan as FlowerBulyan
from flwr.serverapp.strategy import FedMedian as FlowerFedMedian
from flwr.serverapp.strategy import FedTrimmedAvg as FlowerFedTrimmedAvg
from flwr.serverapp.strategy import Krum as FlowerKrum
from flwr.serverapp.strategy import MultiKrum as FlowerMultiKrum
from flwr.serverapp.strategy import Strategy

from fedsdr.algorithms.base import sampling_kwargs
from fedsdr.algorithms.fedavg import FedAvg
from fedsdr.config import RunConfig


class FedMedian(FedAvg):
    name = "fedmedian"

    def strategy(self, cfg: RunConfig) -> Strategy:
        return FlowerFedMedian(**sampling_kwargs(cfg))


class FedTrimmedAvg(FedAvg):
    name = "fedtrimmedavg"

    def strategy(self, cfg: RunConfig) -> Strategy:
        return FlowerFedTrimmedAvg(**sampling_kwargs(cfg), beta=cfg.federation.trimmed_beta)


class Krum(FedAvg):
    name = "krum"

    def strategy(self, cfg: RunConfig) -> Strategy:
        return FlowerKrum(**sampling_kwargs(cfg), num_malicious_nodes=cfg.federation.num_malicious_clients)


class MultiKrum(FedAvg):
    name = "multikrum"

    def strategy(self, cfg: RunConfig) -> Strategy:
        fed = cfg.federation
        return FlowerMultiKrum(**sampling_kwargs(cfg), num_malicious_nodes=fed.num_malicious_clients,
                               num_nodes_to_select=fed.multikrum_select)


class Bulyan(FedAvg):
    name = "bulyan"

    def strategy(self, cfg: RunConfig) -> Strategy:
        return FlowerBulyan(**sampling_kwargs(cfg), num_malicious_nodes=cfg.federation.num_malicious_clients)
