"""Multiple choice by log-likelihood (lm-evaluation-harness conventions), no generation.

Context = the record's chat prompt as generation sees it (`chat_messages(record, system_prompt)`
rendered with `add_generation_prompt=True`); continuation = each choice's text, tokenised on
its own and appended. A choice's score is the summed log-probability of its continuation
tokens given the context. `acc`: the top-scoring choice is the right one; `acc_norm`: the top
choice by score / length of the choice in UTF-8 bytes is the right one. Ties go to the first.

A record's context is encoded once: its key/value cache is repeated for the record's choices,
which then run together (a record of k choices costs one context pass, not k).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from fedsdr.data.schema import Record
from fedsdr.kv import with_cache
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


@torch.no_grad()
def shared_context_logprobs(
    model: torch.nn.Module, groups: Sequence[tuple[list[int], Sequence[list[int]]]], *, autocast: Callable,
    pad_id: int,
) -> list[list[float]]:
    """Per (context ids, [continuation ids, ...]) group: the summed log-prob of each
    continuation given the context. The context (but its last token) is encoded once into a
    key/value cache, repeated for the group's continuations; each continuation row is then the
    context's last token followed by the continuation, right-padded (causal attention: padding
    after a row cannot change its scores). Equal to `continuation_logprobs` within float
    tolerance."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    results: list[list[float]] = []
    was_training = model.training
    model.eval()
    try:
        for context, continuations in groups:
            if len(context) < 2 or not continuations or not all(continuations):
                raise ValueError("a shared context needs two tokens and every continuation one")
            cache = DynamicCache(config=model.config)
            head = torch.tensor([context[:-1]], device=device)
            with autocast():
                model(input_ids=head, attention_mask=torch.ones_like(head), **with_cache(model, cache), use_cache=True,
                      logits_to_keep=1)
            n, width = len(continuations), 1 + max(len(c) for c in continuations)
            cache.batch_repeat_interleave(n)
            rows = torch.full((n, width), pad_id, dtype=torch.long)
            mask = torch.zeros((n, len(context) - 1 + width), dtype=torch.long)
            mask[:, : len(context) - 1] = 1
            for j, cont in enumerate(continuations):
                rows[j, : 1 + len(cont)] = torch.tensor([context[-1], *cont])
                mask[j, len(context) - 1: len(context) + len(cont)] = 1
            positions = torch.arange(len(context) - 1, len(context) - 1 + width).expand(n, width)
            with autocast():
                logits = model(input_ids=rows.to(device), attention_mask=mask.to(device),
                               position_ids=positions.to(device), **with_cache(model, cache), use_cache=True).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            scores = []
            for j, cont in enumerate(continuations):
                targets = torch.tensor(cont, device=device)[:, None]
                scores.append(float(logprobs[j, : len(cont)].gather(1, targets).sum()))
            results.append(scores)
    finally:
        model.train(was_training)
    return results


def choice_scores(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, records: Sequence[Record], *,
    autocast: Callable, system_prompt: str = "", batch_size: int = 8,
) -> list[dict[str, Any]]:
    """Per multiple-choice record: `acc`, `acc_norm` (0/1), `choice_logprobs` (one per choice),
    `pred` and `pred_norm` (the chosen indices). A record's context is encoded once for all its
    choices (`shared_context_logprobs`); a record whose context has a single token (no chat
    prompt has) or an empty choice goes through `continuation_logprobs`, `batch_size` pairs at a
    time."""
    groups: list[tuple[list[int], list[list[int]]]] = []
    for record in records:
        if not record.choices or record.choice_index is None:
            raise ValueError(f"record {record.id!r} has no choices to rank (scorer {record.scorer!r})")
        prompt = tokenizer.apply_chat_template(
            chat_messages(record, system_prompt), add_generation_prompt=True, tokenize=False
        )
        context = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        groups.append((context, [tokenizer(c, add_special_tokens=False)["input_ids"] for c in record.choices]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    shareable = [i for i, (context, choices) in enumerate(groups) if len(context) >= 2 and all(choices)]
    per_record: list[list[float]] = [[] for _ in groups]
    for i, scores in zip(shareable, shared_context_logprobs(
            model, [groups[i] for i in shareable], autocast=autocast, pad_id=pad), strict=True):
        per_record[i] = scores
    rest = sorted(set(range(len(groups))) - set(shareable))
    pairs = [(groups[i][0], c) for i in rest for c in groups[i][1]]  # edge cases: one pair per choice
    flat = iter(continuation_logprobs(model, tokenizer, pairs, autocast=autocast, batch_size=batch_size))
    for i in rest:
        per_record[i] = [next(flat) for _ in groups[i][1]]
    results = []
    for record, scores in zip(records, per_record, strict=True):
        assert record.choices is not None
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
