"""What every algorithm shares: the client's local session and the algorithm interface."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from flwr.serverapp.strategy import Strategy
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fedsdr.config import RunConfig
from fedsdr.data.partition import ClientData
from fedsdr.data.schema import DataError, Record
from fedsdr.models.adapters import AdapterSpec, AdapterState
from fedsdr.models.loading import Runtime
from fedsdr.train import Example, encode_all


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
    state_dir: Path  # this client's own disk: its LoRA-S, its distilled data
    cache_dir: Path  # caches that outlive a run (distilled sets keyed by their inputs)
    _encoded: dict[str, tuple[list[Example], int]] = field(default_factory=dict)
    distill_rows: list[Any] = field(default_factory=list)  # FedSD: DistilledRow per record
    distill_key: str = ""  # cache key of distill_rows
    distill_source_round: int = -1
    distill_generate_calls: int = 0

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


@dataclass
class TrainResult:
    """What goes back to the server: the global adapter's new weights and numbers (never text)."""

    state: AdapterState
    num_examples: int
    metrics: dict[str, float]


class Algorithm:
    """One federated algorithm: which adapters exist, the client's local work, the server strategy."""

    name: ClassVar[str]
    global_adapter: ClassVar[str] = "default"

    def adapters(self, cfg: RunConfig) -> list[AdapterSpec]:
        """The adapters on the model; the first one is the global (aggregated) one."""
        return [AdapterSpec(self.global_adapter, cfg.lora.r, cfg.lora.alpha)]

    def strategy(self, cfg: RunConfig) -> Strategy:
        raise NotImplementedError

    def train(self, session: ClientSession, global_state: AdapterState, server_round: int,
              config: dict[str, Any], client_state: dict[str, Any]) -> TrainResult:
        raise NotImplementedError


def sampling_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """Client sampling as Flower's strategies take it."""
    fed = cfg.federation
    n = cfg.partition.num_clients
    return {
        "fraction_train": fed.fraction_train,
        "fraction_evaluate": fed.fraction_evaluate,
        "min_train_nodes": min(n, fed.min_train_clients),
        "min_evaluate_nodes": n if fed.fraction_evaluate > 0 else 0,
        "min_available_nodes": n,
    }
