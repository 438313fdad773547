"""`model.attn_implementation`: the config picks transformers' attention, and every path that
runs the model (training's loss and gradients, reference losses with the shared prefix, the
generation engine) computes the same with it as with SDPA. On a CPU "auto" picks
`sdpa_recompute` (`fedsdr.models.attention`): SDPA itself for inference, its own backward for
training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_config

from fedsdr.data.schema import Record
from fedsdr.evaluate import reference_losses
from fedsdr.generation import generate
from fedsdr.models import attention
from fedsdr.models.adapters import (
    AdapterSpec,
    adapter_parameters,
    get_adapter_state,
    set_adapter_state,
)
from fedsdr.models.loading import shared_model
from fedsdr.train import collate, encode, response_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RECORDS = [Record(id=f"r{i}", instruction=q, output=a, domain="arithmetic") for i, (q, a) in enumerate(
    [("What is 2 + 3?", "The answer is 5."), ("Sort: pear fig apple", "apple, fig, pear"),
     ("Hi", "Hello! How can I help you today?")])]


def _everything(impl: str) -> dict:
    cfg = tiny_config(f'model.attn_implementation="{impl}"', "lora.dropout=0.0")
    model, tok, runtime, _ = shared_model(cfg.model, cfg.lora, [AdapterSpec("default", cfg.lora.r, cfg.lora.alpha)], 0)
    rng = np.random.default_rng(1)  # a non-zero adapter, the same for both
    set_adapter_state(model, "default", {k: (0.05 * rng.standard_normal(v.shape)).astype(np.float32)
                                         for k, v in sorted(get_adapter_state(model, "default").items())})
    model.train()
    params = adapter_parameters(model, "default")
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    loss, _ = response_loss(model, collate([encode(tok, r) for r in RECORDS], tok.pad_token_id), runtime.autocast)
    loss.backward()
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
        p.requires_grad_(False)
    model.eval()
    return {
        "impl": model.get_base_model().config._attn_implementation,
        "loss": float(loss), "grads": grads,
        "reference": reference_losses(model, tok, RECORDS, autocast=runtime.autocast),
        "texts": generate(model, tok, [[{"role": "user", "content": r.instruction}] for r in RECORDS],
                          max_new_tokens=12, batch_size=2),
    }


def test_the_configured_attention_computes_what_sdpa_does(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "SDPA_DTYPES", frozenset())  # the tiny config trains in fp32
    sdpa, auto, eager = _everything("sdpa"), _everything("auto"), _everything("eager")
    assert (sdpa["impl"], auto["impl"], eager["impl"]) == ("sdpa", attention.RECOMPUTE, "eager")
    for other in (auto, eager):
        assert other["loss"] == pytest.approx(sdpa["loss"], rel=1e-5)
        for a, b in zip(sdpa["grads"], other["grads"], strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
        for (nll_a, n_a), (nll_b, n_b) in zip(sdpa["reference"], other["reference"], strict=True):
            assert n_a == n_b and nll_a == pytest.approx(nll_b, rel=1e-5)
        assert other["texts"] == sdpa["texts"]
    # inference runs SDPA itself: not merely close
    assert auto["reference"] == sdpa["reference"]


class _Layer(torch.nn.Module):
    num_key_value_groups = 3  # 9 query heads over 3 key/value heads, as SmolLM2's
    is_causal = True


def _attend(fn, query, key, value, mask, autocast: bool):  # noqa: ANN001, ANN202
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out, _ = fn(_Layer(), query, key, value, mask, scaling=0.25)
    return out


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("masked", [False, True], ids=["causal", "padded"])
def test_recompute_attention_has_sdpas_values_and_gradients(autocast: bool, masked: bool,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "SDPA_DTYPES", frozenset())
    gen = torch.Generator().manual_seed(0)
    batch, length, dim = 3, 7, 16
    query = torch.randn(batch, 9, length, dim, generator=gen, requires_grad=True)
    key, value = (torch.randn(batch, 3, length, dim, generator=gen, requires_grad=True) for _ in range(2))
    mask, real = None, torch.ones(batch, length, dtype=torch.bool)
    if masked:  # row 0 left-padded by 2, row 1 right-padded after 5
        mask = torch.ones(batch, 1, length, length, dtype=torch.bool).tril()
        mask[0, ..., :2] = False
        mask[1, ..., 5:] = False
        real[0, :2] = False
    weights = torch.randn(batch, length, 9, dim, generator=gen) * real[:, :, None, None]  # padding: no loss
    results = []
    for fn in (attention.sdpa_attention_forward, attention.recompute_attention):
        out = _attend(fn, query, key, value, mask, autocast)
        results.append((out.float()[real], torch.autograd.grad((out.float() * weights).sum(), (query, key, value))))
    (out_sdpa, grads_sdpa), (out_ours, grads_ours) = results
    tol = {"rtol": 2e-2, "atol": 2e-2} if autocast else {"rtol": 1e-5, "atol": 1e-6}  # bf16 rounds to ~0.4%
    torch.testing.assert_close(out_ours, out_sdpa, **tol)
    for ours, theirs in zip(grads_ours, grads_sdpa, strict=True):
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours / theirs.abs().max(), theirs / theirs.abs().max(), **tol)
    assert torch.isfinite(grads_ours[0]).all()  # a padded row attends to nothing: no NaN


def test_recompute_attention_without_a_gradient_is_sdpa_itself() -> None:
    gen = torch.Generator().manual_seed(1)
    query = torch.randn(2, 9, 5, 16, generator=gen, requires_grad=True)
    key, value = (torch.randn(2, 3, 5, 16, generator=gen) for _ in range(2))
    with torch.no_grad():
        for autocast in (False, True):
            ours = _attend(attention.recompute_attention, query, key, value, None, autocast)
            assert torch.equal(ours, _attend(attention.sdpa_attention_forward, query, key, value, None, autocast))


def _autograd_nodes(out: torch.Tensor) -> set[str]:
    names, todo = set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None:
            names.add(type(node).__name__)
            todo.extend(next_node for next_node, _ in node.next_functions)
    return names


def test_recompute_attention_leaves_long_rows_and_fp32_to_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(2)
    query = torch.randn(2, 9, 6, 16, generator=gen, requires_grad=True)
    key, value = (torch.randn(2, 3, 6, 16, generator=gen, requires_grad=True) for _ in range(2))
    for autocast, used in ((False, False), (True, True)):  # fp32: SDPA's flash kernel is as fast
        ours = _attend(attention.recompute_attention, query, key, value, None, autocast)
        assert ("_RecomputedAttentionBackward" in _autograd_nodes(ours)) is used
    monkeypatch.setattr(attention, "MAX_SCORES", 2 * 9 * 6 * 6 - 1)  # one score too many
    ours = _attend(attention.recompute_attention, query, key, value, None, True)
    assert "_RecomputedAttentionBackward" not in _autograd_nodes(ours)
    assert torch.equal(ours, _attend(attention.sdpa_attention_forward, query, key, value, None, True))


def test_a_base_evaluation_under_sdpa_recompute_is_keyed_as_sdpas() -> None:
    """Inference under `sdpa_recompute` is SDPA's, so cached round-0 evaluations stay valid."""
    from fedsdr.evaluate import _base_key

    cfg = tiny_config()
    model, _, _, _ = shared_model(cfg.model, cfg.lora, [AdapterSpec("default", cfg.lora.r, cfg.lora.alpha)], 0)
    base = model.get_base_model()
    keys = {}
    for impl in ("sdpa", attention.RECOMPUTE, "eager"):
        base.set_attn_implementation(impl)
        keys[impl] = _base_key("tiny", model, RECORDS, cfg.eval, "", 0, True)
    base.set_attn_implementation(attention.RECOMPUTE)
    assert keys["sdpa"] == keys[attention.RECOMPUTE] != keys["eager"]


def test_recompute_attention_leaves_a_bidirectional_layer_without_a_mask_to_sdpa(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "SDPA_DTYPES", frozenset())  # fp32 would go to SDPA anyway
    gen = torch.Generator().manual_seed(3)
    query = torch.randn(1, 9, 5, 16, generator=gen, requires_grad=True)
    key, value = (torch.randn(1, 3, 5, 16, generator=gen) for _ in range(2))
    layer = _Layer()
    layer.is_causal = False
    ours, _ = attention.recompute_attention(layer, query, key, value, None, scaling=0.25)
    theirs, _ = attention.sdpa_attention_forward(layer, query, key, value, None, scaling=0.25)
    assert "_RecomputedAttentionBackward" not in _autograd_nodes(ours)
    assert torch.equal(ours, theirs)


def test_inference_over_several_queries_under_a_mask_runs_grouped_heads(monkeypatch: pytest.MonkeyPatch) -> None:
    """A prefill or a pass that checks drafts (several queries, a mask, no gradient) gets SDPA's
    values without transformers' `repeat_kv` copy of every key/value head."""
    gen = torch.Generator().manual_seed(2)
    query = torch.randn(2, 9, 4, 16, generator=gen)
    key, value = (torch.randn(2, 3, 11, 16, generator=gen) for _ in range(2))
    mask = torch.ones(2, 1, 4, 11, dtype=torch.bool).tril(diagonal=7)
    mask[0, ..., :3] = False  # left padding
    with torch.no_grad():
        expected = _attend(attention.sdpa_attention_forward, query, key, value, mask, False)
        monkeypatch.setattr(attention, "sdpa_attention_forward", None)  # not called
        ours = _attend(attention.recompute_attention, query, key, value, mask, False)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
