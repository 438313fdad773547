"""One run's summary (summary.json): the global model at round 0 and at the last round on each
evaluation split, per-client means per model and split, communication, FedSD diagnostics."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from fedsdr.config import RunConfig

GLOBAL_SPLIT = "global_test"
# Figures averaged over clients in `clients_final` (each with `_se` where the rows carry one).
CLIENT_COLUMNS = ("loss", "accuracy", "accuracy_flexible", "hallucination", "rougeL", "gen_len",
                  "length_ratio", "repeat4", "acc_norm")


def split_of(row: dict[str, Any]) -> str:
    """A row's evaluation split; rows written before splits existed are the global test set
    (server) or the client's test split (clients)."""
    if row.get("split"):
        return row["split"]
    return GLOBAL_SPLIT if row.get("scope") == "global" else "client_test"


def fedsd_profile(cfg: RunConfig) -> str | None:
    """The FedSD filter profile of a run ("paper", "safe"), "" when this fedsdr has no profiles,
    None when the run trains on raw data."""
    if not cfg.distill.enabled:
        return None
    return str(getattr(cfg.distill.filters, "profile", "") or "")


def client_means(items: list[dict[str, Any]], columns: tuple[str, ...] = CLIENT_COLUMNS) -> dict[str, Any]:
    """Mean over clients of each figure; its standard error combines the clients' own
    (independent items): sqrt(sum se_k^2) / K over the clients that report the figure."""
    out: dict[str, Any] = {"clients": len(items)}
    for key in columns:
        having = [x for x in items if x.get(key) is not None]
        if not having:
            continue
        out[key] = sum(x[key] for x in having) / len(having)
        ses = [x.get(f"{key}_se") for x in having]
        if all(s is not None for s in ses):
            out[f"{key}_se"] = math.sqrt(sum(s * s for s in ses)) / len(having)
    return out


def largest(rows: list[dict[str, Any]], key: str) -> dict[str, float]:
    """{key: its largest value over the rows}, or {} where no row has it (`device_peak_mb`: a
    figure of CUDA runs only)."""
    values = [r[key] for r in rows if key in r]
    return {key: max(values)} if values else {}


def summarize(cfg: RunConfig, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Final figures of a run.

    `round0` / `final`: the global model on the global held-out set ("global_test") at round 0
    and at the last round; `round0_<split>` / `final_<split>` the same on every other split the
    server evaluates (e.g. `final_general` for the general suite). `clients_final[model][split]`:
    means over clients at the last round, per model label ("global", "personalized") and split
    ("client_test", "general"). Then communication, training time and each client's latest
    FedSD diagnostics (`distill`).
    """
    last = max((r["round"] for r in rows), default=0)
    global_eval: dict[tuple[str, int], dict[str, Any]] = {}
    clients: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["kind"] != "eval":
            continue
        if r["scope"] == "global":
            global_eval[(split_of(r), r["round"])] = r
        elif r["round"] == last:
            clients[r.get("model", "global")][split_of(r)].append(r)
    train_rows = [r for r in rows if r["kind"] == "train" and r["scope"] != "global"]

    def mean_of(items: list[dict[str, Any]], key: str) -> float | None:
        values = [x[key] for x in items if x.get(key) is not None]
        return sum(values) / len(values) if values else None

    summary: dict[str, Any] = {
        "name": cfg.name,
        "algorithm": cfg.federation.algorithm,
        "fedsd": cfg.distill.enabled,
        "fedsd_profile": fedsd_profile(cfg),
        "seed": cfg.seed,
        "rounds": last,
        "rounds_planned": cfg.federation.rounds,
        "round0": global_eval.get((GLOBAL_SPLIT, 0)),
        "final": global_eval.get((GLOBAL_SPLIT, last)),
    }
    for split in sorted({s for s, _ in global_eval} - {GLOBAL_SPLIT}):
        summary[f"round0_{split}"] = global_eval.get((split, 0))
        summary[f"final_{split}"] = global_eval.get((split, last))
    summary.update({
        "clients_final": {label: {split: client_means(items) for split, items in sorted(splits.items())}
                          for label, splits in sorted(clients.items())},
        "bytes_up_per_client_round": mean_of(train_rows, "bytes_up"),
        "bytes_up_total": sum(r.get("bytes_up", 0) for r in train_rows),
        "train_seconds_total": sum(r.get("seconds", 0.0) for r in train_rows),
    })
    summary.update(largest(train_rows, "device_peak_mb"))  # CUDA runs: the most GPU memory a client's round held
    if any(k.startswith("distill/") for r in train_rows for k in r):
        per_client = {r["scope"]: {k[8:]: v for k, v in r.items() if k.startswith("distill/")}
                      for r in train_rows}
        summary["distill"] = per_client  # FedSD diagnostics, each client's latest
    return summary
