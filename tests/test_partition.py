"""Partitioning a record pool into clients, and the held-out global and per-client test sets."""

from __future__ import annotations

import warnings
from collections import Counter
from statistics import mean
from typing import Any

import pytest

from fedsdr.config import DataConfig, PartitionConfig
from fedsdr.data.federated import FederatedData, build_federated_data
from fedsdr.data.partition import hold_out_global_test, partition_records, split_train_test
from fedsdr.data.schema import DataError, Record

DOMAINS = [f"dom{d}" for d in range(6)]
PER_DOMAIN = 20


def make_records(per_domain: int = PER_DOMAIN, domains: list[str] = DOMAINS) -> list[Record]:
    # Interleaved, so that no method can pass by accident of input order.
    return [
        Record(id=f"{d}-{i:03d}", instruction=f"task {i}", output=f"answer {i}", domain=d)
        for i in range(per_domain)
        for d in domains
    ]


RECORDS = make_records()


def partition(**kwargs: Any) -> list[list[Record]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flwr-datasets warns about unused domains
        return partition_records(RECORDS, **kwargs)


def domains_of(client: list[Record]) -> Counter[str]:
    return Counter(r.domain for r in client)


def ids(parts: list[list[Record]]) -> list[list[str]]:
    return [[r.id for r in p] for p in parts]


def assert_no_overlap(parts: list[list[Record]]) -> None:
    all_ids = [r.id for p in parts for r in p]
    assert len(all_ids) == len(set(all_ids))
    assert set(all_ids) <= {r.id for r in RECORDS}


# --- partition_records ---------------------------------------------------------------------


def test_domain_four_clients_one_distinct_domain_each() -> None:
    parts = partition(num_clients=4, method="domain", seed=0)
    assert len(parts) == 4
    seen = [domains_of(p) for p in parts]
    assert all(len(c) == 1 for c in seen)
    assert len({next(iter(c)) for c in seen}) == 4
    # a client holding a domain holds all of it
    assert all(list(c.values()) == [PER_DOMAIN] for c in seen)


def test_domain_six_clients_cover_all_domains() -> None:
    parts = partition(num_clients=6, method="domain", seed=3)
    seen = [domains_of(p) for p in parts]
    assert all(len(c) == 1 for c in seen)
    assert {d for c in seen for d in c} == set(DOMAINS)
    assert sum(len(p) for p in parts) == len(RECORDS)


@pytest.mark.parametrize("num_clients", [3, 4, 6])
def test_k_domains_gives_each_client_k_domains(num_clients: int) -> None:
    parts = partition(num_clients=num_clients, method="k-domains", domains_per_client=2, seed=0)
    assert len(parts) == num_clients
    assert all(len(domains_of(p)) == 2 for p in parts)


def test_k_domains_more_than_available_is_an_error() -> None:
    with pytest.raises(DataError, match="domains_per_client"):
        partition(num_clients=2, method="k-domains", domains_per_client=7)


def test_unknown_method_is_an_error() -> None:
    with pytest.raises(DataError, match="unknown method"):
        partition(num_clients=2, method="random")


def max_share(parts: list[list[Record]]) -> float:
    return mean(max(domains_of(p).values()) / len(p) for p in parts)


def test_dirichlet_small_alpha_is_skewed() -> None:
    shares = [
        max_share(partition(num_clients=4, method="dirichlet", alpha=0.1, seed=s)) for s in range(4)
    ]
    assert mean(shares) > 0.5


def test_dirichlet_large_alpha_is_near_uniform() -> None:
    for seed in range(3):
        parts = partition(num_clients=4, method="dirichlet", alpha=100.0, seed=seed)
        for p in parts:
            counts = domains_of(p)
            assert set(counts) == set(DOMAINS)
            assert max(counts.values()) / len(p) < 0.3  # uniform would be 1/6
        sizes = [len(p) for p in parts]
        assert max(sizes) <= 2 * min(sizes)


def test_iid_clients_mix_domains_with_equal_sizes() -> None:
    parts = partition(num_clients=4, method="iid", seed=0)
    sizes = [len(p) for p in parts]
    assert sum(sizes) == len(RECORDS)
    assert max(sizes) - min(sizes) <= 1
    for p in parts:
        assert len(domains_of(p)) >= 4
        assert max(domains_of(p).values()) / len(p) < 0.5


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "domain", "num_clients": 4},
        {"method": "domain", "num_clients": 6},
        {"method": "domain", "num_clients": 9},
        {"method": "k-domains", "num_clients": 5, "domains_per_client": 3},
        {"method": "dirichlet", "num_clients": 5, "alpha": 0.3},
        {"method": "dirichlet", "num_clients": 5, "alpha": 100.0},
        {"method": "iid", "num_clients": 7},
    ],
)
def test_no_record_in_two_clients(kwargs: dict[str, Any]) -> None:
    parts = partition(seed=1, **kwargs)
    assert len(parts) == kwargs["num_clients"]
    assert all(parts)
    assert_no_overlap(parts)


@pytest.mark.parametrize("method", ["domain", "k-domains", "dirichlet", "iid"])
def test_same_seed_same_partition(method: str) -> None:
    a = partition(num_clients=4, method=method, seed=5, alpha=0.5)
    b = partition(num_clients=4, method=method, seed=5, alpha=0.5)
    assert ids(a) == ids(b)


@pytest.mark.parametrize("method", ["dirichlet", "iid"])
def test_different_seed_different_partition(method: str) -> None:
    a = partition(num_clients=4, method=method, seed=0, alpha=0.5)
    b = partition(num_clients=4, method=method, seed=1, alpha=0.5)
    assert ids(a) != ids(b)


def test_partition_does_not_mutate_or_reorder_input() -> None:
    pool = make_records(5)
    before = list(pool)
    parts = partition_records(pool, num_clients=3, method="iid", seed=0)
    assert pool == before
    position = {r.id: i for i, r in enumerate(pool)}
    for p in parts:  # each client's records keep the pool's order
        assert [position[r.id] for r in p] == sorted(position[r.id] for r in p)


@pytest.mark.parametrize(
    ("pool", "kwargs"),
    [
        # 3 records, 4 clients: IndexError 'Index 3 out of range for dataset of size 3'
        (make_records(1, ["a", "b", "c"]), {"method": "iid", "num_clients": 4}),
        # domain 'a' has 1 record but 2 clients must share it: ValueError from PathologicalPartitioner
        (
            [Record(id="a0", instruction="q", output="o", domain="a")] + make_records(10, ["b"]),
            {"method": "domain", "num_clients": 4},
        ),
        # Dirichlet cannot give 60 clients at least one record each: ValueError after 10 tries
        (RECORDS, {"method": "dirichlet", "num_clients": 60, "alpha": 0.01}),
    ],
    ids=[
        "iid-more-clients-than-records",
        "domain-shared-by-more-clients-than-records",
        "dirichlet",
    ],
)
def test_empty_client_is_a_data_error(pool: list[Record], kwargs: dict[str, Any]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError):
            partition_records(pool, seed=0, **kwargs)


# --- hold_out_global_test ------------------------------------------------------------------


@pytest.mark.parametrize("per_domain", [0, 1, 3, 7])
def test_hold_out_takes_exactly_per_domain(per_domain: int) -> None:
    rest, test = hold_out_global_test(RECORDS, per_domain, seed=0)
    counts = domains_of(test)
    assert all(counts[d] == per_domain for d in DOMAINS)
    assert {r.id for r in rest}.isdisjoint(r.id for r in test)
    assert len(rest) + len(test) == len(RECORDS)
    assert {r.id for r in rest} | {r.id for r in test} == {r.id for r in RECORDS}
    assert all(domains_of(rest)[d] == PER_DOMAIN - per_domain for d in DOMAINS)


def test_hold_out_leaves_training_data_in_small_domains() -> None:
    pool = make_records(20, ["big"]) + make_records(2, ["small"]) + make_records(1, ["tiny"])
    rest, test = hold_out_global_test(pool, 5, seed=0)
    assert domains_of(test) == Counter({"big": 5, "small": 1})
    assert domains_of(rest) == Counter({"big": 15, "small": 1, "tiny": 1})


def test_hold_out_is_deterministic_and_seeded() -> None:
    a = hold_out_global_test(RECORDS, 4, seed=0)
    b = hold_out_global_test(RECORDS, 4, seed=0)
    c = hold_out_global_test(RECORDS, 4, seed=1)
    assert a == b
    assert {r.id for r in a[1]} != {r.id for r in c[1]}


# --- split_train_test ----------------------------------------------------------------------


def test_split_is_disjoint_and_complete() -> None:
    train, test = split_train_test(RECORDS, 0.25, seed=0)
    assert {r.id for r in train}.isdisjoint(r.id for r in test)
    assert len(train) + len(test) == len(RECORDS)


def test_split_is_deterministic() -> None:
    assert split_train_test(RECORDS, 0.25, seed=4) == split_train_test(RECORDS, 0.25, seed=4)
    a = split_train_test(RECORDS, 0.25, seed=4)[1]
    b = split_train_test(RECORDS, 0.25, seed=5)[1]
    assert {r.id for r in a} != {r.id for r in b}


def test_split_is_stratified_by_domain() -> None:
    pool = make_records(20, ["a", "b"]) + make_records(8, ["c"])
    train, test = split_train_test(pool, 0.25, seed=0)
    assert domains_of(test) == Counter({"a": 5, "b": 5, "c": 2})
    assert domains_of(train) == Counter({"a": 15, "b": 15, "c": 6})


def test_split_keeps_a_training_record_per_domain() -> None:
    pool = make_records(1, ["a"]) + make_records(2, ["b"])
    train, test = split_train_test(pool, 0.9, seed=0)
    assert set(domains_of(train)) == {"a", "b"}
    assert domains_of(test) == Counter({"b": 1})


def test_split_zero_fraction_and_cap() -> None:
    train, test = split_train_test(RECORDS, 0.0, seed=0)
    assert test == [] and train == RECORDS
    train, test = split_train_test(RECORDS, 0.5, seed=0, max_test=7)
    assert len(test) == 7
    assert len(train) == len(RECORDS) - 7
    assert {r.id for r in train}.isdisjoint(r.id for r in test)


# --- build_federated_data ------------------------------------------------------------------


@pytest.fixture(scope="module")
def fed() -> FederatedData:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_federated_data(
            DataConfig(
                source="multi-domain",
                records_per_domain=8,
                global_test_per_domain=3,
                test_fraction=0.25,
            ),
            PartitionConfig(num_clients=6, method="domain"),
            seed=0,
        )


def test_federated_global_test_covers_every_domain(fed: FederatedData) -> None:
    from fedsdr.data.benchmark import DOMAINS as BENCHMARK_DOMAINS

    assert set(domains_of(fed.global_test)) == set(BENCHMARK_DOMAINS)
    assert all(n == 3 for n in domains_of(fed.global_test).values())
    assert fed.domains == sorted(BENCHMARK_DOMAINS)


def test_federated_clients_disjoint_from_global_test_and_each_other(fed: FederatedData) -> None:
    assert len(fed.clients) == 6
    assert [c.client_id for c in fed.clients] == list(range(6))
    global_ids = {r.id for r in fed.global_test}
    client_ids = [r.id for c in fed.clients for r in c.train + c.test]
    assert len(client_ids) == len(set(client_ids))
    assert global_ids.isdisjoint(client_ids)
    for c in fed.clients:
        assert c.train
        assert {r.id for r in c.train}.isdisjoint(r.id for r in c.test)
        assert len(domains_of(c.train + c.test)) == 1


def test_federated_is_deterministic_and_cached(fed: FederatedData) -> None:
    again = build_federated_data(
        DataConfig(
            source="multi-domain",
            records_per_domain=8,
            global_test_per_domain=3,
            test_fraction=0.25,
        ),
        PartitionConfig(num_clients=6, method="domain"),
        seed=0,
    )
    assert again.global_test == fed.global_test
    assert [c.train for c in again.clients] == [c.train for c in fed.clients]


def test_federated_from_user_file(tmp_path) -> None:
    import json

    path = tmp_path / "pool.jsonl"
    rows = [
        {"id": f"{d}-{i}", "q": f"question {i}", "a": f"answer {i}", "cat": d}
        for d in ("x", "y", "z")
        for i in range(10)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    data = DataConfig.model_validate(
        {
            "source": str(path),
            "fields": {"instruction": "q", "output": "a", "domain": "cat"},
            "domains": ["x", "y"],
            "global_test_per_domain": 2,
            "test_fraction": 0.25,
        }
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fd = build_federated_data(data, PartitionConfig(num_clients=2, method="domain"), seed=0)
    assert domains_of(fd.global_test) == Counter({"x": 2, "y": 2})
    assert fd.domains == ["x", "y"]
    client_ids = {r.id for c in fd.clients for r in c.train + c.test}
    assert len(client_ids) == 16
    assert client_ids.isdisjoint(r.id for r in fd.global_test)


def test_federated_empty_after_domain_filter_is_a_data_error(tmp_path) -> None:
    path = tmp_path / "pool.jsonl"
    path.write_text('{"instruction": "q", "output": "a", "domain": "x"}\n', encoding="utf-8")
    data = DataConfig(source=str(path), domains=["nope"])
    with pytest.raises(DataError, match="no records"):
        build_federated_data(data, PartitionConfig(num_clients=1), seed=0)


def test_partitioning_does_not_import_flwr_datasets_plotting_until_it_is_used() -> None:
    """flwr-datasets' package init imports matplotlib, seaborn and scipy for its plots (~45 MB
    resident); fedsdr defers that module, which still loads in full on first use."""
    import subprocess
    import sys

    script = """
import sys
import fedsdr.data.partition
import flwr_datasets
assert "matplotlib.pyplot" not in sys.modules and "seaborn" not in sys.modules, "plots imported"
from flwr_datasets.visualization import plot_label_distributions
assert callable(plot_label_distributions) and "matplotlib.pyplot" in sys.modules
assert flwr_datasets.visualization is sys.modules["flwr_datasets.visualization"]
import flwr_datasets.visualization.bar_plot
print("ok")
"""
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
