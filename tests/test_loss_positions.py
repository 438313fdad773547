"""The loss where it is defined (issue 11): the vocabulary projection runs only at the scored
positions, in chunks, and gives the same losses and LoRA gradients as the full-logits path."""

from __future__ import annotations

import contextlib

import pytest
import torch
from tiny_llama import tiny_lora_model

from fedsdr.data.schema import Record
from fedsdr.evaluate import reference_losses
from fedsdr.models.adapters import adapter_parameters
from fedsdr.train import IGNORE, _decoder_and_head, collate, encode, response_loss, token_nll

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["What is 2 + 3?", "Add two and three, then explain in a few words why the sum is what it is.",
           "Hi", "Sort these words: pear apple fig banana cherry date grape"]
ANSWERS = ["The answer is 5.", "5", "Hello! How can I help you today? " * 3, "apple, banana, cherry, date"]


def _records() -> list[Record]:
    return [Record(id=f"r{i}", instruction=p, output=a, domain="arithmetic")
            for i, (p, a) in enumerate(zip(PROMPTS, ANSWERS, strict=True))]


_model = tiny_lora_model


def _bf16() -> contextlib.AbstractContextManager[None]:
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _old_token_nll(model, batch, autocast):  # noqa: ANN001, ANN202
    """The reference: the model's full logits, copied to fp32 (the code before issue 11)."""
    with autocast():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="none"
    )
    return nll, targets != IGNORE


def _batch(tok):  # noqa: ANN001, ANN202
    batch = collate([encode(tok, r) for r in _records()], tok.pad_token_id)
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == len(PROMPTS)  # padding on every row but the longest
    return batch


def _grads(model, loss):  # noqa: ANN001, ANN202
    params = adapter_parameters(model, "default")
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad.detach().clone() for p in params]
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize(("autocast", "tol"), [(contextlib.nullcontext, 1e-5), (_bf16, 2e-2)],
                         ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("chunk", [7, 4096, None], ids=["chunk-7", "one-chunk", "by-bytes"])
def test_loss_and_lora_gradients_match_the_full_logits_path(autocast, tol, chunk) -> None:  # noqa: ANN001
    model, tok = _model()
    assert _decoder_and_head(model, collate([encode(tok, _records()[0])], tok.pad_token_id),
                             contextlib.nullcontext) is not None
    batch = _batch(tok)
    n_targets = int((batch["labels"][:, 1:] != IGNORE).sum())
    assert n_targets > 3 * 7  # several chunks of 7
    model.train()  # tiny config: LoRA dropout 0, so train mode is deterministic
    ref_nll, ref_mask = _old_token_nll(model, batch, autocast)
    ref_grads = _grads(model, ref_nll.sum() / n_targets)

    loss_sum, n = response_loss(model, batch, autocast, chunk=chunk)
    assert n == n_targets
    torch.testing.assert_close(loss_sum, ref_nll.sum().detach(), rtol=tol, atol=tol)
    grads = _grads(model, loss_sum / n)
    scale = max(float(g.abs().max()) for g in ref_grads)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=tol, atol=tol * scale)

    nll, mask = token_nll(model, batch, autocast, chunk=chunk)
    assert torch.equal(mask, ref_mask)
    assert (nll[~mask] == 0).all()
    torch.testing.assert_close(nll.detach(), ref_nll.detach(), rtol=tol, atol=tol)


@pytest.mark.parametrize(("autocast", "tol"), [(contextlib.nullcontext, 1e-5), (_bf16, 2e-2)],
                         ids=["fp32", "bf16-autocast"])
def test_reference_losses_per_record_match_the_full_logits_path(autocast, tol) -> None:  # noqa: ANN001
    model, tok = _model()
    records = _records()
    got = reference_losses(model, tok, records, autocast=autocast, batch_size=3)
    model.eval()
    with torch.no_grad():
        ref_nll, ref_mask = _old_token_nll(model, _batch(tok), autocast)
    for (total, n), row_nll, row_mask in zip(got, ref_nll, ref_mask, strict=True):
        assert n == int(row_mask.sum()) > 0
        assert abs(total - float(row_nll.sum())) <= tol * max(1.0, abs(float(row_nll.sum())))


def test_a_lora_on_the_output_embedding_still_applies_and_gets_gradients() -> None:
    """lm_head wrapped by LoRA: the checkpointed-chunk path, same loss and gradients."""
    model, tok = _model("lora.target_modules=['q_proj','v_proj','lm_head']")
    head = model.get_base_model().get_output_embeddings()
    assert type(head) is not torch.nn.Linear and hasattr(head, "lora_A")
    batch = _batch(tok)
    model.train()
    ref_nll, _ = _old_token_nll(model, batch, contextlib.nullcontext)
    ref_grads = _grads(model, ref_nll.sum())
    loss_sum, _ = response_loss(model, batch, contextlib.nullcontext, chunk=5)
    torch.testing.assert_close(loss_sum, ref_nll.sum().detach(), rtol=1e-5, atol=1e-5)
    grads = _grads(model, loss_sum)
    assert any("lm_head" in n for n, p in model.named_parameters() if p.requires_grad)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_models_without_a_separable_head_take_the_full_forward() -> None:
    """A wrapper whose forward changes the logits (scales them here) fails the one-off check
    and keeps its own forward; a batch with no target at all gives a zero loss."""
    model, tok = _model()
    base = model.get_base_model()

    class Capped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = base

        def get_decoder(self):  # noqa: ANN202
            return base.get_decoder()

        def get_output_embeddings(self):  # noqa: ANN202
            return base.get_output_embeddings()

        def forward(self, **kwargs):  # noqa: ANN003, ANN202
            out = self.inner(**kwargs)
            out.logits = 0.5 * out.logits
            return out

    capped = Capped()
    batch = _batch(tok)
    assert _decoder_and_head(capped, batch, contextlib.nullcontext) is None
    ref_nll, _ = _old_token_nll(capped, batch, contextlib.nullcontext)
    loss_sum, _ = response_loss(capped, batch, contextlib.nullcontext, chunk=7)
    torch.testing.assert_close(loss_sum, ref_nll.sum(), rtol=1e-5, atol=1e-5)

    empty = dict(batch, labels=torch.full_like(batch["labels"], IGNORE))
    loss_sum, n = response_loss(model, empty, contextlib.nullcontext)
    assert n == 0 and float(loss_sum.detach()) == 0.0


def test_the_loss_chunk_holds_the_same_bytes_of_logits_in_every_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedsdr import train

    assert train.loss_chunk(49152, torch.bfloat16) == 256  # SmolLM2's vocabulary
    assert train.loss_chunk(49152, torch.float32) == 128
    assert train.loss_chunk(10**9, torch.float32) == train.LOSS_CHUNK_MIN
    # by default the frozen head's chunks hold LOSS_CHUNK_BYTES of logits in the compute dtype
    model, tok = _model()
    vocab = model.get_output_embeddings().weight.shape[0]
    chunks = []
    apply = train._FrozenHeadNLL.apply
    monkeypatch.setattr(train._FrozenHeadNLL, "apply", lambda *a: chunks.append(a[-1]) or apply(*a))
    monkeypatch.setattr(train, "LOSS_CHUNK_MIN", 1)
    monkeypatch.setattr(train, "LOSS_CHUNK_BYTES", 20 * vocab * 4)
    with torch.no_grad():
        train.token_nll(model, _batch(tok), contextlib.nullcontext)
        train.token_nll(model, _batch(tok), _bf16)
    assert chunks == [20, 40]
