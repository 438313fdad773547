"""Faulty and hostile clients: every reply is validated, offenders are dropped and recorded,
the round aggregates the healthy clients, and no client error carries record text."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fedsdr.algorithms.fedavg import FedAvg
from fedsdr.federation.client import client_app
from fedsdr.federation.engine import InProcessGrid, run_inprocess
from fedsdr.federation.validation import validate_replies
from fedsdr.models.adapters import from_arrayrecord, load_adapter_file
from fedsdr.runs import RunDir

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SECRET = "the private record text of client 0"


def test_a_round_survives_a_raising_a_hanging_and_a_poisoning_client(tmp_path: Path, monkeypatch) -> None:
    cfg = tiny_config("partition.num_clients=5", "partition.method=iid", "federation.round_timeout=6",
                      "eval.clients=false", "eval.generate=false")
    original = FedAvg.train

    def faulty(self, session, global_state, server_round, config, local_state, received):  # noqa: ANN001, ANN202
        if session.client_id == 0:  # an error whose text quotes a training record
            raise ValueError(f"{SECRET}: {session.data.train[0].instruction}")
        if session.client_id == 1:
            time.sleep(15)  # longer than the round timeout; then gives up without touching the model
            raise TimeoutError("gave up")
        result = original(self, session, global_state, server_round, config, local_state, received)
        if session.client_id == 2:
            result.state = {k: np.full_like(v, np.nan) for k, v in result.state.items()}
        return result

    monkeypatch.setattr(FedAvg, "train", faulty)
    grid = InProcessGrid(client_app, cfg.partition.num_clients)
    run = RunDir(tmp_path)
    run.write_config(cfg)
    run_inprocess(cfg, run, grid=grid)

    rows = run.read_metrics()
    for server_round in (1, 2):
        rejected = {r["scope"]: r["reason"] for r in rows if r["round"] == server_round and r["kind"] == "rejected"}
        # (a failed client sends no partition id: it is known by its node, 1000 + partition here)
        assert "client error" in rejected["node-1000"] and "ValueError" in rejected["node-1000"]
        assert "round_timeout" in rejected["node-1001"]  # client 1: no reply in time
        assert "non-finite" in rejected["client-2"]
        trained = {r["scope"] for r in rows if r["round"] == server_round and r["kind"] == "train"}
        assert trained == {"client-3", "client-4", "global"}
    # Round 1's global adapter is the example-weighted mean of the healthy clients' adapters.
    healthy = [m for m in grid.received if not m.has_error() and m.metadata.message_type == "train"
               and int(m.content["metrics"]["partition-id"]) in (3, 4)][:2]
    sizes = [float(m.content["metrics"]["num-examples"]) for m in healthy]
    states = [from_arrayrecord(m.content["arrays"]) for m in healthy]
    aggregated = load_adapter_file(tmp_path / "checkpoints/round-001")
    for key, value in aggregated.items():
        expected = sum(n * s[key] for n, s in zip(sizes, states, strict=True)) / sum(sizes)
        np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-8)
    # Privacy: the error reply itself carries the exception type, not its text.
    errors = [m.error.reason for m in grid.received if m.has_error()]
    from fedsdr.data.federated import build_federated_data

    texts = {t for c in build_federated_data(cfg.data, cfg.partition, cfg.seed).clients for r in c.train + c.test
             for t in (r.instruction, r.output) if len(t) > 8}
    assert errors and not any(t in e for e in errors for t in texts | {SECRET})
    assert SECRET not in (tmp_path / "metrics.jsonl").read_text()


@pytest.fixture(autouse=True)
def _message_identity() -> None:
    """Messages built outside a run read the sender's identity from here (as InProcessGrid sets it)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 0


def _reply(pid: object, arrays: dict[str, np.ndarray], n: object = 4, **metrics: float) -> Message:
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        "metrics": MetricRecord({"partition-id": pid, "num-examples": n, "train_loss": 1.0, **metrics}),
    })
    msg = Message(content, dst_node_id=7, message_type="train")
    return Message(content, reply_to=msg)


def test_validation_rejects_each_kind_of_bad_reply() -> None:
    cfg = tiny_config("partition.num_clients=4").federation
    glob = {"a": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    sent = ArrayRecord({k: Array(v) for k, v in glob.items()})
    good = {k: v + 0.1 for k, v in glob.items()}
    cases = {
        "ok": _reply(0, good),
        "duplicate partition": _reply(0, good),
        "partition out of range": _reply(9, good),
        "no examples": _reply(1, good, n=0),
        "huge examples": _reply(1, good, n=10**9),
        "broadcasting shape": _reply(1, {"a": np.zeros((1, 3), np.float32), "b": good["b"]}),
        "missing key": _reply(1, {"a": good["a"]}),
        "inf": _reply(1, {"a": np.full((2, 3), np.inf, np.float32), "b": good["b"]}),
        "other metric keys": _reply(2, good, extra=1.0),
        "huge update": _reply(3, {k: v + 1e4 for k, v in good.items()}),
    }
    accepted, rejected = validate_replies(list(cases.values()), sent, 4, cfg)
    assert [int(m.content["metrics"]["partition-id"]) for m in accepted] == [0]
    reasons = [r.reason for r in rejected]
    assert len(reasons) == len(cases) - 1
    for needle in ("already replied", "not one of", "num-examples 0", "num-examples 1000000000", "shape (1, 3)",
                   "keys differ", "non-finite", "metric keys differ", "update norm"):
        assert any(needle in r for r in reasons), needle


def test_unvalidated_partition_id_types_do_not_raise() -> None:
    cfg = tiny_config().federation
    sent = ArrayRecord({"a": Array(np.zeros(2, np.float32))})
    no_metrics = Message(RecordDict({"arrays": sent}), reply_to=Message(RecordDict(), dst_node_id=3, message_type="train"))
    replies = [no_metrics, _reply(1.5, {"a": np.zeros(2, np.float32)}), _reply(-1, {"a": np.zeros(2, np.float32)})]
    accepted, rejected = validate_replies(replies, sent, 3, cfg)
    assert accepted == [] and len(rejected) == 3
    json.dumps([r.reason for r in rejected])


def test_an_offline_node_does_not_stall_the_run(tmp_path: Path) -> None:
    """3 clients configured, 1 never connects: the server waits at most round_timeout for it,
    then trains the 2 it has (min_train_clients = 2)."""
    cfg = tiny_config("partition.num_clients=3", "partition.method=iid", "federation.min_train_clients=2",
                      "federation.round_timeout=2", "federation.rounds=1", "eval.clients=false",
                      "eval.generate=false")
    grid = InProcessGrid(client_app, 2)  # the third SuperNode is offline
    run = RunDir(tmp_path)
    run.write_config(cfg)
    run_inprocess(cfg, run, grid=grid)
    trained = {r["scope"] for r in run.read_metrics() if r["kind"] == "train"}
    assert trained == {"client-0", "client-1", "global"}
    assert (tmp_path / "checkpoints/round-001/adapter_model.safetensors").exists()
