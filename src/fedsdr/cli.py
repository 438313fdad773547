"""The `fedsdr` command.

    fedsdr run --config FILE [--set key=value ...] [--out DIR] [--resume]
    fedsdr compare --config A --config B ... [--out DIR]     one table over several runs
    fedsdr grid --config GRID.toml --out DIR                methods x {raw, +FedSD} x seeds, then a report
    fedsdr report RUN_OR_GRID                               results, claims, plots, report.html from finished folders
    fedsdr distill --config FILE [--out DIR]                FedSD's rewriting step alone
    fedsdr export RUN_DIR [--round N] [--client K] --out DIR [--merge]
    fedsdr eval RUN_DIR --tasks T1,T2 [--round N] [--client K] [--limit L]   lm-eval (extra)
    fedsdr models prepare NAME
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path

from fedsdr.config import ConfigError, RunConfig, load_config
from fedsdr.data.schema import DataError
from fedsdr.memory import with_jemalloc


def _out_dir(cfg: RunConfig, out: str | None, config_path: str) -> Path:
    if out:
        return Path(out)
    if cfg.out_dir:
        return Path(cfg.out_dir)
    return Path("runs") / Path(config_path).stem


def check_inputs(cfg: RunConfig) -> None:
    """Bad data (unknown scorer, a numeric answer that is no number, a code record without tests,
    a malformed file...) or a misspelt model name stops here, before the model loads. The data
    is cached per process, so the run does not read it again."""
    from fedsdr.data.federated import build_federated_data
    from fedsdr.models.resolve import check_model_name

    check_model_name(cfg.model.name)
    build_federated_data(cfg.data, cfg.partition, cfg.seed)


def cmd_run(args: argparse.Namespace) -> int:
    from fedsdr.algorithms import get_algorithm
    from fedsdr.console import live
    from fedsdr.federation.engine import run_federation
    from fedsdr.runs import RunDir

    if args.resume:
        if not args.out:
            raise ConfigError("--resume needs --out RUN_DIR (the folder of the run to continue)")
        run = RunDir(Path(args.out))
        cfg = run.read_config()
        if args.set:
            raise ConfigError("--resume continues a run with its saved config; --set is not allowed")
        check_inputs(cfg)
    else:
        cfg = load_config(args.config, args.set)
        get_algorithm(cfg)  # an unknown algorithm stops here, before anything loads
        check_inputs(cfg)
        run = RunDir(_out_dir(cfg, args.out, args.config))
    with run.lock():  # one fedsdr process per run folder
        if args.resume:
            run.verify_checkpoint()  # a corrupt checkpoint stops here, named
        else:
            if run.last_checkpoint() and not args.force:
                raise ConfigError(f"{run.root} already holds a run; pass --resume to continue it, "
                                  "--force to start over, or another --out")
            run.clear()  # nothing of an earlier run is reused: checkpoints, client disks, metrics
            run.write_config(cfg)
        started = time.perf_counter()
        with live():
            summary = run_federation(cfg, run, resume=args.resume)
    print_outcome(cfg, summary, run.root, time.perf_counter() - started)
    return 0


def print_outcome(cfg: RunConfig, summary: dict, root: Path, seconds: float) -> None:
    from fedsdr.console import console

    final, first = summary.get("final") or {}, summary.get("round0") or {}
    console.print(
        f"[bold]{cfg.name}[/]: global held-out loss {first.get('loss', float('nan')):.4f} (round 0) -> "
        f"{final.get('loss', float('nan')):.4f} (round {summary['rounds']}); {seconds:.0f} s; outputs in {root}"
    )
    if summary.get("dp"):
        from fedsdr.dp import describe

        console.print(describe(summary))


def cmd_compare(args: argparse.Namespace) -> int:
    from fedsdr.algorithms import get_algorithm
    from fedsdr.console import console, live
    from fedsdr.federation.engine import run_federation
    from fedsdr.report import comparison_table, write_comparison
    from fedsdr.report.tables import paired_rows, to_rich
    from fedsdr.runs import RunDir

    root = Path(args.out or "runs/compare")
    configs = [load_config(path, args.set) for path in args.config]
    for cfg in configs:  # every config checked before the first run starts
        get_algorithm(cfg)
        check_inputs(cfg)
    runs = [RunDir(root / Path(path).stem) for path in args.config]
    # a folder is resumed only with the config it was started with
    refused = [f"{run.root}: {why}" for run, cfg in zip(runs, configs, strict=True)
               if (why := run.refusal(cfg, given="in --config"))]
    if refused:
        raise ConfigError(f"compare cannot start or resume folders in {root}; nothing ran:\n  " + "\n  ".join(refused)
                          + "\nUse another --out, or remove those folders to run them again.")
    summaries, folders = [], []
    with ExitStack() as locks, live():
        for run in runs:  # every folder is this process's until the comparison ends
            locks.enter_context(run.lock())
        for run, cfg in zip(runs, configs, strict=True):
            resume = bool(run.last_checkpoint())
            if not resume:
                run.clear()
                run.write_config(cfg)
            started = time.perf_counter()
            summaries.append(run_federation(cfg, run, resume=resume))
            folders.append(run.root)
            print_outcome(cfg, summaries[-1], run.root, time.perf_counter() - started)
    console.print(comparison_table(summaries))
    paired = write_comparison(root, summaries, run_dirs=folders)
    if paired:
        console.print(to_rich(paired_rows(paired)))
    console.print(f"tables in {root / 'comparison.md'}; `fedsdr report {root}` draws plots, claims and report.html")
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    """Methods x {raw, +FedSD} x seeds from one grid file, each cell a run in OUT/cells/, then
    the report (results.json/.md, claims.md, plots/, report.html)."""
    from fedsdr.console import live
    from fedsdr.grid import grid_command, load_grid, run_grid

    grid = load_grid(args.config, args.set)  # every cell built and its algorithm checked first
    checked: set[str] = set()
    for cell in grid.cells:  # each distinct data config and model checked once, before any cell runs
        key = cell.config.data.model_dump_json() + cell.config.model.name
        if key not in checked:
            checked.add(key)
            check_inputs(cell.config)
    out = Path(args.out or Path("runs") / Path(args.config).stem)
    try:
        # a cell in its own process opens its own progress display
        with live() if args.in_process else nullcontext():
            run_grid(grid, out, command=grid_command(), report=not args.no_report,
                     fresh_process=not args.in_process)
    except KeyboardInterrupt:
        print(f"interrupted; finished cells and completed rounds are kept: rerun the same command to resume, "
              f"or `fedsdr report {out}` for what is finished", file=sys.stderr)
        return 130
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Redraw results, claims, plots and report.html from finished folders alone."""
    from fedsdr.console import console
    from fedsdr.report import build_report

    files = build_report(Path(args.folder))
    for path in (files.results_md, files.claims_md, files.results_json, *files.plots, files.html):
        if path is not None:
            console.print(f"wrote {path}")
    if files.verdicts:
        console.print(", ".join(f"claim {k}: {v}" for k, v in files.verdicts.items()))
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    """FedSD's rewriting step alone: every client's training data rewritten by the base model
    (as before round 1), each client's distilled set and diagnostics on its disk, one table."""
    from fedsdr.algorithms import get_algorithm
    from fedsdr.algorithms.fedsd import client_distilled_set
    from fedsdr.console import console, live
    from fedsdr.distill import render_table, summarize
    from fedsdr.federation.client import new_session
    from fedsdr.io import write_json_atomic
    from fedsdr.models.adapters import fresh_adapter_state
    from fedsdr.runs import RunDir

    cfg = load_config(args.config, args.set)
    run = RunDir(Path(args.out) if args.out else _out_dir(cfg, None, args.config))
    adapter = get_algorithm(cfg).global_adapter
    check_inputs(cfg)
    per_client: dict[str, dict] = {}
    all_rows = []
    with live():
        for client_id in range(cfg.partition.num_clients):
            session = new_session(cfg, client_id, run.clients)
            unused = fresh_adapter_state(session.model, adapter, 0)  # round 1 rewrites with W0 only
            client_distilled_set(session, 1, adapter, unused)
            per_client[run.client(client_id).root.name] = summarize(session.distilled_rows)
            all_rows.extend(session.distilled_rows)
    per_client["all"] = summarize(all_rows)
    write_json_atomic(run.root / "distill-diagnostics.json", per_client)
    console.print(render_table(per_client))
    console.print(f"distilled sets and diagnostics in {run.clients}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fedsdr.export import export_run

    out = export_run(Path(args.run_dir), Path(args.out), server_round=args.round, client=args.client,
                     merge=args.merge)
    print(f"exported to {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from fedsdr.lm_eval_bridge import run_lm_eval

    run_lm_eval(Path(args.run_dir), args.tasks.split(","), server_round=args.round, client=args.client,
                limit=args.limit, batch_size=args.batch_size, include_path=args.include_path,
                num_fewshot=args.num_fewshot, log_samples=args.log_samples,
                apply_chat_template=args.apply_chat_template)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from fedsdr.models.bundled import BUNDLED_MODELS, prepare_bundled

    if args.name not in BUNDLED_MODELS:
        raise ConfigError(f"unknown bundled model {args.name!r}; known: {sorted(BUNDLED_MODELS)}")
    path = prepare_bundled(args.name, Path(args.cache_dir) if args.cache_dir else None)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsdr", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def config_args(p: argparse.ArgumentParser, multiple: bool = False) -> None:
        p.add_argument("--config", required=not multiple or True, action="append" if multiple else "store",
                       help="TOML config file" + (" (repeat for several runs)" if multiple else ""))
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set federation.rounds=5 (repeatable)")
        p.add_argument("--out", help="output folder")

    p = sub.add_parser("run", help="run federated fine-tuning")
    p.add_argument("--config", help="TOML config file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set federation.rounds=5 (repeatable)")
    p.add_argument("--out", help="output folder (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last complete round")
    p.add_argument("--force", action="store_true", help="start over: remove the earlier run's checkpoints, client disks and metrics in --out")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compare", help="run several configs on the same clients and print one table")
    config_args(p, multiple=True)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("grid", help="run methods x {raw, +FedSD} x seeds from a grid file, then write the report")
    p.add_argument("--config", required=True, help="grid TOML file (see fedsdr.grid)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value in every cell, e.g. --set federation.rounds=2 (repeatable)")
    p.add_argument("--out", help="output folder (default: runs/<grid file name>); rerun to resume")
    p.add_argument("--no-report", action="store_true", help="run the cells only (fedsdr report draws it later)")
    p.add_argument("--in-process", action="store_true",
                   help="run every cell in this process (default: a fresh process per cell, which keeps a long "
                        "grid as fast at its last cell as at its first)")
    p.set_defaults(func=cmd_grid)

    p = sub.add_parser("report", help="redraw results, claims, plots and report.html from finished folders")
    p.add_argument("folder", help="a grid folder, a folder of runs (fedsdr compare --out) or one run folder")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("distill", help="run FedSD's rewriting step alone and print its diagnostics")
    config_args(p)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("export", help="export adapters of a run as standard PEFT folders")
    p.add_argument("run_dir")
    p.add_argument("--round", type=int, default=None, help="checkpoint round (default: the last)")
    p.add_argument("--client", type=int, default=None, help="FedSDR: include this client's LoRA-S")
    p.add_argument("--merge", action="store_true", help="also write a merged model (base + adapters)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("eval", help="run lm-evaluation-harness tasks on a run's model (pip install -e '.[lm-eval]')")
    p.add_argument("run_dir")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--round", type=int, default=None, help="checkpoint round (default: the last)")
    p.add_argument("--client", type=int, default=None,
                   help="evaluate this client's personalized model (FedSDR: LoRA-R + its LoRA-S)")
    p.add_argument("--limit", type=int, default=None, help="at most this many items per task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--include-path", default=None, help="a folder of extra lm-eval task YAMLs")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--log-samples", action="store_true",
                   help="also write every scored item to RUN/lm-eval/round-NNN[-client-K].samples.jsonl")
    p.add_argument("--apply-chat-template", action="store_true",
                   help="wrap prompts in the model's chat template")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("models", help="manage bundled models")
    msub = p.add_subparsers(dest="models_command", required=True)
    mp = msub.add_parser("prepare", help="download and convert a bundled model into the cache")
    mp.add_argument("name")
    mp.add_argument("--cache-dir", default=None)
    mp.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the `fedsdr` command, not a call from Python: restart under jemalloc once
        try:
            with_jemalloc(sys.orig_argv[1:])
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) == "run" and not args.resume and not args.config:
        print("fedsdr run: --config FILE is required (or --resume --out RUN_DIR)", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; completed rounds are checkpointed: rerun with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
