"""SCAFFOLD, FedDPA-style dual adapter, Local-only and Centralized on the tiny model: each one's
defining property, its composition with FedSD, and `fedsdr run` end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, tiny_config
from safetensors.numpy import load_file as load_numpy

from fedsdr import train as train_module
from fedsdr.algorithms import get_algorithm
from fedsdr.algorithms.feddpa import GLOBAL
from fedsdr.algorithms.feddpa import LOCAL as DPA_LOCAL
from fedsdr.algorithms.local import LOCAL
from fedsdr.algorithms.scaffold import CONTROL
from fedsdr.cli import main
from fedsdr.config import RunConfig, load_config
from fedsdr.data.federated import build_federated_data
from fedsdr.distill import DistilledRow
from fedsdr.federation.client import client_app, new_session
from fedsdr.federation.engine import InProcessGrid, run_inprocess
from fedsdr.federation.server import Server
from fedsdr.models.adapters import (
    arrayrecord_nbytes,
    from_arrayrecord,
    get_adapter_state,
    load_adapter_file,
    to_arrayrecord,
)
from fedsdr.models.loading import shared_model
from fedsdr.runs import ClientDir, RunDir
from fedsdr.train import encode

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMOKE = str(ROOT / "configs/smoke.toml")
NEW = ["scaffold", "feddpa", "local", "centralized"]


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _client_trains(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["kind"] == "train" and r["scope"] != "global"]


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _trained_inputs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Every example a training batch holds (its token ids), recorded as batches are built."""
    seen: list[tuple[int, ...]] = []
    original = train_module.collate

    def spy(examples, pad_id):  # noqa: ANN001, ANN202
        seen.extend(tuple(e.input_ids) for e in examples)
        return original(examples, pad_id)

    monkeypatch.setattr(train_module, "collate", spy)
    return seen


def _encoded(cfg: RunConfig, records) -> set[tuple[int, ...]]:  # noqa: ANN001
    """The token ids training would give each record."""
    _, tok, _, _ = shared_model(cfg.model, cfg.lora, get_algorithm(cfg).adapters(cfg), cfg.seed)
    return {tuple(encode(tok, r, cfg.data.system_prompt).input_ids) for r in records}


def _adapter_bytes(cfg: RunConfig) -> int:
    algorithm = get_algorithm(cfg)
    model, *_ = shared_model(cfg.model, cfg.lora, algorithm.adapters(cfg), cfg.seed)
    return arrayrecord_nbytes(to_arrayrecord(get_adapter_state(model, algorithm.global_adapter)))


# ------------------------------------------------------------------------- every new method


def test_each_new_algorithm_declares_its_adapters_and_models() -> None:
    declared = {}
    for name in NEW:
        cfg = tiny_config(f"federation.algorithm={name}")
        algorithm = get_algorithm(cfg)
        declared[name] = ([s.name for s in algorithm.adapters(cfg)], algorithm.eval_models(cfg),
                          algorithm.uploads_global)
    assert declared == {
        "scaffold": (["default"], {"global": ["default"]}, True),
        "feddpa": ([GLOBAL, DPA_LOCAL], {"global": [GLOBAL], "personalized": [GLOBAL, DPA_LOCAL]}, True),
        "local": (["default", LOCAL], {"global": ["default"], "personalized": [LOCAL]}, False),
        "centralized": (["default"], {"global": ["default"]}, True),
    }


@pytest.mark.parametrize("name", NEW)
def test_fedsdr_run_works_for_each_new_algorithm(tmp_path: Path, name: str) -> None:
    out = tmp_path / "run"
    args = ["run", "--config", SMOKE, "--out", str(out), "--set", f"federation.algorithm={name}",
            "--set", "federation.rounds=1", "--set", "eval.generate=false"]
    assert main(args) == 0
    cfg = RunDir(out).read_config()
    assert json.loads((out / "summary.json").read_text())["algorithm"] == name
    assert (out / "checkpoints/round-001/adapter_model.safetensors").exists()
    trains = _client_trains(_rows(out))
    assert len(trains) == (1 if name == "centralized" else 3)
    one = _adapter_bytes(cfg)
    # SCAFFOLD moves c and delta c_i besides the adapter; Local-only moves nothing in training
    per_message = {"scaffold": 2 * one, "local": 0}.get(name, one)
    assert all(r["bytes_up"] == r["bytes_down"] == per_message for r in trains)
    models = {r["model"] for r in _rows(out) if r["kind"] == "eval" and r["scope"] != "global"}
    assert models == ({"global", "personalized"} if name in ("feddpa", "local") else {"global"})


# ---------------------------------------------------------------------------------- SCAFFOLD


def _one_round(cfg: RunConfig, tmp_path: Path) -> tuple[InProcessGrid, dict[int, dict]]:
    grid = InProcessGrid(client_app, cfg.partition.num_clients)
    server = Server(cfg, RunDir(tmp_path))
    server.train_round(grid, 1, server.initial_arrays())
    return grid, {int(m.content["metrics"]["partition-id"]): from_arrayrecord(m.content["arrays"])
                  for m in grid.received}


@pytest.mark.parametrize("correction", ["step", "gradient"])
def test_scaffold_with_zero_control_variates_is_fedavg_on_the_client(tmp_path: Path, correction: str) -> None:
    _, fedavg = _one_round(tiny_config(), tmp_path / "fedavg")
    grid, scaffold = _one_round(tiny_config("federation.algorithm=scaffold",
                                            f"federation.scaffold_correction={correction}"), tmp_path / "scaffold")
    # round 1: c = 0 is sent with the adapter, c_i = 0 on every client
    assert all(not np.any(a) for m in grid.sent for a in from_arrayrecord(m.content[CONTROL]).values())
    assert fedavg.keys() == scaffold.keys() == {0, 1, 2}
    for pid in fedavg:
        assert _equal(fedavg[pid], scaffold[pid])  # bit for bit
    assert all(set(m.content.array_records) == {"arrays", CONTROL} for m in grid.received)


@pytest.mark.parametrize("correction", ["step", "gradient"])
def test_scaffold_control_variates_follow_option_ii(tmp_path: Path, correction: str) -> None:
    """Two rounds, 2 of 3 clients sampled, eta_g = 0.5, constant learning rate: every c_i,
    delta c_i, c and x equals its formula computed here from x, y_i, K and lr."""
    cfg = tiny_config("federation.algorithm=scaffold", "train.scheduler=constant", "federation.fraction_train=0.67",
                      "federation.server_lr=0.5", f"federation.scaffold_correction={correction}")
    k_lr = cfg.train.local_steps * cfg.train.lr
    run = RunDir(tmp_path)
    grid = InProcessGrid(client_app, 3)
    server = Server(cfg, run)
    arrays = server.initial_arrays()
    x = from_arrayrecord(arrays)
    c = {key: np.zeros_like(v) for key, v in x.items()}
    c_clients = {pid: {key: np.zeros_like(v) for key, v in x.items()} for pid in range(3)}
    for server_round in (1, 2):
        sent, received = len(grid.sent), len(grid.received)
        arrays, _ = server.train_round(grid, server_round, arrays)
        messages, replies = grid.sent[sent:], grid.received[received:]
        assert len(replies) == 2  # |S| = 2 of N = 3
        for m in messages:  # the server's c travels with x
            assert _equal(from_arrayrecord(m.content[CONTROL]), c)
        ys, deltas = [], []
        for reply in replies:
            pid = int(reply.content["metrics"]["partition-id"])
            y, delta = from_arrayrecord(reply.content["arrays"]), from_arrayrecord(reply.content[CONTROL])
            c_i = c_clients[pid]
            new_c_i = {key: c_i[key] - c[key] + (x[key] - y[key]) / k_lr for key in x}
            for key in x:
                np.testing.assert_allclose(delta[key], new_c_i[key] - c_i[key], rtol=1e-5, atol=2e-5)
            on_disk = load_numpy(str(run.client(pid).local_tensors(CONTROL, server_round)))
            for key in x:  # c_i stays on the client, in its own folder
                np.testing.assert_allclose(on_disk[key], new_c_i[key], rtol=1e-5, atol=2e-5)
            c_clients[pid] = on_disk
            ys.append(y)
            deltas.append(delta)
        new_x = from_arrayrecord(arrays)
        for key in x:  # x <- x + eta_g mean(y_i - x); c <- c + |S|/N mean(delta c_i)
            np.testing.assert_allclose(new_x[key], x[key] + 0.5 * np.mean([y[key] - x[key] for y in ys], axis=0),
                                       rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(server.strategy.control[key], c[key] + 2 / 3 * np.mean(
                [d[key] for d in deltas], axis=0), rtol=1e-6, atol=1e-6)
        assert any(np.any(v) for v in server.strategy.control.values())
        sampled = {int(r.content["metrics"]["partition-id"]) for r in replies}
        for pid in set(range(3)) - sampled:  # a client not sampled keeps its c_i
            assert not run.client(pid).local_tensors(CONTROL, server_round).exists()
        x, c = new_x, {k: v.copy() for k, v in server.strategy.control.items()}


def test_scaffold_control_variates_survive_a_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    overrides = ["--set", "federation.algorithm=scaffold", "--set", "eval.generate=false"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert main(["run", "--config", SMOKE, "--out", str(full), *overrides]) == 0
    original = Server.checkpoint

    def die_after_round_1(self, server_round, arrays):  # noqa: ANN001, ANN202
        original(self, server_round, arrays)
        if server_round == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(Server, "checkpoint", die_after_round_1)
    assert main(["run", "--config", SMOKE, "--out", str(killed), *overrides]) == 130
    saved = load_numpy(str(killed / "checkpoints/round-001/server_state.safetensors"))
    control = {k: v for k, v in saved.items() if k.startswith("control/")}
    assert control and any(np.any(v) for v in control.values())  # c != 0 after round 1 is checkpointed
    monkeypatch.setattr(Server, "checkpoint", original)
    lost = tmp_path / "lost"
    shutil.copytree(killed, lost)
    assert main(["run", "--resume", "--out", str(killed)]) == 0

    a, b = load_adapter_file(full / "checkpoints/round-002"), load_adapter_file(killed / "checkpoints/round-002")
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-7)
    # the same resume with the server's c lost (zeros again) gives another adapter: c matters
    restore = Server.restore

    def restore_without_c(self, last_round):  # noqa: ANN001, ANN202
        arrays = restore(self, last_round)
        self.strategy.control = None
        return arrays

    monkeypatch.setattr(Server, "restore", restore_without_c)
    assert main(["run", "--resume", "--out", str(lost)]) == 0
    c = load_adapter_file(lost / "checkpoints/round-002")
    assert any(not np.allclose(a[key], c[key], rtol=1e-5, atol=1e-7) for key in a)
    sa = load_numpy(str(full / "checkpoints/round-002/server_state.safetensors"))
    sb = load_numpy(str(killed / "checkpoints/round-002/server_state.safetensors"))
    for key in (k for k in sa if k.startswith("control/")):
        np.testing.assert_allclose(sa[key], sb[key], rtol=1e-5, atol=1e-6)
    for pid in range(3):  # and every client's c_i
        ca = load_numpy(str(RunDir(full).client(pid).local_tensors(CONTROL, 2)))
        cb = load_numpy(str(RunDir(killed).client(pid).local_tensors(CONTROL, 2)))
        for key in ca:
            np.testing.assert_allclose(ca[key], cb[key], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------ FedDPA


def test_feddpa_keeps_its_local_adapter_home_and_trains_both_on_raw_data(tmp_path: Path, monkeypatch) -> None:
    cfg = tiny_config("federation.algorithm=feddpa", "eval.generate=false")
    trained = _trained_inputs(monkeypatch)
    grid = InProcessGrid(client_app, cfg.partition.num_clients)
    run = RunDir(tmp_path)
    run_inprocess(cfg, run, grid=grid)
    train_replies = [m for m in grid.received if "arrays" in m.content.array_records]
    assert len(train_replies) == 6  # 3 clients x 2 rounds
    global_keys = set(from_arrayrecord(Server(cfg, run).initial_arrays()))
    for pid in range(3):
        local1 = load_adapter_file(run.client(pid).adapter(DPA_LOCAL, 1))
        local2 = load_adapter_file(run.client(pid).adapter(DPA_LOCAL, 2))
        assert any(np.any(v) for k, v in local1.items() if "lora_B" in k)  # L trained (B starts at 0)
        assert not _equal(local1, local2)  # ... and again from where it was
        for reply in train_replies:  # no reply carries L's tensors
            assert set(reply.content.array_records) == {"arrays"}
            sent = from_arrayrecord(reply.content["arrays"])
            assert set(sent) == global_keys
            assert not any(np.array_equal(sent[k], local[k]) for local in (local1, local2) for k in sent
                           if "lora_B" in k)
    # G trained: the global adapter moved
    assert not _equal(load_adapter_file(tmp_path / "checkpoints/round-002"),
                      from_arrayrecord(Server(cfg, run).initial_arrays()))
    # both streams took raw batches only
    data = build_federated_data(cfg.data, cfg.partition, cfg.seed)
    assert trained and set(trained) <= _encoded(cfg, [r for c in data.clients for r in c.train])


# ---------------------------------------------------------------------------------- Local-only


def test_local_only_sends_nothing_keeps_the_global_adapter_and_each_client_its_own(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["run", "--config", SMOKE, "--out", str(out), "--set", "federation.algorithm=local",
                 "--set", "eval.generate=false"]) == 0
    cfg, run = RunDir(out).read_config(), RunDir(out)
    trains = [r for r in _rows(out) if r["kind"] == "train"]
    assert trains and all(r["bytes_up"] == 0 and r["bytes_down"] == 0 for r in trains)
    initial = from_arrayrecord(Server(cfg, run).initial_arrays())
    for server_round in (1, 2):
        assert _equal(load_adapter_file(out / f"checkpoints/round-{server_round:03d}"), initial)
    algorithm = get_algorithm(cfg)
    for pid in range(3):
        first, second = (load_adapter_file(run.client(pid).adapter(LOCAL, r)) for r in (1, 2))
        assert any(np.any(v) for k, v in first.items() if "lora_B" in k) and not _equal(first, second)
        # round 2 trained from the client's own round-1 adapter: recomputing it gives the saved one
        session = new_session(cfg, pid, tmp_path / "recompute")
        again = algorithm.train(session, {}, 2, {}, {LOCAL: first}, {}).local_state[LOCAL]
        for key in second:
            np.testing.assert_allclose(again[key], second[key], rtol=1e-5, atol=1e-7)
    personalized = [r for r in _rows(out) if r["kind"] == "eval" and r["model"] == "personalized"]
    assert {(r["round"], r["scope"]) for r in personalized if r["split"] == "client_test"} == {
        (r, f"client-{c}") for r in (0, 1, 2) for c in range(3)}


# --------------------------------------------------------------------------------- Centralized


def test_centralized_takes_the_federated_step_budget_on_the_pooled_data(tmp_path: Path, monkeypatch) -> None:
    common = ["--config", SMOKE, "--set", "eval.generate=false", "--set", "eval.clients=false"]
    assert main(["run", *common, "--out", str(tmp_path / "fedavg")]) == 0
    trained = _trained_inputs(monkeypatch)
    assert main(["run", *common, "--out", str(tmp_path / "central"), "--set", "federation.algorithm=centralized"]) == 0
    fed, central = _client_trains(_rows(tmp_path / "fedavg")), _client_trains(_rows(tmp_path / "central"))
    assert sum(r["steps"] for r in central) == sum(r["steps"] for r in fed) == 2 * 3 * 3
    assert len(central) == 2 and {r["scope"] for r in central} == {"client-0"}  # one trainer, every round
    cfg = RunDir(tmp_path / "central").read_config()
    pool = [r for c in build_federated_data(cfg.data, cfg.partition, cfg.seed).clients for r in c.train]
    assert all(r["num_examples"] == len(pool) == sum(f["num_examples"] for f in fed[:3]) for r in central)
    # every client's training records were trained on, and nothing else
    assert set(trained) == _encoded(cfg, pool)


def test_centralized_matches_partial_participation_and_is_aggregated(tmp_path: Path) -> None:
    """min_train_clients = 2 of 3, fraction 0.34: a federated round samples 2 clients (6 steps);
    the one trainer takes 6 steps, and its single reply is enough to aggregate."""
    overrides = ("federation.min_train_clients=2", "federation.fraction_train=0.34", "federation.rounds=1",
                 "eval.generate=false", "eval.clients=false")
    steps = {}
    for name in ("fedavg", "centralized"):
        cfg = tiny_config(f"federation.algorithm={name}", *overrides)
        run_inprocess(cfg, RunDir(tmp_path / name))
        rows = _rows(tmp_path / name)
        assert not [r for r in rows if r["kind"] == "rejected"]
        steps[name] = sum(r["steps"] for r in _client_trains(rows))
    assert steps == {"fedavg": 6, "centralized": 6}
    assert not _equal(load_adapter_file(tmp_path / "centralized/checkpoints/round-001"),
                      from_arrayrecord(Server(cfg, RunDir(tmp_path / "centralized")).initial_arrays()))


# ------------------------------------------------------------------------------ + FedSD


def _write_distilled(disk: ClientDir, records) -> list:  # noqa: ANN001
    """A distilled set as the rewriting step leaves it on a client's disk (round 0: the base model)."""
    rows = [DistilledRow(id=r.id, raw=r.output, rewrite=f"distilled answer number {i}",
                         target=f"distilled answer number {i}", fallback=None, truncated=False, length_ratio=1.0,
                         record=r) for i, r in enumerate(records)]
    path = disk.distilled_set(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row.to_json()) + "\n" for row in rows))
    return [r.replace(output=row.target) for r, row in zip(records, rows, strict=True)]


@pytest.mark.parametrize("name", NEW)
def test_each_new_algorithm_composes_with_fedsd(tmp_path: Path, monkeypatch, name: str) -> None:
    cfg = load_config(ROOT / "configs/smoke-fedsd.toml",
                      [f"federation.algorithm={name}", "federation.rounds=1", "eval.generate=false",
                       "eval.clients=false"])
    run = RunDir(tmp_path)
    clients = build_federated_data(cfg.data, cfg.partition, cfg.seed).clients
    if name == "centralized":  # the pool's distilled set, on the trainer's disk
        pool = [r for c in clients for r in c.train]
        distilled = _write_distilled(ClientDir(run.client(0).root / "pool"), pool)
    else:
        distilled = [r for c in clients for r in _write_distilled(run.client(c.client_id), c.train)]
    trained = _trained_inputs(monkeypatch)
    run_inprocess(cfg, run)
    assert trained and set(trained) <= _encoded(cfg, distilled)  # every batch (both streams for FedDPA)
    assert not set(trained) & _encoded(cfg, [r for c in clients for r in c.train])
    trains = _client_trains(_rows(tmp_path))
    assert trains and all(r["distill/kept_rate"] == 1.0 for r in trains)
