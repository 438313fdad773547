"""Multiple choice by log-likelihood (lm-evaluation-harness conventions), no generation.

Context = the record's chat prompt as generation sees it (`chat_messages(record, system_prompt)`
rendered with `add_generation_prompt=True`); continuation = each choice's text, tokenised on
its own and appended. A choice's score is the summed log-probability of its continuation
tokens given the context. `acc`: the top-scoring choice is the right one; `acc_norm`: the top
choice by score / length of the choice in UTF-8 bytes is the right one. Ties go to the first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from fedsdr.data.schema import Record
from fedsdr.train import IGNORE, Example, chat_messages, collate, token_nll


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


@torch.no_grad()
def continuation_logprobs(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[list[int], list[int]]], *,
    autocast: Callable, batch_size: int = 8,
) -> list[float]:
    """Summed log-prob of each (context ids, continuation ids) pair's continuation; pairs run
    `batch_size` at a time, sorted by length and right-padded (causal attention: padding after
    a row cannot change its scores)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]), reverse=True)
    out = [0.0] * len(pairs)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            examples = []
            for i in idx:
                context, continuation = pairs[i]
                if not context or not continuation:
                    raise ValueError("a context and a continuation need at least one token each")
                examples.append(Example(context + continuation, [IGNORE] * len(context) + list(continuation)))
            # The vocabulary projection runs only at the continuation's positions (train.token_nll).
            nll, _ = token_nll(model, collate(examples, pad), autocast)
            for row, i in enumerate(idx):
                out[i] = -float(nll[row].sum())
    finally:
        model.train(was_training)
    return out


def choice_scores(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, records: Sequence[Record], *,
    autocast: Callable, system_prompt: str = "", batch_size: int = 8,
) -> list[dict[str, Any]]:
    """Per multiple-choice record: `acc`, `acc_norm` (0/1), `choice_logprobs` (one per choice),
    `pred` and `pred_norm` (the chosen indices). Every (context, choice) pair of every record is
    scored in batches of `batch_size` pairs."""
    pairs: list[tuple[list[int], list[int]]] = []
    spans: list[tuple[int, int]] = []
    for record in records:
        if not record.choices or record.choice_index is None:
            raise ValueError(f"record {record.id!r} has no choices to rank (scorer {record.scorer!r})")
        prompt = tokenizer.apply_chat_template(
            chat_messages(record, system_prompt), add_generation_prompt=True, tokenize=False
        )
        context = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        start = len(pairs)
        for choice in record.choices:
            pairs.append((context, tokenizer(choice, add_special_tokens=False)["input_ids"]))
        spans.append((start, len(pairs)))
    logprobs = continuation_logprobs(model, tokenizer, pairs, autocast=autocast, batch_size=batch_size)
    results = []
    for record, (start, end) in zip(records, spans, strict=True):
        assert record.choices is not None
        scores = logprobs[start:end]
        normed = [s / max(1, len(c.encode("utf-8"))) for s, c in zip(scores, record.choices, strict=True)]
        pred, pred_norm = _argmax(scores), _argmax(normed)
        results.append({
            "acc": float(pred == record.choice_index),
            "acc_norm": float(pred_norm == record.choice_index),
            "choice_logprobs": scores,
            "pred": pred,
            "pred_norm": pred_norm,
        })
    return results
