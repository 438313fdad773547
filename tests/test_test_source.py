"""A user's own global test set (`data.test_source`) and a deployed node's own test file
(node config `test-path`) replace the held-out records, and leave training data whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_config

from fedsdr.data.federated import build_federated_data
from fedsdr.data.schema import DataError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_records(path: Path, prefix: str, n: int, domain: str = "mine") -> Path:
    rows = [{"id": f"{prefix}-{i}", "instruction": f"{prefix} question {i}?", "output": f"answer {i}",
             "domain": domain} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_test_source_replaces_the_held_out_records(tmp_path: Path) -> None:
    test_file = write_records(tmp_path / "test.jsonl", "t", 7)
    held_out = build_federated_data((cfg := tiny_config("partition.method=iid")).data, cfg.partition, cfg.seed)
    own = tiny_config("partition.method=iid", f"data.test_source={test_file}")
    data = build_federated_data(own.data, own.partition, own.seed)

    assert [r.id for r in data.global_test] == [f"t-{i}" for i in range(7)]
    assert {r.domain for r in data.global_test} == {"mine"}
    # nothing is held out of the pool any more: the clients get every record
    pooled = sum(len(c.train) + len(c.test) for c in data.clients)
    assert pooled == sum(len(c.train) + len(c.test) for c in held_out.clients) + len(held_out.global_test)
    assert not {r.id for c in data.clients for r in c.train} & {r.id for r in data.global_test}


def test_empty_test_source_names_the_key(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    cfg = tiny_config(f"data.test_source={empty}")
    with pytest.raises(DataError, match="empty.jsonl"):
        build_federated_data(cfg.data, cfg.partition, cfg.seed)


def test_a_node_reads_its_own_data_and_test_file(tmp_path: Path) -> None:
    from fedsdr.federation.client import new_session

    silo = write_records(tmp_path / "silo.jsonl", "s", 20)
    node_test = write_records(tmp_path / "node-test.jsonl", "n", 5)
    cfg = tiny_config()
    node = {"partition-id": 1, "data-path": str(silo), "test-path": str(node_test)}
    session = new_session(cfg, 1, tmp_path / "state", node)

    assert [r.id for r in session.data.test] == [f"n-{i}" for i in range(5)]
    assert {r.id for r in session.data.train} <= {f"s-{i}" for i in range(20)}
    assert session.data.train and not any(r.id.startswith("n-") for r in session.data.train)

    without = new_session(cfg, 1, tmp_path / "state2", {"partition-id": 1, "data-path": str(silo)})
    assert {r.id for r in without.data.test} <= {f"s-{i}" for i in range(20)}  # split from the silo file
