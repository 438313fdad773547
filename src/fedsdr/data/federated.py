"""From the data config to each client's train/test split and the global test set."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from fedsdr.config import DataConfig, PartitionConfig
from fedsdr.data.loaders import load_records
from fedsdr.data.partition import (
    ClientData,
    hold_out_global_test,
    partition_records,
    split_train_test,
)
from fedsdr.data.schema import DataError, Record


@dataclass(frozen=True)
class FederatedData:
    clients: list[ClientData]
    global_test: list[Record]

    @property
    def domains(self) -> list[str]:
        return sorted({r.domain for c in self.clients for r in c.train + c.test} | {r.domain for r in self.global_test})


def load_pool(cfg: DataConfig, seed: int) -> list[Record]:
    """Every record of the configured source (bundled benchmark or user data), domain-filtered."""
    if cfg.source == "multi-domain":
        from fedsdr.data.benchmark import build_multi_domain

        records = build_multi_domain(cfg.records_per_domain, seed=seed, domains=cfg.domains or None)
    else:
        records = load_records(
            cfg.source, fmt=cfg.format, fields=cfg.fields.model_dump(), split=cfg.split,
            default_domain=cfg.default_domain,
        )
        if cfg.domains:
            records = [r for r in records if r.domain in set(cfg.domains)]
    if not records:
        raise DataError(f"data.source={cfg.source!r}: no records left after data.domains={cfg.domains}")
    return records


def load_test_source(cfg: DataConfig, path: str | None = None) -> list[Record]:
    """`data.test_source` (or a node's own `test-path`), read with the data's field mapping."""
    source = path or cfg.test_source
    records = load_records(source, fmt="auto", fields=cfg.fields.model_dump(), split=cfg.split,
                           default_domain=cfg.default_domain)
    if not records:
        raise DataError(f"data.test_source={source!r}: no records")
    return records


def split_client(records: list[Record], client_id: int, cfg: DataConfig, seed: int) -> ClientData:
    train, test = split_train_test(records, cfg.test_fraction, seed + 1000 + client_id, cfg.max_test_per_client)
    return ClientData(client_id=client_id, train=train, test=test)


@functools.lru_cache(maxsize=8)
def _build(data_json: str, partition_json: str, seed: int) -> FederatedData:
    cfg = DataConfig.model_validate_json(data_json)
    part = PartitionConfig.model_validate_json(partition_json)
    if cfg.test_source:  # the user's own global test set; every pooled record goes to the clients
        pool, global_test = load_pool(cfg, seed), load_test_source(cfg)
    else:
        pool, global_test = hold_out_global_test(load_pool(cfg, seed), cfg.global_test_per_domain, seed)
    parts = partition_records(
        pool, num_clients=part.num_clients, method=part.method, seed=seed, alpha=part.alpha,
        domains_per_client=part.domains_per_client,
    )
    return FederatedData([split_client(p, cid, cfg, seed) for cid, p in enumerate(parts)], global_test)


def build_federated_data(data: DataConfig, partition: PartitionConfig, seed: int) -> FederatedData:
    """Deterministic for a seed; cached per process so virtual clients do not rebuild it."""
    return _build(data.model_dump_json(), partition.model_dump_json(), seed)


def load_silo_data(path: str, client_id: int, cfg: DataConfig, seed: int) -> ClientData:
    """A deployed client's own file (node config `data-path`): its split stays on the silo."""
    records = load_records(
        path, fmt="auto", fields=cfg.fields.model_dump(), split=cfg.split, default_domain=cfg.default_domain
    )
    return split_client(records, client_id, cfg, seed)
