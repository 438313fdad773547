"""What every algorithm shares: the client's local session and the algorithm interface.

An `Algorithm` carries every algorithm-specific decision the ClientApp and the server need:
which adapters exist and which one is aggregated, the client's local state (what it keeps
between rounds, in memory and on its own disk), the models a client evaluates, the server
strategy, and the local training. `fedsdr.federation` only calls these methods.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

from flwr.serverapp.strategy import Strategy
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fedsdr.config import RunConfig
from fedsdr.data.partition import ClientData
from fedsdr.data.schema import DataError, Record
from fedsdr.evaluate import Evaluator, suite_sets
from fedsdr.models.adapters import (
    AdapterSpec,
    AdapterState,
    fresh_adapter_state,
    load_adapter_file,
    save_peft_adapter,
)
from fedsdr.models.loading import Runtime, resolve_model_source
from fedsdr.runs import ClientDir
from fedsdr.train import Example, encode_all

# Named tensors a client keeps between rounds (e.g. FedSDR's LoRA-S), never sent.
LocalState = dict[str, AdapterState]


def derive_seed(seed: int, *parts: object) -> int:
    """A stable 31-bit seed for (run seed, round, client, purpose...)."""
    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF


@dataclass
class ClientSession:
    """What one client holds locally: its private data, the model, its own disk."""

    cfg: RunConfig
    client_id: int
    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    runtime: Runtime
    data: ClientData
    disk: ClientDir  # this client's own disk: its local adapters, its distilled sets
    cache_dir: Path  # caches that outlive a run (distilled sets keyed by their inputs)
    _encoded: dict[str, tuple[list[Example], int]] = field(default_factory=dict)
    distilled_rows: list[Any] = field(default_factory=list)  # FedSD: one DistilledRow per record
    distilled_from_round: int = -1  # the round whose model rewrote `distilled_rows`

    def encoded(self, key: str, records: list[Record]) -> tuple[list[Example], int]:
        """Tokenised records (cached per key); second item: how many were too long."""
        if key not in self._encoded:
            examples, dropped = encode_all(
                self.tokenizer, records, self.cfg.model.max_seq_len, self.cfg.data.system_prompt
            )
            if not examples:
                raise DataError(
                    f"client {self.client_id}: all {len(records)} training records are longer than "
                    f"model.max_seq_len={self.cfg.model.max_seq_len} tokens; raise it or use shorter data"
                )
            self._encoded[key] = (examples, dropped)
        return self._encoded[key]

    def raw_examples(self) -> tuple[list[Example], int]:
        return self.encoded("raw", self.data.train)

    @cached_property
    def evaluator(self) -> Evaluator:
        """How this client evaluates: the run's settings, base-model evaluations reused."""
        cfg = self.cfg
        return Evaluator(self.model, self.tokenizer, self.runtime.autocast, cfg.eval, resolve_model_source(cfg.model),
                         cfg.data.system_prompt, cfg.seed, self.cache_dir)

    @cached_property
    def suites(self) -> dict[str, list[Record]]:
        """The held-out suites `eval.suites` names, by split name."""
        return suite_sets(self.cfg)


@dataclass
class TrainResult:
    """A client's round: the global adapter's new weights and numbers for the server (never
    text), and its local state for the next round (kept on the client)."""

    state: AdapterState
    num_examples: int
    metrics: dict[str, float]
    local_state: LocalState = field(default_factory=dict)
    extra: dict[str, AdapterState] = field(default_factory=dict)  # more tensors for the server (SCAFFOLD's delta c_i)


class Algorithm:
    """One federated algorithm. Subclasses set `name` and implement `strategy` and `train`;
    algorithms with local adapters list them after the global one in `adapters`."""

    name: ClassVar[str]
    global_adapter: ClassVar[str] = "default"
    uploads_global: ClassVar[bool] = True  # False: clients send no tensors (e.g. Local-only)

    # adapters -------------------------------------------------------------
    def adapters(self, cfg: RunConfig) -> list[AdapterSpec]:
        """The adapters on the model; the first one is the global (aggregated) one."""
        return [AdapterSpec(self.global_adapter, cfg.lora.r, cfg.lora.alpha)]

    def local_adapters(self, cfg: RunConfig) -> list[AdapterSpec]:
        """Adapters that stay on their client."""
        return self.adapters(cfg)[1:]

    def eval_models(self, cfg: RunConfig) -> dict[str, list[str]]:
        """The models a client evaluates, by label: the adapters active in each."""
        models = {"global": [self.global_adapter]}
        if self.local_adapters(cfg):
            models["personalized"] = [spec.name for spec in self.adapters(cfg)]
        return models

    # the client's local state -----------------------------------------------
    def load_local_state(self, session: ClientSession, held: LocalState, server_round: int) -> LocalState:
        """The local state a client starts `server_round` with: what it holds in memory
        (Flower's Context), else its latest copy on its own disk (a resumed run, a restarted
        SuperNode), else a fresh initialisation."""
        state: LocalState = {}
        for spec in self.local_adapters(session.cfg):
            saved = session.disk.last_adapter(spec.name, server_round - 1)
            if spec.name in held:
                state[spec.name] = held[spec.name]
            elif saved is not None:
                state[spec.name] = load_adapter_file(saved)
            else:
                seed = derive_seed(session.cfg.seed, f"{spec.name}-init", session.client_id)
                state[spec.name] = fresh_adapter_state(session.model, spec.name, seed)
        return state

    def save_local_state(self, session: ClientSession, server_round: int, state: LocalState) -> None:
        """Write the local adapters after `server_round` to the client's own disk (PEFT folders)."""
        cfg = session.cfg
        for spec in self.local_adapters(cfg):
            save_peft_adapter(session.disk.adapter(spec.name, server_round), state[spec.name], spec,
                              cfg.lora, cfg.model.name)

    # the two sides of a round ---------------------------------------------------
    def strategy(self, cfg: RunConfig) -> Strategy:
        """The Flower strategy that samples clients and aggregates the global adapter."""
        raise NotImplementedError

    def train(self, session: ClientSession, global_state: AdapterState, server_round: int,
              config: dict[str, Any], local_state: LocalState, received: dict[str, AdapterState]) -> TrainResult:
        """The client's local work in `server_round`, starting from the global adapter. `config`
        is the round's ConfigRecord, `received` any tensors the strategy sent besides the global
        adapter (ArrayRecords other than "arrays", e.g. SCAFFOLD's server control variate)."""
        raise NotImplementedError


def proximal_mu(config: dict[str, Any]) -> float:
    """FedProx's mu when the server strategy sends one ("proximal-mu", as Flower's FedProx does)."""
    return float(config.get("proximal-mu", 0.0))


def sampling_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """Client sampling as Flower's strategies take it."""
    fed = cfg.federation
    n = cfg.partition.num_clients
    return {
        "fraction_train": fed.fraction_train,
        "fraction_evaluate": fed.fraction_evaluate,
        "min_train_nodes": min(n, fed.min_train_clients),
        "min_evaluate_nodes": n if fed.fraction_evaluate > 0 else 0,
        # Rounds start once min_train_clients nodes are connected; the server waits up to
        # federation.round_timeout for all of them first.
        "min_available_nodes": min(n, fed.min_train_clients),
    }
