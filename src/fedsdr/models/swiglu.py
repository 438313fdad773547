"""A SwiGLU MLP that keeps two of its three intermediate tensors for backward.

Llama-style MLPs compute `down_proj(silu(gate_proj(x)) * up_proj(x))`. Autograd keeps the
gate (for silu's gradient), silu's output and the up projection (for the product's): three
tensors of the MLP's width per token and layer, the largest share of what a LoRA training
pass keeps (SmolLM2: 270 of ~990 KiB per token in bf16, `benchmarks/bench_step.py`). Here the
product is one autograd function that keeps the gate and the up projection and recomputes
silu in backward: the same operations on the same values, so the same results to the bit,
for one activation more per layer in backward.
"""

from __future__ import annotations

import inspect
import re

import torch
import torch.nn.functional as F
from transformers.activations import SiLUActivation

# the forward this replaces, as transformers writes it (Llama, Mistral, Qwen2/3, SmolLM3, ...);
# an MLP whose forward reads otherwise is left alone
_FORWARD = "self.down_proj(self.act_fn(self.gate_proj(x))*self.up_proj(x))"
_SILU = (SiLUActivation, torch.nn.SiLU)


class _SiluTimes(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        gate, up = ctx.saved_tensors
        # what autograd computes for `silu(gate) * up`: the product's two gradients, then silu's
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def silu_times(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up`; where autograd records it, silu is recomputed in backward."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SiluTimes.apply(gate, up)
    return F.silu(gate) * up


def _recomputing_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(silu_times(self.gate_proj(x), self.up_proj(x)))


_RECOMPUTING: dict[type, type] = {}


def _is_swiglu(module: torch.nn.Module) -> bool:
    if type(module) in _RECOMPUTING.values():
        return False
    if not all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")):
        return False
    if type(getattr(module, "act_fn", None)) not in _SILU:
        return False
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False
    return _FORWARD in re.sub(r"\s+", "", source)


def recompute_swiglu(model: torch.nn.Module) -> int:
    """Give every Llama-style SiLU MLP of `model` the recomputing product (each instance's class
    becomes a subclass of its own with that forward, named the same); returns how many."""
    count = 0
    for module in model.modules():
        if _is_swiglu(module):
            cls = type(module)
            if cls not in _RECOMPUTING:
                _RECOMPUTING[cls] = type(cls.__name__, (cls,), {"forward": _recomputing_forward,
                                                                "__module__": __name__})
            module.__class__ = _RECOMPUTING[cls]
            count += 1
    return count
