"""Which dtype a CPU's matmuls are fastest in: bf16 only where it is measurably faster than fp32.

Native bf16 instructions do not make bf16 matmuls fast by themselves. On a 2-core AMD EPYC with
AVX512-bf16, oneDNN's bf16 matmuls ran ~4x the fp32 ones at SmolLM2's shapes; on a 2-core Intel
Xeon with AVX512-bf16 and no AMX (oneDNN's `brg_matmul:avx512_core_bf16`) they ran 0.55-0.59x,
and a training round under bf16 autocast there ran 1.36x slower than in fp32 (`benchmarks/README.md`).
The CPU's flags cannot tell the two apart; a 0.2 s timing can. It runs once per machine: the verdict
is kept in fedsdr's cache, keyed by the CPU, torch and the threads, so every process of a run,
and every later run, computes in the same dtype.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fedsdr.io import write_json_atomic

# bf16 rounds activations to ~3 significant digits; below this speedup fp32 is worth keeping.
BF16_MIN_SPEEDUP = 1.3
# A decoder layer's typical matmul: tokens of a training pass x hidden x MLP width.
PROBE_SHAPE = (512, 1024, 1024)
_PROBE_REPEATS = 5


@dataclass(frozen=True)
class MatmulProbe:
    """Best-of-`_PROBE_REPEATS` GFLOP/s of `PROBE_SHAPE` in fp32 and bf16 on this CPU."""

    fp32_gflops: float
    bf16_gflops: float
    threads: int

    @property
    def bf16_speedup(self) -> float:
        return self.bf16_gflops / self.fp32_gflops


def measure_matmuls(shape: tuple[int, int, int] = PROBE_SHAPE, repeats: int = _PROBE_REPEATS) -> MatmulProbe:
    """Time `x @ w.T` in fp32 and bf16, alternating, so that a busy machine slows both alike."""
    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    pairs = {dtype: (torch.randn(m, k, generator=gen).to(dtype), torch.randn(n, k, generator=gen).to(dtype))
             for dtype in (torch.float32, torch.bfloat16)}
    best = dict.fromkeys(pairs, float("inf"))
    with torch.inference_mode():
        for x, w in pairs.values():  # warm-up: oneDNN builds its primitive
            torch.nn.functional.linear(x, w)
        for _ in range(repeats):
            for dtype, (x, w) in pairs.items():
                start = time.perf_counter()
                torch.nn.functional.linear(x, w)
                best[dtype] = min(best[dtype], time.perf_counter() - start)
    flop = 2 * m * k * n
    return MatmulProbe(fp32_gflops=flop / best[torch.float32] / 1e9, bf16_gflops=flop / best[torch.bfloat16] / 1e9,
                       threads=torch.get_num_threads())


def _cpu_identity() -> dict[str, str]:
    """What the verdict depends on: the CPU (model name and flags), torch, the threads, and the
    environment variables that limit oneDNN's and ATen's instruction sets."""
    name, flags = "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name") and not name:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = hashlib.sha256(line.split(":", 1)[1].strip().encode()).hexdigest()[:16]
    except OSError:
        pass
    name = name or platform.processor() or platform.machine()
    limits = ",".join(f"{k}={os.environ[k]}" for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY",
                                                        "MKL_ENABLE_INSTRUCTIONS") if k in os.environ)
    return {"cpu": name, "flags": flags, "torch": torch.__version__, "threads": str(torch.get_num_threads()),
            "limits": limits}


_VERDICTS: dict[str, MatmulProbe] = {}


def cpu_matmul_probe(cache_dir: Path | None) -> MatmulProbe:
    """This CPU's `MatmulProbe`, measured once and kept in `cache_dir/cpu-matmul/` (None: in
    this process only)."""
    identity = _cpu_identity()
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
    if key in _VERDICTS:
        return _VERDICTS[key]
    path = cache_dir / "cpu-matmul" / f"{key}.json" if cache_dir is not None else None
    probe = None
    if path is not None and path.exists():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            probe = MatmulProbe(float(stored["fp32_gflops"]), float(stored["bf16_gflops"]), int(stored["threads"]))
        except (OSError, ValueError, KeyError, TypeError):
            probe = None  # unreadable: measured again and rewritten
    if probe is None:
        probe = measure_matmuls()
        if path is not None:
            try:
                write_json_atomic(path, {**identity, **asdict(probe), "bf16_speedup": probe.bf16_speedup})
            except OSError:
                pass  # a read-only cache: the verdict lives in this process
    _VERDICTS[key] = probe
    return probe


def bf16_pays_off(probe: MatmulProbe) -> bool:
    return probe.bf16_speedup >= BF16_MIN_SPEEDUP
