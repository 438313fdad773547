"""The Algorithm interface: what each algorithm decides, and FedSDR's composition with FedProx
and its joint schedule."""

from __future__ import annotations

import ast
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, tiny_config

from fedsdr.algorithms import get_algorithm
from fedsdr.algorithms.fedsdr import RECTIFY, SMOOTH
from fedsdr.config import ConfigError
from fedsdr.federation.client import client_app, new_session
from fedsdr.federation.engine import InProcessGrid
from fedsdr.models.adapters import (
    activate,
    adapter_parameters,
    fresh_adapter_state,
    get_adapter_state,
    set_adapter_state,
    to_arrayrecord,
)
from fedsdr.train import dual_stream_steps, make_stream

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_each_algorithm_declares_its_adapters_and_models() -> None:
    fedavg = get_algorithm(tiny_config())
    assert [s.name for s in fedavg.adapters(tiny_config())] == ["default"]
    assert fedavg.local_adapters(tiny_config()) == []
    assert fedavg.eval_models(tiny_config()) == {"global": ["default"]}

    cfg = tiny_config("federation.algorithm=fedsdr", "fedsdr.smooth_r=2")
    fedsdr = get_algorithm(cfg)
    assert fedsdr.global_adapter == RECTIFY
    assert [(s.name, s.r) for s in fedsdr.adapters(cfg)] == [(RECTIFY, 4), (SMOOTH, 2)]
    assert [s.name for s in fedsdr.local_adapters(cfg)] == [SMOOTH]
    assert fedsdr.eval_models(cfg) == {"global": [RECTIFY], "personalized": [RECTIFY, SMOOTH]}


def test_unknown_algorithm_or_server_strategy_names_the_key() -> None:
    with pytest.raises(ConfigError, match="federation.algorithm"):
        get_algorithm(tiny_config("federation.algorithm=fedavgg"))
    with pytest.raises(ConfigError, match="federation.server_strategy"):
        get_algorithm(tiny_config("federation.algorithm=fedsdr", "federation.server_strategy=fedmean"))


def test_inherited_adapter_settings_are_none() -> None:
    cfg = tiny_config()
    assert cfg.fedsdr.smooth_r is None and cfg.fedsdr.rectify_alpha is None and cfg.fedsdr.smooth_lr is None
    with pytest.raises(ConfigError, match="smooth_r"):
        tiny_config("fedsdr.smooth_r=0")


def test_federation_names_no_algorithm_and_no_adapter() -> None:
    """The ClientApp and the server only call the Algorithm interface."""
    for path in sorted((ROOT / "src/fedsdr/federation").glob("*.py")):
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("fedsdr.algorithms."), (path.name, node.module)
        assert "smooth" not in text.lower() and "rectify" not in text.lower(), path.name


def test_fedsdr_with_fedprox_sends_mu_to_its_clients(tmp_path: Path) -> None:
    cfg = tiny_config("federation.algorithm=fedsdr", "federation.server_strategy=fedprox",
                      "federation.proximal_mu=0.25")
    algorithm = get_algorithm(cfg)
    session = new_session(cfg, 0, tmp_path)
    arrays = to_arrayrecord(fresh_adapter_state(session.model, RECTIFY, 0))
    grid = InProcessGrid(client_app, cfg.partition.num_clients)
    random.seed(0)
    from flwr.app import ConfigRecord

    messages = list(algorithm.strategy(cfg).configure_train(1, arrays, ConfigRecord({}), grid))
    assert messages and all(float(m.content["config"]["proximal-mu"]) == 0.25 for m in messages)


def _dual_streams(tmp_path: Path, mu: float, *overrides: str):  # noqa: ANN202
    cfg = tiny_config("federation.algorithm=fedsdr", "train.lr=0.05", "train.max_grad_norm=0", *overrides)
    session = new_session(cfg, 0, tmp_path)
    model = session.model
    rectify_global = {k: v + (0.01 if "lora_B" in k else 0.0)
                      for k, v in fresh_adapter_state(model, RECTIFY, 1).items()}
    set_adapter_state(model, RECTIFY, rectify_global)
    set_adapter_state(model, SMOOTH, fresh_adapter_state(model, SMOOTH, 2))
    activate(model, [RECTIFY, SMOOTH], trainable=[RECTIFY, SMOOTH])
    examples, _ = session.raw_examples()
    smooth = make_stream(examples, adapter_parameters(model, SMOOTH), cfg.train, seed=0)
    rectify = make_stream(examples, adapter_parameters(model, RECTIFY), cfg.train, seed=1, proximal_mu=mu)
    return session, smooth, rectify, rectify_global


def _train(session, smooth, rectify, schedule: str, steps: int = 4, joint_lambda: float = 1.0):  # noqa: ANN001, ANN202
    import torch

    torch.manual_seed(0)
    dual_stream_steps(
        session.model, smooth, rectify, session.cfg.train, schedule=schedule, steps=steps, first_step=0,
        total_steps=steps, pad_id=session.tokenizer.pad_token_id, autocast=session.runtime.autocast,
        joint_lambda=joint_lambda,
    )
    return get_adapter_state(session.model, SMOOTH), get_adapter_state(session.model, RECTIFY)


def _distance(a: dict, b: dict) -> float:
    return float(np.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a)))


def test_proximal_term_reaches_lora_r_only(tmp_path: Path) -> None:
    # sequential: every S step runs before any R step, so S sees the same R whatever mu is,
    # and any difference in S would have to come from the proximal gradient itself.
    runs = {}
    for mu in (0.0, 50.0):
        session, smooth, rectify, r_global = _dual_streams(tmp_path / str(mu), mu, "fedsdr.schedule=sequential")
        runs[mu] = (*_train(session, smooth, rectify, "sequential"), r_global)
    (s_free, r_free, g), (s_prox, r_prox, _) = runs[0.0], runs[50.0]
    assert all(np.array_equal(s_free[k], s_prox[k]) for k in s_free)  # S untouched by mu
    assert any(not np.array_equal(r_free[k], r_prox[k]) for k in r_free)  # R's update changes with mu
    assert _distance(r_prox, g) < _distance(r_free, g)  # and is pulled toward R_global


def test_joint_lambda_changes_training(tmp_path: Path) -> None:
    results = {}
    for lam in (0.0, 1.0, 3.0):
        session, smooth, rectify, r_global = _dual_streams(tmp_path / str(lam), 0.0, "fedsdr.schedule=joint")
        s, r = _train(session, smooth, rectify, "joint", steps=2, joint_lambda=lam)
        results[lam] = (s, r, r_global)
        assert smooth.optimizer is rectify.optimizer  # one AdamW over both adapters
    s0, r0, g = results[0.0]
    assert all(np.array_equal(r0[k], g[k]) for k in g)  # lambda = 0: R does not move
    assert any(not np.array_equal(results[1.0][1][k], results[3.0][1][k]) for k in g)
    assert _distance(results[3.0][1], g) > _distance(results[1.0][1], g)


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"])
def test_robust_aggregators_are_flowers_own(name: str) -> None:
    """Each robust aggregator is the Flower strategy of that name; FedMedian's aggregate of
    three replies equals the coordinate-wise median computed by hand."""
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    cfg = tiny_config(f"federation.algorithm={name}", "federation.num_malicious_clients=0")
    strategy = get_algorithm(cfg).strategy(cfg)
    assert type(strategy).__name__.lower() == name
    fedsdr_cfg = tiny_config("federation.algorithm=fedsdr", f"federation.server_strategy={name}")
    assert type(get_algorithm(fedsdr_cfg).strategy(fedsdr_cfg)).__name__.lower() == name
    if name != "fedmedian":
        return
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 0
    rng = np.random.default_rng(0)
    states = [{"w": rng.normal(size=(3, 4)).astype(np.float32)} for _ in range(3)]
    replies = []
    for i, state in enumerate(states):
        content = RecordDict({"arrays": ArrayRecord({"w": Array(state["w"])}),
                              "metrics": MetricRecord({"num-examples": 10 + i, "partition-id": i})})
        replies.append(Message(content, reply_to=Message(RecordDict(), dst_node_id=10 + i, message_type="train")))
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), np.median([s["w"] for s in states], axis=0), rtol=1e-6)
