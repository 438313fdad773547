"""Everything a report folder holds, redrawn from finished run folders alone:

    results.json   per method: figures over seeds (mean, std, 95% interval) per split and domain,
                   client means, cost, FedSD diagnostics; paired differences; the claims
    results.md     the same as tables
    claims.md      the three claims, each held / not held / inconclusive (grids and folders of runs)
    plots/         curves.png, bars.png, rewrite-paradox.png
    report.html    one self-contained page with all of the above, the commands and the configs
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fedsdr.report.html as page_html
import fedsdr.report.plots as plots
from fedsdr.io import write_json_atomic, write_text_atomic
from fedsdr.report.claims import _rewrite_runs, claims_markdown, decide_claims, methods_of
from fedsdr.report.collect import Collection, load_collection, method_results, paired_table
from fedsdr.report.tables import results_markdown
from fedsdr.runs import _clean


@dataclass
class ReportFiles:
    root: Path
    results_json: Path
    results_md: Path
    html: Path
    claims_md: Path | None = None
    plots: list[Path] = field(default_factory=list)
    verdicts: dict[int, str] = field(default_factory=dict)


def collection_results(collection: Collection) -> dict[str, Any]:
    methods = collection.methods()
    results: dict[str, Any] = {
        "title": collection.title, "kind": collection.kind, "root": str(collection.root),
        "skipped": collection.skipped,
        "methods": {label: method_results(runs) for label, runs in methods.items()},
    }
    labels = list(methods)
    if len(labels) > 1:
        results["paired"] = paired_table(methods, pairs=[(label, labels[0]) for label in labels[1:]])
    return results


def build_report(folder: Path) -> ReportFiles:
    """Write the report files of a grid folder, a folder of runs or one run folder (into it)."""
    collection = load_collection(Path(folder))
    if not collection.runs:
        raise FileNotFoundError(f"{folder}: no finished run to report on yet "
                                f"({', '.join(collection.skipped) or 'nothing started'})")
    root = collection.root
    results = collection_results(collection)
    files = ReportFiles(root, root / "results.json", root / "results.md", root / "report.html")
    claims = decide_claims(collection) if collection.kind != "run" else []
    claims_md = ""
    if claims:
        results["claims"] = [c.to_json() for c in claims]
        claims_md = claims_markdown(claims, collection.title)
        files.claims_md = root / "claims.md"
        write_text_atomic(files.claims_md, claims_md)
        files.verdicts = {c.number: c.verdict for c in claims}
    write_json_atomic(files.results_json, _clean(results))
    results_md = results_markdown(results)
    write_text_atomic(files.results_md, results_md)

    methods = collection.methods()
    drawn = [
        plots.curves(methods, root / "plots" / "curves.png"),
        plots.bars(results, root / "plots" / "bars.png"),
        plots.paradox(_rewrite_runs(methods_of(collection)), root / "plots" / "rewrite-paradox.png"),
    ]
    figures = [p for p in drawn if p is not None]
    files.plots = [p.path for p in figures]

    sections = []
    if claims_md:
        sections.append(("Claims", page_html.markdown_to_html(claims_md.split("\n", 1)[1], shift=1)))
    sections.append(("Plots", "".join(page_html.image_tag(p) for p in figures)))
    sections.append(("Results", page_html.markdown_to_html(results_md.split("\n", 1)[1], shift=1)))
    sections.append(("Commands and configs", _provenance(collection)))
    write_text_atomic(files.html, page_html.page(f"fedsdr report: {collection.title}", sections))
    return files


def _provenance(collection: Collection) -> str:
    """The exact commands and configs behind the report."""
    h = page_html
    out = ""
    grid = collection.grid
    commands = []
    if grid:
        commands.append(grid.get("command") or f"fedsdr grid --config {grid.get('config_path', 'GRID.toml')} "
                                              f"--out {collection.root}")
    commands.append(f"fedsdr report {collection.root}")
    out += "<p>Commands (the grid command resumes: finished cells are skipped):</p>\n"
    out += h.code_block("\n".join(commands))
    if grid:
        out += f"<p>Grid file <code>{grid.get('config_path', '')}</code>:</p>\n" + h.code_block(grid.get("toml", ""))
        cells = "".join(
            f"<p><code>{c['folder']}</code> ({c['label']}, seed {c['seed']})</p>\n" + h.code_block(c.get("command", ""))
            for c in grid.get("cells", []))
        out += h.details(f"Each cell as a single run ({len(grid.get('cells', []))} cells)", cells)
    configs = "".join(
        f"<p><code>{run.root}</code> ({run.label}, seed {run.seed})</p>\n"
        + h.code_block(json.dumps(json.loads(run.config.to_json()), indent=1))
        for run in collection.runs)
    out += h.details(f"Resolved configs (config.json of {len(collection.runs)} runs)", configs)
    if collection.skipped:
        out += "<p>Left out (not finished): " + ", ".join(collection.skipped) + "</p>\n"
    return out
