"""FedSD and FedSDR inside the federation, on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, assert_numbers_only, tiny_config

from fedsdr import train as train_module
from fedsdr.algorithms import fedsdr as fedsdr_module
from fedsdr.algorithms import get_algorithm
from fedsdr.algorithms.dual import quiet_when_frozen
from fedsdr.algorithms.fedsdr import RECTIFY, SMOOTH
from fedsdr.cli import main
from fedsdr.data.federated import build_federated_data
from fedsdr.distill import DistilledRow
from fedsdr.federation import client as client_module
from fedsdr.federation.client import client_app, new_session
from fedsdr.federation.engine import InProcessGrid, run_inprocess
from fedsdr.federation.server import Server
from fedsdr.models.adapters import (
    activate,
    adapter_dropouts,
    adapter_parameters,
    fresh_adapter_state,
    from_arrayrecord,
    get_adapter_state,
    load_adapter_file,
    set_adapter_state,
)
from fedsdr.runs import RunDir
from fedsdr.train import make_stream, stream_step


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------- FedSD


def test_smoke_fedsd_writes_distilled_data_and_diagnostics(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["run", "--config", str(ROOT / "configs/smoke-fedsd.toml"), "--out", str(out)]) == 0
    for cid in range(3):
        folder = out / "clients" / f"client-{cid}" / "distill"
        rows = [json.loads(x) for x in (folder / "round-000.jsonl").read_text().splitlines()]
        assert rows and {"raw", "rewrite", "target", "fallback"} <= rows[0].keys()
        for row in rows:  # the target is the rewrite unless a filter sent it back to the raw output
            assert row["target"] == (row["raw"] if row["fallback"] else row["rewrite"])
        diagnostics = json.loads((folder / "round-000.diagnostics.json").read_text())
        assert diagnostics["num_records"] == len(rows)
    trains = [r for r in _rows(out) if r["kind"] == "train" and r["scope"] != "global"]
    assert all("distill/consistency_before" in r and "distill/kept_rate" in r for r in trains)
    assert "distill" in json.loads((out / "summary.json").read_text())


def test_distill_cache_prevents_a_second_generation(tmp_path: Path, monkeypatch) -> None:
    cfg = tiny_config("distill.enabled=true", "distill.max_new_tokens=16", "distill.min_new_tokens=4",
                      f'model.cache_dir="{tmp_path / "cache"}"')
    from fedsdr.algorithms import fedsd

    adapter = get_algorithm(cfg).global_adapter
    calls = []
    original = fedsd.rewrite_records

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(fedsd, "rewrite_records", counted)
    for attempt in range(2):  # two independent runs (fresh sessions, fresh run folders)
        session = new_session(cfg, 0, tmp_path / f"run{attempt}")
        state = fresh_adapter_state(session.model, adapter, 0)
        records = fedsd.client_distilled_set(session, 1, adapter, state)
        assert len(records) == len(session.data.train)
        assert len(calls) == 1  # rewritten by the first run only


def test_fedsd_training_batches_hold_the_distilled_targets(tmp_path: Path, monkeypatch) -> None:
    cfg = tiny_config("distill.enabled=true", "partition.num_clients=1", "partition.method=iid")
    session = new_session(cfg, 0, tmp_path)
    # The client's distilled set for round 1 (as the rewriting step leaves it on its disk).
    targets = {r.id: f"distilled answer number {i}" for i, r in enumerate(session.data.train)}
    rows = [DistilledRow(id=r.id, raw=r.output, rewrite=targets[r.id], target=targets[r.id], fallback=None,
                         truncated=False, length_ratio=1.0, record=r) for r in session.data.train]
    path = session.disk.distilled_set(0)
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(r.to_json()) + "\n" for r in rows))

    seen: list[str] = []
    original = train_module.collate

    def spy(examples, pad_id):  # noqa: ANN001, ANN202
        for e in examples:
            ids = [t for t, lab in zip(e.input_ids, e.labels, strict=True) if lab != -100]
            seen.append(session.tokenizer.decode(ids, skip_special_tokens=True).strip())
        return original(examples, pad_id)

    monkeypatch.setattr(train_module, "collate", spy)
    state = fresh_adapter_state(session.model, "default", 0)
    get_algorithm(cfg).train(session, state, 1, {}, {}, {})
    assert seen
    assert set(seen) <= set(targets.values())
    assert not set(seen) & {r.output.strip() for r in session.data.train}


@pytest.mark.parametrize("config", ["smoke-fedsd.toml", "smoke-fedsdr.toml"])
def test_no_text_crosses_from_clients_to_server(tmp_path: Path, config: str) -> None:
    from conftest import load_config

    cfg = load_config(ROOT / "configs" / config)
    grid = InProcessGrid(client_app, cfg.partition.num_clients)
    run_inprocess(cfg, RunDir(tmp_path), grid=grid)
    assert grid.received
    domains = set(cfg.data.domains) or {r.domain for c in build_federated_data(cfg.data, cfg.partition, cfg.seed)
                                        .clients for r in c.test}
    for reply in grid.received:
        assert_numbers_only(reply, domains)


# --------------------------------------------------------------------------------- FedSDR


def _dual_session(tmp_path: Path, *overrides: str):  # noqa: ANN202
    cfg = tiny_config("federation.algorithm=fedsdr", *overrides)
    session = new_session(cfg, 0, tmp_path)
    model = session.model
    set_adapter_state(model, RECTIFY, fresh_adapter_state(model, RECTIFY, 1))
    set_adapter_state(model, SMOOTH, fresh_adapter_state(model, SMOOTH, 2))
    activate(model, [RECTIFY, SMOOTH], trainable=[RECTIFY, SMOOTH])
    examples, _ = session.raw_examples()
    smooth = make_stream(examples, adapter_parameters(model, SMOOTH), cfg.train, seed=0,
                         quiet_when_frozen=quiet_when_frozen(cfg, model, SMOOTH))
    rectify = make_stream(examples, adapter_parameters(model, RECTIFY), cfg.train, seed=1,
                          quiet_when_frozen=quiet_when_frozen(cfg, model, RECTIFY))
    return session, smooth, rectify


def test_each_stream_updates_only_its_own_adapter(tmp_path: Path) -> None:
    session, smooth, rectify = _dual_session(tmp_path)
    model, cfg, tok = session.model, session.cfg, session.tokenizer
    kwargs = {"pad_id": tok.pad_token_id, "autocast": session.runtime.autocast}

    s0, r0 = get_adapter_state(model, SMOOTH), get_adapter_state(model, RECTIFY)
    stream_step(model, smooth, rectify, cfg.train, 1e-2, **kwargs)  # a distilled batch
    s1, r1 = get_adapter_state(model, SMOOTH), get_adapter_state(model, RECTIFY)
    assert all(np.array_equal(r0[k], r1[k]) for k in r0)
    assert any(not np.array_equal(s0[k], s1[k]) for k in s0)

    stream_step(model, rectify, smooth, cfg.train, 1e-2, **kwargs)  # a raw batch
    s2, r2 = get_adapter_state(model, SMOOTH), get_adapter_state(model, RECTIFY)
    assert all(np.array_equal(s1[k], s2[k]) for k in s1)
    assert any(not np.array_equal(r1[k], r2[k]) for k in r1)


@pytest.mark.parametrize("frozen_dropout", [False, True])
def test_the_frozen_adapter_drops_out_only_when_asked(tmp_path: Path, frozen_dropout: bool) -> None:
    session, smooth, rectify = _dual_session(tmp_path, "lora.dropout=0.3",
                                             f"fedsdr.frozen_dropout={str(frozen_dropout).lower()}")
    model, cfg, tok = session.model, session.cfg, session.tokenizer
    seen: dict[str, list[bool]] = {SMOOTH: [], RECTIFY: []}  # training mode of each dropout call

    def record(name: str, module: torch.nn.Module) -> None:
        if torch.is_grad_enabled():  # training passes (not the no-grad check of the loss's fast path)
            seen[name].append(module.training)

    for name in seen:
        assert adapter_dropouts(model, name)
        for module in adapter_dropouts(model, name):
            module.register_forward_pre_hook(lambda m, args, name=name: record(name, m))

    model.train()  # as dual_stream_steps has it
    stream_step(model, smooth, rectify, cfg.train, 1e-2, pad_id=tok.pad_token_id,
                autocast=session.runtime.autocast)  # trains S, R frozen
    assert seen[SMOOTH] and all(seen[SMOOTH])  # the trained adapter always drops out
    assert seen[RECTIFY] and all(m == frozen_dropout for m in seen[RECTIFY])
    assert all(m.training for m in adapter_dropouts(model, RECTIFY))  # back in training mode after


def test_both_adapters_take_part_in_the_forward_pass(tmp_path: Path) -> None:
    session, _, _ = _dual_session(tmp_path)
    model = session.model
    for name in (RECTIFY, SMOOTH):  # give both a non-zero B
        set_adapter_state(model, name, {k: v + 0.05 if "lora_B" in k else v
                                        for k, v in get_adapter_state(model, name).items()})
    x = torch.tensor([[1, 5, 9, 12, 40]])

    def logits(active: list[str]) -> torch.Tensor:
        activate(model, active, trainable=[])
        model.eval()
        with torch.no_grad():
            return model(input_ids=x).logits

    both, r_only, s_only = logits([RECTIFY, SMOOTH]), logits([RECTIFY]), logits([SMOOTH])
    assert not torch.allclose(both, r_only) and not torch.allclose(both, s_only)


def test_server_receives_only_lora_r(tmp_path: Path) -> None:
    # LoRA-S with another rank: any S tensor reaching the server would have the wrong shape.
    cfg = tiny_config("federation.algorithm=fedsdr", "fedsdr.smooth_r=2", "distill.max_new_tokens=16",
                      "distill.min_new_tokens=4")
    grid = InProcessGrid(client_app, cfg.partition.num_clients)
    server = Server(cfg, RunDir(tmp_path))
    rectify_shapes = {k: v.shape for k, v in from_arrayrecord(server.initial_arrays()).items()}
    _, rows = server.train_round(grid, 1, server.initial_arrays())
    r_bytes = sum(int(np.prod(s)) * 4 for s in rectify_shapes.values())
    for reply in grid.received:
        assert list(reply.content.array_records) == ["arrays"]
        uploaded = from_arrayrecord(reply.content["arrays"])
        assert {k: v.shape for k, v in uploaded.items()} == rectify_shapes
    for row in rows:
        if row["scope"] != "global":
            assert row["bytes_up"] == r_bytes
    smooth = load_adapter_file(tmp_path / "clients/client-0/smooth/round-001")
    assert any(v.shape != rectify_shapes[k] for k, v in smooth.items())


def test_lora_s_continues_across_rounds_and_after_resume(tmp_path: Path, monkeypatch) -> None:
    config = str(ROOT / "configs/smoke-fedsdr.toml")
    loaded: dict[tuple[int, int], dict] = {}
    original_train = fedsdr_module.FedSDR.train

    def record_load(self, session, global_state, server_round, config, local_state, received):  # noqa: ANN001, ANN202
        smooth = local_state[fedsdr_module.SMOOTH]
        loaded[(session.client_id, server_round)] = {k: v.copy() for k, v in smooth.items()}
        return original_train(self, session, global_state, server_round, config, local_state, received)

    monkeypatch.setattr(fedsdr_module.FedSDR, "train", record_load)
    full = tmp_path / "full"
    assert main(["run", "--config", config, "--out", str(full)]) == 0
    after_round_1 = load_adapter_file(full / "clients/client-0/smooth/round-001")
    start_of_round_2 = loaded[(0, 2)]
    assert all(np.array_equal(after_round_1[k], start_of_round_2[k]) for k in after_round_1)

    # A run killed after round 1, resumed in a fresh process state (new grid, no sessions).
    original_checkpoint = Server.checkpoint

    def die_after_round_1(self, server_round, arrays):  # noqa: ANN001, ANN202
        original_checkpoint(self, server_round, arrays)
        if server_round == 1:
            raise KeyboardInterrupt

    killed = tmp_path / "killed"
    monkeypatch.setattr(Server, "checkpoint", die_after_round_1)
    assert main(["run", "--config", config, "--out", str(killed)]) == 130
    monkeypatch.setattr(Server, "checkpoint", original_checkpoint)
    client_module._SESSIONS.clear()
    loaded.clear()
    assert main(["run", "--resume", "--out", str(killed)]) == 0
    restored = loaded[(0, 2)]
    assert all(np.array_equal(after_round_1[k], restored[k]) for k in after_round_1)
    for sub in ("checkpoints/round-002", "clients/client-0/smooth/round-002"):
        a, b = load_adapter_file(full / sub), load_adapter_file(killed / sub)
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7)


def test_smoke_fedsdr_metrics_have_global_and_personalized_rows(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["run", "--config", str(ROOT / "configs/smoke-fedsdr.toml"), "--out", str(out)]) == 0
    rows = _rows(out)
    cfg = tiny_config("federation.algorithm=fedsdr")
    r_bytes = sum(v.nbytes for v in load_adapter_file(out / "checkpoints/round-001").values())
    for server_round in (0, 1, 2):
        evals = [r for r in rows if r["round"] == server_round and r["kind"] == "eval"]
        clients = {f"client-{i}" for i in range(cfg.partition.num_clients)}
        assert {r["scope"] for r in evals if r["model"] == "personalized"} == clients
        assert {r["scope"] for r in evals if r["model"] == "global"} == clients | {"global"}
    for r in rows:
        if r["kind"] == "train" and r["scope"] != "global":
            assert r["bytes_up"] == r_bytes


def test_exported_adapters_load_with_plain_peft_and_match(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedsdr.models.loading import resolve_model_source

    run, out = tmp_path / "run", tmp_path / "export"
    assert main(["run", "--config", str(ROOT / "configs/smoke-fedsdr.toml"), "--out", str(run)]) == 0
    assert main(["export", str(run), "--client", "1", "--out", str(out)]) == 0
    assert (out / "rectify/adapter_config.json").exists() and (out / "smooth/adapter_config.json").exists()

    cfg = RunDir(run).read_config()
    base = AutoModelForCausalLM.from_pretrained(resolve_model_source(cfg.model))
    plain = PeftModel.from_pretrained(base, str(out / "rectify"), adapter_name="rectify")
    plain.load_adapter(str(out / "smooth"), adapter_name="smooth")
    plain.base_model.set_adapter(["rectify", "smooth"])
    plain.eval()

    session = new_session(cfg, 1, run / "clients")
    model = session.model
    set_adapter_state(model, RECTIFY, load_adapter_file(run / "checkpoints/round-002"))
    set_adapter_state(model, SMOOTH, load_adapter_file(run / "clients/client-1/smooth/round-002"))
    activate(model, [RECTIFY, SMOOTH], trainable=[])
    model.eval()
    x = torch.tensor([[1, 7, 30, 200, 5, 9]])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=x).logits, model(input_ids=x).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("schedule", ["alternate", "joint", "sequential"])
def test_every_schedule_trains_both_adapters_from_their_own_data(tmp_path: Path, schedule: str) -> None:
    from fedsdr.train import dual_stream_steps

    session, smooth, rectify = _dual_session(tmp_path, f"fedsdr.schedule={schedule}")
    model, cfg, tok = session.model, session.cfg, session.tokenizer
    s0, r0 = get_adapter_state(model, SMOOTH), get_adapter_state(model, RECTIFY)
    s_stats, r_stats = dual_stream_steps(
        model, smooth, rectify, cfg.train, schedule=schedule, steps=2, first_step=0, total_steps=2,
        pad_id=tok.pad_token_id, autocast=session.runtime.autocast,
    )
    assert len(s_stats.losses) == len(r_stats.losses) == 2
    s1, r1 = get_adapter_state(model, SMOOTH), get_adapter_state(model, RECTIFY)
    assert any(not np.array_equal(s0[k], s1[k]) for k in s0)
    assert any(not np.array_equal(r0[k], r1[k]) for k in r0)


def test_distill_command_writes_data_and_prints_diagnostics(tmp_path: Path, capsys) -> None:
    out = tmp_path / "distill"
    assert main(["distill", "--config", str(ROOT / "configs/smoke-fedsd.toml"), "--out", str(out)]) == 0
    table = json.loads((out / "distill-diagnostics.json").read_text())
    assert {"client-0", "client-1", "client-2", "all"} <= table.keys()
    assert table["all"]["num_records"] == sum(table[f"client-{i}"]["num_records"] for i in range(3))
    assert (out / "clients/client-0/distill/round-000.jsonl").exists()
    assert "consist" in capsys.readouterr().out


def test_export_merge_gives_the_same_logits(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedsdr.models.loading import resolve_model_source

    run, out = tmp_path / "run", tmp_path / "export"
    assert main(["run", "--config", str(ROOT / "configs/smoke-fedsdr.toml"), "--out", str(run),
                 "--set", "federation.rounds=1"]) == 0
    assert main(["export", str(run), "--client", "0", "--merge", "--out", str(out)]) == 0
    cfg = RunDir(run).read_config()
    base = AutoModelForCausalLM.from_pretrained(resolve_model_source(cfg.model))
    adapters = PeftModel.from_pretrained(base, str(out / "rectify"), adapter_name="rectify")
    adapters.load_adapter(str(out / "smooth"), adapter_name="smooth")
    adapters.base_model.set_adapter(["rectify", "smooth"])
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"))
    x = torch.tensor([[1, 7, 30, 200, 5, 9]])
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(input_ids=x).logits, adapters.eval()(input_ids=x).logits,
                                   rtol=1e-4, atol=1e-4)


def test_fedsd_with_an_open_ended_only_client(tmp_path: Path) -> None:
    # A client without verifiable records has no consistency rate: its train reply must still
    # carry the same metric keys as the others, or Flower refuses to aggregate.
    out = tmp_path / "run"
    args = ["run", "--config", str(ROOT / "configs/smoke-fedsd.toml"), "--out", str(out),
            "--set", 'data.domains=["arithmetic", "construction_faq"]', "--set", "partition.num_clients=2",
            "--set", "federation.rounds=1"]
    assert main(args) == 0
    trains = [r for r in _rows(out) if r["kind"] == "train" and r["scope"] != "global"]
    assert len({frozenset(r) for r in trains}) == 1
    assert any(r["distill/consistency_before"] is None for r in trains)
