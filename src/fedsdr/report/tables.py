"""Tables: per round (printed during a run), across runs (`fedsdr compare`: comparison.md/.json)
and across a grid's methods and seeds (results.md). One table structure, rendered to rich,
markdown and HTML."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from fedsdr.config import RunConfig
from fedsdr.console import console
from fedsdr.io import write_json_atomic, write_text_atomic
from fedsdr.report.collect import Z95, algorithm_name, method_label
from fedsdr.report.summary import GLOBAL_SPLIT, fedsd_profile, split_of

EVAL_COLUMNS = ("loss", "accuracy", "hallucination", "rougeL", "gen_len", "repeat4")
PAIRED_METRICS = ("accuracy", "hallucination", "loss", "rougeL")
SHORT = {"accuracy": "acc", "hallucination": "halluc.", "loss": "loss", "rougeL": "rougeL", "gen_len": "gen len",
         "repeat4": "rep4", "length_ratio": "len ratio", "acc_norm": "acc_norm", "perplexity": "ppl"}


@dataclass
class TableData:
    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""
    first_left: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def to_markdown(table: TableData, level: int = 3) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    out = f"{'#' * level} {table.title}\n\n" if table.title else ""
    out += "| " + " | ".join(cell(h) for h in table.header) + " |\n"
    out += "|" + "|".join("---" if i == 0 and table.first_left else "---:" for i in range(len(table.header))) + "|\n"
    out += "".join("| " + " | ".join(cell(c) for c in row) + " |\n" for row in table.rows)
    if table.note:
        out += f"\n{table.note}\n"
    return out + "\n"


def to_rich(table: TableData) -> Table:
    from rich.markup import escape

    out = Table(title=escape(table.title), caption=escape(table.note) if table.note else None)
    for i, h in enumerate(table.header):
        out.add_column(escape(h), justify="left" if i == 0 and table.first_left else "right", no_wrap=i == 0)
    for row in table.rows:
        out.add_row(*(escape(c) for c in row))
    return out


# formatting --------------------------------------------------------------------
def _digits(metric: str) -> int:
    return 1 if metric in ("gen_len",) else 3


def fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def fmt_ci(value: float | None, se: float | None, digits: int = 3) -> str:
    """"m ± h" with h the half-width of the 95% interval, 1.96 se."""
    if value is None:
        return "-"
    if se is None or not math.isfinite(se):
        return fmt(float(value), digits)
    return f"{value:.{digits}f} ± {Z95 * se:.{digits}f}"


def fmt_stat(stat: dict[str, Any] | None, digits: int = 3) -> str:
    """"mean ± std [lo, hi]" over seeds (one seed: "mean [lo, hi]", the interval over items)."""
    if not stat:
        return "-"
    text = f"{stat['mean']:.{digits}f}"
    if stat.get("std") is not None:
        text += f" ± {stat['std']:.{digits}f}"
    if stat.get("lo") is not None and stat.get("hi") is not None:
        text += f" [{stat['lo']:.{digits}f}, {stat['hi']:.{digits}f}]"
    return text


def fmt_diff(d: dict[str, Any] | None, digits: int = 3) -> str:
    """"+0.120 [+0.050, +0.190]*": the mean paired difference, its 95% interval, * when the
    interval excludes 0."""
    if not d:
        return "-"
    mark = "*" if d.get("excludes_zero") else ""
    return f"{d['mean']:+.{digits}f} [{d['lo']:+.{digits}f}, {d['hi']:+.{digits}f}]{mark}"


def fmt_spread(stat: dict[str, Any] | None, digits: int = 0) -> str:
    """"mean ± std" over seeds (costs: an interval of a cost says little)."""
    if not stat:
        return "-"
    text = f"{stat['mean']:.{digits}f}"
    return text + (f" ± {stat['std']:.{digits}f}" if stat.get("std") is not None else "")


def fmt_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


# per round ------------------------------------------------------------------------
def run_label(cfg: RunConfig) -> str:
    return method_label(cfg.federation.algorithm, fedsd_profile(cfg))


def round_table(cfg: RunConfig, server_round: int, rows: list[dict[str, Any]]) -> Table:
    from rich.markup import escape

    table = Table(title=escape(f"{cfg.name} ({run_label(cfg)}) round {server_round}"))
    table.add_column("scope")
    table.add_column("model")
    table.add_column("split")
    for col in ("train_loss", *EVAL_COLUMNS, "bytes_up"):
        table.add_column(col, justify="right")
    train = {r["scope"]: r for r in rows if r["kind"] == "train"}
    for r in rows:
        if r["kind"] != "eval":
            continue
        t = train.get(r["scope"], {}) if r.get("model", "global") == "global" else {}
        table.add_row(r["scope"], r.get("model", "global"), split_of(r), fmt(t.get("train_loss")),
                      *(fmt(r.get(c)) for c in EVAL_COLUMNS), fmt(t.get("bytes_up")))
    return table


def print_round(cfg: RunConfig, server_round: int, rows: list[dict[str, Any]]) -> None:
    console.print(round_table(cfg, server_round, rows))


# across runs (fedsdr compare) -------------------------------------------------------
def _label(summary: dict[str, Any]) -> str:
    profile = summary.get("fedsd_profile")
    if profile is None and summary.get("fedsd"):
        profile = ""
    return method_label(summary["algorithm"], profile)


def _pers(summary: dict[str, Any]) -> dict[str, Any]:
    clients = (summary.get("clients_final") or {}).get("personalized") or {}
    entry = clients.get("client_test", clients)  # summaries before splits: the means themselves
    return entry if isinstance(entry, dict) else {}


def comparison_rows(summaries: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Each run's last round, global model on the global held-out set: mean ± 95% CI (1.96 se)."""
    domains = sorted({d for s in summaries for d in ((s.get("final") or {}).get("domains") or {})})
    general = any(s.get("final_general") for s in summaries)
    header = ["method", *[f"acc {d}" for d in domains], "acc all", "halluc.", "rougeL", "gen len", "loss",
              *(["general acc"] if general else []), "pers. acc", "bytes up/client/round"]
    rows = []
    for s in summaries:
        final = s.get("final") or {}
        doms = final.get("domains") or {}
        pers = _pers(s)
        cells = []
        for d in domains:
            entry = doms.get(d) or {}
            key = "accuracy" if entry.get("accuracy") is not None else "rougeL"
            cells.append(fmt_ci(entry.get(key), entry.get(f"{key}_se")))
        gen = s.get("final_general") or {}
        rows.append([
            _label(s), *cells,
            *(fmt_ci(final.get(k), final.get(f"{k}_se"), _digits(k))
              for k in ("accuracy", "hallucination", "rougeL", "gen_len", "loss")),
            *([fmt_ci(gen.get("accuracy"), gen.get("accuracy_se"))] if general else []),
            fmt_ci(pers.get("accuracy"), pers.get("accuracy_se")),
            fmt(int(s["bytes_up_per_client_round"]) if s.get("bytes_up_per_client_round") else None),
        ])
    return header, rows


COMPARISON_TITLE = ("Global model on the global held-out set, last round: mean ± 95% CI (1.96 se over items; "
                    "open-ended domains show ROUGE-L in their column)")


def paired_rows(paired: list[dict[str, Any]], metrics: tuple[str, ...] = PAIRED_METRICS) -> TableData:
    header = ["A − B", *[f"Δ {SHORT.get(m, m)}" for m in metrics], "items x seeds"]
    rows = []
    for entry in paired:
        counts = [(d["n_items"], d["n_seeds"]) for m in metrics if (d := entry.get(m))]
        n_items, n_seeds = max(counts) if counts else (0, 0)
        rows.append([f"{entry['a']} − {entry['b']}", *[fmt_diff(entry.get(m), _digits(m)) for m in metrics],
                     f"{n_items} x {n_seeds}" if counts else "no shared items"])
    return TableData(
        "Paired differences on the same items (global held-out set, last round)", header, rows,
        note="Mean of A − B per record, paired by record id, with its 95% bootstrap interval over items "
             "(and seeds); * marks an interval that excludes 0. Lower is better for loss and hallucination.")


def comparison_table(summaries: list[dict[str, Any]]) -> Table:
    header, rows = comparison_rows(summaries)
    return to_rich(TableData(COMPARISON_TITLE, header, rows))


def paired_for_runs(run_dirs: list[Path]) -> list[dict[str, Any]]:
    """Paired differences between every two of these finished run folders."""
    from fedsdr.report.collect import _disambiguate, load_run, paired_table

    runs = [load_run(Path(p)) for p in run_dirs]
    runs = [r for r in runs if r.summary]
    _disambiguate(runs)
    methods: dict[str, dict[int, Any]] = {}
    for run in runs:
        label = run.label
        while label in methods:  # same method and seed twice: keep both apart
            label += "'"
        run.label = label
        methods[label] = {run.seed: run}
    return paired_table(methods)


def write_comparison(root: Path, summaries: list[dict[str, Any]], run_dirs: list[Path] | None = None,
                     paired: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """comparison.md (the table, then the paired differences when the run folders are given)
    and comparison.json ({"runs": summaries, "paired": [...]}). Returns the paired differences."""
    if paired is None:
        paired = paired_for_runs(run_dirs) if run_dirs else []
    header, rows = comparison_rows(summaries)
    md = to_markdown(TableData(COMPARISON_TITLE, header, rows))
    if paired:
        md += to_markdown(paired_rows(paired))
    write_text_atomic(Path(root) / "comparison.md", md)
    write_json_atomic(Path(root) / "comparison.json", {"runs": summaries, "paired": paired})
    return paired


# across a grid's methods and seeds ----------------------------------------------------
STAT_NOTE = ("mean ± std over seeds [95% interval: Student t over seeds; with one seed, ±1.96 se over items]. "
             "Open-ended domains show ROUGE-L in their accuracy column.")


def _stat(figures: dict[str, Any], key: str) -> dict[str, Any] | None:
    return figures.get(key) if figures else None


def results_tables(results: dict[str, Any]) -> list[TableData]:
    """The tables of results.md from results.json's `methods`."""
    methods: dict[str, Any] = results["methods"]
    tables = []
    domains = sorted({d for m in methods.values() for d in m["splits"].get(GLOBAL_SPLIT, {}) if d != "all"})
    overall_keys = ("accuracy", "hallucination", "rougeL", "gen_len", "repeat4", "loss")
    rows = []
    for label, m in methods.items():
        overall = (m["splits"].get(GLOBAL_SPLIT, {}).get("all")) or {}
        rows.append([label, str(len(m["seeds"])), *(fmt_stat(_stat(overall, k), _digits(k)) for k in overall_keys)])
    tables.append(TableData("Global model on the global held-out set (every client domain), last round",
                            ["method", "seeds", *(SHORT.get(k, k) for k in overall_keys)], rows, note=STAT_NOTE))
    if domains:
        rows = []
        for label, m in methods.items():
            split = m["splits"].get(GLOBAL_SPLIT, {})
            rows.append([label, *(fmt_stat((split.get(d) or {}).get("accuracy") or (split.get(d) or {}).get("rougeL"))
                                  for d in domains)])
        tables.append(TableData("Per domain: accuracy (ROUGE-L for open-ended domains), global model, last round",
                                ["method", *domains], rows, note=STAT_NOTE))
    other = sorted({s for m in methods.values() for s in m["splits"] if s != GLOBAL_SPLIT})
    for split in other:
        rows = []
        for label, m in methods.items():
            overall = (m["splits"].get(split) or {}).get("all") or {}
            base = (m["round0"].get(split) or {}).get("all") or {}
            rows.append([label, *(fmt_stat(_stat(overall, k), _digits(k)) for k in ("accuracy", "acc_norm", "loss")),
                         fmt_stat(_stat(base, "accuracy"))])
        tables.append(TableData(f"Global model on the held-out suite {split!r} (no client trains on it), last round",
                                ["method", "acc", "acc_norm", "loss", "acc at round 0"], rows, note=STAT_NOTE))
    labels = sorted({k for m in methods.values() for k in m["clients"]})
    if labels:
        rows = []
        for label, m in methods.items():
            for key in labels:
                figures = m["clients"].get(key)
                if figures:
                    rows.append([label, key, *(fmt_stat(_stat(figures, k), _digits(k))
                                               for k in ("accuracy", "hallucination", "rougeL", "loss"))])
        tables.append(TableData("Clients' own test splits, mean over clients, last round",
                                ["method", "model/split", "acc", "halluc.", "rougeL", "loss"], rows,
                                note="`personalized`: each client's own model (FedSDR: W0 + S_k + R). " + STAT_NOTE))
    rows = []
    for label, m in methods.items():
        base = (m["round0"].get(GLOBAL_SPLIT) or {}).get("all") or {}
        cost = m.get("cost") or {}
        rows.append([label, fmt_stat(_stat(base, "accuracy")), fmt_stat(_stat(base, "loss")),
                     fmt_bytes((cost.get("bytes_up_per_client_round") or {}).get("mean")),
                     fmt_bytes((cost.get("bytes_up_total") or {}).get("mean")),
                     fmt_spread(cost.get("wall_seconds")), fmt_spread(cost.get("train_seconds_total"))])
    tables.append(TableData("Round 0 (the base model) and cost",
                            ["method", "acc round 0", "loss round 0", "bytes up/client/round", "bytes up total",
                             "wall s", "train s (clients)"], rows,
                            note="Round 0 evaluates the base model; its evaluation is cached under the model cache "
                                 "and reused by every run with the same model, records and settings (in a grid: "
                                 "computed once per seed, shared by all cells). Costs: mean ± std over seeds; "
                                 "wall time of the sessions that completed a cell."))
    rows = []
    for label, m in methods.items():
        rw = m.get("rewrite")
        if rw:
            rows.append([label, *(fmt_stat(rw.get(k)) for k in ("consistency_before", "length_ratio_mean_before",
                                                                 "repeat4_before", "kept_rate",
                                                                 "consistency_after"))])
    if rows:
        tables.append(TableData("FedSD rewrites (all clients pooled)",
                                ["method", "consistency before", "len ratio before", "rep4 before", "kept",
                                 "consistency after"], rows,
                                note="`before`: every rewrite; `after`: the training targets once filters sent "
                                     "some back to the raw response. 1 - consistency is the rewrites' "
                                     "hallucination rate."))
    if results.get("paired"):
        table = paired_rows(results["paired"])
        table.title = f"Paired differences against {results['paired'][0]['b']} (global held-out set, last round)"
        tables.append(table)
    return tables


def results_markdown(results: dict[str, Any]) -> str:
    md = f"# Results: {results.get('title', '')}\n\n"
    if results.get("skipped"):
        md += "Left out (not finished): " + ", ".join(results["skipped"]) + "\n\n"
    return md + "".join(to_markdown(t) for t in results_tables(results))


__all__ = ["EVAL_COLUMNS", "TableData", "algorithm_name", "comparison_rows", "comparison_table", "fmt", "fmt_ci",
           "fmt_diff", "fmt_stat", "paired_rows", "print_round", "results_markdown", "results_tables",
           "round_table", "to_markdown", "to_rich", "write_comparison"]
