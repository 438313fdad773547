"""Finished run folders read back for reports: one run, the runs of a `compare` folder, or the
cells of a grid; figures over seeds with their intervals; paired differences over items.

Paired differences pair two methods on the same items: per seed, the last round's predictions
of the global model on the global held-out set (predictions.jsonl: scope "global", model
"global", split "global_test"), aligned by record `id` (a record counts only when both runs saw
the same prompt and reference). Over several seeds the interval comes from a two-stage
bootstrap: resample the seeds, then the items within each seed (one seed: the plain paired
bootstrap over items, `fedsdr.stats.paired_bootstrap_diff`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedsdr.config import RunConfig
from fedsdr.report.summary import GLOBAL_SPLIT, fedsd_profile, split_of
from fedsdr.runs import RunDir, read_jsonl
from fedsdr.stats import mean_ci95, paired_bootstrap_diff, paired_diff_over_seeds

Z95 = 1.959963984540054
BOOTSTRAP_SEED = 0
BOOTSTRAP_RESAMPLES = 2000
# Per-record figures a prediction row carries (0/1 rates, or values); "loss" is per token.
ITEM_METRICS = ("accuracy", "hallucination", "loss", "rougeL", "gen_len", "length_ratio", "repeat4",
                "accuracy_flexible", "acc_norm")
# Figures reported per method (those a run has).
FIGURES = ("accuracy", "accuracy_flexible", "hallucination", "stated", "rougeL", "gen_len", "length_ratio",
           "repeat4", "truncated", "looped", "loss", "perplexity", "acc_norm")
LOWER_IS_BETTER = {"loss", "perplexity", "hallucination", "repeat4", "truncated", "looped"}

NAMES = {
    "fedavg": "FedAvg", "fedprox": "FedProx", "fedavgm": "FedAvgM", "fedadam": "FedAdam", "fedyogi": "FedYogi",
    "fedadagrad": "FedAdagrad", "scaffold": "SCAFFOLD", "feddpa": "FedDPA", "local": "Local",
    "centralized": "Centralized", "fedsdr": "FedSDR",
}
# Algorithms that always train on distilled data (FedSD is part of them, not a variant).
DISTILLING = {"fedsdr"}


def algorithm_name(algorithm: str) -> str:
    return NAMES.get(algorithm, algorithm)


def method_label(algorithm: str, profile: str | None, name: str | None = None) -> str:
    """"FedAvg", "FedAvg+FedSD(paper)", "FedSDR"...: the algorithm (or `name`), then the FedSD
    variant for algorithms where FedSD is an option (`profile` None: raw data)."""
    base = name or algorithm_name(algorithm)
    if profile is None or algorithm in DISTILLING:
        return base
    return base + "+FedSD" + (f"({profile})" if profile else "")


def _fingerprint(row: dict[str, Any]) -> str:
    text = json.dumps([row.get("prompt"), row.get("reference")], ensure_ascii=False)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


@dataclass
class Run:
    """One finished (or unfinished) run folder."""

    root: Path
    config: RunConfig
    summary: dict[str, Any] | None
    label: str
    cell: str = ""
    wall_seconds: float | None = None
    method: str = ""  # the method without its FedSD variant ("FedAvg"); default: the algorithm's name
    _predictions: dict[tuple[str, str, str], list[dict[str, Any]]] | None = field(default=None, repr=False)
    _metrics: list[dict[str, Any]] | None = field(default=None, repr=False)

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def algorithm(self) -> str:
        return self.config.federation.algorithm

    @property
    def profile(self) -> str | None:
        return fedsd_profile(self.config)

    @property
    def complete(self) -> bool:
        return bool(self.summary) and self.summary.get("rounds") == self.config.federation.rounds

    @property
    def last_round(self) -> int:
        return int((self.summary or {}).get("rounds", 0))

    def metrics(self) -> list[dict[str, Any]]:
        if self._metrics is None:
            self._metrics = RunDir(self.root).read_metrics()
        return self._metrics

    def predictions(self, split: str = GLOBAL_SPLIT, scope: str = "global", model: str = "global",
                    ) -> list[dict[str, Any]]:
        """The last round's prediction rows of one (scope, model, split)."""
        if self._predictions is None:
            self._predictions = defaultdict(list)
            last = self.last_round
            for row in RunDir(self.root).read_predictions():
                if row.get("round") == last:
                    self._predictions[(row.get("scope", "global"), row.get("model", "global"),
                                       split_of(row))].append(row)
        return self._predictions.get((scope, model, split), [])

    def items(self, metric: str, split: str = GLOBAL_SPLIT) -> dict[str, tuple[float, str]]:
        """Record id -> (per-record figure, fingerprint of prompt and reference), for the records
        that carry `metric` (accuracy only where an answer was generated and is verifiable...)."""
        out = {}
        for row in self.predictions(split):
            value = row.get(metric)
            if value is not None and row.get("id") is not None:
                out[str(row["id"])] = (float(value), _fingerprint(row))
        return out

    def curve(self, metric: str, split: str = GLOBAL_SPLIT) -> dict[int, tuple[float, float | None]]:
        """Round -> (figure, its standard error) of the global model on `split`."""
        out = {}
        for r in self.metrics():
            if r.get("kind") == "eval" and r.get("scope") == "global" and split_of(r) == split \
                    and r.get(metric) is not None:
                out[int(r["round"])] = (float(r[metric]), r.get(f"{metric}_se"))
        return dict(sorted(out.items()))

    def rewrites(self, source_round: int = 0) -> list[dict[str, Any]]:
        """Every client's distilled rows rewritten by the model of `source_round` (0: the base model)."""
        rows: list[dict[str, Any]] = []
        for client in RunDir(self.root).client_dirs():
            rows.extend({**r, "client": client.root.name} for r in read_jsonl(client.distilled_set(source_round)))
        return rows

    def rewrite_diagnostics(self, source_round: int = 0) -> dict[str, dict[str, Any]]:
        """Client -> its FedSD diagnostics (the file beside its distilled set, else summary.json's)."""
        out: dict[str, dict[str, Any]] = {}
        for client in RunDir(self.root).client_dirs():
            path = client.distill_diagnostics(source_round)
            if path.exists():
                try:
                    out[client.root.name] = json.loads(path.read_text(encoding="utf-8"))
                except ValueError:
                    pass
        return out or dict((self.summary or {}).get("distill") or {})

    def client_domains(self) -> dict[str, list[str]]:
        """Client -> the domains of its own test split (from its evaluation rows)."""
        out: dict[str, list[str]] = {}
        for r in self.metrics():
            if r.get("kind") == "eval" and r.get("scope", "global") != "global" and split_of(r) == "client_test":
                out.setdefault(r["scope"], sorted(r.get("domains") or {}))
        return out


def load_run(root: Path, label: str | None = None, cell: str = "", method: str = "") -> Run:
    """A run folder (config.json, and summary.json once finished)."""
    run_dir = RunDir(root)
    cfg = run_dir.read_config()
    summary_path = Path(root) / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.exists() else None
    wall = None
    timing = Path(root) / "grid-timing.json"
    if timing.exists():
        wall = json.loads(timing.read_text(encoding="utf-8")).get("wall_seconds")
    elif summary:
        wall = summary.get("seconds_this_session")
    algorithm = cfg.federation.algorithm
    return Run(Path(root), cfg, summary, label or method_label(algorithm, fedsd_profile(cfg)), cell=cell,
               wall_seconds=wall, method=method or algorithm_name(algorithm))


@dataclass
class Collection:
    """What a report covers: kind "grid" (DIR/grid.json), "run" (one run folder) or "runs"
    (the run folders under DIR, as `fedsdr compare` writes them)."""

    root: Path
    kind: str
    runs: list[Run]
    skipped: list[str] = field(default_factory=list)  # unfinished cells or runs, left out
    grid: dict[str, Any] | None = None

    @property
    def title(self) -> str:
        if self.grid:
            return str(self.grid.get("name") or self.root.name)
        return self.root.name

    def methods(self) -> dict[str, dict[int, Run]]:
        """Method label -> seed -> run, in the order of the grid (or of the folders)."""
        out: dict[str, dict[int, Run]] = {}
        for run in self.runs:
            out.setdefault(run.label, {})[run.seed] = run
        return {label: dict(sorted(by_seed.items())) for label, by_seed in out.items()}


def load_collection(folder: Path) -> Collection:
    """A grid folder, a run folder or a folder of runs, finished parts only."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    grid_path = folder / "grid.json"
    if grid_path.exists():
        grid = json.loads(grid_path.read_text(encoding="utf-8"))
        runs, skipped = [], []
        for cell in grid.get("cells", []):
            root = folder / cell["folder"]
            if not (root / "config.json").exists():
                skipped.append(f"{cell['folder']} (not started)")
                continue
            run = load_run(root, cell.get("label"), cell.get("cell", ""), cell.get("method", ""))
            if run.complete:
                runs.append(run)
            else:
                skipped.append(f"{cell['folder']} (unfinished)")
        return Collection(folder, "grid", runs, skipped, grid)
    if (folder / "config.json").exists():
        run = load_run(folder)
        if not run.summary:
            raise FileNotFoundError(f"{folder}: the run has no summary.json yet (unfinished)")
        return Collection(folder, "run", [run])
    children = [p for p in sorted(folder.iterdir()) if (p / "config.json").exists()]
    if not children:
        raise FileNotFoundError(f"{folder}: neither a run folder (config.json), a grid (grid.json) "
                                "nor a folder of runs")
    runs, skipped = [], []
    for child in children:
        run = load_run(child)
        if run.summary:
            runs.append(run)
        else:
            skipped.append(f"{child.name} (unfinished)")
    _disambiguate(runs)
    return Collection(folder, "runs", runs, skipped)


def _disambiguate(runs: list[Run]) -> None:
    """Runs that share a label and a seed (two configs of one method) get their config name added."""
    seen: dict[tuple[str, int], int] = defaultdict(int)
    for run in runs:
        seen[(run.label, run.seed)] += 1
    for run in runs:
        if seen[(run.label, run.seed)] > 1:
            run.label = f"{run.label} ({run.config.name or run.root.name})"


# figures over seeds -----------------------------------------------------------
def seed_stat(values: list[float], ses: list[float | None] | None = None) -> dict[str, Any]:
    """Mean and spread of one figure over seeds: std, and the Student-t 95% interval (`ci`:
    "seeds"); with one seed the interval is the run's own +-1.96 se over items (`ci`: "items")."""
    mean = float(np.mean(values))
    out: dict[str, Any] = {"mean": mean, "n_seeds": len(values), "per_seed": [float(v) for v in values]}
    if len(values) > 1:
        _, lo, hi = mean_ci95(values)
        out.update(std=float(np.std(values, ddof=1)), lo=lo, hi=hi, ci="seeds")
    else:
        se = (ses or [None])[0]
        out.update(std=None, lo=None if se is None else mean - Z95 * se,
                   hi=None if se is None else mean + Z95 * se, ci="items")
    return out


def _figures_of(rows: list[dict[str, Any] | None], keys: tuple[str, ...] = FIGURES) -> dict[str, Any]:
    rows = [r for r in rows if r]
    out = {}
    for key in keys:
        having = [r for r in rows if r.get(key) is not None]
        if having and len(having) == len(rows):
            out[key] = seed_stat([r[key] for r in having], [r.get(f"{key}_se") for r in having])
    if rows and all(r.get("num_examples") is not None for r in rows):
        out["num_examples"] = float(np.mean([r["num_examples"] for r in rows]))
    return out


def _by_domain(rows: list[dict[str, Any] | None]) -> dict[str, Any]:
    rows = [r for r in rows if r]
    out: dict[str, Any] = {"all": _figures_of(rows)}
    for domain in sorted({d for r in rows for d in (r.get("domains") or {})}):
        out[domain] = _figures_of([(r.get("domains") or {}).get(domain) for r in rows])
    return out


REWRITE_KEYS = ("consistency_before", "hallucination_before", "length_ratio_mean_before", "repeat4_before",
                "consistency_after", "hallucination_after", "length_ratio_mean_after", "repeat4_after", "kept_rate")


def pooled_diagnostics(per_client: dict[str, dict[str, Any]]) -> dict[str, float]:
    """FedSD diagnostics over all clients: rates over verifiable records weighted by their
    number, the other figures by the number of records."""
    out: dict[str, float] = {}
    for key in REWRITE_KEYS:
        weight_key = "num_verifiable" if key.startswith(("consistency", "hallucination")) else "num_records"
        pairs = [(d[key], d.get(weight_key) or 0) for d in per_client.values() if d.get(key) is not None]
        total = sum(w for _, w in pairs)
        if pairs and total > 0:
            out[key] = sum(v * w for v, w in pairs) / total
    return out


def method_results(runs: dict[int, Run]) -> dict[str, Any]:
    """A method's figures over its seeds: the global model on each split (overall and per
    domain), round 0, client means per model and split, cost, FedSD diagnostics."""
    first = next(iter(runs.values()))
    summaries = [r.summary or {} for r in runs.values()]
    splits = [GLOBAL_SPLIT] + sorted({k[6:] for s in summaries for k in s if k.startswith("final_")})
    out: dict[str, Any] = {
        "algorithm": first.algorithm, "fedsd": first.profile, "seeds": list(runs),
        "folders": [str(r.root) for r in runs.values()], "rounds": first.config.federation.rounds,
    }
    out["splits"] = {split: _by_domain([s.get("final" if split == GLOBAL_SPLIT else f"final_{split}")
                                        for s in summaries]) for split in splits}
    out["round0"] = {split: _by_domain([s.get("round0" if split == GLOBAL_SPLIT else f"round0_{split}")
                                        for s in summaries]) for split in splits}
    clients: dict[str, Any] = {}
    for label in sorted({m for s in summaries for m in (s.get("clients_final") or {})}):
        for split in sorted({sp for s in summaries for sp in ((s.get("clients_final") or {}).get(label) or {})}):
            entries = [((s.get("clients_final") or {}).get(label) or {}).get(split) for s in summaries]
            if entries and all(isinstance(e, dict) for e in entries):
                clients[f"{label}/{split}"] = _figures_of(entries)
    out["clients"] = clients
    cost: dict[str, Any] = {}
    for key in ("bytes_up_per_client_round", "bytes_up_total", "train_seconds_total"):
        values = [s.get(key) for s in summaries]
        if all(v is not None for v in values):
            cost[key] = seed_stat([float(v) for v in values])
    walls = [r.wall_seconds for r in runs.values()]
    if all(w is not None for w in walls):
        cost["wall_seconds"] = seed_stat([float(w) for w in walls])
    out["cost"] = cost
    pooled = [pooled_diagnostics(r.rewrite_diagnostics()) for r in runs.values()] if first.profile is not None else []
    if pooled and all(pooled):
        out["rewrite"] = {k: seed_stat([p[k] for p in pooled]) for k in REWRITE_KEYS if all(k in p for p in pooled)}
    return out


# paired differences -------------------------------------------------------------
def hierarchical_diff(diffs_by_seed: list[list[float]], seed: int = BOOTSTRAP_SEED,
                      n: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float, float]:
    """(mean, lo, hi) of per-item differences grouped by seed: the mean of the seeds' mean
    differences, and a percentile 95% interval from a two-stage bootstrap (seeds resampled with
    replacement, then items within each drawn seed). One seed: `paired_bootstrap_diff`."""
    groups = [np.asarray(d, dtype=np.float64) for d in diffs_by_seed if len(d)]
    if not groups:
        raise ValueError("no items to compare")
    if len(groups) == 1:
        d = groups[0]
        return paired_bootstrap_diff(d.tolist(), [0.0] * len(d), seed=seed, n=n)
    mean = float(np.mean([g.mean() for g in groups]))
    flat = np.concatenate(groups)
    if np.all(flat == flat[0]):
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    s = len(groups)
    picks = rng.integers(0, s, size=(n, s))
    boot = np.empty((s, n, s))  # boot[g, b, j]: the j-th independent item resample of seed g
    for g, d in enumerate(groups):
        for j in range(s):
            boot[g, :, j] = d[rng.integers(0, len(d), size=(n, len(d)))].mean(axis=1)
    stats = boot[picks, np.arange(n)[:, None], np.arange(s)[None, :]].mean(axis=1)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return mean, float(lo), float(hi)


def diff_result(diffs_by_seed: dict[int, list[float]]) -> dict[str, Any] | None:
    """Summary of paired per-item differences a - b grouped by seed: mean, the interval of
    `hierarchical_diff`, the count of items and seeds, and (two seeds or more) the Student-t
    interval over the seeds' mean differences."""
    groups = {k: v for k, v in diffs_by_seed.items() if len(v)}
    if not groups:
        return None
    mean, lo, hi = hierarchical_diff(list(groups.values()))
    out: dict[str, Any] = {
        "mean": mean, "lo": lo, "hi": hi, "n_items": sum(len(v) for v in groups.values()),
        "n_seeds": len(groups), "items_per_seed": {str(k): len(v) for k, v in groups.items()},
        "excludes_zero": bool(lo > 0 or hi < 0),
    }
    if len(groups) > 1:
        seed_means = [float(np.mean(v)) for v in groups.values()]
        _, slo, shi = paired_diff_over_seeds(seed_means, [0.0] * len(seed_means))
        out.update(seed_lo=slo, seed_hi=shi)
    return out


def paired_metric(a: dict[int, Run], b: dict[int, Run], metric: str, split: str = GLOBAL_SPLIT,
                  ) -> dict[str, Any] | None:
    """Method a minus method b on `metric`, paired over the items both evaluated (by id, same
    prompt and reference) in each seed both ran; None when they share no item."""
    diffs: dict[int, list[float]] = {}
    for seed in sorted(set(a) & set(b)):
        ia, ib = a[seed].items(metric, split), b[seed].items(metric, split)
        common = [k for k in sorted(ia) if k in ib and ia[k][1] == ib[k][1]]
        diffs[seed] = [ia[k][0] - ib[k][0] for k in common]
    return diff_result(diffs)


def paired_table(methods: dict[str, dict[int, Run]], metrics: tuple[str, ...] = ("accuracy", "hallucination",
                 "loss", "rougeL"), pairs: list[tuple[str, str]] | None = None) -> list[dict[str, Any]]:
    """Paired differences for each pair of methods (all pairs, or `pairs`), per metric: one
    entry per pair with `a`, `b`, and per metric the `diff_result` or None (no shared items)."""
    labels = list(methods)
    if pairs is None:
        pairs = [(labels[i], labels[j]) for i in range(len(labels)) for j in range(i + 1, len(labels))]
    out = []
    for la, lb in pairs:
        entry: dict[str, Any] = {"a": la, "b": lb}
        for metric in metrics:
            entry[metric] = paired_metric(methods[la], methods[lb], metric)
        out.append(entry)
    return out


def finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)
