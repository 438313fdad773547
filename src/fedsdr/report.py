"""Tables and summaries from metrics rows."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from rich.table import Table

from fedsdr import progress
from fedsdr.config import RunConfig

EVAL_COLUMNS = ("loss", "accuracy", "hallucination", "rougeL", "gen_len", "repeat4")


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def round_table(cfg: RunConfig, server_round: int, rows: list[dict[str, Any]]) -> Table:
    table = Table(title=f"{cfg.name} ({cfg.federation.algorithm}{'+FedSD' if cfg.distill.enabled and cfg.federation.algorithm != 'fedsdr' else ''}) round {server_round}")
    table.add_column("scope")
    table.add_column("model")
    for col in ("train_loss", *EVAL_COLUMNS, "bytes_up"):
        table.add_column(col, justify="right")
    train = {r["scope"]: r for r in rows if r["kind"] == "train"}
    for r in rows:
        if r["kind"] != "eval":
            continue
        t = train.get(r["scope"], {}) if r["model"] == "global" else {}
        table.add_row(r["scope"], r["model"], _fmt(t.get("train_loss")),
                      *(_fmt(r.get(c)) for c in EVAL_COLUMNS), _fmt(t.get("bytes_up")))
    return table


def print_round(cfg: RunConfig, server_round: int, rows: list[dict[str, Any]]) -> None:
    progress.console.print(round_table(cfg, server_round, rows))


def summarize(cfg: RunConfig, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Final figures of a run: the global model at round 0 and at the last round, means over
    clients, communication, and FedSD diagnostics."""
    last = max((r["round"] for r in rows), default=0)
    global_eval = {r["round"]: r for r in rows if r["kind"] == "eval" and r["scope"] == "global"}
    clients: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["kind"] == "eval" and r["scope"] != "global" and r["round"] == last:
            clients[r["model"]].append(r)
    train_rows = [r for r in rows if r["kind"] == "train" and r["scope"] != "global"]

    def mean_of(items: list[dict[str, Any]], key: str) -> float | None:
        values = [x[key] for x in items if x.get(key) is not None]
        return sum(values) / len(values) if values else None

    summary: dict[str, Any] = {
        "name": cfg.name,
        "algorithm": cfg.federation.algorithm,
        "fedsd": cfg.distill.enabled,
        "rounds": last,
        "round0": global_eval.get(0),
        "final": global_eval.get(last),
        "clients_final": {label: {k: mean_of(items, k) for k in EVAL_COLUMNS} for label, items in clients.items()},
        "bytes_up_per_client_round": mean_of(train_rows, "bytes_up"),
        "bytes_up_total": sum(r.get("bytes_up", 0) for r in train_rows),
        "train_seconds_total": sum(r.get("seconds", 0.0) for r in train_rows),
    }
    if any(k.startswith("distill/") for r in train_rows for k in r):
        per_client = {r["scope"]: {k[8:]: v for k, v in r.items() if k.startswith("distill/")}
                      for r in train_rows}
        summary["distill"] = per_client  # FedSD diagnostics, each client's latest
    return summary
