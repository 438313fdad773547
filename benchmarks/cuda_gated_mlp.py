"""CUDA only (`gpu_check.sh`, part gated_mlp): the gated MLP of `fedsdr.models.gated_mlp`, which
recomputes its activation in backward, against autograd's `act(gate) * up`, to the bit: on the op
(SiLU and tanh-GELU, fp32 and bf16) and in the tests' tiny LoRA model as `shared_model` loads it
on CUDA (bf16 weights): outputs, losses, gradients.

    python benchmarks/cuda_gated_mlp.py
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def op_check(dtype: torch.dtype, name: str) -> bool:
    from fedsdr.models.gated_mlp import act_times, activation_of

    module = torch.nn.SiLU() if name == "silu" else torch.nn.GELU(approximate="tanh")
    act = activation_of(module)

    torch.manual_seed(0)
    gate, up = torch.randn(2, 4, 96, 1536, device="cuda").to(dtype).unbind(0)
    upstream = torch.randn(4, 96, 1536, device="cuda").to(dtype)
    runs = []
    for fn in (lambda g, u: module(g) * u, lambda g, u: act_times(g, u, act)):
        g, u = gate.clone().requires_grad_(True), up.clone().requires_grad_(True)
        out = fn(g, u)
        out.backward(upstream)
        runs.append((out.detach(), g.grad, u.grad))
    return all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def model_check() -> tuple[bool, bool, str]:
    from test_memory import _records
    from tiny_llama import tiny_lora_model
    from transformers.models.llama.modeling_llama import LlamaMLP

    from fedsdr.models.adapters import adapter_parameters
    from fedsdr.models.gated_mlp import plain_gated_mlps
    from fedsdr.train import collate, encode, response_loss

    model, tok = tiny_lora_model("lora.dropout=0.0")
    mlps = [m for m in model.modules() if isinstance(m, LlamaMLP)]
    where = (f"{next(model.parameters()).device}, {model.get_base_model().lm_head.weight.dtype}, "
             f"{sum(type(m) is not LlamaMLP for m in mlps)} of {len(mlps)} MLPs recomputing")
    batch = collate([encode(tok, r) for r in _records()], tok.pad_token_id)
    batch = {k: v.to("cuda") for k, v in batch.items()}
    model.train()
    runs = []
    for recompute in (True, False):
        if not recompute:
            plain_gated_mlps(model)  # transformers' own MLPs
        loss, _ = response_loss(model, batch, contextlib.nullcontext)
        loss.backward()
        runs.append((loss.detach(), [p.grad.clone() for p in adapter_parameters(model, "default")]))
        model.zero_grad(set_to_none=True)
    (loss_a, grads_a), (loss_b, grads_b) = runs
    return (torch.equal(loss_a, loss_b),
            all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True)), where)


def main() -> int:
    if not torch.cuda.is_available():
        print("cuda_gated_mlp.py: no CUDA device")
        return 2
    ok = True
    for name in ("silu", "gelu-tanh"):
        for dtype in (torch.float32, torch.bfloat16):
            same = op_check(dtype, name)
            ok &= same
            print(f"op {name} x up, {dtype}: outputs and gradients bitwise equal: {same}")
    loss_same, grads_same, where = model_check()
    ok &= loss_same and grads_same
    print(f"tiny LoRA model ({where}): loss equal {loss_same}, LoRA gradients equal {grads_same}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
