"""The SwiGLU MLP that recomputes silu in backward (models/swiglu.py): installed on the model
`shared_model` builds, the same loss and gradients to the bit, less kept for backward."""

from __future__ import annotations

import contextlib

import pytest
import torch
from test_memory import _records
from tiny_llama import tiny_lora_model
from transformers.models.llama.modeling_llama import LlamaMLP

from fedsdr.models.adapters import adapter_parameters
from fedsdr.models.swiglu import recompute_swiglu, silu_times
from fedsdr.train import collate, encode, response_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _saved_bytes(run):  # noqa: ANN001, ANN202
    """`run()`'s result and the bytes autograd keeps for backward while it builds the graph
    (each storage once)."""
    storages: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storages.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out = run()
    return out, sum(storages.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_times_has_autograds_values_and_gradients_and_keeps_two_tensors(dtype) -> None:  # noqa: ANN001
    gate, up = torch.randn(2, 2, 7, 33).to(dtype).unbind(0)
    upstream = torch.randn(2, 7, 33).to(dtype)
    runs = []
    for fn in (lambda g, u: torch.nn.functional.silu(g) * u, silu_times):
        g, u = gate.clone().requires_grad_(True), up.clone().requires_grad_(True)
        out, kept = _saved_bytes(lambda fn=fn, g=g, u=u: fn(g, u))
        out.backward(upstream)
        runs.append((out.detach(), g.grad, u.grad, kept))
    (out_ref, g_ref, u_ref, kept_ref), (out, g, u, kept) = runs
    assert torch.equal(out, out_ref) and torch.equal(g, g_ref) and torch.equal(u, u_ref)
    assert kept == kept_ref * 2 // 3  # gate and up, not silu's output
    with torch.no_grad():
        assert torch.equal(silu_times(gate, up), out_ref)


@pytest.mark.parametrize("bf16", [False, True])
def test_the_models_mlps_recompute_silu_and_train_the_same(bf16) -> None:  # noqa: ANN001
    model, tok = tiny_lora_model("lora.dropout=0.0")
    mlps = [m for m in model.modules() if isinstance(m, LlamaMLP)]
    assert mlps and all(type(m) is not LlamaMLP and type(m).__name__ == "LlamaMLP" for m in mlps)
    assert recompute_swiglu(model) == 0  # once is enough
    batch = collate([encode(tok, r) for r in _records()], tok.pad_token_id)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    model.train()
    results = []
    recomputing = type(mlps[0])
    try:
        for cls in (recomputing, LlamaMLP):
            for m in mlps:
                m.__class__ = cls
            (loss, _), kept = _saved_bytes(lambda: response_loss(model, batch, autocast))
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in adapter_parameters(model, "default")], kept))
            model.zero_grad(set_to_none=True)
    finally:
        for m in mlps:
            m.__class__ = recomputing
        model.eval()
    (loss, grads, kept), (loss_ref, grads_ref, kept_ref) = results
    assert torch.equal(loss, loss_ref) and all(torch.equal(a, b) for a, b in zip(grads, grads_ref, strict=True))
    width = mlps[0].gate_proj.base_layer.out_features
    itemsize = 2 if bf16 else 4
    assert kept_ref - kept == len(mlps) * batch["input_ids"].numel() * width * itemsize  # silu's output


def test_an_mlp_of_another_shape_is_left_alone() -> None:
    class GeluMLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = (torch.nn.Linear(4, 4) for _ in range(3))
            self.act_fn = torch.nn.GELU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    class OtherForward(GeluMLP):
        def __init__(self) -> None:
            super().__init__()
            self.act_fn = torch.nn.SiLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))

    model = torch.nn.Sequential(GeluMLP(), OtherForward())
    assert recompute_swiglu(model) == 0
    assert [type(m) for m in model] == [GeluMLP, OtherForward]
