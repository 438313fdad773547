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
from transformers import StoppingCriteria, StoppingCriteriaList

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
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id

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
                limit = max(budgets[i] for i in idx)
                kwargs: dict[str, Any] = {"do_sample": do_sample}
                if do_sample:
                    kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
                with torch.random.fork_rng(devices=_cuda_devices(device)):
                    torch.manual_seed(seed + b)
                    out = model.generate(
                        input_ids=input_ids,
                        attention_mask=attention_mask,
                        max_new_tokens=limit,
                        eos_token_id=eos_id,
                        pad_token_id=pad_id,
                        use_cache=True,
                        stopping_criteria=StoppingCriteriaList(
                            [_RowBudget([budgets[i] for i in idx], input_ids.shape[1])]
                        ),
                        **kwargs,
                    )
                calls += 1
                new = out[:, input_ids.shape[1] :].tolist()
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


class _RowBudget(StoppingCriteria):
    """Marks each row done once it has used its own token budget, so a batch stops as soon as
    every row has reached eos or its budget (not the largest budget of the batch)."""

    def __init__(self, budgets: list[int], prompt_len: int) -> None:
        self.budgets = torch.tensor(budgets)
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        used = input_ids.shape[1] - self.prompt_len
        return (used >= self.budgets).to(input_ids.device)


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


def _cuda_devices(device: torch.device) -> list[int]:
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []


def _progress_bar(description: str | None, total: int):  # noqa: ANN202
    """A bar over records in the shared progress display (a no-op outside one)."""
    from fedsdr import progress

    return progress.task(description, total)
