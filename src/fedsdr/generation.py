"""Batched generation from chat prompts: the engine behind evaluation and rewriting.

Prompts are rendered with the tokenizer's chat template, sorted by length (then by token
budget) so each batch holds similar lengths, left-padded, and decoded with the KV cache.
Each batch decodes up to the largest budget it holds; every output is then cut back to
its own budget, so batched greedy outputs equal one-at-a-time greedy outputs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

Messages = list[dict[str, str]]


@dataclass
class GenerationStats:
    """Counters accumulated over `generate` calls (pass the same object to accumulate)."""

    calls: int = 0  # model.generate calls (one per batch)
    records: int = 0  # prompts generated for
    prompt_tokens: int = 0  # real (non-pad) prompt tokens
    new_tokens: int = 0  # generated tokens per row, up to and including the first eos
    seconds: float = 0.0  # wall time inside `generate`

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Generation:
    """One output: decoded new text, its token count, and whether it stopped at eos."""

    text: str
    num_tokens: int
    finished: bool


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Messages],
    *,
    max_new_tokens: int | Sequence[int],
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    progress: str | None = None,
    stats: GenerationStats | None = None,
) -> list[str]:
    """Generate one reply per chat prompt; outputs in the order of `prompts`."""
    outputs = generate_detailed(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        progress=progress,
        stats=stats,
    )
    return [o.text for o in outputs]


def generate_detailed(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Messages],
    *,
    max_new_tokens: int | Sequence[int],
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    progress: str | None = None,
    stats: GenerationStats | None = None,
) -> list[Generation]:
    """Like `generate`, but each output also says how many tokens it used and whether it
    ended at eos (`finished=False`: it hit its token budget)."""
    n = len(prompts)
    budgets = _budgets(max_new_tokens, n)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no eos_token_id: generation could not stop")

    start = time.perf_counter()
    texts = [
        tokenizer.apply_chat_template(list(p), add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    # Group rows with similar budgets (which follow the reference lengths) and prompt lengths:
    # a batch runs until its longest row is done, so alike rows waste fewer decode slots.
    order = sorted(range(n), key=lambda i: (budgets[i], len(ids[i])))
    device = next(model.parameters()).device
    results: list[Generation | None] = [None] * n
    was_training = model.training
    model.eval()
    calls = new_tokens = 0
    try:
        with _progress_bar(progress, n) as advance, torch.inference_mode():
            for b, lo in enumerate(range(0, n, batch_size)):
                idx = order[lo : lo + batch_size]
                batch = tokenizer.pad(
                    {"input_ids": [ids[i] for i in idx]},
                    padding=True,
                    padding_side="left",
                    return_tensors="pt",
                    return_attention_mask=True,
                )
                input_ids = batch["input_ids"].to(device)
                attention_mask = batch["attention_mask"].to(device)
                generator = torch.Generator(device=device).manual_seed(seed + b)
                new = _decode_batch(
                    model, input_ids, attention_mask, [budgets[i] for i in idx], eos_id,
                    do_sample=do_sample, temperature=temperature, top_p=top_p, generator=generator,
                )
                calls += 1
                for row, i in zip(new, idx, strict=True):
                    result = _finish_row(tokenizer, row[: budgets[i]], eos_id)
                    results[i] = result
                    new_tokens += result.num_tokens
                advance(len(idx))
    finally:
        model.train(was_training)
    if stats is not None:
        stats.calls += calls
        stats.records += n
        stats.prompt_tokens += sum(len(x) for x in ids)
        stats.new_tokens += new_tokens
        stats.seconds += time.perf_counter() - start
    return [r for r in results if r is not None]


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
          generator: torch.Generator) -> torch.Tensor:
    """Next token per row: argmax, or a seeded draw after temperature and nucleus (top-p)."""
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest set reaching top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _decode_batch(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, budgets: list[int], eos_id: int, *,
    do_sample: bool, temperature: float, top_p: float, generator: torch.Generator,
) -> list[list[int]]:
    """Decode a left-padded batch with a KV cache; a row leaves the batch (and its cache) as
    soon as it emits eos or uses its own budget, so finished rows cost nothing afterwards.
    Returns each row's new tokens (ending with eos when it finished)."""
    cache = DynamicCache(config=model.config)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                   cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1, :]
    next_pos = positions[:, -1] + 1
    live = list(range(input_ids.shape[0]))  # batch row -> original row
    out: list[list[int]] = [[] for _ in live]
    while True:
        tokens = _pick(logits.float(), do_sample, temperature, top_p, generator)
        keep = []
        for j, (row, token) in enumerate(zip(live, tokens.tolist(), strict=True)):
            out[row].append(token)
            if token != eos_id and len(out[row]) < budgets[row]:
                keep.append(j)
        if not keep:
            return out
        if len(keep) < len(live):
            index = torch.tensor(keep, device=input_ids.device)
            cache.batch_select_indices(index)
            attention_mask, tokens, next_pos = attention_mask[index], tokens[index], next_pos[index]
            live = [live[j] for j in keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(live), 1))], dim=1)
        logits = model(input_ids=tokens[:, None], attention_mask=attention_mask, position_ids=next_pos[:, None],
                       cache=cache, use_cache=True).logits[:, -1, :]
        next_pos = next_pos + 1


def _finish_row(tokenizer: Any, row: list[int], eos_id: int) -> Generation:
    """Cut a generated row at its first eos and decode it."""
    if eos_id in row:
        end = row.index(eos_id)
        return Generation(_decode(tokenizer, row[:end]), end + 1, True)
    return Generation(_decode(tokenizer, row), len(row), False)


def _decode(tokenizer: Any, row: list[int]) -> str:
    return tokenizer.decode(row, skip_special_tokens=True) if row else ""


def _budgets(max_new_tokens: int | Sequence[int], n: int) -> list[int]:
    if isinstance(max_new_tokens, int):
        budgets = [max_new_tokens] * n
    else:
        budgets = [int(x) for x in max_new_tokens]
        if len(budgets) != n:
            raise ValueError(f"{len(budgets)} token budgets for {n} prompts")
    if any(x < 1 for x in budgets):
        raise ValueError("max_new_tokens must be >= 1")
    return budgets


def _progress_bar(description: str | None, total: int):  # noqa: ANN202
    """A bar over records in the shared progress display (a no-op outside one)."""
    from fedsdr import progress

    return progress.task(description, total)
