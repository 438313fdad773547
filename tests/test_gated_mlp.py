"""The gated MLP that recomputes its activation in backward (models/gated_mlp.py): installed on the
model `shared_model` builds (SiLU) and on Gemma-style GELU MLPs, the same results to the bit, less
kept for backward."""

from __future__ import annotations

import contextlib

import pytest
import torch
from test_memory import _records
from tiny_llama import tiny_lora_model
from transformers.models.llama.modeling_llama import LlamaMLP

from fedsdr.models.adapters import adapter_parameters
from fedsdr.models.gated_mlp import plain_gated_mlps, recompute_gated_mlps, silu_times
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
    assert recompute_gated_mlps(model) == 0  # once is enough
    batch = collate([encode(tok, r) for r in _records()], tok.pad_token_id)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    model.train()
    results = []
    try:
        for recompute in (True, False):
            if not recompute:
                assert plain_gated_mlps(model) == len(mlps) and all(type(m) is LlamaMLP for m in mlps)
            (loss, _), kept = _saved_bytes(lambda: response_loss(model, batch, autocast))
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in adapter_parameters(model, "default")], kept))
            model.zero_grad(set_to_none=True)
    finally:
        assert recompute_gated_mlps(model) == len(mlps)  # the shared model as it was
        model.eval()
    (loss, grads, kept), (loss_ref, grads_ref, kept_ref) = results
    assert torch.equal(loss, loss_ref) and all(torch.equal(a, b) for a, b in zip(grads, grads_ref, strict=True))
    width = mlps[0].gate_proj.base_layer.out_features
    itemsize = 2 if bf16 else 4
    assert kept_ref - kept == len(mlps) * batch["input_ids"].numel() * width * itemsize  # silu's output


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "gelu", "silu"])
def test_a_gemma_style_mlp_recomputes_its_activation_to_the_bit(act, dtype) -> None:  # noqa: ANN001
    from transformers import GemmaConfig
    from transformers.models.gemma.modeling_gemma import GemmaMLP

    torch.manual_seed(0)
    mlp = GemmaMLP(GemmaConfig(hidden_size=32, intermediate_size=96, hidden_act=act)).to(dtype)
    x = torch.randn(3, 5, 32, dtype=dtype)
    upstream = torch.randn(3, 5, 32, dtype=dtype)
    model = torch.nn.Sequential(mlp)
    runs = []
    for recompute in (False, True):
        if recompute:
            assert recompute_gated_mlps(model) == 1 and type(mlp) is not GemmaMLP and type(mlp).__name__ == "GemmaMLP"
        xi = x.clone().requires_grad_(True)
        out, kept = _saved_bytes(lambda xi=xi: mlp(xi))
        out.backward(upstream)
        runs.append((out.detach(), xi.grad, [p.grad.clone() for p in mlp.parameters()], kept))
        mlp.zero_grad(set_to_none=True)
    (out_ref, gx_ref, gw_ref, kept_ref), (out, gx, gw, kept) = runs
    assert torch.equal(out, out_ref) and torch.equal(gx, gx_ref)
    assert all(torch.equal(a, b) for a, b in zip(gw, gw_ref, strict=True))
    assert kept_ref - kept == x.shape[0] * x.shape[1] * 96 * x.element_size()  # the activation's output


def test_only_mlps_that_return_the_product_of_a_known_activation_are_changed() -> None:
    class ReluMLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = (torch.nn.Linear(4, 4) for _ in range(3))
            self.act_fn = torch.nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    class OtherForward(ReluMLP):
        def __init__(self) -> None:
            super().__init__()
            self.act_fn = torch.nn.SiLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))

    from transformers.activations import GELUTanh

    class PythonGelu(ReluMLP):  # transformers' "gelu_python_tanh": its own formula, not torch's kernel
        def __init__(self) -> None:
            super().__init__()
            self.act_fn = GELUTanh(use_gelu_tanh_python=True)

    class MoreAfter(OtherForward):  # the product and then something else: not to be dropped
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
            return out * 2

    class TheProduct(OtherForward):  # as transformers writes it, argument renamed: recomputed
        def forward(self, hidden: torch.Tensor) -> torch.Tensor:
            """A docstring is fine."""
            down_proj = self.down_proj(self.act_fn(self.gate_proj(hidden)) * self.up_proj(hidden))
            return down_proj

    model = torch.nn.Sequential(ReluMLP(), OtherForward(), PythonGelu(), MoreAfter(), TheProduct())
    assert recompute_gated_mlps(model) == 1
    assert [type(m) for m in model][:4] == [ReluMLP, OtherForward, PythonGelu, MoreAfter]
    assert type(model[4]) is not TheProduct and isinstance(model[4], TheProduct)
