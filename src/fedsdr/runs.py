"""A run's output folder: resolved config, metrics.jsonl, summary.json, checkpoints.

    OUT/config.json               the resolved config
    OUT/metrics.jsonl             one JSON object per line (round, scope, kind, figures)
    OUT/summary.json              final figures
    OUT/checkpoints/round-NNN/    global adapter (PEFT folder) + server state, written atomically
    OUT/clients/client-K/         simulated clients' own disks (LoRA-S, distilled data)
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path
from typing import Any

from fedsdr.config import RunConfig, config_from_json
from fedsdr.io import write_json_atomic, write_text_atomic

CHECKPOINT = "round-{:03d}"


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
        self.root.mkdir(parents=True, exist_ok=True)
        with self.metrics_path.open("a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(_clean(row), ensure_ascii=False, allow_nan=False) + "\n")
            f.flush()

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        rows = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a crash: it belongs to an unfinished round
                    break
        return rows

    def truncate_metrics(self, last_round: int) -> None:
        """Drop rows of rounds after `last_round` (written by a run that died mid-round)."""
        keep = [r for r in self.read_metrics() if r.get("round", 0) <= last_round]
        write_text_atomic(self.metrics_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep))

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json_atomic(self.root / "summary.json", _clean(summary))

    # checkpoints ------------------------------------------------------------
    def checkpoint_dir(self, server_round: int) -> Path:
        return self.checkpoints / CHECKPOINT.format(server_round)

    def last_checkpoint(self) -> int:
        """The last complete round (0 when none)."""
        if not self.checkpoints.exists():
            return 0
        rounds = [
            int(p.name.split("-")[1]) for p in self.checkpoints.glob("round-*")
            if p.is_dir() and (p / "adapter_model.safetensors").exists() and (p / "server_state.pkl").exists()
        ]
        return max(rounds, default=0)

    def client_dir(self, client_id: int) -> Path:
        return self.clients / f"client-{client_id}"


def save_server_state(folder: Path, state: dict[str, Any]) -> None:
    (folder / "server_state.pkl").write_bytes(pickle.dumps(state))


def load_server_state(folder: Path) -> dict[str, Any]:
    return pickle.loads((folder / "server_state.pkl").read_bytes())
