"""The Flower ClientApp: train and evaluate on the client's private data.

What a client sends back is adapter tensors of the global adapter and numbers (MetricRecords);
its data, its rewrites and its local state (e.g. FedSDR's LoRA-S) stay with it. Every
algorithm-specific decision comes from the run's `Algorithm`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedsdr.algorithms import Algorithm, ClientSession, LocalState, get_algorithm
from fedsdr.config import RunConfig, config_from_json
from fedsdr.console import quiet_libraries
from fedsdr.data.federated import build_federated_data, load_silo_data, load_test_source
from fedsdr.dp import client_dp_mod
from fedsdr.evaluate import check_references
from fedsdr.federation.messages import identity, pack_evaluation
from fedsdr.models.adapters import (
    activate,
    adds_nothing,
    from_arrayrecord,
    set_adapter_state,
    to_arrayrecord,
)
from fedsdr.models.cache import resolve_cache_dir
from fedsdr.models.loading import device_peak_memory, shared_model
from fedsdr.runs import ClientDir, append_jsonl, client_name, node_state_root, pause_for_tests

client_app = ClientApp()
logger = logging.getLogger(__name__)

# (run config + client disk, client id) -> session: virtual clients keep their model and data
# across rounds within a process.
_SESSIONS: dict[tuple[str, int], ClientSession] = {}


def new_session(cfg: RunConfig, client_id: int, state_root: Path, node_config: dict[str, Any] | None = None
                ) -> ClientSession:
    """Build a client's session: the shared model, its private data, its own disk."""
    quiet_libraries()  # also in Ray actors and SuperNode processes
    algorithm = get_algorithm(cfg)
    model, tokenizer, runtime, _ = shared_model(cfg.model, cfg.lora, algorithm.adapters(cfg), cfg.seed)
    node = node_config or {}
    if "data-path" in node:  # a deployed silo reads its own file (and checks its own references)
        data = load_silo_data(str(node["data-path"]), client_id, cfg.data, cfg.seed)
        if "test-path" in node:  # ... and may name its own test file
            data = replace(data, test=load_test_source(cfg.data, str(node["test-path"])))
        check_references(cfg, data.train + data.test)
    else:
        data = build_federated_data(cfg.data, cfg.partition, cfg.seed).clients[client_id]
    return ClientSession(
        cfg=cfg, client_id=client_id, model=model, tokenizer=tokenizer, runtime=runtime, data=data,
        disk=ClientDir.under(state_root, client_id), cache_dir=resolve_cache_dir(cfg.model.cache_dir or None),
    )


def client_session(msg: Message, context: Context) -> tuple[ClientSession, Algorithm]:
    """This node's session, built on first use and reused across rounds."""
    config = msg.content["config"]
    cfg_json = str(config["fedsdr-config"])
    cfg: RunConfig = config_from_json(cfg_json)
    client_id = int(context.node_config.get("partition-id", 0))
    node = dict(context.node_config)
    if node.get("state-dir"):  # a deployed SuperNode: one folder per run (the server's run id)
        run_id = str(config["run-id"]) if "run-id" in config else f"flwr-run-{context.run_id}"
        state_root = node_state_root(Path(str(node["state-dir"])), run_id)
    else:  # simulated clients: the run folder's clients/
        state_root = Path(str(config.get("client-state-root") or "fedsdr-client"))
    key = (hashlib.sha256(f"{cfg_json}\n{state_root}".encode()).hexdigest(), client_id)
    if key not in _SESSIONS:
        if len(_SESSIONS) >= 64 or any(k[0] != key[0] for k in _SESSIONS):
            _SESSIONS.clear()  # one run at a time per process
        _SESSIONS[key] = new_session(cfg, client_id, state_root, node)
    return _SESSIONS[key], get_algorithm(cfg)


def _held_state(context: Context) -> LocalState:
    """The local state this node holds in memory (Flower's Context persists across rounds)."""
    return {k: from_arrayrecord(v) for k, v in context.state.array_records.items()}


def private_errors(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """A client's failure reaches the server as its exception type only: the message of an
    exception can quote the client's data (a bad record, a rewrite). The traceback stays in the
    client's own log."""

    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as e:  # noqa: BLE001 - any failure becomes an error reply, never a crash
            logger.error("ClientApp %s failed", handler.__name__, exc_info=e)
            reason = f"{type(e).__name__} in the ClientApp's {handler.__name__} (details in the client's log)"
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)

    return wrapped


@client_app.train(mods=[client_dp_mod])  # federation.dp = client-*: Flower's clipping mod
@private_errors
def train(msg: Message, context: Context) -> Message:
    session, algorithm = client_session(msg, context)
    config = dict(msg.content["config"])
    server_round = int(config["server-round"])
    global_state = from_arrayrecord(msg.content["arrays"])
    received = {k: from_arrayrecord(v) for k, v in msg.content.array_records.items() if k != "arrays"}
    local_state = algorithm.load_local_state(session, _held_state(context), server_round)
    with device_peak_memory(session.runtime.device) as peak:
        result = algorithm.train(session, global_state, server_round, config, local_state, received)
    algorithm.save_local_state(session, server_round, result.local_state)
    pause_for_tests(f"trained:{server_round}:{session.client_id}")
    for name, state in result.local_state.items():
        context.state[name] = to_arrayrecord(state)
    metrics = identity(result.num_examples, session.client_id, **result.metrics, **peak)
    content = RecordDict({"arrays": to_arrayrecord(result.state), "metrics": metrics})
    for name, state in result.extra.items():
        content[name] = to_arrayrecord(state)
    return Message(content, reply_to=msg)


@client_app.evaluate()
@private_errors
def evaluate(msg: Message, context: Context) -> Message:
    """Each model the algorithm names (the global one; personalized ones with the client's
    local adapters as they are now) on this client's test split; the personalized ones also on
    the held-out suites (the server evaluates the global model there). Predictions stay in the
    client's own folder; only the figures go back."""
    session, algorithm = client_session(msg, context)
    cfg, model = session.cfg, session.model
    config = msg.content["config"]
    server_round = int(config["server-round"])
    generate = bool(config.get("generate", cfg.eval.generate))
    states = {
        algorithm.global_adapter: from_arrayrecord(msg.content["arrays"]),
        **algorithm.load_local_state(session, _held_state(context), server_round + 1),
    }
    evaluation, predictions = {}, []
    for label, active in algorithm.eval_models(cfg).items():
        for name in active:
            set_adapter_state(model, name, states[name])
        activate(model, active, trainable=[])
        base_model = all(adds_nothing(states[name]) for name in active)
        sets = {"client_test": session.data.test}
        if label != "global" and generate:  # suites at the generation rounds, as on the server
            sets.update(session.suites)
        for split, records in sets.items():
            result, preds = session.evaluator(records, generate=generate, base_model=base_model,
                                              progress=f"client {session.client_id}: {label} on {split}")
            evaluation[(label, split)] = result
            where = {"round": server_round, "scope": client_name(session.client_id), "model": label, "split": split}
            predictions.extend({**where, **p} for p in preds)
    append_jsonl(session.disk.predictions, predictions)
    return Message(pack_evaluation(evaluation, len(session.data.test), session.client_id), reply_to=msg)


__all__ = ["client_app", "client_session", "new_session"]
