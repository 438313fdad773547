"""The on-disk layout of a run and of a client's disk; the one module that formats these paths.

    OUT/config.json                    the resolved config
    OUT/run-id                         a random id, new at every fresh start (keys the run's state
                                       on deployed SuperNodes)
    OUT/.fedsdr.lock                   held (an OS lock) by the fedsdr process using the folder
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
A deployed SuperNode keeps each run apart under its `state-dir`: `state-dir/<run-id>/client-K/`
is laid out like `clients/client-K/`, <run-id> being the server's OUT/run-id (sent with every
message), so two runs on one SuperNode never share local adapters or distilled sets, and a
resumed run finds its own.

A fresh start (`fedsdr run`, `--force`, a new compare or grid cell) removes every file of this
layout left by an earlier run (`RunDir.clear`), and nothing else.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy

from fedsdr.config import ConfigError, RunConfig, config_from_json
from fedsdr.io import write_json_atomic, write_text_atomic

LOCK_NAME = ".fedsdr.lock"
# What a run writes into its folder (a fresh start removes these, and only these). Also files
# of other fedsdr commands about this run: the grid's timing, `fedsdr eval` results.
RUN_FILES = ("run-id", "metrics.jsonl", "predictions.jsonl", "summary.json", "grid-timing.json",
             "distill-diagnostics.json")
RUN_FOLDERS = ("checkpoints", "clients", "lm-eval")


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


def node_state_root(state_dir: Path, run_id: str) -> Path:
    """Where a deployed SuperNode keeps one run's client disks: `state-dir/<run-id>/` (the id
    must be a plain folder name: it comes over the network)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", run_id):
        raise ConfigError(f"run id {run_id!r} is not a plain folder name")
    return Path(state_dir) / run_id


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


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold `folder`'s lock file for the block, or raise ConfigError at once when another process
    holds it. An OS lock (flock): the OS drops it when its process dies, so a killed run never
    leaves a stale lock behind."""
    from filelock import FileLock, Timeout

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / LOCK_NAME)
    try:
        lock.acquire(blocking=False)
    except Timeout:
        raise ConfigError(f"{folder} is in use: another fedsdr process is running in it (it holds "
                          f"{folder / LOCK_NAME}); wait for it to end, or use another --out") from None
    try:
        yield
    finally:
        lock.release()


def config_differences(stored: dict[str, Any], wanted: dict[str, Any], prefix: str = "",
                       given: str = "given") -> list[str]:
    """`key: A in the folder, B <given>` for every leaf where two config dicts differ, sorted by key."""
    out = []
    for key in sorted(set(stored) | set(wanted)):
        x, y = stored.get(key), wanted.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out.extend(config_differences(x, y, f"{prefix}{key}.", given))
        elif x != y:
            out.append(f"{prefix}{key}: {x!r} in the folder, {y!r} {given}")
    return out


class RunDir:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.metrics_path = self.root / "metrics.jsonl"
        self.predictions_path = self.root / "predictions.jsonl"
        self.checkpoints = self.root / "checkpoints"
        self.clients = self.root / "clients"
        self._run_id: str | None = None

    # config ---------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.root / "config.json"

    def write_config(self, cfg: RunConfig) -> None:
        write_text_atomic(self.config_path, cfg.to_json() + "\n")

    def read_config(self) -> RunConfig:
        path = self.config_path
        if not path.exists():
            raise FileNotFoundError(f"{self.root}: no config.json; is this a fedsdr run folder?")
        try:
            return config_from_json(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:  # pydantic's ValidationError is a ValueError
            raise ConfigError(f"{path}: not a readable fedsdr config ({type(e).__name__}: {e})") from None

    def config_differences(self, cfg: RunConfig, given: str = "given") -> list[str]:
        """How the folder's saved config differs from `cfg` ([] when it has none, or the same)."""
        if not self.config_path.exists():
            return []
        stored = json.loads(self.read_config().to_json())
        return config_differences(stored, json.loads(cfg.to_json()), given=given)

    def refusal(self, cfg: RunConfig, given: str = "given") -> str | None:
        """Why this folder cannot take a run of `cfg` (start or resume) without losing someone's
        files: it holds another config, an unreadable config.json, run files but no config.json,
        or a corrupt last checkpoint. None when it can."""
        if not self.config_path.exists():
            return "the folder holds checkpoints but no config.json" if self.last_checkpoint() else None
        try:
            diffs = self.config_differences(cfg, given)
        except ConfigError as e:
            return f"its config.json cannot be read ({e})"
        if diffs:
            return "it holds another config (" + "; ".join(diffs[:3]) + (" ..." if len(diffs) > 3 else "") + ")"
        try:
            self.verify_checkpoint()
        except ConfigError as e:
            return str(e)
        return None

    # the folder as a whole ------------------------------------------------------
    def lock(self) -> AbstractContextManager[None]:
        """This process alone uses the folder while the block runs (see `folder_lock`)."""
        return folder_lock(self.root)

    def leftovers(self) -> list[Path]:
        """Files and folders of the run layout present now (config.json and the lock aside)."""
        names = (*RUN_FILES, *RUN_FOLDERS)
        return [self.root / n for n in names if (self.root / n).exists() or (self.root / n).is_symlink()]

    def clear(self) -> None:
        """Remove what an earlier run (or `fedsdr distill`) left: `RUN_FILES`, `RUN_FOLDERS` and
        their atomic writers' temp files, nothing else, so that a fresh start reuses nothing: no
        checkpoint, distilled set or local adapter."""
        for path in self.leftovers():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        for name in (*RUN_FILES, "config.json"):  # temp files of writers killed mid-write
            for tmp in self.root.glob(f".{name}.*"):
                if tmp.is_file() and not tmp.is_symlink():
                    tmp.unlink()
        self._run_id = None

    def run_id(self) -> str:
        """This run's random id (created on first use; a fresh start gets a new one)."""
        if self._run_id is None:
            path = self.root / "run-id"
            if not path.exists():
                write_text_atomic(path, uuid.uuid4().hex + "\n")
            self._run_id = path.read_text(encoding="utf-8").strip()
        return self._run_id

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
        """Drop metrics and predictions (the server's and each simulated client's) of rounds after
        `last_round` (a run that died mid-round)."""
        truncate_jsonl(self.metrics_path, last_round)
        truncate_jsonl(self.predictions_path, last_round)
        for client in self.client_dirs():
            truncate_jsonl(client.predictions, last_round)

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

    def verify_checkpoint(self, server_round: int | None = None) -> None:
        """Read checkpoint `server_round` (default: the last) in full: a truncated or garbage file
        raises ConfigError naming it, before anything loads a model."""
        server_round = self.last_checkpoint() if server_round is None else server_round
        if server_round:
            folder = self.checkpoint_dir(server_round)
            read_tensors(folder / "adapter_model.safetensors", f"remove {folder} to resume from the round before")
            read_server_state(folder)

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
    if folder.name.startswith(".round-") and folder.name[7:10].isdigit():  # atomic_dir's temp folder
        pause_for_tests(f"checkpoint:{int(folder.name[7:10])}")  # halfway: the tensors not written yet
    save_numpy(arrays, str(folder / "server_state.safetensors"))


def pause_for_tests(point: str) -> None:
    """With FEDSDR_TEST_PAUSE_AT=`point` the process says so on stderr and stops here, so that a
    test can kill it at that exact point (tests/test_kill_resume.py). Points: `checkpoint:N`
    (round N's checkpoint half-written), `trained:N:K` (client K trained in round N, no reply yet)."""
    if os.environ.get("FEDSDR_TEST_PAUSE_AT") == point:
        print(f"FEDSDR_TEST_PAUSED {point}", file=sys.stderr, flush=True)
        time.sleep(3600)


def read_tensors(path: Path, advice: str = "") -> dict[str, np.ndarray]:
    """A safetensors file; a missing, truncated or garbage one raises ConfigError naming it."""
    try:
        return load_numpy(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types (and OSError)
        raise ConfigError(f"{path}: unreadable ({type(e).__name__}: {e}); " + (advice or "the file is corrupt")) from None


def read_server_state(folder: Path) -> dict[str, Any]:
    """The strategy state `write_server_state` saved; a corrupt file raises ConfigError naming it."""
    from flwr.app import Array, ArrayRecord

    advice = f"the checkpoint is corrupt: remove {folder} to resume from the round before"
    path = folder / "server_state.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        layout = {name: (str(entry["kind"]), [str(k) for k in entry["keys"]]) for name, entry in meta["arrays"].items()}
        state: dict[str, Any] = dict(meta["scalars"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"{path}: unreadable ({type(e).__name__}: {e}); {advice}") from None
    tensors = read_tensors(folder / "server_state.safetensors", advice)
    for name, (kind, keys) in layout.items():
        missing = [k for k in keys if f"{name}/{k}" not in tensors]
        if missing or kind not in ("arrayrecord", "array", "list", "dict"):
            raise ConfigError(f"{folder / 'server_state.safetensors'}: does not match server_state.json "
                              f"({name!r}: kind {kind!r}, missing {missing[:3]}); {advice}")
        values = [tensors[f"{name}/{k}"] for k in keys]
        if kind == "arrayrecord":
            state[name] = ArrayRecord({k: Array(v) for k, v in zip(keys, values, strict=True)})
        elif kind == "array":
            state[name] = values[0]
        elif kind == "list":
            state[name] = values
        else:
            state[name] = dict(zip(keys, values, strict=True))
    return state
