"""Linear layers on a few rows, with the weight as the product's tall left operand.

A decoding pass runs every linear on a handful of rows: the live rows times the tokens each
checks, at most ~64 with prompt lookup. `F.linear(x, W)` computes x W^T, and on a CPU in fp32
MKL's GEMM runs that skinny product well below the rate it reaches on the same product written as
(W x^T)^T, where the weight is the tall left operand (`benchmarks/bench_decode_pass.py` times both,
side by side; measured on a 2-core AVX2-only AMD EPYC, where a pass got 1.15-1.41x faster: on
another CPU, run it before trusting the default). The two sum the same products in another order:
equal up to rounding. From ~96 rows on the two forms cost the same, so larger inputs (prefill,
training) keep `F.linear`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

SKINNY_ROWS = 64  # at most this many rows take the transposed form (measured crossover ~96)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  max_rows: int | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, computed as (weight x^T)^T when x has at most `max_rows`
    rows (all dimensions but the last; None: `SKINNY_ROWS`)."""
    max_rows = SKINNY_ROWS if max_rows is None else max_rows
    features = x.shape[-1]
    rows = x.numel() // features if features else 0
    if not 0 < rows <= max_rows:
        return F.linear(x, weight, bias)
    out = torch.mm(weight, x.reshape(rows, features).t()).t().contiguous()  # later ops want rows contiguous
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _forward(module: torch.nn.Linear, max_rows: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: skinny_linear(x, module.weight, module.bias, max_rows)


@contextlib.contextmanager
def skinny_linears(model: torch.nn.Module, max_rows: int | None = None) -> Iterator[int]:
    """Within the block, every `nn.Linear` of `model` whose weight is fp32 on a CPU runs inputs
    of at most `max_rows` rows (None: `SKINNY_ROWS`, read now; 0: none) as (W x^T)^T
    (`skinny_linear`); yields how many it took. Elsewhere
    (a GPU, bf16 weights, CPU autocast: not measured) nothing changes. A module whose `forward`
    is already replaced on the instance (accelerate's offload hooks), or whose class has its own
    `forward` (a quantized or otherwise special linear), is left alone."""
    max_rows = SKINNY_ROWS if max_rows is None else max_rows
    if max_rows < 1 or torch.is_autocast_enabled("cpu"):
        yield 0
        return
    taken = [m for m in model.modules()
             if isinstance(m, torch.nn.Linear) and type(m).forward is torch.nn.Linear.forward
             and "forward" not in vars(m) and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32]
    for module in taken:
        module.forward = _forward(module, max_rows)
    try:
        yield len(taken)
    finally:
        for module in taken:
            del module.forward
