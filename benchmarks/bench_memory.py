"""Peak resident memory (RSS) of federated runs, each measured in its own clean child process.

What it measures (each scenario is one fresh `python` child running one federated round
through the in-process engine, exactly what `fedsdr run` does: the round-0 evaluation, one
training round, the round-1 evaluation, a checkpoint):

    quickstart  the config as given (default configs/quickstart.toml: 4 clients, SmolLM2)
    six         the same with all 6 bundled domains, one client each, model.max_seq_len=384
    clients-4   the config with partition.method=iid over 4 clients ...
    clients-8   ... and over 8 clients: (8 - 4) / 4 = memory per extra virtual client (peak, RSS
                and live heap at the end); both with a 4-per-domain global test set

Each child reports its peak RSS (the kernel's high-water mark, VmHWM), the RSS it keeps at
the end, the bytes of the base model's parameters (the floor: the model must be resident),
and a breakdown by phase: the high-water mark is reset (`/proc/self/clear_refs`) at every
phase boundary, so each phase's peak is exact, not sampled. Phases: `setup` (model load,
data), `eval:loss` (reference losses), `eval:generate` (generation), `train` (`sft_steps`
/ `dual_stream_steps` of one client), `other` (messages, aggregation, checkpoints...).
glibc's `mallinfo2` at the end of each phase shows how much of the RSS is heap memory freed
but kept by the allocator (`heap_free`) rather than live (`heap_used`, `mmapped`).

Usage:
    .venv/bin/python benchmarks/bench_memory.py [--scenarios quickstart,six,clients-4,clients-8]
        [--config configs/quickstart.toml] [--set key=value ...] [--env MALLOC_ARENA_MAX=2]
        [--loss full] [--torch-dropout] [--keep-freed] [--sample-live 0.005] [--allocator system]
        [--json out.json]
`--loss full` runs the children with the pre-issue-11 loss (the model's full B x T x V
logits, copied to fp32) for a before/after comparison; `--torch-dropout` with torch's own
dropout in the LoRA layers (its fp32 noise kept for backward) instead of `train.MaskDropout`;
`--keep-freed` without the `malloc_trim` (jemalloc: purge) after each client and evaluation;
`--sample-live` also samples the live heap's peak per phase; `--allocator system` runs the
children on the system's malloc instead of the jemalloc the `fedsdr` command picks; `--env` sets
environment variables for the children. Memory is not affected by other jobs on the machine (only the time is).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import os
import pkgutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedsdr.memory import allocator, release_freed_memory

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import allocator_as_fedsdr, child_figures, console, parser, status_kb, write_json  # noqa: E402

GIB = 1024**3
# The per-client comparison does not need the quickstart's 100-per-domain global test set:
# 4 per domain, with the clients' 64 training records per domain unchanged.
_SMALL_GLOBAL_TEST = ["data.records_per_domain=68", "data.global_test_per_domain=4"]
SCENARIOS = {
    "quickstart": ["federation.rounds=1"],
    "six": [
        "federation.rounds=1",
        "data.domains=['arithmetic','gsm','word_sorting','competition_math','construction_faq','code']",
        "partition.num_clients=6",
        "partition.method=domain",
        "model.max_seq_len=384",
    ],
    "clients-4": ["federation.rounds=1", "partition.method=iid", "partition.num_clients=4", *_SMALL_GLOBAL_TEST],
    "clients-8": ["federation.rounds=1", "partition.method=iid", "partition.num_clients=8", *_SMALL_GLOBAL_TEST],
}
TARGETS_GB = {"quickstart": 2.0, "six": 2.5}


# --- the child: one run, phase by phase --------------------------------------------------
class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _heap() -> dict[str, int]:
    """The heap: bytes in use (`heap_used`), free but kept resident by the allocator
    (`heap_free`), and glibc's mmapped chunks (`mmapped`, in use). glibc: `mallinfo2`;
    jemalloc: `stats.allocated` and `stats.resident` (its page-level resident set)."""
    kind = allocator()
    if kind == "other":
        return {}
    libc = ctypes.CDLL(None)
    if kind == "jemalloc":
        return _jemalloc_stats(libc)
    try:
        libc.mallinfo2.restype = _Mallinfo2
        m = libc.mallinfo2()
    except AttributeError:  # glibc before 2.33
        return {}
    return {"heap_used": m.uordblks, "heap_free": m.fordblks, "mmapped": m.hblkhd}


def _jemalloc_stats(libc: ctypes.CDLL) -> dict[str, int]:
    epoch = ctypes.c_uint64(1)
    libc.mallctl(b"epoch", None, None, ctypes.byref(epoch), ctypes.c_size_t(8))  # refresh the stats
    out = {}
    for name in ("allocated", "resident"):
        value, size = ctypes.c_size_t(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_size_t))
        libc.mallctl(f"stats.{name}".encode(), ctypes.byref(value), ctypes.byref(size), None, ctypes.c_size_t(0))
        out[name] = value.value
    return {"heap_used": out["allocated"], "heap_free": max(0, out["resident"] - out["allocated"]), "mmapped": 0}


class Phases:
    """Exact peak RSS per phase: at each boundary read VmHWM, credit it to the phase that
    ends, reset the high-water mark to the current RSS."""

    def __init__(self, trim: bool = False, sample_live: float = 0.0) -> None:
        self.trim = release_freed_memory if trim else None
        self.live_peaks: dict[str, int] = {}
        self.current = "setup"
        self.peaks: dict[str, int] = {}
        self.counts: dict[str, int] = {}
        self.end_of: dict[str, dict[str, int]] = {}
        self.clear = Path("/proc/self/clear_refs")
        self.can_reset = True
        self.started = time.perf_counter()
        self.timeline: list[tuple[float, str, int, int, int]] = []  # (s, phase, peak, RSS, heap used)
        if sample_live > 0:  # the live heap's peak per phase, sampled (mallinfo2 walks the bins)
            threading.Thread(target=self._sample, args=(sample_live,), daemon=True).start()

    def _sample(self, every: float) -> None:
        while True:
            heap = _heap()
            live = heap.get("heap_used", 0) + heap.get("mmapped", 0)
            phase = self.current
            self.live_peaks[phase] = max(self.live_peaks.get(phase, 0), live)
            time.sleep(every)

    def mark(self, label: str) -> None:
        hwm = status_kb("VmHWM") * 1024
        rss = status_kb("VmRSS") * 1024
        ended = self.current
        if self.trim is not None:
            self.trim()
        self.peaks[ended] = max(self.peaks.get(ended, 0), hwm)
        self.counts[ended] = self.counts.get(ended, 0) + 1
        # RssFile: pages of mapped files (the libraries' code, a mapped checkpoint), not the heap.
        self.end_of[ended] = {"rss": rss, "rss_anon": status_kb("RssAnon") * 1024,
                              "rss_file": status_kb("RssFile") * 1024, **_heap()}
        self.timeline.append((time.perf_counter() - self.started, ended, hwm, rss, self.end_of[ended].get("heap_used", 0)))
        if self.can_reset:
            try:
                self.clear.write_text("5")
            except OSError:
                self.can_reset = False
        self.current = label

    def wrap(self, owner: Any, name: str, label: str) -> None:
        inner = getattr(owner, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            before = self.current
            self.mark(label)
            try:
                return inner(*args, **kwargs)
            finally:
                self.mark("other" if before == "setup" else before)

        setattr(owner, name, wrapped)


def _full_logits_token_nll() -> Callable:
    """The loss before issue 11: the model's full logits, copied to fp32 (for comparison)."""
    import torch

    from fedsdr.train import IGNORE

    def token_nll(model: Any, batch: dict[str, Any], autocast: Callable, **_: Any) -> Any:
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="none"
        )
        return nll, targets != IGNORE

    return token_nll


def inventory(model: Any) -> dict[str, int]:
    """What is still alive at the end of the run, by kind (bytes): tensors that are not the
    model's parameters or buffers, numpy arrays, large `bytes` objects (Flower's Array payloads)."""
    import gc

    import numpy as np
    import torch

    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: set[int] = set()
    out = {"tensors": 0, "numpy": 0, "bytes_over_64k": 0, "messages": 0}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            ptr = obj.untyped_storage().data_ptr()
            if ptr not in owned and ptr not in seen:
                seen.add(ptr)
                out["tensors"] += obj.untyped_storage().nbytes()
        elif isinstance(obj, np.ndarray) and obj.base is None:
            out["numpy"] += obj.nbytes
        elif isinstance(obj, bytes) and len(obj) > 65536:
            out["bytes_over_64k"] += len(obj)
        elif type(obj).__name__ == "Message" and type(obj).__module__.startswith("flwr"):
            out["messages"] += 1
    return out


def child(config: str, overrides: list[str], loss: str, out_path: Path, *, trim: bool = False,
          torch_dropout: bool = False, keep_freed: bool = False, sample_live: float = 0.0) -> None:
    phases = Phases(trim, sample_live)
    os.environ.setdefault("FEDSDR_PROGRESS", "0")
    import fedsdr.algorithms as algorithms
    import fedsdr.evaluate as evaluate
    import fedsdr.generation as generation
    import fedsdr.train as train
    from fedsdr.config import load_config
    from fedsdr.console import quiet_libraries
    from fedsdr.federation.engine import run_federation
    from fedsdr.models import loading
    from fedsdr.runs import RunDir
    from fedsdr.train import pass_budget

    quiet_libraries()
    cfg = load_config(config, overrides)
    if loss == "full":
        full = _full_logits_token_nll()

        def response_loss(model: Any, batch: dict[str, Any], autocast: Callable, **_: Any) -> Any:
            nll, mask = full(model, batch, autocast)
            return nll.sum(), int(mask.sum())

        train.token_nll, train.response_loss = full, response_loss
        for module in (evaluate, sys.modules.get("fedsdr.choice")):
            if module is not None and hasattr(module, "token_nll"):
                module.token_nll = full
    phases.wrap(evaluate, "reference_losses", "eval:loss")
    for name in ("generate", "generate_detailed"):
        phases.wrap(generation, name, "eval:generate")
        if hasattr(evaluate, name):  # evaluate binds generate_detailed at import: wrap that name too
            phases.wrap(evaluate, name, "eval:generate")
    if hasattr(evaluate, "choice_scores"):
        phases.wrap(evaluate, "choice_scores", "eval:choice")
    for info in pkgutil.iter_modules(algorithms.__path__):  # wherever the algorithms call them
        module = importlib.import_module(f"fedsdr.algorithms.{info.name}")
        for name in ("sft_steps", "dual_stream_steps"):
            if hasattr(module, name):
                phases.wrap(module, name, "train")
    # model loading and data building, before the first phase above
    original_shared_model = loading.shared_model
    first_load: dict[str, int] = {}

    def shared_model(*args: Any, **kwargs: Any) -> Any:
        result = original_shared_model(*args, **kwargs)
        first_load.setdefault("rss_after_model_load", status_kb("VmRSS") * 1024)
        return result

    if torch_dropout:  # LoRA's dropout as torch has it: the noise kept for backward in fp32
        loading.compact_lora_dropout = lambda model: 0
    if keep_freed:  # no malloc_trim (or jemalloc purge) after each client and evaluation
        import fedsdr.federation.engine as engine

        engine.release_freed_memory = evaluate.release_freed_memory = lambda: None
    for module_name in ("fedsdr.federation.server", "fedsdr.federation.client"):
        module = sys.modules.get(module_name) or __import__(module_name, fromlist=["x"])
        module.shared_model = shared_model
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        run_federation(cfg, RunDir(Path(tmp) / "run"))
        phases.mark("end")
    seconds = time.perf_counter() - started
    model, _, runtime, _ = next(iter(loading._CACHE.values()))
    base = model.get_base_model()
    param_bytes = sum(p.numel() * p.element_size() for n, p in base.named_parameters() if "lora_" not in n)
    adapter_bytes = sum(p.numel() * p.element_size() for n, p in base.named_parameters() if "lora_" in n)
    import torch

    figures = {
        "peak_rss": max(phases.peaks.values()),
        "phase_peaks": phases.peaks,
        "live_peaks": phases.live_peaks,
        "phase_counts": phases.counts,
        "phase_end": phases.end_of,
        "rss_end": status_kb("VmRSS") * 1024,
        "alive_end": inventory(model),
        "live_end": sum(_heap().get(k, 0) for k in ("heap_used", "mmapped")),
        "hwm_resettable": phases.can_reset,
        "param_bytes": param_bytes,
        "adapter_bytes": adapter_bytes,
        "clients": cfg.partition.num_clients,
        "max_seq_len": cfg.model.max_seq_len,
        "threads": torch.get_num_threads(),
        "trim": trim,
        "checkpointing": cfg.train.gradient_checkpointing,
        "pass_tokens": pass_budget(cfg.train, runtime.device, runtime.compute_dtype),
        "torch_dropout": torch_dropout,
        "keep_freed": keep_freed,
        "compute_dtype": str(runtime.compute_dtype),
        "allocator": allocator(),
        "seconds": seconds,
        **first_load,
        "timeline": phases.timeline,
    }
    out_path.write_text(json.dumps(figures, indent=1), encoding="utf-8")


# --- the parent: one child per scenario, side by side ------------------------------------
def run_child(scenario: str, args: Any, env: dict[str, str]) -> dict[str, Any]:
    argv = ["--child", scenario, "--config", args.config, "--loss", args.loss]
    argv += ["--trim"] if args.trim else []
    argv += ["--torch-dropout"] if args.torch_dropout else []
    argv += ["--keep-freed"] if args.keep_freed else []
    argv += ["--sample-live", str(args.sample_live)] if args.sample_live else []
    for item in args.overrides:
        argv += ["--set", item]
    return child_figures(__file__, argv, f"child {scenario!r}", env)


def _gb(x: float) -> str:
    return f"{x / GIB:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--scenarios", default="quickstart,six,clients-4,clients-8",
                   help=f"comma-separated, from {', '.join(SCENARIOS)}")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment variable for the children (repeatable)")
    p.add_argument("--loss", choices=("default", "full"), default="default",
                   help="'full': the pre-issue-11 full-logits loss, for comparison")
    p.add_argument("--trim", action="store_true",
                   help="what-if: malloc_trim(0) at every phase boundary (freed heap back to the OS)")
    p.add_argument("--torch-dropout", action="store_true",
                   help="what-if: LoRA's dropout as torch has it (before issue 11: its fp32 noise kept for backward)")
    p.add_argument("--keep-freed", action="store_true",
                   help="what-if: no malloc_trim after each client and evaluation (before issue 11)")
    p.add_argument("--sample-live", type=float, default=0.0, metavar="SECONDS",
                   help="also sample the live heap (glibc mallinfo2, jemalloc stats.allocated) every SECONDS: its peak per phase, "
                   "against which the RSS peak shows what the allocator keeps beyond the live bytes")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    allocator_as_fedsdr(args)
    if args.child:
        child(args.config, [*args.overrides, *SCENARIOS[args.child]], args.loss, args.child_out,
              trim=args.trim, torch_dropout=args.torch_dropout,
              keep_freed=args.keep_freed, sample_live=args.sample_live)
        return 0

    from rich.table import Table

    out = console()
    env = dict(os.environ)
    env.setdefault("FEDSDR_PROGRESS", "0")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    for item in args.env:
        name, _, value = item.partition("=")
        env[name] = value
    # Prepare the bundled model first, so no child counts the one-off GGUF conversion.
    subprocess.run([sys.executable, "-m", "fedsdr.cli", "models", "prepare", "smollm2-135m-instruct"],
                   env=env, check=False, capture_output=True)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}")
    results: dict[str, dict[str, Any]] = {}
    for scenario in scenarios:
        out.print(f"running {scenario} ...")
        results[scenario] = run_child(scenario, args, env)
        r = results[scenario]
        phases = ", ".join(f"{k} {_gb(v)}" for k, v in r["phase_peaks"].items())
        alive = ", ".join(f"{k} {v / 2**20:.0f} MiB" if k != "messages" else f"{v} messages"
                          for k, v in r["alive_end"].items())
        out.print(f"  {scenario}: peak {_gb(r['peak_rss'])} GiB ({phases}), {r['seconds']:.0f} s, "
                  f"allocator {r.get('allocator')}; "
                  f"alive at the end: {alive}")

    what_if = [*args.overrides, *args.env, *(["trim"] if args.trim else []),
               *(["torch-dropout"] if args.torch_dropout else []), *(["keep-freed"] if args.keep_freed else [])]
    table = Table(title=f"peak RSS per run ({args.config}, loss={args.loss}"
                        + (f", {' '.join(what_if)}" if what_if else "") + ")")
    for col in ("scenario", "clients", "seq len", "peak RSS (GiB)", "target", "end RSS", "after load",
                "base params (GiB)", "peak / params"):
        table.add_column(col, justify="right")
    for name, r in results.items():
        target = TARGETS_GB.get(name)
        ok = "" if target is None else ("[green]ok[/]" if r["peak_rss"] <= target * 1e9 else "[red]over[/]")
        table.add_row(name, str(r["clients"]), str(r["max_seq_len"]), _gb(r["peak_rss"]),
                      f"<= {target} GB {ok}" if target else "", _gb(r["rss_end"]),
                      _gb(r.get("rss_after_model_load", 0)), _gb(r["param_bytes"]),
                      f"{r['peak_rss'] / r['param_bytes']:.1f}x")
    out.print(table)

    phases = Table(title="peak RSS by phase (GiB); heap at the end of the phase's last occurrence")
    for col in ("scenario", "phase", "times", "peak", "RSS at end", "heap used", "heap free", "mmapped"):
        phases.add_column(col, justify="right")
    for name, r in results.items():
        for phase, peak in r["phase_peaks"].items():
            end = r["phase_end"].get(phase, {})
            phases.add_row(name, phase, str(r["phase_counts"].get(phase, "")), _gb(peak),
                           _gb(end.get("rss", 0)), _gb(end.get("heap_used", 0)),
                           _gb(end.get("heap_free", 0)), _gb(end.get("mmapped", 0)))
    out.print(phases)

    figures: dict[str, Any] = {"config": args.config, "overrides": args.overrides, "env": args.env,
                               "loss": args.loss, "trim": args.trim,
                               "torch_dropout": args.torch_dropout, "keep_freed": args.keep_freed,
                               "scenarios": results}
    if "clients-4" in results and "clients-8" in results:
        a, b = results["clients-4"], results["clients-8"]
        figures["per_extra_client_peak"] = (b["peak_rss"] - a["peak_rss"]) / 4
        figures["per_extra_client_end"] = (b["rss_end"] - a["rss_end"]) / 4
        figures["per_extra_client_live"] = (b["live_end"] - a["live_end"]) / 4
        out.print(f"memory per extra virtual client (4 -> 8 clients): peak "
                  f"{figures['per_extra_client_peak'] / 2**20:+.0f} MiB, RSS at the end "
                  f"{figures['per_extra_client_end'] / 2**20:+.0f} MiB, live heap at the end "
                  f"{figures['per_extra_client_live'] / 2**20:+.0f} MiB")
    write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
