"""Shared bits of the benchmark scripts: arguments, config loading, output."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = "configs/quickstart.toml"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--config", default=DEFAULT_CONFIG, help=f"TOML config (default {DEFAULT_CONFIG})"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, repeatable (e.g. --set train.local_steps=1)",
    )
    p.add_argument(
        "--json", type=Path, default=None, metavar="PATH", help="also write the figures here"
    )
    p.add_argument(
        "--allocator", choices=("auto", "system"), default="auto",
        help="auto (default): fedsdr's code runs under jemalloc where one is found, as the `fedsdr` "
        "command runs it (fedsdr.memory); system: the system's malloc (a what-if)",
    )
    return p


def allocator_as_fedsdr(args: argparse.Namespace) -> None:
    """Run this benchmark's process (and the children it starts) under the allocator the
    `fedsdr` command would pick: restarted once under jemalloc where one is found, unless
    `--allocator system`. Call first thing after parsing the arguments."""
    from fedsdr.memory import ALLOCATOR_ENV, with_jemalloc

    if getattr(args, "allocator", "auto") == "system":
        os.environ[ALLOCATOR_ENV] = "system"
    if not getattr(args, "child", None):  # a child inherits the parent's allocator
        with_jemalloc(sys.orig_argv[1:])


def system_allocator_env() -> dict[str, str]:
    """This process's environment without fedsdr's jemalloc preload: for the loop users write
    today (TRL), which runs on the system's malloc."""
    from fedsdr.memory import find_jemalloc

    env = dict(os.environ)
    ours = str(find_jemalloc())
    kept = [p for p in env.get("LD_PRELOAD", "").split(":") if p and p != ours]
    if kept:
        env["LD_PRELOAD"] = ":".join(kept)
    else:
        env.pop("LD_PRELOAD", None)
    return env


def load(args: argparse.Namespace) -> Any:
    """The run config, with the libraries quietened the way the CLI does it."""
    os.environ.setdefault("FEDSDR_PROGRESS", "0")
    from fedsdr.config import load_config
    from fedsdr.federation.engine import quiet_libraries

    quiet_libraries()
    return load_config(args.config, args.overrides)


def console() -> Any:
    """A rich console that does not squeeze tables when the output is a file or a pipe."""
    from rich.console import Console

    plain = Console()
    return plain if plain.is_terminal else Console(width=120)


def machine() -> dict[str, Any]:
    import torch

    from fedsdr.memory import allocator

    bf16 = cpu_bf16()
    return {
        "allocator": allocator(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "cpu_native_bf16": bf16["native"],
        "cpu_bf16_in_use": bf16["in_use"],
    }


def cpu_bf16() -> dict[str, Any]:
    """The CPU's native-bf16 flags (what `lscpu` shows: avx512_bf16, amx_bf16); without
    them bf16 matmuls are emulated and fedsdr computes in fp32. `in_use`: whether torch's oneDNN
    will use them, which is what fedsdr's runtime asks; `ONEDNN_MAX_CPU_ISA=AVX2` turns them off,
    the way to run an fp32-only CPU's code paths on a bf16 one (`limits` names what was set)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        text = ""
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    found = {name: name in flags for name in ("avx512_bf16", "amx_bf16")}
    from fedsdr.models.loading import cpu_supports_bf16

    limits = {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY",
                                         "MKL_ENABLE_INSTRUCTIONS") if k in os.environ}
    in_use = cpu_supports_bf16()
    out = {**found, "native": any(found.values()), "in_use": in_use, "limits": limits}
    if in_use:  # what `compute_dtype = "auto"` decided from this machine's matmul timing
        from fedsdr.models.cache import default_cache_dir
        from fedsdr.models.cpu_dtype import bf16_pays_off, cpu_matmul_probe

        probe = cpu_matmul_probe(default_cache_dir())
        out.update(bf16_speedup=probe.bf16_speedup, auto_computes_in_bf16=bf16_pays_off(probe))
    return out


def describe_bf16(flags: dict[str, Any]) -> str:
    """One line on the CPU's bf16: native or not, and whether it was used."""
    text = (f"CPU native bf16: {'yes' if flags['native'] else 'no'} (avx512_bf16 "
            f"{'yes' if flags['avx512_bf16'] else 'no'}, amx_bf16 {'yes' if flags['amx_bf16'] else 'no'})")
    if flags["native"] and not flags["in_use"]:
        limits = " ".join(f"{k}={v}" for k, v in flags["limits"].items()) or "the environment"
        text += f", turned off by {limits}: an fp32-only CPU emulated"
    if "bf16_speedup" in flags:
        text += (f"; bf16 matmuls {flags['bf16_speedup']:.2f}x fp32 here, so compute_dtype \"auto\" is "
                 f"{'bf16' if flags['auto_computes_in_bf16'] else 'fp32'}")
    return text


@contextmanager
def stopwatch() -> Iterator[Callable[[], float]]:
    """`with stopwatch() as elapsed:` ... `elapsed()` -> seconds (frozen at exit)."""
    start = time.perf_counter()
    end: list[float] = []
    yield lambda: (end[0] if end else time.perf_counter()) - start
    end.append(time.perf_counter())


def synchronize(device: Any = "cpu") -> None:
    """Wait for the work queued on `device` (CUDA kernels run asynchronously); no-op on a CPU."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def accelerator(device: Any = "cpu") -> dict[str, Any]:
    """The CUDA device's name and the most memory its allocator held in this process (MB); {}
    on a CPU."""
    import torch

    if torch.device(device).type != "cuda":
        return {}
    return {"gpu": torch.cuda.get_device_name(device),
            "device_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20}


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def write_json(path: Path | None, figures: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2, default=str) + "\n", encoding="utf-8")


def status_kb(field: str) -> int:
    """A `/proc/self/status` figure in kB (`VmRSS`, `VmHWM`...); 0 where there is none."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child_figures(script: str, argv: list[str], what: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `script argv --child-out PATH` in a fresh Python process (so its memory figures are its
    own) and return the JSON it wrote there; exit with its output when it fails."""
    with tempfile.TemporaryDirectory(prefix="bench-child-") as tmp:
        out = Path(tmp) / "figures.json"
        proc = subprocess.run([sys.executable, script, *argv, "--child-out", str(out)], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise SystemExit(f"{Path(script).stem}: {what} failed (exit {proc.returncode})")
        return json.loads(out.read_text(encoding="utf-8"))


def linear_shapes(model: Any) -> tuple[Counter, dict[tuple[int, int], str]]:
    """(in, out) of every linear layer of the frozen base (LoRA's own layers excluded)."""
    import torch

    shapes: Counter = Counter()
    names: dict[tuple[int, int], set[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lora_" not in name:
            key = (module.in_features, module.out_features)
            shapes[key] += 1
            leaf = name.split(".")[-1]
            leaf = name.split(".")[-2] if leaf == "base_layer" else leaf
            names.setdefault(key, set()).add(leaf)
    return shapes, {k: ",".join(sorted(v)) for k, v in names.items()}


def matmul_seconds(
    m: int,
    k: int,
    n: int,
    mode: str,
    compute: Any,
    direction: str,
    device: Any = "cpu",
    min_time: float = 0.1,
    repeats: int = 3,
) -> float:
    """Best-of-`repeats` seconds of one (m,k)x(k,n) matmul as the model does it.

    direction fwd: F.linear(x[m,k], W[n,k]); bwd: g[m,n] @ W[n,k] (the gradient to the input).
    mode: "compute" = tensors in the compute dtype; "fp32"; "autocast" = fp32 tensors under
    autocast to the compute dtype (casts included). On CUDA the clock stops after the device
    has finished (`synchronize`, once per 8 matmuls)."""
    import torch
    import torch.nn.functional as F

    dtype = compute if mode == "compute" else torch.float32
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen).to(device, dtype)
    if direction == "fwd":
        x = torch.randn(m, k, generator=gen).to(device, dtype)

        def op() -> Any:
            return F.linear(x, w)
    else:
        g = torch.randn(m, n, generator=gen).to(device, dtype)

        def op() -> Any:
            return torch.mm(g, w)

    kind = torch.device(device).type
    ctx = (
        torch.autocast(kind, dtype=compute)
        if mode == "autocast"
        else torch.autocast(kind, enabled=False)
    )
    best = float("inf")
    with torch.inference_mode(), ctx:
        for _ in range(2):
            op()
        for _ in range(repeats):
            iters = 0
            start = time.perf_counter()
            while True:
                for _ in range(8):  # on CUDA: one wait per 8 launches, not a wait per matmul
                    op()
                iters += 8
                synchronize(device)
                spent = time.perf_counter() - start
                if spent >= min_time and iters >= 2:
                    break
            best = min(best, spent / iters)
    return best


# Rows of the matmuls timed for "the machine's matmul rate" of a forward pass: the size of a
# training or prefill pass (train.pass_tokens 256), where the CPU's GEMMs run near their best.
MATMUL_M = 256


def forward_rate(model: Any, compute: Any, device: Any, m: int = MATMUL_M) -> dict[str, float]:
    """The forward matmul rate of `model`'s own linear shapes (best-of-3 `matmul_seconds` per
    shape, weighted by how many layers have it) with `m` rows in the compute dtype, and the
    parameters of its decoder body's linears and of its LM head: the FLOPs of a forward are
    2 x body per position computed plus 2 x head per position projected."""
    shapes, _ = linear_shapes(model)
    head = model.get_output_embeddings()
    head_params = head.in_features * head.out_features
    flops = seconds = 0.0
    for (k, n), count in shapes.items():
        flops += count * 2.0 * m * k * n
        seconds += count * matmul_seconds(m, k, n, "compute", compute, "fwd", device)
    body_params = sum(k * n * count for (k, n), count in shapes.items()) - head_params
    return {"matmul_m": m, "flops_per_s": flops / seconds, "body_params": body_params, "head_params": head_params}


def forward_flops(rate: dict[str, float], positions: float, projected: float) -> float:
    """The FLOPs of the linears of a forward over `positions`, `projected` of them through the LM
    head, for the model `rate` (`forward_rate`) was measured on."""
    return 2.0 * rate["body_params"] * positions + 2.0 * rate["head_params"] * projected
