"""Split a record pool into clients with flwr-datasets partitioners, plus the held-out sets."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import random
import sys
from collections import defaultdict
from dataclasses import dataclass

import datasets

from fedsdr.data.schema import DataError, Record


def _defer_flwr_datasets_plots() -> None:
    """Put `flwr_datasets.visualization` in `sys.modules` unexecuted, to run on first use.

    flwr-datasets' `__init__` imports its plotting helpers, and with them matplotlib.pyplot,
    seaborn and scipy: ~45 MB resident in every process that partitions data, for plots fedsdr
    never draws (the fp32 quickstart round peaked ~40 MB over its 2 GB target with them). The
    package's `from flwr_datasets import visualization` then binds this module object; its body
    runs, in full, the first time anyone looks up a name it lacks (a PEP 562 module
    `__getattr__`). Not `importlib.util.LazyLoader`: the import system reads `__spec__` of a
    module it finds in `sys.modules`, and on Python 3.11 any attribute read loads a lazy one."""
    name = "flwr_datasets.visualization"
    package = importlib.util.find_spec("flwr_datasets")  # a top-level spec: imports nothing
    if "flwr_datasets" in sys.modules or package is None or package.submodule_search_locations is None:
        return
    spec = importlib.machinery.PathFinder.find_spec(name, package.submodule_search_locations)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)

    def load_on_first_use(attribute: str) -> object:
        del module.__getattr__
        spec.loader.exec_module(module)
        return getattr(module, attribute)

    module.__getattr__ = load_on_first_use
    sys.modules[name] = module


_defer_flwr_datasets_plots()

from flwr_datasets.partitioner import (  # noqa: E402 (after the deferral above)
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
    PathologicalPartitioner,
)


@dataclass(frozen=True)
class ClientData:
    """One client's private data: what it trains on and what it is evaluated on."""

    client_id: int
    train: list[Record]
    test: list[Record]


def _partitioner(
    method: str, num_clients: int, seed: int, alpha: float, domains_per_client: int, num_domains: int
) -> Partitioner:
    if method == "iid":
        return IidPartitioner(num_partitions=num_clients)
    if method == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_clients,
            partition_by="domain",
            alpha=alpha,
            min_partition_size=1,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    if method in ("domain", "k-domains"):
        k = 1 if method == "domain" else domains_per_client
        if k > num_domains:
            raise DataError(f"partition.domains_per_client={k} but the data has only {num_domains} domains")
        return PathologicalPartitioner(
            num_partitions=num_clients,
            partition_by="domain",
            num_classes_per_partition=k,
            # Client i's first domain is domain i (mod the number of domains), the others are
            # drawn with the seed: every domain is used when clients >= domains.
            class_assignment_mode="first-deterministic",
            shuffle=True,
            seed=seed,
        )
    raise DataError(f"partition.method: unknown method {method!r}")


def partition_records(
    records: list[Record],
    *,
    num_clients: int,
    method: str = "domain",
    seed: int = 0,
    alpha: float = 0.5,
    domains_per_client: int = 2,
) -> list[list[Record]]:
    """Assign every record to at most one client; returns one list per client."""
    domains = sorted({r.domain for r in records})
    # Shuffle first: IidPartitioner cuts contiguous shards.
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    table = datasets.Dataset.from_dict(
        {"index": order, "domain": [records[i].domain for i in order]}
    )
    partitioner = _partitioner(method, num_clients, seed, alpha, domains_per_client, len(domains))
    partitioner.dataset = table
    parts: list[list[Record]] = []
    try:
        for cid in range(num_clients):
            indices = partitioner.load_partition(cid)["index"]
            parts.append([records[i] for i in sorted(indices)])
    except (ValueError, IndexError) as e:  # flwr-datasets refuses impossible splits
        raise DataError(
            f"partition.method={method!r} cannot split {len(records)} records over {num_clients} clients: {e}"
        ) from None
    empty = [cid for cid, p in enumerate(parts) if not p]
    if empty:
        raise DataError(
            f"partition.method={method!r} left clients {empty} with no data; "
            "use fewer clients, more records or another method"
        )
    return parts


def hold_out_global_test(records: list[Record], per_domain: int, seed: int) -> tuple[list[Record], list[Record]]:
    """Take `per_domain` records of every domain out of the pool: (rest, global_test)."""
    by_domain: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_domain[r.domain].append(r)
    rng = random.Random(seed + 7919)
    test_ids: set[str] = set()
    for domain in sorted(by_domain):
        items = by_domain[domain]
        take = min(per_domain, max(0, len(items) - 1))  # leave training data in each domain
        test_ids.update(r.id for r in rng.sample(items, take))
    rest = [r for r in records if r.id not in test_ids]
    test = [r for r in records if r.id in test_ids]
    return rest, test


def split_train_test(
    records: list[Record], test_fraction: float, seed: int, max_test: int = 0
) -> tuple[list[Record], list[Record]]:
    """Seeded per-client train/test split, stratified by domain."""
    by_domain: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_domain[r.domain].append(r)
    rng = random.Random(seed)
    test_ids: list[str] = []
    for domain in sorted(by_domain):
        items = list(by_domain[domain])
        rng.shuffle(items)
        n_test = min(len(items) - 1, round(len(items) * test_fraction)) if test_fraction > 0 else 0
        test_ids.extend(r.id for r in items[: max(0, n_test)])
    if max_test and len(test_ids) > max_test:
        rng.shuffle(test_ids)
        test_ids = test_ids[:max_test]
    chosen = set(test_ids)
    return [r for r in records if r.id not in chosen], [r for r in records if r.id in chosen]
