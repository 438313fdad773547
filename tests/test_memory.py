"""Memory without changing the numbers (issue 11): LoRA's dropout keeps a 1-byte mask for
backward instead of the noise tensor, with the same random draws, losses and gradients; a batch
split into passes of bounded tokens, and gradient checkpointing, take the same optimizer step."""

from __future__ import annotations

import contextlib

import pytest
import torch
from tiny_llama import tiny_lora_model

from fedsdr.config import TrainConfig
from fedsdr.data.schema import Record
from fedsdr.models.adapters import adapter_parameters, get_adapter_state, set_adapter_state
from fedsdr.train import MaskDropout, collate, encode, make_stream, passes, response_loss, sft_steps

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


def test_a_batch_is_split_into_passes_of_at_most_the_token_budget() -> None:
    from fedsdr.train import Example

    batch = [Example([1] * n, [1] * n) for n in (5, 40, 12, 33, 7, 40)]
    split = passes(batch, 80)
    assert sorted(len(e.input_ids) for p in split for e in p) == sorted(len(e.input_ids) for e in batch)
    assert all(len(p) * max(len(e.input_ids) for e in p) <= 80 for p in split)
    assert [len(p) for p in split] == [2, 2, 2]  # longest first: 2 x 40, 33 + 12, then 7 + 5
    assert passes(batch, 0) == [batch] == passes(batch, 6 * 40)
    assert [len(p) for p in passes(batch, 10)] == [1] * 6  # a row over the budget gets its own pass


@pytest.mark.parametrize("setting", [{"pass_tokens": 24}, {"gradient_checkpointing": True}])
def test_passes_and_checkpointing_take_the_same_optimizer_step(setting) -> None:  # noqa: ANN001
    model, tok = tiny_lora_model("lora.dropout=0.0")
    examples = [encode(tok, r) for r in _records()]
    assert max(len(e.input_ids) for e in examples) * 2 > 24  # the batch of 3 is split
    start = get_adapter_state(model, "default")
    after = []
    one_pass = TrainConfig(batch_size=3, lr=1e-2, pass_tokens=0)
    for cfg in (one_pass, one_pass.model_copy(update=setting)):
        set_adapter_state(model, "default", start)
        stream = make_stream(examples, adapter_parameters(model, "default"), cfg, seed=0)
        stats = sft_steps(model, stream, cfg, steps=2, first_step=0, total_steps=2, pad_id=tok.pad_token_id,
                          autocast=contextlib.nullcontext)
        after.append((stats.losses, stats.tokens, get_adapter_state(model, "default")))
    (losses_a, tokens_a, state_a), (losses_b, tokens_b, state_b) = after
    assert tokens_a == tokens_b and losses_a == pytest.approx(losses_b, rel=1e-5)
    assert not all(torch.equal(torch.as_tensor(state_a[k]), torch.as_tensor(start[k])) for k in start)
    for key in state_a:
        torch.testing.assert_close(torch.as_tensor(state_a[key]), torch.as_tensor(state_b[key]), rtol=1e-4, atol=1e-6)
    assert not model.get_base_model().is_activation_checkpointing  # off again for evaluation
    set_adapter_state(model, "default", start)
    model.eval()
