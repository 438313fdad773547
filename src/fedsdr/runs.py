"""The on-disk layout of a run and of a client's disk; the one module that formats these paths.

    OUT/config.json                    the resolved config
    OUT/metrics.jsonl                  one JSON object per line (round, scope, kind, figures)
    OUT/predictions.jsonl              the server's evaluations, one line per record (round, scope, model,
                                       split, id, prompt, response, reference, scores)
    OUT/summary.json                   final figures
    OUT/checkpoints/round-NNN/         global adapter (PEFT folder) + server state (JSON + safetensors),
                                       written atomically as one folder
    OUT/clients/client-K/              a simulated client's own disk (`ClientDir`):
        <adapter>/round-NNN/               a local adapter (FedSDR's LoRA-S) after round NNN (PEFT folder)
        <name>/round-NNN.safetensors       other local tensors (SCAFFOLD's control variate c_i)
        distill/round-NNN.jsonl            the distilled set rewritten by the model of round NNN
        distill/round-NNN.diagnostics.json its diagnostics
        predictions.jsonl                  its own evaluations, one line per record (never sent)
A deployed SuperNode's `state-dir` is laid out like one `clients/client-K/` folder.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy

from fedsdr.config import RunConfig, config_from_json
from fedsdr.io import write_json_atomic, write_text_atomic


def client_name(client_id: int) -> str:
    """A client's folder name, and its `scope` in metrics rows."""
    return f"client-{client_id}"


def round_name(server_round: int) -> str:
    return f"round-{server_round:03d}"


def _round_of(folder: Path) -> int | None:
    name = folder.name
    return int(name[6:]) if name.startswith("round-") and name[6:].isdigit() else None


@dataclass(frozen=True)
class ClientDir:
    """One client's own disk: its local adapters per round and its distilled sets."""

    root: Path

    @classmethod
    def under(cls, clients_root: Path, client_id: int) -> ClientDir:
        return cls(Path(clients_root) / client_name(client_id))

    def adapter(self, name: str, server_round: int) -> Path:
        """Local adapter `name` as it was after `server_round` (a PEFT folder)."""
        return self.root / name / round_name(server_round)

    def last_adapter(self, name: str, up_to_round: int) -> Path | None:
        """The latest saved copy of local adapter `name` from a round <= `up_to_round`."""
        for r in range(up_to_round, 0, -1):
            if (self.adapter(name, r) / "adapter_model.safetensors").exists():
                return self.adapter(name, r)
        return None

    def local_tensors(self, name: str, server_round: int) -> Path:
        """Local tensors `name` that are not an adapter (e.g. SCAFFOLD's c_i) after `server_round`."""
        return self.root / name / f"{round_name(server_round)}.safetensors"

    def last_local_tensors(self, name: str, up_to_round: int) -> Path | None:
        for r in range(up_to_round, 0, -1):
            if self.local_tensors(name, r).exists():
                return self.local_tensors(name, r)
        return None

    def distilled_set(self, source_round: int) -> Path:
        """The distilled set rewritten by the model of `source_round` (0: the base model)."""
        return self.root / "distill" / f"{round_name(source_round)}.jsonl"

    def distill_diagnostics(self, source_round: int) -> Path:
        return self.distilled_set(source_round).with_suffix(".diagnostics.json")

    @property
    def predictions(self) -> Path:
        return self.root / "predictions.jsonl"


def append_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append rows as JSON lines (NaN/inf written as null)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(_clean(row), ensure_ascii=False, allow_nan=False) + "\n")
        f.flush()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file, up to the first line cut by a crash."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash: it belongs to an unfinished round
                break
    return rows


def truncate_jsonl(path: Path, last_round: int) -> None:
    """Drop rows of rounds after `last_round` (written by a run that died mid-round)."""
    if path.exists():
        keep = [r for r in read_jsonl(path) if r.get("round", 0) <= last_round]
        write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep))


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


class RunDir:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.metrics_path = self.root / "metrics.jsonl"
        self.predictions_path = self.root / "predictions.jsonl"
        self.checkpoints = self.root / "checkpoints"
        self.clients = self.root / "clients"

    # config ---------------------------------------------------------------
    def write_config(self, cfg: RunConfig) -> None:
        write_text_atomic(self.root / "config.json", cfg.to_json() + "\n")

    def read_config(self) -> RunConfig:
        path = self.root / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"{self.root}: no config.json; is this a fedsdr run folder?")
        return config_from_json(path.read_text(encoding="utf-8"))

    # metrics --------------------------------------------------------------
    def append_metrics(self, rows: list[dict[str, Any]]) -> None:
        append_jsonl(self.metrics_path, rows)

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics_path)

    def append_predictions(self, rows: list[dict[str, Any]]) -> None:
        append_jsonl(self.predictions_path, rows)

    def read_predictions(self) -> list[dict[str, Any]]:
        return read_jsonl(self.predictions_path)

    def truncate(self, last_round: int) -> None:
        """Drop metrics and predictions of rounds after `last_round` (a run that died mid-round)."""
        truncate_jsonl(self.metrics_path, last_round)
        truncate_jsonl(self.predictions_path, last_round)

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json_atomic(self.root / "summary.json", _clean(summary))

    # checkpoints ------------------------------------------------------------
    def checkpoint_dir(self, server_round: int) -> Path:
        return self.checkpoints / round_name(server_round)

    def last_checkpoint(self) -> int:
        """The last complete round (0 when none)."""
        if not self.checkpoints.exists():
            return 0
        rounds = [
            _round_of(p) for p in self.checkpoints.glob("round-*")
            if _round_of(p) is not None and (p / "adapter_model.safetensors").exists()
            and (p / "server_state.json").exists()
        ]
        return max(rounds, default=0)

    def client(self, client_id: int) -> ClientDir:
        return ClientDir.under(self.clients, client_id)

    def client_dirs(self) -> list[ClientDir]:
        """Every client folder of the run, by client id."""
        found = [(int(p.name.rsplit("-", 1)[1]), p) for p in self.clients.glob("client-*")
                 if p.is_dir() and p.name.rsplit("-", 1)[1].isdigit()]
        return [ClientDir(p) for _, p in sorted(found)]


def write_server_state(folder: Path, state: dict[str, Any]) -> None:
    """A strategy's state as JSON (scalars, and the layout of its arrays) + safetensors (arrays:
    Flower's ArrayRecords, lists and dicts of arrays, in their order): nothing that runs code
    when read back."""
    from flwr.app import ArrayRecord

    arrays: dict[str, np.ndarray] = {}
    scalars: dict[str, Any] = {}
    layout: dict[str, dict[str, Any]] = {}
    for name, value in state.items():
        if isinstance(value, ArrayRecord):
            value, kind = {k: a.numpy() for k, a in value.items()}, "arrayrecord"
        elif isinstance(value, np.ndarray):
            value, kind = {"": value}, "array"
        elif isinstance(value, list | tuple) and value and all(isinstance(v, np.ndarray) for v in value):
            value, kind = {str(i): v for i, v in enumerate(value)}, "list"
        elif isinstance(value, dict) and value and all(isinstance(v, np.ndarray) for v in value.values()):
            kind = "dict"
        elif value is None or isinstance(value, bool | int | float | str):
            scalars[name] = value
            continue
        else:
            raise TypeError(f"server state {name!r}: cannot save a {type(value).__name__}")
        layout[name] = {"kind": kind, "keys": list(value)}
        arrays.update({f"{name}/{k}": np.ascontiguousarray(v) for k, v in value.items()})
    (folder / "server_state.json").write_text(json.dumps({"scalars": scalars, "arrays": layout}, indent=2) + "\n")
    save_numpy(arrays, str(folder / "server_state.safetensors"))


def read_server_state(folder: Path) -> dict[str, Any]:
    from flwr.app import Array, ArrayRecord

    meta = json.loads((folder / "server_state.json").read_text(encoding="utf-8"))
    tensors = load_numpy(str(folder / "server_state.safetensors"))
    state: dict[str, Any] = dict(meta["scalars"])
    for name, entry in meta["arrays"].items():
        values = [tensors[f"{name}/{k}"] for k in entry["keys"]]
        kind = entry["kind"]
        if kind == "arrayrecord":
            state[name] = ArrayRecord({k: Array(v) for k, v in zip(entry["keys"], values, strict=True)})
        elif kind == "array":
            state[name] = values[0]
        elif kind == "list":
            state[name] = values
        else:
            state[name] = dict(zip(entry["keys"], values, strict=True))
    return state
