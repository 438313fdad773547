"""`fedsdr grid`: methods x {raw, + FedSD} x seeds from one file, each cell a normal run,
resumable, then one report (results.json/.md, claims.md, plots, report.html).

The grid file (TOML)::

    name = "claims"                  # optional: the report's title (default: the file's name)
    base = "quickstart.toml"         # the run config every cell extends (relative to this file)
    seeds = [0, 1, 2]                # every cell runs once per seed (sets `seed`)

    [config]                         # optional: every cell's overrides, keys as in a run config
    federation.rounds = 3
    eval.suites = ["general"]

    [[method]]                       # one entry per method
    algorithm = "fedavg"             # a name in fedsdr.algorithms.ALGORITHMS
    fedsd = ["none", "paper", "safe"]  # variants: "none" raw data; "paper" / "safe" FedSD with that
                                       # filter profile (default ["none"]; algorithms that always
                                       # distill, FedSDR, take profiles only and default to ["paper"])
    name = "FedAvg"                  # optional: its label (default: the algorithm's name)
    [method.config]                  # optional: this method's overrides
    federation.proximal_mu = 0.01

Each cell is `load_config(base, overrides)` with, in this order: `[config]`, `[method.config]`,
the variant (`distill.enabled`, `distill.filters.profile`), `federation.algorithm`, `seed`,
`name`, then the command line's `--set`. It runs in `OUT/cells/<cell>-seed<k>/` exactly as
`fedsdr run --config BASE --set ... --out that-folder` would (grid.json lists that command per
cell). A finished cell (summary.json for every planned round) is skipped; an interrupted one
resumes from its last checkpoint; a folder holding another config is refused before anything
runs. `fedsdr grid` runs each cell in a fresh Python process (`run_grid(fresh_process=True)`;
`--in-process` does not): a long grid run in one process slowed down cell by cell (the same
cell took 101 s in a fresh process and 159 s as the 36th cell of one), so the process now ends
with the cell. Every cell uses the same `model.cache_dir`: the base model's evaluations (round
0) are cached there, keyed by model, records and settings, so each seed's round 0 is computed
once and shared by all its cells.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsdr.config import ConfigError, RunConfig, load_config

GRID_KEYS = {"name", "base", "seeds", "config", "method"}
METHOD_KEYS = {"algorithm", "fedsd", "name", "config"}
VARIANTS = ("none", "paper", "safe")


@dataclass
class Cell:
    cell: str  # folder stem, without the seed
    label: str  # method label in tables ("FedAvg+FedSD(paper)")
    method: str  # the method without its variant ("FedAvg")
    algorithm: str
    variant: str  # "none", "paper", "safe"
    seed: int
    overrides: list[str]
    config: RunConfig

    @property
    def folder(self) -> str:
        return f"cells/{self.cell}-seed{self.seed}"


@dataclass
class GridSpec:
    path: Path
    name: str
    base: Path
    seeds: list[int]
    cells: list[Cell] = field(default_factory=list)
    toml: str = ""


def _toml_value(value: Any) -> str:
    """A value as TOML text for a `key=value` override (what `--set` parses)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ConfigError(f"cannot use {value!r} as a config value in a grid")


def flatten(table: dict[str, Any], prefix: str = "") -> list[str]:
    """Nested TOML tables as `a.b.c=value` overrides."""
    out = []
    for key, value in table.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.extend(flatten(value, path + "."))
        else:
            out.append(f"{path}={_toml_value(value)}")
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "method"


def _variant_overrides(variant: str) -> list[str]:
    if variant == "none":
        return ["distill.enabled=false"]
    from fedsdr.config import FilterConfig

    if "profile" in FilterConfig.model_fields:
        return ["distill.enabled=true", f'distill.filters.profile="{variant}"']
    if variant == "paper":
        raise ConfigError("fedsd = \"paper\" needs distill.filters.profile, which this fedsdr does not have")
    return ["distill.enabled=true"]  # the filters' defaults are the safe profile


def load_grid(path: str | Path, overrides: list[str] | None = None) -> GridSpec:
    """Read a grid file and build every cell's config (each validated, its algorithm checked:
    a bad name stops here, before anything runs)."""
    from fedsdr.algorithms import get_algorithm
    from fedsdr.report.collect import DISTILLING, algorithm_name, method_label

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError(f"grid file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    unknown = sorted(set(data) - GRID_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown grid key(s) {unknown}; a grid has {sorted(GRID_KEYS)}")
    if not data.get("base"):
        raise ConfigError(f"{path}: `base` (the run config every cell extends) is required")
    base = (path.parent / data["base"]).resolve()
    seeds = data.get("seeds", [0])
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
            and len(set(seeds)) == len(seeds)):
        raise ConfigError(f"{path}: seeds must be a non-empty list of distinct integers, got {seeds!r}")
    common = flatten(data.get("config", {}))
    methods = data.get("method", [])
    if not methods or not isinstance(methods, list):
        raise ConfigError(f"{path}: no [[method]] entries")
    grid = GridSpec(path, str(data.get("name") or path.stem), base, seeds, toml=text)
    seen: dict[str, str] = {}
    for i, entry in enumerate(methods):
        where = f"{path}: method {i + 1}"
        bad = sorted(set(entry) - METHOD_KEYS)
        if bad:
            raise ConfigError(f"{where}: unknown key(s) {bad}; a method has {sorted(METHOD_KEYS)}")
        algorithm = entry.get("algorithm")
        if not algorithm or not isinstance(algorithm, str):
            raise ConfigError(f"{where}: `algorithm` is required")
        always = algorithm in DISTILLING
        variants = entry.get("fedsd", ["paper"] if always else ["none"])
        if isinstance(variants, str):
            variants = [variants]
        wrong = [v for v in variants if v not in VARIANTS]
        if wrong or not variants or len(set(variants)) != len(variants):
            raise ConfigError(f"{where}: fedsd must list distinct variants from {list(VARIANTS)}, got {variants!r}")
        if always and "none" in variants:
            raise ConfigError(f"{where}: {algorithm} always trains on distilled data; give fedsd profiles "
                              "(\"paper\", \"safe\"), not \"none\"")
        name = str(entry.get("name") or algorithm_name(algorithm))
        method_overrides = flatten(entry.get("config", {}))
        for variant in variants:
            profile = None if variant == "none" else variant
            if always:
                label = name + (f"({variant})" if len(variants) > 1 else "")
                slug = _slug(name) + (f"-{variant}" if len(variants) > 1 else "")
            else:
                label = method_label(algorithm, profile, name)
                slug = _slug(name) + ("" if profile is None else f"-fedsd-{variant}")
            if slug in seen:
                raise ConfigError(f"{where}: cell {slug!r} ({label}) twice (also {seen[slug]}); give one a `name`")
            seen[slug] = label
            for seed in seeds:
                cell_overrides = [*common, *method_overrides, *_variant_overrides(variant),
                                  f'federation.algorithm="{algorithm}"', f"seed={seed}", f'name="{slug}"',
                                  *(overrides or [])]
                try:
                    cfg = load_config(base, cell_overrides)
                    get_algorithm(cfg)  # an unknown algorithm stops the grid here, before any cell runs
                except ConfigError as e:
                    raise ConfigError(f"{where} ({label}, seed {seed}): {e}") from None
                grid.cells.append(Cell(slug, label, name, algorithm, variant, seed, cell_overrides, cfg))
    caches = {c.config.model.cache_dir for c in grid.cells}
    if len(caches) > 1:
        raise ConfigError(f"{path}: cells use different model.cache_dir {sorted(caches)}; the base model's "
                          "round-0 evaluation is shared through one cache: use the same one everywhere")
    # seed-major: every method of seed 0 first, so partial grids already compare every method
    order = {slug: i for i, slug in enumerate(seen)}
    grid.cells.sort(key=lambda c: (seeds.index(c.seed), order[c.cell]))
    return grid


def cell_command(grid: GridSpec, cell: Cell, out: Path) -> str:
    """The `fedsdr run` command that runs this cell on its own."""
    parts = ["fedsdr", "run", "--config", str(grid.base)]
    for item in cell.overrides:
        parts += ["--set", item]
    parts += ["--out", str(out / cell.folder)]
    return shlex.join(parts)


# state of a cell's folder ---------------------------------------------------------------
def cell_state(cell: Cell, folder: Path) -> str:
    """"new", "finished", "partial" (resumable), or a refusal (text starting "refused")."""
    from fedsdr.runs import RunDir

    run = RunDir(folder)
    why = run.refusal(cell.config, given="in the grid")
    if why:
        return f"refused: {why}"
    rounds = cell.config.federation.rounds
    summary_path = folder / "summary.json"
    if summary_path.exists() and run.last_checkpoint() == rounds:
        try:
            if json.loads(summary_path.read_text(encoding="utf-8")).get("rounds") == rounds:
                return "finished"
        except ValueError:
            pass
    return "partial" if run.last_checkpoint() else "new"


# running ------------------------------------------------------------------------------------
def write_manifest(grid: GridSpec, out: Path, command: str | None = None) -> None:
    from fedsdr.io import write_json_atomic

    write_json_atomic(out / "grid.json", {
        "name": grid.name, "config_path": str(grid.path), "base": str(grid.base), "seeds": grid.seeds,
        "command": command, "toml": grid.toml,
        "cells": [{"cell": c.cell, "folder": c.folder, "label": c.label, "method": c.method,
                   "algorithm": c.algorithm, "fedsd": c.variant, "seed": c.seed, "overrides": c.overrides,
                   "command": cell_command(grid, c, out)} for c in grid.cells],
    })


def run_grid(grid: GridSpec, out: Path, command: str | None = None, report: bool = True,
             fresh_process: bool = False) -> dict[str, str]:
    """Run every cell not finished yet (seed by seed), then write the report. Returns each cell
    folder's outcome: "skipped", "ran" or "resumed". With `fresh_process` each cell runs in a
    new Python process (`python -m fedsdr.grid FOLDER`), as `fedsdr grid` does by default."""
    from fedsdr.runs import folder_lock

    out = Path(out)
    with folder_lock(out):  # one grid process per folder (each cell is locked too while it runs)
        return _run_cells(grid, out, command, report, fresh_process)


def _run_in_fresh_process(folder: Path, resume: bool) -> dict[str, Any] | None:
    """Run the cell whose config.json is in `folder` in a new interpreter; its summary."""
    argv = [sys.executable, "-m", "fedsdr.grid", str(folder), *(["--resume"] if resume else [])]
    done = subprocess.run(argv, check=False)
    if done.returncode != 0:
        if done.returncode in (-2, 130):  # Ctrl-C reached the cell too
            raise KeyboardInterrupt
        raise RuntimeError(f"the cell in {folder} failed (exit status {done.returncode}); its output is above. "
                           f"Rerun the grid to resume it, or run it alone: {shlex.join(argv)}")
    summary = folder / "summary.json"
    return json.loads(summary.read_text(encoding="utf-8")) if summary.exists() else None


def _run_cells(grid: GridSpec, out: Path, command: str | None, report: bool,
               fresh_process: bool) -> dict[str, str]:
    from rich.markup import escape

    from fedsdr.console import console
    from fedsdr.federation import engine
    from fedsdr.io import write_json_atomic
    from fedsdr.runs import RunDir

    states = {c.folder: cell_state(c, out / c.folder) for c in grid.cells}
    refused = [f"{folder}: {state}" for folder, state in states.items() if state.startswith("refused")]
    if refused:
        raise ConfigError("the grid's cells disagree with folders already in " + str(out) + "; nothing ran:\n  "
                          + "\n  ".join(refused) + "\nUse another --out, or remove those folders to run them again.")
    write_manifest(grid, out, command)
    cache = grid.cells[0].config.model.cache_dir or "the default fedsdr cache"
    console.print(f"[bold]grid {escape(grid.name)}[/]: {len(grid.cells)} cells ({len({c.cell for c in grid.cells})} methods x "
                  f"{len(grid.seeds)} seeds) in {out}; base-model evaluations shared through {cache}")
    outcome: dict[str, str] = {}
    started = time.perf_counter()
    ran = 0
    todo = sum(1 for s in states.values() if s != "finished")
    for i, cell in enumerate(grid.cells, 1):
        folder = out / cell.folder
        head = escape(f"[{i}/{len(grid.cells)}] {cell.label} seed {cell.seed}")
        if states[cell.folder] == "finished":
            console.print(f"{head}: finished, skipped")
            outcome[cell.folder] = "skipped"
            continue
        run = RunDir(folder)
        resume = states[cell.folder] == "partial"
        with run.lock():  # a `fedsdr run` on this cell's folder at the same time is refused
            if not resume:
                run.clear()  # a cell that never finished round 1 leaves client disks: not reused
                run.write_config(cell.config)
            console.print(f"{head}: {'resuming after round ' + str(run.last_checkpoint()) if resume else 'running'} "
                          f"in {escape(str(folder))}")
            t0 = time.perf_counter()
            if fresh_process:
                summary = _run_in_fresh_process(folder, resume)
            else:
                summary = engine.run_federation(cell.config, run, resume=resume)
            seconds = time.perf_counter() - t0
            timing = folder / "grid-timing.json"
            before = json.loads(timing.read_text(encoding="utf-8")) if resume and timing.exists() else {}
            write_json_atomic(timing, {"wall_seconds": before.get("wall_seconds", 0.0) + seconds,
                                       "sessions": before.get("sessions", 0) + 1})
        ran += 1
        outcome[cell.folder] = "resumed" if resume else "ran"
        final = (summary or {}).get("final") or {}
        eta = (time.perf_counter() - started) / ran * (todo - ran)
        console.print(f"{head}: done in {seconds:.0f} s (loss {final.get('loss', float('nan')):.4f}, "
                      f"accuracy {final.get('accuracy', float('nan')):.3f}); about {eta / 60:.1f} min left")
    if report:
        from fedsdr.report import build_report

        files = build_report(out)
        verdicts = ", ".join(f"claim {k}: {v}" for k, v in files.verdicts.items())
        console.print(f"[bold]report[/]: {files.html} ({verdicts})")
    return outcome


def grid_command(argv: list[str] | None = None) -> str:
    return shlex.join(["fedsdr", *(sys.argv[1:] if argv is None else argv)])


def _cell_main(argv: list[str] | None = None) -> int:
    """`python -m fedsdr.grid FOLDER [--resume]`: one cell, from the config.json the grid wrote
    there (the grid process holds the folder's lock meanwhile)."""
    import argparse

    from fedsdr.console import live
    from fedsdr.federation import engine
    from fedsdr.runs import RunDir

    parser = argparse.ArgumentParser(prog="python -m fedsdr.grid", description=_cell_main.__doc__)
    parser.add_argument("folder")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    run = RunDir(Path(args.folder))
    with live():
        engine.run_federation(run.read_config(), run, resume=args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(_cell_main())
