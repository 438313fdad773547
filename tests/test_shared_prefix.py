"""The shared opening of evaluation rows (`fedsdr.prefix`): computed once, it gives the losses
of the full forward."""

from __future__ import annotations

import contextlib

import pytest
import torch
from tiny_llama import tiny_lora_model

from fedsdr.data.schema import Record
from fedsdr.evaluate import reference_losses
from fedsdr.models.adapters import get_adapter_state, set_adapter_state
from fedsdr.prefix import MIN_SHARED, shareable_length
from fedsdr.train import IGNORE, collate, encode, shared_prefix_of, token_nll

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["What is 2 + 3?", "Add two and three, then explain in a few words why.", "Hi", "Sort: pear apple fig"]
ANSWERS = ["The answer is 5.", "5", "Hello! How can I help you today?", "apple, fig, pear"]


def _examples(tok):  # noqa: ANN001, ANN202
    records = [Record(id=f"r{i}", instruction=p, output=a, domain="arithmetic")
               for i, (p, a) in enumerate(zip(PROMPTS, ANSWERS, strict=True))]
    return records, [encode(tok, r) for r in records]


def _bf16() -> contextlib.AbstractContextManager[None]:
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_shareable_length_stops_at_the_first_difference_and_before_any_scored_position() -> None:
    rows = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 9, 9, 9], [1, 2, 3, 4, 5]]
    assert shareable_length(rows, [5, 5, 5]) == 4  # rows differ at index 4
    assert shareable_length(rows, [5, 3, 5]) == 2  # a row scores token 3: its position 2 stays
    assert shareable_length([[1, 2, 3]], [3]) == 2  # at least one token of its own per row
    assert shareable_length([], []) == 0


@pytest.mark.parametrize(("autocast", "tol"), [(contextlib.nullcontext, 1e-5), (_bf16, 2e-2)],
                         ids=["fp32", "bf16-autocast"])
def test_losses_after_a_shared_prefix_equal_the_full_forward(autocast, tol) -> None:  # noqa: ANN001
    model, tok = tiny_lora_model()
    # a trained-looking adapter, so the prefix's keys and values carry it
    set_adapter_state(model, "default", {k: v + 0.05 for k, v in get_adapter_state(model, "default").items()})
    model.eval()
    records, examples = _examples(tok)
    prefix = shared_prefix_of(model, examples, autocast)
    assert prefix is not None and prefix.length >= MIN_SHARED  # the chat template's opening
    first_scored = min(next(i for i, t in enumerate(e.labels) if t != IGNORE) for e in examples)
    assert prefix.length < first_scored

    batch = collate(examples, tok.pad_token_id)  # right-padded: every row but the longest
    with torch.no_grad():
        full, full_mask = token_nll(model, batch, autocast)
        shared, shared_mask = token_nll(model, batch, autocast, prefix=prefix)
    assert torch.equal(full_mask, shared_mask)
    torch.testing.assert_close(shared, full, rtol=tol, atol=tol)

    with torch.no_grad():  # and through reference_losses, which shares the prefix itself
        got = reference_losses(model, tok, records, autocast=autocast, batch_size=3)
    for (total, n), row, row_mask in zip(got, full, full_mask, strict=True):
        assert n == int(row_mask.sum())
        assert abs(total - float(row.sum())) <= tol * max(1.0, abs(float(row.sum())))


def test_a_prefix_that_reaches_a_scored_position_is_refused() -> None:
    model, tok = tiny_lora_model()
    model.eval()
    _, examples = _examples(tok)
    prefix = shared_prefix_of(model, examples, contextlib.nullcontext)
    assert prefix is not None
    batch = collate(examples, tok.pad_token_id)
    batch["labels"][0, 1:prefix.length] = batch["input_ids"][0, 1:prefix.length]  # score the opening too
    with pytest.raises(ValueError, match="shared prefix"), torch.no_grad():
        token_nll(model, batch, contextlib.nullcontext, prefix=prefix)
