"""Reports: tables per round and per run (summary.json), comparisons across runs
(`fedsdr compare`), and the report of a grid, a folder of runs or one run (`fedsdr report`:
results.json/.md, claims.md, plots, report.html).

    summary.py  summarize(): one run's summary.json
    tables.py   round tables, the comparison table with 95% intervals, paired differences, results.md
    collect.py  finished run folders read back; figures over seeds; paired differences over items
    claims.py   the three claims, each held / not held / inconclusive
    plots.py    PNG plots (matplotlib, Agg canvas)
    html.py     the self-contained report.html
    build.py    build_report(folder): all of the above from finished folders

Importing this package stays light (no matplotlib): the server imports it every run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedsdr.report.summary import summarize
from fedsdr.report.tables import (
    EVAL_COLUMNS,
    comparison_rows,
    comparison_table,
    print_round,
    round_table,
    write_comparison,
)

if TYPE_CHECKING:
    from fedsdr.report.build import ReportFiles


def build_report(folder: Any) -> ReportFiles:
    """Write results.json/.md, claims.md, plots and report.html for a grid, a folder of runs or a run."""
    from fedsdr.report.build import build_report as build

    return build(folder)


__all__ = ["EVAL_COLUMNS", "build_report", "comparison_rows", "comparison_table", "print_round", "round_table",
           "summarize", "write_comparison"]
