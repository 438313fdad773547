"""Memory without changing the numbers (issue 11): LoRA's dropout keeps a 1-byte mask for
backward instead of the noise tensor, with the same random draws, losses and gradients."""

from __future__ import annotations

import contextlib

import pytest
import torch
from tiny_llama import tiny_lora_model

from fedsdr.data.schema import Record
from fedsdr.models.adapters import adapter_parameters
from fedsdr.train import MaskDropout, collate, encode, response_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("shape", [(3, 5, 7), (0, 4)])
def test_mask_dropout_draws_and_gradients_equal_torch_dropout(shape) -> None:  # noqa: ANN001
    x = torch.randn(shape)
    outs = []
    for layer in (torch.nn.Dropout(0.3), MaskDropout(0.3)):
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(7)
        y = layer(xi)
        y.backward(torch.arange(y.numel(), dtype=torch.float32).reshape(y.shape))
        outs.append((y.detach(), xi.grad, torch.rand(1)))  # the RNG advanced the same way
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)
    layer = MaskDropout(0.3).eval()
    assert layer(x) is x


def _records() -> list[Record]:
    pairs = [("What is 2 + 3?", "The answer is 5."), ("Sort: pear fig apple", "apple, fig, pear"),
             ("Hi", "Hello! How can I help you today?")]
    return [Record(id=f"r{i}", instruction=p, output=a, domain="arithmetic") for i, (p, a) in enumerate(pairs)]


@pytest.mark.parametrize("bf16", [False, True])
def test_training_with_the_compact_dropout_gives_identical_losses_and_gradients(bf16) -> None:  # noqa: ANN001
    model, tok = tiny_lora_model("lora.dropout=0.4")  # non-zero B: the dropout's gradient path is exercised
    dropouts = [d for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict)
                for d in m.lora_dropout.values()]
    assert dropouts and all(type(d) is MaskDropout for d in dropouts)
    batch = collate([encode(tok, r) for r in _records()], tok.pad_token_id)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    model.train()
    results = []
    for compact in (False, True):  # ends as shared_model left it (the model is cached)
        for m in model.modules():
            if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict):
                for name, d in list(m.lora_dropout.items()):
                    m.lora_dropout[name] = (MaskDropout if compact else torch.nn.Dropout)(d.p).train()
        torch.manual_seed(3)
        loss, _ = response_loss(model, batch, autocast)
        loss.backward()
        params = adapter_parameters(model, "default")
        results.append((loss.detach(), [p.grad.clone() for p in params]))
        model.zero_grad(set_to_none=True)
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))
    model.eval()


def test_freed_heap_memory_can_be_handed_back_at_any_time() -> None:
    from fedsdr.models.loading import release_freed_memory

    release_freed_memory()  # glibc: malloc_trim; elsewhere: nothing
