"""Tables and summaries: per round, per run (summary.json), and across runs (comparison.md/.json)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from rich.table import Table

from fedsdr.config import RunConfig
from fedsdr.console import console
from fedsdr.io import write_json_atomic, write_text_atomic

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
    console.print(round_table(cfg, server_round, rows))


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


# across runs ------------------------------------------------------------------
def _label(summary: dict[str, Any]) -> str:
    algo = summary["algorithm"]
    if algo == "fedsdr":
        return "FedSDR"
    names = {"fedavg": "FedAvg", "fedprox": "FedProx", "fedavgm": "FedAvgM", "fedadam": "FedAdam",
             "fedyogi": "FedYogi", "fedadagrad": "FedAdagrad"}
    return names.get(algo, algo) + ("+FedSD" if summary.get("fedsd") else "")


def comparison_rows(summaries: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    domains = sorted({d for s in summaries for d in ((s.get("final") or {}).get("domains") or {})})

    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    header = ["method", *[f"acc {d}" for d in domains], "acc all", "halluc.", "rougeL", "gen len",
              "loss", "pers. acc", "bytes up/client/round"]
    rows = []
    for s in summaries:
        final = s.get("final") or {}
        doms = final.get("domains") or {}
        pers = (s.get("clients_final") or {}).get("personalized") or {}
        rows.append([
            _label(s), *[fmt((doms.get(d) or {}).get("accuracy", (doms.get(d) or {}).get("rougeL"))) for d in domains],
            fmt(final.get("accuracy")), fmt(final.get("hallucination")), fmt(final.get("rougeL")),
            fmt(final.get("gen_len")), fmt(final.get("loss")), fmt(pers.get("accuracy")),
            fmt(int(s["bytes_up_per_client_round"]) if s.get("bytes_up_per_client_round") else None),
        ])
    return header, rows


def comparison_table(summaries: list[dict[str, Any]]) -> Table:
    header, rows = comparison_rows(summaries)
    table = Table(title="Global model on the global held-out set, last round "
                        "(open-ended domains show ROUGE-L in their column)")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


def write_comparison(root: Path, summaries: list[dict[str, Any]]) -> None:
    header, rows = comparison_rows(summaries)
    md = "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
    md += "".join("| " + " | ".join(r) + " |\n" for r in rows)
    write_text_atomic(Path(root) / "comparison.md", md)
    write_json_atomic(Path(root) / "comparison.json", summaries)
