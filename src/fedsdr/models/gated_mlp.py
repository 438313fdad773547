"""A gated MLP (SwiGLU, GeGLU) that keeps two of its three intermediate tensors for backward.

Llama-style MLPs compute `down_proj(act(gate_proj(x)) * up_proj(x))` with act = SiLU (Llama,
Mistral, Qwen2/3, SmolLM2/3) or a GELU (Gemma). Autograd keeps the gate (for the activation's
gradient), the activation's output and the up projection (for the product's): three tensors of
the MLP's width per token and layer, the largest share of what a LoRA training pass keeps
(SmolLM2: 270 of ~950 KiB per token in bf16, `benchmarks/bench_step.py`). Here the product is
one autograd function that keeps the gate and the up projection and recomputes the activation in
backward: the same operations on the same values, so the same results to the bit, for one
activation more per layer in backward.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import activations

# the forward this replaces, as transformers writes it (Llama, Mistral, Qwen2/3, SmolLM3, Gemma,
# ...): its whole body returns this expression (directly or through one variable); an MLP whose
# forward does anything else is left alone
_PRODUCT = "self.down_proj(self.act_fn(self.gate_proj({x})) * self.up_proj({x}))"


def _silu_grad(grad: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.silu_backward(grad, gate)


def _gelu_grad(approximate: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return lambda grad, gate: torch.ops.aten.gelu_backward(grad, gate, approximate=approximate)


Activation = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
_SILU: Activation = (F.silu, _silu_grad)


def activation_of(module: torch.nn.Module) -> Activation | None:
    """(forward, backward) of an activation module that is exactly one of torch's SiLU or GELU
    kernels, where `backward(grad, input)` is the kernel autograd runs; else None."""
    if type(module) in (activations.SiLUActivation, torch.nn.SiLU):
        return _SILU
    if type(module) is torch.nn.GELU:
        approximate = module.approximate
    elif type(module) is activations.GELUActivation and module.act is F.gelu:
        approximate = "none"
    elif (type(module) is getattr(activations, "GELUTanh", None) and isinstance(module.act, functools.partial)
          and module.act.func is F.gelu and module.act.keywords == {"approximate": "tanh"} and not module.act.args):
        approximate = "tanh"
    else:
        return None
    return functools.partial(F.gelu, approximate=approximate), _gelu_grad(approximate)


class _ActTimes(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, act: Activation) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(gate, up)
        ctx.act = act
        return act[0](gate) * up

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        gate, up = ctx.saved_tensors
        forward, backward = ctx.act
        # what autograd computes for `act(gate) * up`: the product's two gradients, then act's
        grad_gate = backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * forward(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up, None


def act_times(gate: torch.Tensor, up: torch.Tensor, act: Activation) -> torch.Tensor:
    """`act(gate) * up`; where autograd records it, the activation is recomputed in backward."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _ActTimes.apply(gate, up, act)
    return act[0](gate) * up


def silu_times(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up`, silu recomputed in backward (`act_times`)."""
    return act_times(gate, up, _SILU)


def _recomputing_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(act_times(self.gate_proj(x), self.up_proj(x), self._recomputed_act))


_RECOMPUTING: dict[type, type] = {}


@functools.cache
def _forward_is_the_product(cls: type) -> bool:
    """Whether `cls.forward(self, x)` only returns `_PRODUCT` (read from its source, once per class)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, SyntaxError):
        return False
    fn = tree.body[0] if tree.body else None
    if not isinstance(fn, ast.FunctionDef) or len(fn.args.args) != 2 or fn.args.vararg or fn.args.kwarg:
        return False
    body = [st for st in fn.body if not (isinstance(st, ast.Expr) and isinstance(st.value, ast.Constant))]
    expected = _PRODUCT.format(x=fn.args.args[1].arg)
    if len(body) == 1 and isinstance(body[0], ast.Return) and body[0].value is not None:
        return ast.unparse(body[0].value) == expected
    if (len(body) == 2 and isinstance(body[0], ast.Assign) and len(body[0].targets) == 1
            and isinstance(body[0].targets[0], ast.Name) and isinstance(body[1], ast.Return)
            and isinstance(body[1].value, ast.Name) and body[1].value.id == body[0].targets[0].id):
        return ast.unparse(body[0].value) == expected
    return False


def _gated_activation(module: torch.nn.Module) -> Activation | None:
    """The activation of a Llama-style gated MLP not yet recomputing, else None."""
    if type(module) in _RECOMPUTING.values():
        return None
    if not all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return None
    act = activation_of(module.act_fn)
    return act if act is not None and _forward_is_the_product(type(module)) else None


def recompute_gated_mlps(model: torch.nn.Module) -> int:
    """Give every Llama-style gated MLP of `model` with a SiLU or GELU the recomputing product
    (each instance's class becomes a subclass of its own with that forward, named the same);
    returns how many."""
    count = 0
    for module in model.modules():
        act = _gated_activation(module)
        if act is not None:
            cls = type(module)
            if cls not in _RECOMPUTING:
                _RECOMPUTING[cls] = type(cls.__name__, (cls,), {"forward": _recomputing_forward,
                                                                "__module__": __name__})
            module._recomputed_act = act  # a plain attribute: no submodule
            module.__class__ = _RECOMPUTING[cls]
            count += 1
    return count


def plain_gated_mlps(model: torch.nn.Module) -> int:
    """Undo `recompute_gated_mlps` (for comparisons): each MLP gets its own class back; returns
    how many."""
    count = 0
    for module in model.modules():
        if type(module) in _RECOMPUTING.values():
            module.__class__ = type(module).__mro__[1]
            del module._recomputed_act
            count += 1
    return count
