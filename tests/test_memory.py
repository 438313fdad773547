"""Memory and speed without changing what training computes (issue 11): LoRA's dropout keeps a
1-byte mask for backward and draws it cheaply, still a seeded Bernoulli dropout with the right
gradient; a batch split into passes of bounded tokens, and gradient checkpointing, take the same
optimizer step."""

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mask_dropout_is_a_seeded_bernoulli_dropout_with_its_gradient(dtype) -> None:  # noqa: ANN001
    p = 0.3
    x = torch.randn(257, 129).to(dtype)  # not a multiple of 4 elements: the last 64-bit word is cut
    runs = []
    for _ in range(2):
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(7)
        y = MaskDropout(p)(xi)
        upstream = torch.randn(y.shape, dtype=dtype)
        y.backward(upstream)
        runs.append((y.detach(), xi.grad))
    (y, grad), (y_again, grad_again) = runs
    assert torch.equal(y, y_again) and torch.equal(grad, grad_again)  # seeded
    kept = y != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.01
    torch.testing.assert_close(y[kept], (x[kept].float() / (1 - p)).to(dtype))
    torch.testing.assert_close(grad, (upstream.float() * kept / (1 - p)).to(dtype))
    torch.manual_seed(8)
    assert not torch.equal(MaskDropout(p)(x), y)
    assert MaskDropout(p).eval()(x) is x
    assert MaskDropout(p)(torch.empty(0, 4)).shape == (0, 4)


def test_keep_mask_draws_every_16_bit_lane_uniformly() -> None:
    from fedsdr.train import keep_mask

    torch.manual_seed(0)
    mask = keep_mask((4 * 200_000,), 0.95).view(-1, 4).float()
    assert torch.allclose(mask.mean(0), torch.full((4,), 0.95), atol=0.003)  # no lane biased


def _records() -> list[Record]:
    pairs = [("What is 2 + 3?", "The answer is 5."), ("Sort: pear fig apple", "apple, fig, pear"),
             ("Hi", "Hello! How can I help you today?")]
    return [Record(id=f"r{i}", instruction=p, output=a, domain="arithmetic") for i, (p, a) in enumerate(pairs)]


@pytest.mark.parametrize("bf16", [False, True])
def test_lora_dropout_in_training_is_the_compact_one_and_seeded(bf16) -> None:  # noqa: ANN001
    model, tok = tiny_lora_model("lora.dropout=0.4")  # non-zero B: the dropout's gradient path is exercised
    dropouts = [d for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict)
                for d in m.lora_dropout.values()]
    assert dropouts and all(type(d) is MaskDropout for d in dropouts)
    batch = collate([encode(tok, r) for r in _records()], tok.pad_token_id)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    model.train()
    results = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        loss, _ = response_loss(model, batch, autocast)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in adapter_parameters(model, "default")]))
        model.zero_grad(set_to_none=True)
    (loss_a, grads_a), (loss_b, grads_b), (loss_c, _) = results
    assert torch.equal(loss_a, loss_b) and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))
    assert not torch.equal(loss_a, loss_c)  # other draws, another loss
    model.eval()


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
    base = model.get_base_model()  # its name since transformers 5.2x; before, is_gradient_checkpointing
    assert not getattr(base, "is_activation_checkpointing", None) and not base.is_gradient_checkpointing  # off again
    set_adapter_state(model, "default", start)
    model.eval()


def test_pass_tokens_auto_splits_batches_on_a_cpu_and_not_on_an_accelerator(monkeypatch) -> None:  # noqa: ANN001
    from fedsdr import train

    assert train.pass_budget(TrainConfig(), torch.device("cpu")) == train.CPU_PASS_TOKENS == 512
    assert train.pass_budget(TrainConfig(), torch.device("cpu"), torch.bfloat16) == 512
    # fp32 keeps ~4/3 the bytes per token for backward: about the same bytes, 3/4 of the tokens
    assert train.pass_budget(TrainConfig(), torch.device("cpu"), torch.float32) == 384
    assert train.pass_budget(TrainConfig(pass_tokens=512), torch.device("cpu"), torch.float32) == 512
    assert train.pass_budget(TrainConfig(), torch.device("cuda")) == 0  # the whole batch in one pass
    assert train.pass_budget(TrainConfig(pass_tokens=100), torch.device("cuda")) == 100  # the config's wins
    # training resolves "auto" for the device the model is on and the dtype it computes in: here
    # a CPU in fp32 (no autocast), with a budget small enough to split the tiny batch
    monkeypatch.setattr(train, "CPU_PASS_TOKENS", 32)  # 24 in fp32
    model, tok = tiny_lora_model("lora.dropout=0.0")
    examples = [encode(tok, r) for r in _records()]
    embedded: list[int] = []
    handle = model.get_input_embeddings().register_forward_hook(lambda *_: embedded.append(1))
    forwards = {}
    try:
        for setting in (0, "auto", 24):  # 0 first: the model's one-time head check runs there
            cfg = TrainConfig(batch_size=3, lr=1e-2, pass_tokens=setting)
            stream = make_stream(examples, adapter_parameters(model, "default"), cfg, seed=0)
            embedded.clear()
            sft_steps(model, stream, cfg, steps=1, first_step=0, total_steps=1, pad_id=tok.pad_token_id,
                      autocast=contextlib.nullcontext)
            forwards[setting] = len(embedded)
    finally:
        handle.remove()
    assert forwards[0] == 1
    assert forwards["auto"] == forwards[24] == len(passes(examples, 24)) > 1


def test_gpu_memory_is_a_figure_of_cuda_runs_only() -> None:
    from fedsdr.models.loading import device_peak_memory

    with device_peak_memory(torch.device("cpu")) as peak:
        torch.ones(1000).sum()
    assert peak == {}  # a CPU run's memory is its RSS (benchmarks/bench_memory.py)


def _saved_bytes_loss_and_grads(model, batch) -> tuple[int, torch.Tensor, list[torch.Tensor]]:  # noqa: ANN001
    """What one training pass keeps for backward (each storage once, parameters left out), its
    loss and the adapter's gradients, the dropout seeded."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:
            storages.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    model.train()
    torch.manual_seed(5)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss, _ = response_loss(model, batch, contextlib.nullcontext)
    loss.backward()
    grads = [p.grad.clone() for p in adapter_parameters(model, "default")]
    model.zero_grad(set_to_none=True)
    model.eval()
    return sum(storages.values()), loss.detach(), grads


def test_the_lora_dropout_folded_into_a_keeps_less_and_computes_the_same() -> None:
    from fedsdr.train import DroppedInputLinear

    model, tok = tiny_lora_model("lora.dropout=0.4")  # non-zero B: every gradient path is exercised
    dropouts = [m.lora_dropout["default"] for m in model.modules()
                if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict)]
    folded = [m.lora_A["default"] for m in model.modules() if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict)]
    assert folded and all(type(a) is DroppedInputLinear and a.dropout.folded for a in folded)
    assert all(key.endswith(".weight") and "dropout" not in key for key in get_adapter_state(model, "default"))
    batch = collate([encode(tok, r) for r in _records()], tok.pad_token_id)
    kept_folded, loss_folded, grads_folded = _saved_bytes_loss_and_grads(model, batch)
    for d in dropouts:
        d.folded = False  # dropout, then the plain linear: the path before
    try:
        kept_plain, loss_plain, grads_plain = _saved_bytes_loss_and_grads(model, batch)
    finally:
        for d in dropouts:
            d.folded = True
    assert torch.equal(loss_folded, loss_plain)  # the same mask draws and products, to the bit
    assert all(torch.equal(a, b) for a, b in zip(grads_folded, grads_plain, strict=True))
    assert kept_folded < kept_plain
