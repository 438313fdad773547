"""Federated training end to end on the tiny model: metrics rows, aggregation, FedProx,
frozen base, resume, and what crosses from clients to the server."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, assert_numbers_only, tiny_config

from fedsdr.algorithms import ClientSession, get_algorithm
from fedsdr.cli import main
from fedsdr.data.federated import build_federated_data
from fedsdr.federation.client import client_app
from fedsdr.federation.engine import InProcessGrid, run_inprocess
from fedsdr.federation.server import Server
from fedsdr.models.adapters import from_arrayrecord, load_adapter_file
from fedsdr.models.loading import shared_model
from fedsdr.runs import ClientDir, RunDir


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_smoke_run_writes_metrics_for_every_round(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["run", "--config", str(ROOT / "configs/smoke.toml"), "--out", str(out)]) == 0
    rows = _rows(out)
    for server_round in (0, 1, 2):
        evals = [r for r in rows if r["round"] == server_round and r["kind"] == "eval"]
        assert {r["scope"] for r in evals} == {"global", "client-0", "client-1", "client-2"}
        for r in evals:  # answers generated at round 0 and the last round; loss every round
            assert r["generated"] == (server_round in (0, 2))
            assert {"loss", "loss_se", "num_examples"} <= r.keys()
            assert ({"accuracy", "accuracy_se", "gen_len", "truncated"} <= r.keys()) == r["generated"]
    trains = [r for r in rows if r["kind"] == "train" and r["scope"] != "global"]
    assert {r["round"] for r in trains} == {1, 2}
    for r in trains:
        assert {"train_loss", "steps", "tokens", "seconds", "bytes_up", "bytes_down"} <= r.keys()
        assert r["bytes_up"] == r["bytes_down"] > 0
    assert any("rougeL" in r for r in rows if r["kind"] == "eval")
    assert (out / "checkpoints/round-002/adapter_model.safetensors").exists()
    assert (out / "config.json").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2
    # Training lowers the held-out loss of the global adapter even on the tiny random model.
    assert summary["final"]["loss"] < summary["round0"]["loss"]


def _trained_round(cfg, tmp_path):  # noqa: ANN001, ANN202
    grid = InProcessGrid(client_app, cfg.partition.num_clients)
    server = Server(cfg, RunDir(tmp_path))
    start = server.initial_arrays()
    new, rows = server.train_round(grid, 1, start)
    return grid, server, start, new, rows


def test_fedavg_equals_example_weighted_mean(tmp_path: Path) -> None:
    cfg = tiny_config("partition.num_clients=2", "data.records_per_domain=24")
    grid, _, _, aggregated, rows = _trained_round(cfg, tmp_path)
    replies = grid.received
    assert len(replies) == 2
    sizes = [float(r.content["metrics"]["num-examples"]) for r in replies]
    assert sizes[0] != sizes[1] or True  # weights need not differ for the check below
    states = [from_arrayrecord(r.content["arrays"]) for r in replies]
    for key, value in from_arrayrecord(aggregated).items():
        by_hand = (sizes[0] * states[0][key] + sizes[1] * states[1][key]) / (sizes[0] + sizes[1])
        np.testing.assert_allclose(value, by_hand, rtol=1e-6, atol=1e-8)
    # and the clients really moved away from each other (the mean is not trivially one of them)
    key = next(k for k in states[0] if "lora_B" in k)
    assert not np.allclose(states[0][key], states[1][key])


def test_fedavg_with_unequal_client_sizes(tmp_path: Path) -> None:
    # Dirichlet partitions give clients different sizes: the weights must matter.
    cfg = tiny_config("partition.num_clients=2", "partition.method=iid", "data.records_per_domain=13",
                      "data.test_fraction=0.0")
    grid, _, _, aggregated, _ = _trained_round(cfg, tmp_path)
    sizes = [float(r.content["metrics"]["num-examples"]) for r in grid.received]
    states = [from_arrayrecord(r.content["arrays"]) for r in grid.received]
    for key, value in from_arrayrecord(aggregated).items():
        by_hand = sum(n * s[key] for n, s in zip(sizes, states, strict=True)) / sum(sizes)
        np.testing.assert_allclose(value, by_hand, rtol=1e-6, atol=1e-8)


def _client_update(cfg, client_id: int, tmp_path: Path) -> tuple[dict, dict]:  # noqa: ANN001
    algorithm = get_algorithm(cfg)
    model, tok, runtime, _ = shared_model(cfg.model, cfg.lora, algorithm.adapters(cfg), cfg.seed)
    data = build_federated_data(cfg.data, cfg.partition, cfg.seed).clients[client_id]
    session = ClientSession(cfg=cfg, client_id=client_id, model=model, tokenizer=tok, runtime=runtime,
                            data=data, disk=ClientDir(tmp_path / "c"), cache_dir=tmp_path / "cache")
    server = Server(cfg, RunDir(tmp_path / "s"))
    global_state = from_arrayrecord(server.initial_arrays())
    # a non-zero B so the global adapter is not at the origin
    global_state = {k: v + (0.01 if "lora_B" in k else 0.0) for k, v in global_state.items()}
    config = {"proximal-mu": cfg.federation.proximal_mu}
    result = algorithm.train(session, global_state, 1, config, {}, {})
    return global_state, result.state


def _distance(a: dict, b: dict) -> float:
    return float(np.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a)))


def test_fedprox_pulls_local_adapter_toward_global(tmp_path: Path) -> None:
    base = ("federation.algorithm=fedprox", "train.local_steps=6", "train.lr=0.02")
    g0, free = _client_update(tiny_config(*base, "federation.proximal_mu=0.0"), 0, tmp_path / "a")
    g1, pulled = _client_update(tiny_config(*base, "federation.proximal_mu=5.0"), 0, tmp_path / "b")
    assert all(np.array_equal(g0[k], g1[k]) for k in g0)
    assert _distance(pulled, g1) < 0.8 * _distance(free, g0)


def test_base_weights_never_change(tmp_path: Path) -> None:
    cfg = tiny_config()
    algorithm = get_algorithm(cfg)
    model, *_ = shared_model(cfg.model, cfg.lora, algorithm.adapters(cfg), cfg.seed)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    run_inprocess(cfg, RunDir(tmp_path))
    after = dict(model.named_parameters())
    assert before and all(torch.equal(before[n], after[n]) for n in before)
    assert all(not after[n].requires_grad for n in before)


def test_clients_send_only_adapter_tensors_and_numbers(tmp_path: Path) -> None:
    cfg = tiny_config()
    grid = InProcessGrid(client_app, cfg.partition.num_clients)
    run_inprocess(cfg, RunDir(tmp_path), grid=grid)
    assert grid.received
    expected_keys = set(from_arrayrecord(Server(cfg, RunDir(tmp_path)).initial_arrays()))
    domains = {r.domain for c in build_federated_data(cfg.data, cfg.partition, cfg.seed).clients for r in c.test}
    for reply in grid.received:
        assert_numbers_only(reply, domains)
        for record in reply.content.array_records.values():
            assert set(record) == expected_keys


@pytest.mark.parametrize("algorithm", ["fedavg", "fedadam", "fedavgm"])
def test_resume_after_kill_between_rounds_matches_uninterrupted(tmp_path: Path, monkeypatch, algorithm: str) -> None:
    config = str(ROOT / "configs/smoke.toml")
    overrides = ["--set", f"federation.algorithm={algorithm}", "--set", "eval.generate=false"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert main(["run", "--config", config, "--out", str(full), *overrides]) == 0

    original = Server.checkpoint

    def die_after_round_1(self, server_round, arrays):  # noqa: ANN001, ANN202
        original(self, server_round, arrays)
        if server_round == 1:
            with (self.run.root / "metrics.jsonl").open("a") as f:
                f.write('{"round": 2, "scope": "client-0", "kind": "tr')  # a line cut mid-write
            raise KeyboardInterrupt

    monkeypatch.setattr(Server, "checkpoint", die_after_round_1)
    assert main(["run", "--config", config, "--out", str(killed), *overrides]) == 130
    assert RunDir(killed).last_checkpoint() == 1
    # the strategy's state is data (JSON + safetensors), never pickle
    assert sorted(p.name for p in (killed / "checkpoints/round-001").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "server_state.json", "server_state.safetensors"]
    monkeypatch.setattr(Server, "checkpoint", original)
    assert main(["run", "--resume", "--out", str(killed)]) == 0

    a = load_adapter_file(full / "checkpoints/round-002")
    b = load_adapter_file(killed / "checkpoints/round-002")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-7)
    rows_full, rows_killed = _rows(full), _rows(killed)
    assert [(r["round"], r["scope"], r["kind"]) for r in rows_full] == [
        (r["round"], r["scope"], r["kind"]) for r in rows_killed]


def test_existing_run_is_not_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    config = str(ROOT / "configs/smoke.toml")
    assert main(["run", "--config", config, "--out", str(out), "--set", "federation.rounds=1"]) == 0
    assert main(["run", "--config", config, "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err


def test_ray_engine_gives_the_same_adapter_as_inprocess(tmp_path: Path) -> None:
    config = str(ROOT / "configs/smoke.toml")
    for engine in ("inprocess", "ray"):
        args = ["run", "--config", config, "--out", str(tmp_path / engine), "--set", "federation.rounds=1",
                "--set", f"federation.engine={engine}"]
        assert main(args) == 0
    a = load_adapter_file(tmp_path / "inprocess/checkpoints/round-001")
    b = load_adapter_file(tmp_path / "ray/checkpoints/round-001")
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("algorithm", ["fedadam", "fedyogi", "fedavgm"])
def test_server_optimizers_send_the_adapter_dtype_and_aggregate_every_round(tmp_path: Path, algorithm: str) -> None:
    # Flower's FedOpt strategies compute in float64; what they hand back is sent in the
    # adapter's float32, so round 2's float32 replies pass validation and are aggregated.
    out = tmp_path / "run"
    args = ["run", "--config", str(ROOT / "configs/smoke.toml"), "--out", str(out), "--set", "federation.rounds=2",
            "--set", f"federation.algorithm={algorithm}", "--set", "eval.generate=false"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in rows if r["kind"] == "rejected"]
    assert [r["round"] for r in rows if r["kind"] == "train" and r["scope"] == "global"] == [1, 2]
    one, two = (load_adapter_file(out / f"checkpoints/round-00{k}") for k in (1, 2))
    assert {v.dtype for v in two.values()} == {np.dtype(np.float32)}
    assert any(not np.array_equal(one[k], two[k]) for k in one)


def test_ray_clients_get_gpus_from_the_config_or_a_share_of_one_when_cuda_is_there(monkeypatch) -> None:  # noqa: ANN001
    from fedsdr.federation.engine import ray_client_gpus

    three_clients = "partition.num_clients=3"
    assert ray_client_gpus(tiny_config(three_clients, "federation.ray_client_gpus=0.5")) == 0.5
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ray_client_gpus(tiny_config(three_clients)) == 0.0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # what a CUDA machine reports
    assert ray_client_gpus(tiny_config(three_clients)) == pytest.approx(1 / 3)
    assert ray_client_gpus(tiny_config(three_clients, 'model.device="cpu"')) == 0.0
    assert ray_client_gpus(tiny_config(three_clients, "federation.ray_client_gpus=0")) == 0.0
