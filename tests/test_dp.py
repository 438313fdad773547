"""Differential privacy (`federation.dp`): Flower's clipping wrappers and mods clip and noise the
global adapter's updates, and every round reports its noise, clipping norm and (epsilon, delta)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from fedsdr import dp
from fedsdr.algorithms.base import sampling_kwargs
from fedsdr.config import ConfigError, RunConfig
from fedsdr.federation.engine import InProcessGrid, run_inprocess
from fedsdr.federation.server import Server
from fedsdr.models.adapters import load_adapter_file
from fedsdr.runs import RunDir

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GLOBAL = {"a": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}
LARGE = {"a": np.full((2, 3), 4.0, np.float32), "b": np.full(3, 4.0, np.float32)}  # norm 12
SMALL = {"a": np.full((2, 3), 0.1, np.float32), "b": np.full(3, 0.1, np.float32)}  # norm 0.3


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v.copy()) for k, v in arrays.items()})


def _norm(arrays: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in arrays.values()))


def _round(cfg: RunConfig, updates: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One round of the wrapped FedAvg strategy with hand-made replies (equal weights)."""
    strategy = dp.wrap(cfg, FlowerFedAvg(**sampling_kwargs(cfg)))
    grid = InProcessGrid(ClientApp(), cfg.partition.num_clients)
    messages = list(strategy.configure_train(1, _record(GLOBAL), ConfigRecord({"x": 1}), grid))
    replies = [Message(RecordDict({"arrays": _record(u),
                                   "metrics": MetricRecord({"num-examples": 4, "train_loss": 1.0})}), reply_to=m)
               for m, u in zip(messages, updates, strict=True)]
    arrays, _ = strategy.aggregate_train(1, replies)
    return {k: v.numpy() for k, v in arrays.items()}


def _clipped_mean(updates: list[dict[str, np.ndarray]], clip: float) -> dict[str, np.ndarray]:
    scaled = [{k: v * min(1.0, clip / _norm(u)) for k, v in u.items()} for u in updates]
    return {k: sum(s[k] for s in scaled) / len(scaled) for k in GLOBAL}


def test_server_fixed_clipping_without_noise_is_the_clipped_mean() -> None:
    cfg = tiny_config("partition.num_clients=2", "federation.dp=server-fixed", "federation.dp_noise_multiplier=0",
                      "federation.dp_clipping_norm=1.0")
    aggregated = _round(cfg, [LARGE, SMALL])
    expected = _clipped_mean([LARGE, SMALL], 1.0)  # LARGE scaled to norm 1, SMALL untouched
    for k in GLOBAL:
        np.testing.assert_allclose(aggregated[k], expected[k], rtol=1e-5)
    assert _norm(aggregated) < _norm({k: (LARGE[k] + SMALL[k]) / 2 for k in GLOBAL}) / 5


def test_noise_moves_the_aggregate_and_epsilon_falls_as_noise_grows() -> None:
    cfg = tiny_config("partition.num_clients=2", "federation.dp=server-fixed", "federation.dp_noise_multiplier=1.0")
    aggregated = _round(cfg, [LARGE, SMALL])
    expected = _clipped_mean([LARGE, SMALL], 1.0)
    assert not all(np.allclose(aggregated[k], expected[k], atol=1e-3) for k in GLOBAL)
    eps = [dp.epsilon(z, 0.5, 10, 1e-5) for z in (0.6, 1.0, 2.0, 4.0)]
    assert all(math.isfinite(e) and e > 0 for e in eps)
    assert eps == sorted(eps, reverse=True) and eps[0] > eps[-1]
    assert dp.epsilon(1.0, 0.5, 20, 1e-5) > dp.epsilon(1.0, 0.5, 10, 1e-5)  # rounds compose
    assert dp.epsilon(1.0, 0.25, 10, 1e-5) < dp.epsilon(1.0, 1.0, 10, 1e-5)  # sampling amplifies
    assert dp.epsilon(0.0, 0.5, 10, 1e-5) == math.inf
    fields = dp.round_fields(cfg, dp.wrap(cfg, FlowerFedAvg()), 3)
    assert fields["dp_epsilon"] == pytest.approx(dp.epsilon(1.0, 1.0, 3, dp.delta(cfg)))
    assert fields["dp_delta"] == 1e-5 and fields["dp_clipping_norm"] == 1.0 and fields["dp_noise_multiplier"] == 1.0


def _mod_app(update: dict[str, np.ndarray]) -> ClientApp:
    """A ClientApp whose train handler returns `update` behind fedsdr's DP mod."""
    app = ClientApp()

    @app.train(mods=[dp.client_dp_mod])
    def train(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"arrays": _record(update),
                                   "metrics": MetricRecord({"num-examples": 4, "train_loss": 1.0})}), reply_to=msg)

    return app


@pytest.mark.parametrize("mode", ["client-fixed", "client-adaptive", "none"])
def test_client_side_clipping_goes_through_flowers_mod(mode: str) -> None:
    cfg = tiny_config("partition.num_clients=2", f"federation.dp={mode}", "federation.dp_noise_multiplier=0",
                      "federation.dp_clipping_norm=0.5")
    strategy = dp.wrap(cfg, FlowerFedAvg(**sampling_kwargs(cfg)))
    grid = InProcessGrid(_mod_app(LARGE), cfg.partition.num_clients)
    config = ConfigRecord({"fedsdr-config": cfg.to_json()})
    replies = list(grid.send_and_receive(strategy.configure_train(1, _record(GLOBAL), config, grid)))
    assert replies and not any(r.has_error() for r in replies)
    for reply in replies:
        sent = {k: v.numpy() for k, v in reply.content["arrays"].items()}
        assert _norm(sent) == pytest.approx(0.5 if mode != "none" else _norm(LARGE), rel=1e-5)
        assert ("norm_bit" in reply.content["metrics"]) == (mode == "client-adaptive")
    if mode != "none":
        aggregated = strategy.aggregate_train(1, replies)[0]
        assert _norm({k: v.numpy() for k, v in aggregated.items()}) == pytest.approx(0.5, rel=1e-5)
    if mode == "client-adaptive":  # every update was clipped: the norm grows toward them
        assert strategy.clipping_norm > 0.5


def test_server_adaptive_norm_tracks_the_update_norms() -> None:
    cfg = tiny_config("partition.num_clients=2", "federation.dp=server-adaptive", "federation.dp_noise_multiplier=0",
                      "federation.dp_clipping_norm=0.5")
    strategy = dp.wrap(cfg, FlowerFedAvg(**sampling_kwargs(cfg)))
    grid = InProcessGrid(ClientApp(), cfg.partition.num_clients)
    for server_round in (1, 2, 3):
        messages = list(strategy.configure_train(server_round, _record(GLOBAL), ConfigRecord({"x": 1}), grid))
        replies = [Message(RecordDict({"arrays": _record(LARGE),
                                       "metrics": MetricRecord({"num-examples": 4})}), reply_to=m) for m in messages]
        strategy.aggregate_train(server_round, replies)
    assert strategy.clipping_norm > 0.5  # updates of norm 12 are all clipped: C grows


def test_config_errors_name_the_key() -> None:
    bad = {
        "federation.dp=laplace": "federation.dp",
        "federation.dp_noise_multiplier=-1": "federation.dp_noise_multiplier",
        "federation.dp_clipping_norm=0": "federation.dp_clipping_norm",
        "federation.dp_delta=1.5": "federation.dp_delta",
        "federation.dp_target_quantile=2": "federation.dp_target_quantile",
    }
    for override, key in bad.items():
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            tiny_config("federation.dp=server-fixed", override)
    with pytest.raises(ConfigError, match="federation.dp .*scaffold"):
        tiny_config("federation.dp=client-fixed", "federation.algorithm=scaffold")
    with pytest.raises(ConfigError, match="dp_clipped_count_stddev"):  # 3 clients: count noise 0.15
        tiny_config("federation.dp=server-adaptive", "federation.dp_noise_multiplier=1.0")
    cfg = tiny_config("federation.dp=server-adaptive", "federation.dp_noise_multiplier=1.0",
                      "federation.dp_clipped_count_stddev=2.0")
    assert dp.delta(cfg) == 1e-5
    assert dp.delta(tiny_config("federation.dp_delta=1e-3")) == 1e-3


def _server_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train" and r["scope"] == "global"]


def test_a_dp_run_reports_privacy_and_a_killed_one_resumes_the_same(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # FedAdam inside the wrapper: the checkpoint holds the wrapper's norm and FedAdam's moments
    cfg = tiny_config("partition.num_clients=2", "federation.rounds=2", "federation.algorithm=fedadam",
                      "federation.dp=client-adaptive", "federation.dp_noise_multiplier=0.1",
                      "federation.dp_clipping_norm=0.01", "federation.fraction_evaluate=0", "eval.generate=false",
                      "train.local_steps=1")
    full = RunDir(tmp_path / "full")
    full.write_config(cfg)
    summary = run_inprocess(cfg, full)
    server = _server_rows(full.root)
    assert [r["round"] for r in server] == [1, 2]
    for r in server:
        assert r["dp"] == "client-adaptive" and r["dp_noise_multiplier"] == 0.1 and r["dp_delta"] == 1e-5
        assert math.isfinite(r["dp_epsilon"]) and r["dp_epsilon"] > 0
    assert server[1]["dp_epsilon"] > server[0]["dp_epsilon"]
    assert server[0]["dp_clipping_norm"] == 0.01  # round 1 clips at the initial norm
    assert server[1]["dp_clipping_norm"] > 0.01  # LoRA updates are far larger: the norm grows
    assert summary["dp_epsilon"] == server[1]["dp_epsilon"]
    assert json.loads((full.root / "summary.json").read_text())["dp_epsilon"] == summary["dp_epsilon"]
    assert "epsilon" in dp.describe(summary)
    state = json.loads((full.checkpoint_dir(2) / "server_state.json").read_text())
    assert state["scalars"]["clipping_norm"] > 0.01 and "wrapped.m_t" in state["arrays"]

    original = Server.checkpoint

    def die_after_round_1(self, server_round, arrays):  # noqa: ANN001, ANN202
        original(self, server_round, arrays)
        if server_round == 1:
            raise KeyboardInterrupt

    killed = RunDir(tmp_path / "killed")
    killed.write_config(cfg)
    monkeypatch.setattr(Server, "checkpoint", die_after_round_1)
    with pytest.raises(KeyboardInterrupt):
        run_inprocess(cfg, killed)
    monkeypatch.setattr(Server, "checkpoint", original)
    run_inprocess(cfg, killed, resume=True)  # the adapted norm, FedAdam's moments and the noise replay
    assert _server_rows(killed.root)[1]["dp_clipping_norm"] == server[1]["dp_clipping_norm"]
    a, b = load_adapter_file(full.checkpoint_dir(2)), load_adapter_file(killed.checkpoint_dir(2))
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-7)
