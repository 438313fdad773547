"""Plots as PNG files (matplotlib's Agg canvas; no display, no global pyplot state):
per-round curves with seed bands, bars per method with 95% intervals, and the Rewrite Paradox
scatter (each client's rewrite length ratio against its rewrites' answer consistency)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedsdr.report.collect import Run
from fedsdr.report.summary import GLOBAL_SPLIT

CURVE_METRICS = (("loss", GLOBAL_SPLIT, "reference loss"), ("accuracy", GLOBAL_SPLIT, "accuracy"))
BAR_METRICS = (("accuracy", GLOBAL_SPLIT, "accuracy"), ("hallucination", GLOBAL_SPLIT, "hallucination"),
               ("gen_len", GLOBAL_SPLIT, "generated length (words)"), ("loss", GLOBAL_SPLIT, "reference loss"))


@dataclass
class Plot:
    path: Path
    title: str
    caption: str


def _figure(ncols: int, width: float = 4.6, height: float = 3.6) -> tuple[Any, list[Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    return path


def curves(methods: dict[str, dict[int, Run]], path: Path) -> Plot | None:
    """Per round, the global model's figures on the global held-out set (and the general suite's
    accuracy when present): mean over seeds, band mean ± std (one seed: ± 1.96 se)."""
    from matplotlib.ticker import MaxNLocator

    panels = list(CURVE_METRICS)
    if any(run.curve("accuracy", "general") for runs in methods.values() for run in runs.values()):
        panels.append(("accuracy", "general", "general suite accuracy"))
    fig, axes = _figure(len(panels))
    colors = _colors(len(methods))
    drawn = False
    for ax, (metric, split, name) in zip(axes, panels, strict=True):
        for color, (label, runs) in zip(colors, methods.items(), strict=True):
            per_seed = [run.curve(metric, split) for run in runs.values()]
            rounds = sorted(set.intersection(*(set(c) for c in per_seed))) if per_seed else []
            if not rounds:
                continue
            values = np.array([[c[r][0] for r in rounds] for c in per_seed])
            mean = values.mean(axis=0)
            if len(per_seed) > 1:
                half = values.std(axis=0, ddof=1)
            else:
                half = np.array([1.96 * (per_seed[0][r][1] or 0.0) for r in rounds])
            ax.plot(rounds, mean, marker="o", color=color, label=label, linewidth=1.5, markersize=3)
            ax.fill_between(rounds, mean - half, mean + half, color=color, alpha=0.15, linewidth=0)
            drawn = True
        ax.set_title(f"{name} ({split})", fontsize=10)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if not drawn:
        return None
    axes[-1].legend(fontsize=7, loc="best")
    return Plot(_save(fig, path), "Per-round curves",
                "Global model per round, mean over seeds; band: ± one standard deviation over seeds (one seed: "
                "± 1.96 se over items). Accuracy is measured at the rounds that generate answers.")


def bars(results: dict[str, Any], path: Path) -> Plot | None:
    """Last round, one bar per method and metric: mean over seeds with its 95% interval."""
    methods: dict[str, Any] = results["methods"]
    panels = list(BAR_METRICS)
    if any("general" in m["splits"] for m in methods.values()):
        panels.append(("accuracy", "general", "general suite accuracy"))
    panels = [p for p in panels if any(((m["splits"].get(p[1]) or {}).get("all") or {}).get(p[0])
                                       for m in methods.values())]
    if not panels:
        return None
    fig, axes = _figure(len(panels), width=max(3.6, 0.55 * len(methods) + 1.5), height=4.2)
    labels = list(methods)
    colors = _colors(len(labels))
    for ax, (metric, split, name) in zip(axes, panels, strict=True):
        means, lows, highs = [], [], []
        for label in labels:
            stat = ((methods[label]["splits"].get(split) or {}).get("all") or {}).get(metric)
            mean = stat["mean"] if stat else np.nan
            lo = stat.get("lo") if stat else None
            hi = stat.get("hi") if stat else None
            means.append(mean)
            lows.append(0.0 if lo is None else max(0.0, mean - lo))
            highs.append(0.0 if hi is None else max(0.0, hi - mean))
        x = np.arange(len(labels))
        ax.bar(x, means, color=colors, yerr=[lows, highs], capsize=3, error_kw={"linewidth": 1})
        ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{name} ({split})", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    return Plot(_save(fig, path), "Methods at the last round",
                "Mean over seeds; error bars: 95% interval (Student t over seeds; one seed: ± 1.96 se over items).")


def paradox(runs_by_seed: dict[int, Run], path: Path) -> Plot | None:
    """Each client's FedSD rewrites: mean length ratio (rewrite / raw response, words) against
    answer consistency (share of verifiable rewrites whose answer is still right), before
    filtering (filled) and after (the training targets, hollow); one point per client and seed."""
    points = []
    for seed, run in runs_by_seed.items():
        domains = run.client_domains()
        for client, diag in run.rewrite_diagnostics().items():
            if diag.get("consistency_before") is None or diag.get("length_ratio_mean_before") is None:
                continue
            points.append((client, seed, "/".join(domains.get(client, [])), diag))
    if not points:
        return None
    fig, axes = _figure(1, width=6.4, height=4.6)
    ax = axes[0]
    clients = sorted({p[0] for p in points}, key=lambda c: (len(c), c))
    colors = dict(zip(clients, _colors(len(clients)), strict=True))
    markers = "osD^vP*X"
    seeds = sorted({p[1] for p in points})
    for client, seed, domain, diag in points:
        marker = markers[seeds.index(seed) % len(markers)]
        ax.scatter(diag["length_ratio_mean_before"], diag["consistency_before"], color=colors[client], marker=marker,
                   s=40, label=f"{client} ({domain})" if domain else client)
        if diag.get("length_ratio_mean_after") is not None and diag.get("consistency_after") is not None:
            ax.scatter(diag["length_ratio_mean_after"], diag["consistency_after"], facecolors="none",
                       edgecolors=[colors[client]], marker=marker, s=40)
            ax.plot([diag["length_ratio_mean_before"], diag["length_ratio_mean_after"]],
                    [diag["consistency_before"], diag["consistency_after"]], color=colors[client], alpha=0.3,
                    linewidth=0.8)
    handles, names = ax.get_legend_handles_labels()
    unique = dict(zip(names, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="best")
    ax.axvline(1.0, color="gray", linestyle=":", linewidth=0.8)
    ax.set_xlabel("rewrite length ratio (words rewrite / words raw)")
    ax.set_ylabel("answer consistency of rewrites")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.set_title("Rewrite Paradox, per client", fontsize=10)
    return Plot(_save(fig, path), "Rewrite Paradox",
                "Each client's rewrites by the base model: filled, every rewrite; hollow, the training targets "
                f"after filtering; marker shape: seed ({', '.join(str(s) for s in seeds)}). Clients without "
                "verifiable records have no consistency and are not shown.")
