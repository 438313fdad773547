"""Local training: chat-template SFT with loss on response tokens, and the algorithms' local steps.

Everything a client does between receiving and sending adapter weights is plain PyTorch here:
`sft_steps` (FedAvg family, with FedProx's proximal term) and `dual_stream_steps` (FedSDR).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from fedsdr.config import TrainConfig
from fedsdr.data.schema import Record

IGNORE = -100


@dataclass(frozen=True)
class Example:
    """A tokenised record: the loss covers `labels != -100`, i.e. the response tokens only."""

    input_ids: list[int]
    labels: list[int]

    @property
    def num_target_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def chat_messages(record: Record, system_prompt: str = "", response: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": record.prompt})
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def encode(tokenizer: PreTrainedTokenizerBase, record: Record, system_prompt: str = "") -> Example:
    """Render with the chat template; mask everything up to the assistant's turn.

    Prompt and response are tokenised separately and concatenated, so the boundary is exact
    even where BPE would merge across it.
    """
    prompt = tokenizer.apply_chat_template(
        chat_messages(record, system_prompt), add_generation_prompt=True, tokenize=False
    )
    full = tokenizer.apply_chat_template(
        chat_messages(record, system_prompt, record.output), tokenize=False
    )
    if not full.startswith(prompt):
        raise ValueError(f"chat template renders the prompt of {record.id!r} differently with a response")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    return Example(prompt_ids + response_ids, [IGNORE] * len(prompt_ids) + list(response_ids))


def encode_all(
    tokenizer: PreTrainedTokenizerBase, records: Sequence[Record], max_len: int, system_prompt: str = ""
) -> tuple[list[Example], int]:
    """Encode records; drop those longer than `max_len`. Returns (examples, number dropped)."""
    examples = [encode(tokenizer, r, system_prompt) for r in records]
    kept = [e for e in examples if len(e.input_ids) <= max_len]
    return kept, len(examples) - len(kept)


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example of the batch (dynamic padding)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def batches(
    examples: Sequence[Example], batch_size: int, seed: int, length_grouping: bool = True
) -> Iterator[list[Example]]:
    """Endless seeded batches. With length grouping, each window of 16 batches is sorted by
    length and cut into batches whose order is then shuffled: little padding, still random."""
    if not examples:
        raise ValueError("no training examples")
    rng = random.Random(seed)
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        window = batch_size * 16 if length_grouping else batch_size
        chunk: list[list[int]] = []
        for start in range(0, len(order), window):
            part = order[start:start + window]
            if length_grouping:
                part.sort(key=lambda i: len(examples[i].input_ids))
            chunk.extend(part[j:j + batch_size] for j in range(0, len(part), batch_size))
        if length_grouping:
            rng.shuffle(chunk)
        for idx in chunk:
            yield [examples[i] for i in idx]


def lr_at(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """Learning rate at a global step (counting every round's local steps)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.scheduler == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    decay = 1 - progress if cfg.scheduler == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay)


def token_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor], autocast: Callable
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token NLL per position [B, T-1] (0 where the label is ignored) and the target mask."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    with autocast():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="none"
    )
    return nll, targets != IGNORE


def response_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], autocast: Callable) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over response tokens, and their count."""
    nll, mask = token_nll(model, batch, autocast)
    return nll.sum(), int(mask.sum())


@dataclass
class StepStats:
    """What a client reports about its local training."""

    losses: list[float] = field(default_factory=list)
    tokens: int = 0  # non-pad tokens processed (prompt + response)
    target_tokens: int = 0
    seconds: float = 0.0

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else float("nan")


@dataclass
class Stream:
    """One optimisation stream: its batches, the parameters it updates, its optimizer."""

    batches: Iterator[list[Example]]
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scale: float = 1.0
    stats: StepStats = field(default_factory=StepStats)


def make_stream(
    examples: Sequence[Example], params: list[torch.nn.Parameter], cfg: TrainConfig, seed: int, lr_scale: float = 1.0
) -> Stream:
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return Stream(batches(examples, cfg.batch_size, seed, cfg.length_grouping), params, optimizer, lr_scale)


def _accumulate(
    model: torch.nn.Module, stream: Stream, cfg: TrainConfig, pad_id: int, autocast: Callable,
    extra_loss: Callable[[], torch.Tensor] | None = None, weight: float = 1.0,
) -> float:
    """Forward/backward over `grad_accum` micro-batches; the loss is a token-level mean."""
    micro = [next(stream.batches) for _ in range(cfg.grad_accum)]
    n_targets = sum(e.num_target_tokens for b in micro for e in b)
    total = 0.0
    for batch in micro:
        loss_sum, _ = response_loss(model, collate(batch, pad_id), autocast)
        loss = loss_sum / max(1, n_targets)
        total += float(loss.detach())
        (weight * loss).backward()
        stream.stats.tokens += sum(len(e.input_ids) for e in batch)
    stream.stats.target_tokens += n_targets
    if extra_loss is not None:
        extra_loss().backward()
    return total


def _apply(stream: Stream, cfg: TrainConfig, lr: float) -> None:
    if cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(stream.params, cfg.max_grad_norm)
    for group in stream.optimizer.param_groups:
        group["lr"] = lr * stream.lr_scale
    stream.optimizer.step()
    stream.optimizer.zero_grad(set_to_none=True)


def proximal_term(params: Sequence[torch.nn.Parameter], anchors: Sequence[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx: mu/2 * ||theta - theta_global||^2 over the trained adapter."""
    return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True))


def sft_steps(
    model: torch.nn.Module, stream: Stream, cfg: TrainConfig, *, steps: int, first_step: int, total_steps: int,
    pad_id: int, autocast: Callable, proximal_mu: float = 0.0, on_step: Callable[[int, float], None] | None = None,
) -> StepStats:
    """`steps` optimizer steps of supervised fine-tuning on one stream (FedAvg/FedProx/FedOpt clients)."""
    model.train()
    anchors = [p.detach().clone() for p in stream.params] if proximal_mu > 0 else []
    prox = (lambda: proximal_term(stream.params, anchors, proximal_mu)) if proximal_mu > 0 else None
    start = time.perf_counter()
    for step in range(steps):
        loss = _accumulate(model, stream, cfg, pad_id, autocast, extra_loss=prox)
        _apply(stream, cfg, lr_at(cfg, first_step + step, total_steps))
        stream.stats.losses.append(loss)
        if on_step:
            on_step(step, loss)
    stream.stats.seconds += time.perf_counter() - start
    return stream.stats


def stream_step(
    model: torch.nn.Module, stream: Stream, other: Stream, cfg: TrainConfig, lr: float, *, pad_id: int,
    autocast: Callable,
) -> float:
    """One optimizer step of `stream` with both adapters in the forward pass; `other`'s
    adapter is frozen for it, so this batch's loss changes only this stream's adapter."""
    with _frozen(other.params):
        loss = _accumulate(model, stream, cfg, pad_id, autocast)
    _apply(stream, cfg, lr)
    stream.stats.losses.append(loss)
    return loss


def dual_stream_steps(
    model: torch.nn.Module, smooth: Stream, rectify: Stream, cfg: TrainConfig, *, schedule: str, steps: int,
    first_step: int, total_steps: int, pad_id: int, autocast: Callable, joint_lambda: float = 1.0,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[StepStats, StepStats]:
    """FedSDR local training. Both adapters are active in every forward pass; a distilled batch
    updates only LoRA-S (`smooth`), a raw batch only LoRA-R (`rectify`).

    alternate:  each step, one distilled batch -> step S, then one raw batch -> step R.
    joint:      one backward of L_distilled + lambda * L_raw; gradients reach S and R only from
                their own stream, then both step.
    sequential: all S steps, then all R steps.
    """
    model.train()
    start = time.perf_counter()

    def step_one(stream: Stream, other: Stream, lr: float) -> float:
        return stream_step(model, stream, other, cfg, lr, pad_id=pad_id, autocast=autocast)

    if schedule == "alternate":
        for step in range(steps):
            lr = lr_at(cfg, first_step + step, total_steps)
            step_one(smooth, rectify, lr)
            loss = step_one(rectify, smooth, lr)
            if on_step:
                on_step(step, loss)
    elif schedule == "sequential":
        for step in range(steps):
            step_one(smooth, rectify, lr_at(cfg, first_step + step, total_steps))
        for step in range(steps):
            loss = step_one(rectify, smooth, lr_at(cfg, first_step + step, total_steps))
            if on_step:
                on_step(step, loss)
    elif schedule == "joint":
        for step in range(steps):
            lr = lr_at(cfg, first_step + step, total_steps)
            # L_distilled + lambda * L_raw with each term's gradient reaching only its own
            # adapter: two backward passes, the other adapter frozen in each.
            with _frozen(rectify.params):
                smooth.stats.losses.append(_accumulate(model, smooth, cfg, pad_id, autocast))
            with _frozen(smooth.params):
                loss = _accumulate(model, rectify, cfg, pad_id, autocast, weight=joint_lambda)
            rectify.stats.losses.append(loss)
            _apply(smooth, cfg, lr)
            _apply(rectify, cfg, lr)
            if on_step:
                on_step(step, loss)
    else:
        raise ValueError(f"fedsdr.schedule: unknown schedule {schedule!r}")
    elapsed = time.perf_counter() - start
    smooth.stats.seconds += elapsed / 2
    rectify.stats.seconds += elapsed / 2
    return smooth.stats, rectify.stats


class _frozen:
    """Temporarily stop gradients into `frozen` (used so one stream cannot touch the other adapter)."""

    def __init__(self, frozen: Sequence[torch.nn.Parameter]) -> None:
        self.frozen = list(frozen)

    def __enter__(self) -> None:
        for p in self.frozen:
            p.requires_grad_(False)

    def __exit__(self, *exc: object) -> None:
        for p in self.frozen:
            p.requires_grad_(True)
