"""`model.attn_implementation`: the config picks transformers' attention, and every path that
runs the model (training's loss and gradients, reference losses with the shared prefix, the
generation engine) computes the same with it as with the default."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_config

from fedsdr.data.schema import Record
from fedsdr.evaluate import reference_losses
from fedsdr.generation import generate
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


def test_the_configured_attention_computes_what_the_default_does() -> None:
    default, eager = _everything("auto"), _everything("eager")
    assert default["impl"] == "sdpa" and eager["impl"] == "eager"
    assert eager["loss"] == pytest.approx(default["loss"], rel=1e-5)
    for a, b in zip(default["grads"], eager["grads"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for (nll_a, n_a), (nll_b, n_b) in zip(default["reference"], eager["reference"], strict=True):
        assert n_a == n_b and nll_a == pytest.approx(nll_b, rel=1e-5)
    assert eager["texts"] == default["texts"]
