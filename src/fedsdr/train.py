"""Local training: chat-template SFT with loss on response tokens, and the algorithms' local steps.

Everything a client does between receiving and sending adapter weights is plain PyTorch here:
`sft_steps` (FedAvg family, with FedProx's proximal term) and `dual_stream_steps` (FedSDR).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from fedsdr.config import TrainConfig
from fedsdr.data.schema import Record
from fedsdr.kv import with_cache
from fedsdr.prefix import SharedPrefix, shareable_length, shared_prefix

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


def passes(batch: Sequence[Example], max_tokens: int) -> list[list[Example]]:
    """Split a batch into forward/backward passes of at most `max_tokens` padded tokens each
    (rows x the pass's longest row), longest rows first; a row longer than that gets a pass of
    its own. The passes' gradients add up to the batch's. `max_tokens` 0: one pass."""
    longest = max(len(e.input_ids) for e in batch)
    if max_tokens <= 0 or len(batch) * longest <= max_tokens:
        return [list(batch)]
    ordered = sorted(batch, key=lambda e: len(e.input_ids), reverse=True)
    out: list[list[Example]] = []
    while ordered:
        rows = max(1, max_tokens // len(ordered[0].input_ids))
        out.append(ordered[:rows])
        ordered = ordered[rows:]
    return out


# `train.pass_tokens = "auto"` on a CPU computing in bf16: bounds training's activations
# (bench_memory) at no cost in speed there (bench_step). In fp32 a token keeps ~4/3 the bytes for
# backward (SmolLM2, LoRA on all linears: ~1,150 KiB against ~860 in bf16, the LoRA dropout
# folded into A), so the same bytes hold 3/4 of the tokens: 384.
CPU_PASS_TOKENS = 512


def pass_budget(cfg: TrainConfig, device: torch.device, compute_dtype: torch.dtype = torch.bfloat16) -> int:
    """`train.pass_tokens` with "auto" resolved for `device`: on a CPU `CPU_PASS_TOKENS` in a
    16-bit `compute_dtype` and about the same bytes' worth of tokens in a wider one (384 in fp32); the
    whole batch (0) on an accelerator, where each extra pass is another ~16k operator launches for
    SmolLM2 (bench_step's ATen ops / step) and the host's time per launch, not memory, sets the pace."""
    if cfg.pass_tokens != "auto":
        return cfg.pass_tokens
    if device.type != "cpu":
        return 0
    return CPU_PASS_TOKENS if torch.finfo(compute_dtype).bits <= 16 else CPU_PASS_TOKENS * 3 // 4


def compute_dtype_of(model: torch.nn.Module, autocast: Callable) -> torch.dtype:
    """The dtype the model's matmuls run in under `autocast`: its autocast dtype, else the
    dtype of the model's first floating-point weight."""
    device = next(model.parameters()).device.type
    with autocast():
        if torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def lr_at(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """Learning rate at a global step (counting every round's local steps)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.scheduler == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    decay = 1 - progress if cfg.scheduler == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay)


# Target positions per lm_head chunk, by bytes: a chunk's logits (rows x vocabulary, in the
# compute dtype) and their fp32 log-softmax are the only vocabulary-sized tensors the loss holds
# at a time. 24 MiB of logits: 256 rows of SmolLM2's 49152 in bf16, 128 in fp32 (against 256
# rows, -22 MiB at an fp32 round's peak; ad-hoc, sixteenth session).
LOSS_CHUNK_BYTES = 24 * 2**20
LOSS_CHUNK_MIN = 16


def loss_chunk(vocab: int, dtype: torch.dtype) -> int:
    """Target positions per lm_head chunk for a `vocab`-sized output in `dtype` (`LOSS_CHUNK_BYTES`)."""
    return max(LOSS_CHUNK_MIN, LOSS_CHUNK_BYTES // (vocab * dtype.itemsize))


def token_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor], autocast: Callable, *,
              chunk: int | None = None, prefix: SharedPrefix | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token NLL per position [B, T-1] (0 where the label is ignored) and the target mask.
    With a `prefix` (`shared_prefix_of` the batch's examples), the forward starts after it.
    `chunk`: target positions per lm_head chunk (None: `loss_chunk` of the compute dtype)."""
    nll, mask = _target_nll(model, batch, autocast, chunk, prefix)
    return nll.new_zeros(mask.shape).masked_scatter(mask, nll), mask


def shared_prefix_of(model: torch.nn.Module, examples: Sequence[Example], autocast: Callable
                     ) -> SharedPrefix | None:
    """The keys and values of the tokens all `examples` start with, before any scored
    position, for `token_nll(..., prefix=)` (no-grad use only: evaluation); None when too few."""
    first_scored = [next((i for i, t in enumerate(e.labels) if t != IGNORE), len(e.labels)) for e in examples]
    n = shareable_length([e.input_ids for e in examples], first_scored)
    ids = torch.tensor([examples[0].input_ids])
    parts = _decoder_and_head(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, autocast)
    device = next(model.parameters()).device
    return shared_prefix(parts[0] if parts else model, examples[0].input_ids[:n], autocast, device)


def response_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], autocast: Callable, *,
                  chunk: int | None = None) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over response tokens, and their count."""
    nll, mask = _target_nll(model, batch, autocast, chunk)
    return nll.sum(), int(mask.sum())


def _target_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor], autocast: Callable, chunk: int | None,
                prefix: SharedPrefix | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """NLL (fp32) of every scored next token, in row-major order of the mask
    `labels[:, 1:] != -100` [B, T-1], and that mask.

    The vocabulary projection runs only at those positions: the decoder body gives the last
    hidden states, the ones whose next token is scored are gathered and projected through the
    output embedding `chunk` rows at a time in the compute dtype, each chunk upcast to fp32
    only inside its log-softmax. Models without a separable decoder body take the full
    forward, and only the scored rows of its logits are upcast. With a `prefix`, the forward
    covers only the tokens after it, attending to its cached keys and values.
    """
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    mask = batch["labels"][:, 1:] != IGNORE
    targets = batch["labels"][:, 1:][mask]
    parts = _decoder_and_head(model, batch, autocast)
    runner = model if parts is None else parts[0]
    inputs: dict[str, object] = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                                 "use_cache": False}
    scored = mask
    if prefix is not None:
        n, (rows, width) = prefix.length, batch["input_ids"].shape
        if mask[:, :n].any():
            raise ValueError("token_nll: the shared prefix overlaps scored positions")
        inputs.update(input_ids=batch["input_ids"][:, n:], use_cache=True,
                      position_ids=torch.arange(n, width, device=device).expand(rows, -1),
                      **with_cache(runner, prefix.cache(rows, runner.config)))
        scored = mask[:, n:]
    with autocast():
        out = runner(**inputs)
        if parts is None:
            return _chunked_nll(out.logits[:, :-1][scored], targets, None, chunk), mask
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return _chunked_nll(hidden[:, :-1][scored], targets, parts[1], chunk), mask


def _chunked_nll(rows: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module | None, chunk: int | None
                 ) -> torch.Tensor:
    """NLL per row. `rows` are hidden states projected by `head`, or logits when head is None."""
    if chunk is None:
        weight = getattr(head, "weight", None)
        device = rows.device.type
        dtype = torch.get_autocast_dtype(device) if head is not None and torch.is_autocast_enabled(device) \
            else (weight.dtype if isinstance(weight, torch.Tensor) else rows.dtype)
        vocab = weight.shape[0] if isinstance(weight, torch.Tensor) else rows.shape[-1]
        chunk = loss_chunk(vocab, dtype)
    if head is None:
        return torch.cat([
            -torch.log_softmax(rows[s:s + chunk], dim=-1, dtype=torch.float32)
            .gather(1, targets[s:s + chunk, None]).squeeze(1)
            for s in range(0, len(rows), chunk)
        ]) if len(rows) else rows.new_zeros(0, dtype=torch.float32)
    weight, bias = getattr(head, "weight", None), getattr(head, "bias", None)
    if type(head) is torch.nn.Linear and not head.weight.requires_grad and (bias is None or not bias.requires_grad):
        # A frozen plain linear head (every LoRA setup that leaves lm_head alone): the gradient
        # of each row is computed with its chunk, nothing vocabulary-sized is kept for backward.
        return _FrozenHeadNLL.apply(rows, weight, bias, targets, chunk)
    # Any other head (a LoRA on lm_head, a trainable head): each chunk under checkpoint, so
    # backward recomputes the chunk's logits instead of keeping them all.
    from torch.utils.checkpoint import checkpoint

    def nll_of(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -torch.log_softmax(head(h), dim=-1, dtype=torch.float32).gather(1, t[:, None]).squeeze(1)

    grad = torch.is_grad_enabled() and (rows.requires_grad or any(p.requires_grad for p in head.parameters()))
    parts = [
        checkpoint(nll_of, rows[s:s + chunk], targets[s:s + chunk], use_reentrant=False) if grad
        else nll_of(rows[s:s + chunk], targets[s:s + chunk])
        for s in range(0, len(rows), chunk)
    ]
    return torch.cat(parts) if parts else rows.new_zeros(0, dtype=torch.float32)


class _FrozenHeadNLL(torch.autograd.Function):
    """-log softmax(h W^T + b)[target] per row, for a frozen W, in chunks of rows.

    Forward computes, chunk by chunk, the NLL and (when `h` needs a gradient) d NLL / d h =
    (softmax - onehot) W, which is all backward needs: it scales each row by its incoming
    gradient. No chunk's logits outlive the chunk, and nothing is recomputed. Matmuls run
    in the ambient autocast dtype; the log-softmax in fp32.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,  # noqa: ANN001
                targets: torch.Tensor, chunk: int) -> torch.Tensor:
        device = hidden.device.type
        if torch.is_autocast_enabled(device) and weight.is_floating_point():
            weight = weight.to(torch.get_autocast_dtype(device))  # cast once, not per chunk
            bias = bias.to(weight.dtype) if bias is not None else None
        need_grad = ctx.needs_input_grad[0]
        nll = torch.empty(len(hidden), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if need_grad else None
        for s in range(0, len(hidden), chunk):
            t = targets[s:s + chunk]
            logits = torch.nn.functional.linear(hidden[s:s + chunk], weight, bias)
            logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
            del logits
            nll[s:s + chunk] = -logp.gather(1, t[:, None]).squeeze(1)
            if need_grad:
                p = logp.exp_()
                p[torch.arange(len(t), device=p.device), t] -= 1.0
                grad[s:s + chunk] = (p.to(weight.dtype) @ weight).to(grad.dtype)
            del logp
        ctx.save_for_backward(grad if need_grad else None)
        return nll

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_nll: torch.Tensor):  # noqa: ANN001, ANN205
        (grad,) = ctx.saved_tensors
        grad_hidden = grad * grad_nll[:, None].to(grad.dtype) if grad is not None else None
        return grad_hidden, None, None, None, None


def _decoder_and_head(model: torch.nn.Module, batch: dict[str, torch.Tensor], autocast: Callable
                      ) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(decoder body, output embedding) when the model's logits are exactly
    `output_embedding(body(...).last_hidden_state)`, else None (then the full forward is used).

    Works for a PeftModel with LoRA-style adapters (the adapters sit inside the modules, so
    calling the inner body applies them) and for a plain Hugging Face causal LM. Checked once
    per model on a few tokens of the first batch, against the model's own forward, under the
    `autocast` the loss runs under (weights stored in its dtype need it): models that scale or
    soft-cap the logits, or wrap the forward otherwise, fall back.
    """
    base = model
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        config = getattr(model, "active_peft_config", None)
        if config is None or config.is_prompt_learning or getattr(config, "alora_invocation_tokens", None):
            return None
        base = model.get_base_model()
    get_decoder, get_head = getattr(base, "get_decoder", None), getattr(base, "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        return None
    try:
        body, head = get_decoder(), get_head()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    if body is None or head is None or body is base or not isinstance(head, torch.nn.Module):
        return None
    config = getattr(base, "config", None)
    if any(getattr(config, key, None) not in (None, 1, 1.0) for key in _LOGIT_TRANSFORMS):
        return None  # logits scaled or soft-capped after the head (Gemma 2/3, Cohere, Granite...)
    verdict = base.__dict__.get("_fedsdr_hidden_positions_ok")
    if verdict is None:
        verdict = _same_logits(model, body, head, batch, autocast)
        base.__dict__["_fedsdr_hidden_positions_ok"] = verdict
    return (body, head) if verdict else None


_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_softcapping", "logit_scale", "logits_scaling",
                     "logits_mup_width_multiplier", "output_multiplier_scale", "lm_head_multiplier")


def _same_logits(model: torch.nn.Module, body: torch.nn.Module, head: torch.nn.Module,
                 batch: dict[str, torch.Tensor], autocast: Callable) -> bool:
    """Does head(body(x).last_hidden_state) reproduce model(x).logits? (eval mode, no grad,
    under the training autocast, which frozen weights stored in its dtype need: the same
    operations give the same numbers; nothing draws random numbers)."""
    n = min(16, batch["input_ids"].shape[1])
    ids, attn = batch["input_ids"][:1, :n], batch["attention_mask"][:1, :n]
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), autocast():
            ref = model(input_ids=ids, attention_mask=attn, use_cache=False).logits.float()
            out = body(input_ids=ids, attention_mask=attn, use_cache=False)
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            ours = head(hidden).float()
    except Exception:  # noqa: BLE001 -- an unusual model: use its own forward
        return False
    finally:
        for m, mode in modes.items():
            m.training = mode
    return ours.shape == ref.shape and bool(
        torch.allclose(ours, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max().clamp(min=1.0)))
    )


class MaskDropout(torch.nn.Dropout):
    """Dropout for CPU training that keeps a 1-byte mask for backward and draws it with a quarter
    of the generator calls of torch's dropout; elsewhere (eval, CUDA, in-place) `nn.Dropout` as is.

    On CPU, torch's dropout is `x * noise` with `noise = bernoulli(1 - p) / (1 - p)` in x's
    dtype, and autograd keeps `noise` (4 bytes per element in fp32). LoRA applies a dropout to
    the input of every adapted linear layer, so these noise tensors were ~40% of what one
    training step kept for backward (SmolLM2, all-linear LoRA), and the Bernoulli draws a large
    share of the step's time (a py-spy profile). Here each element is kept when a 16-bit uniform draw falls below
    (1 - p) x 65536, four draws per 64-bit word of torch's generator (`keep_mask`): the same
    distribution up to p rounded to 1/65536, seeded by `torch.manual_seed` like torch's own.

    `folded`: the LoRA A layer after it drops out its input itself (`DroppedInputLinear`), and this
    module passes x through wherever that layer does (`defers`).
    """

    folded = False

    def drops(self, x: torch.Tensor) -> bool:
        """Whether this dropout draws a `keep_mask` for `x` (training on a CPU, 0 < p < 1)."""
        return self.training and 0.0 < self.p < 1.0 and not self.inplace and x.device.type == "cpu"

    def defers(self, x: torch.Tensor) -> bool:
        """Whether the folded LoRA A layer drops `x` out instead: the case `drops`, without autocast
        (under autocast the A layer keeps its input cast to the compute dtype, which costs
        less than the shared uncast input)."""
        return self.folded and self.drops(x) and not torch.is_autocast_enabled(x.device.type)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.defers(x):
            return x
        if not self.drops(x):
            return super().forward(x)
        return _MaskDropoutFn.apply(x, self.p)  # without a gradient to track, just its forward


class DroppedInputLinear(torch.nn.Linear):
    """A LoRA A layer that applies its adapter's dropout (`MaskDropout`, which then passes its
    input through) and keeps for backward the undropped input and the 1-byte mask, where
    dropout-then-linear keeps the dropped copy of the input as well (4 bytes per element in fp32).
    The undropped input is one tensor for the layers that read it (q, k, v; gate, up), so in fp32
    these copies were ~14% of what a training pass kept (SmolLM2, LoRA on all seven linears,
    `benchmarks/bench_step.py`). The same mask draws and products: the same results to the bit."""

    dropout: MaskDropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.dropout.defers(x):
            return super().forward(x)
        return _DroppedLinearFn.apply(x, self.weight, self.dropout.p)


class _DroppedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:  # noqa: ANN001
        mask = keep_mask(x.shape, 1 - p)
        ctx.scale = 1 / (1 - p)
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, mask, weight)
        return torch.nn.functional.linear(_masked(x, mask, ctx.scale), weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        x, mask, weight = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:  # as linear's backward and then the dropout's
            grad_x = torch.matmul(grad, weight).mul_(mask).mul_(ctx.scale)
        if ctx.needs_input_grad[1]:  # the dropped input, recomputed
            dropped = _masked(x, mask, ctx.scale)
            grad_weight = grad.reshape(-1, grad.shape[-1]).t().mm(dropped.reshape(-1, dropped.shape[-1]))
        return grad_x, grad_weight, None


def _masked(x: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """`x` with the elements `mask` drops zeroed and the kept ones scaled: the dropout's product."""
    return torch.mul(x, mask).mul_(scale)


def keep_mask(shape: torch.Size | tuple[int, ...], keep: float) -> torch.Tensor:
    """Bernoulli(`keep`) booleans of `shape` (CPU), from 16-bit uniform draws, four per 64-bit
    word of torch's default generator; `keep` is rounded to a multiple of 1/65536."""
    n = math.prod(shape)
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)
    return words.view(torch.int16)[:n].view(shape) < round(keep * 65536) - 32768


class _MaskDropoutFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:  # noqa: ANN001
        mask = keep_mask(x.shape, 1 - p)
        ctx.save_for_backward(mask)
        ctx.p = p
        return _masked(x, mask, 1 / (1 - p))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        (mask,) = ctx.saved_tensors
        return _masked(grad, mask, 1 / (1 - ctx.p)), None


def compact_lora_dropout(model: torch.nn.Module) -> int:
    """Swap every plain `nn.Dropout` a LoRA layer applies (PEFT's `lora_dropout`) for
    `MaskDropout` (less memory kept for backward, cheaper draws), and fold it into the adapter's
    A layer where that is a plain linear of plain LoRA (`DroppedInputLinear`; variants such as
    DoRA read the dropped input themselves). Returns how many dropouts were swapped."""
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, layer in list(dropouts.items()):
            if type(layer) is not torch.nn.Dropout:
                continue
            new = MaskDropout(layer.p, layer.inplace)
            new.train(layer.training)
            dropouts[name] = new
            swapped += 1
            lora_a = getattr(module, "lora_A", None)
            a = lora_a[name] if isinstance(lora_a, torch.nn.ModuleDict) and name in lora_a else None
            if type(a) is torch.nn.Linear and name not in getattr(module, "lora_variant", {}):
                a.__class__ = DroppedInputLinear  # the same parameters: state dicts are unchanged
                a.dropout = new  # also a child of lora_dropout: one module, registered twice
                new.folded = True
    return swapped


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
    """One optimisation stream: its batches, the parameters it updates, the optimizer that
    steps them (its own, or one shared with another stream: see `share_optimizer`) and an
    optional proximal anchor."""

    batches: Iterator[list[Example]]
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    stats: StepStats = field(default_factory=StepStats)
    proximal_mu: float = 0.0
    anchors: list[torch.Tensor] = field(default_factory=list)
    # modules switched to eval while this stream's adapter is frozen for the other stream's pass
    quiet_when_frozen: list[torch.nn.Module] = field(default_factory=list)

    def proximal_loss(self) -> torch.Tensor | None:
        """FedProx's mu/2 * ||theta - theta_global||^2 over this stream's adapter, if mu > 0."""
        if self.proximal_mu <= 0:
            return None
        return 0.5 * self.proximal_mu * sum(((p - a) ** 2).sum() for p, a in zip(self.params, self.anchors, strict=True))


def make_stream(
    examples: Sequence[Example], params: list[torch.nn.Parameter], cfg: TrainConfig, seed: int, *,
    lr_scale: float = 1.0, proximal_mu: float = 0.0, quiet_when_frozen: Sequence[torch.nn.Module] = (),
) -> Stream:
    """A stream with its own AdamW; `proximal_mu` > 0 anchors it at the parameters' current
    (global) values. `quiet_when_frozen`: modules (its adapter's LoRA dropouts, for FedSDR's
    `fedsdr.frozen_dropout = false`) put in eval mode while the other stream's passes run with
    this adapter frozen (`dual_stream_steps`)."""
    optimizer = torch.optim.AdamW([{"params": params, "lr_scale": lr_scale}], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    anchors = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    return Stream(batches(examples, cfg.batch_size, seed, cfg.length_grouping), params, optimizer,
                  proximal_mu=proximal_mu, anchors=anchors, quiet_when_frozen=list(quiet_when_frozen))


def share_optimizer(first: Stream, second: Stream, cfg: TrainConfig, second_lr_scale: float) -> None:
    """Give both streams one AdamW over both adapters (one param group each, keeping each
    stream's learning-rate factor; the second's multiplied by `second_lr_scale`)."""
    groups = [dict(first.optimizer.param_groups[0]), dict(second.optimizer.param_groups[0])]
    groups[1]["lr_scale"] = groups[1]["lr_scale"] * second_lr_scale
    shared = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    first.optimizer = second.optimizer = shared


def _accumulate(
    model: torch.nn.Module, stream: Stream, cfg: TrainConfig, pad_id: int, autocast: Callable,
    extra_loss: Callable[[], torch.Tensor | None] | None = None,
) -> float:
    """Forward/backward over `grad_accum` batches, each in passes of at most `pass_tokens`
    padded tokens; the loss is a token-level mean over all of them."""
    micro = [next(stream.batches) for _ in range(cfg.grad_accum)]
    n_targets = sum(e.num_target_tokens for b in micro for e in b)
    total = 0.0
    budget = pass_budget(cfg, next(model.parameters()).device, compute_dtype_of(model, autocast))
    for part in (part for batch in micro for part in passes(batch, budget)):
        loss_sum, _ = response_loss(model, collate(part, pad_id), autocast)
        loss = loss_sum / max(1, n_targets)
        total += float(loss.detach())
        loss.backward()
        stream.stats.tokens += sum(len(e.input_ids) for e in part)
    stream.stats.target_tokens += n_targets
    extra = extra_loss() if extra_loss is not None else None
    if extra is not None:
        extra.backward()
    return total


def _apply(optimizer: torch.optim.Optimizer, cfg: TrainConfig, lr: float) -> None:
    """Clip, set each group's learning rate (times its factor), step, clear gradients."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def sft_steps(
    model: torch.nn.Module, stream: Stream, cfg: TrainConfig, *, steps: int, first_step: int, total_steps: int,
    pad_id: int, autocast: Callable, on_step: Callable[[int, float], None] | None = None,
) -> StepStats:
    """`steps` optimizer steps of supervised fine-tuning on one stream (single-adapter
    algorithms; the stream's proximal term, if any, is FedProx's)."""
    model.train()
    start = time.perf_counter()
    with gradient_checkpointing(model, cfg.gradient_checkpointing):
        for step in range(steps):
            loss = _accumulate(model, stream, cfg, pad_id, autocast, extra_loss=stream.proximal_loss)
            _apply(stream.optimizer, cfg, lr_at(cfg, first_step + step, total_steps))
            stream.stats.losses.append(loss)
            if on_step:
                on_step(step, loss)
    stream.stats.seconds += time.perf_counter() - start
    return stream.stats


def _backward_only_into(model: torch.nn.Module, stream: Stream, other: Stream, cfg: TrainConfig, *,
                        pad_id: int, autocast: Callable) -> float:
    """Forward/backward of one batch of `stream` with both adapters in the forward pass and
    `other`'s adapter frozen, so the gradient reaches only this stream's adapter (and `other`'s
    `quiet_when_frozen` modules in eval mode)."""
    with _frozen(other.params, other.quiet_when_frozen):
        loss = _accumulate(model, stream, cfg, pad_id, autocast, extra_loss=stream.proximal_loss)
    stream.stats.losses.append(loss)
    return loss


def stream_step(
    model: torch.nn.Module, stream: Stream, other: Stream, cfg: TrainConfig, lr: float, *, pad_id: int,
    autocast: Callable,
) -> float:
    """One optimizer step of `stream` with both adapters in the forward pass; `other`'s
    adapter is frozen for it, so this batch's loss changes only this stream's adapter."""
    loss = _backward_only_into(model, stream, other, cfg, pad_id=pad_id, autocast=autocast)
    _apply(stream.optimizer, cfg, lr)
    return loss


def dual_stream_steps(
    model: torch.nn.Module, smooth: Stream, rectify: Stream, cfg: TrainConfig, *, schedule: str, steps: int,
    first_step: int, total_steps: int, pad_id: int, autocast: Callable, joint_lambda: float = 1.0,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[StepStats, StepStats]:
    """FedSDR local training. Both adapters are active in every forward pass; a distilled batch
    updates only LoRA-S (`smooth`), a raw batch only LoRA-R (`rectify`), whose stream also
    carries the server strategy's proximal term when it has one (FedProx).

    alternate:  each step, one distilled batch -> step S, then one raw batch -> step R.
    joint:      L_distilled (gradient to S) + lambda * L_raw (gradient to R), one AdamW over both
                adapters stepping once. AdamW is invariant to a loss scale, so lambda acts as R's
                learning-rate factor: the step R takes is what lambda * L_raw gives under SGD.
    sequential: all S steps, then all R steps.

    The adapter a pass does not train is frozen for it, with its stream's `quiet_when_frozen`
    modules in eval mode (FedSDR: its LoRA dropouts, unless `fedsdr.frozen_dropout`).
    """
    model.train()
    start = time.perf_counter()

    def step_one(stream: Stream, other: Stream, lr: float) -> float:
        return stream_step(model, stream, other, cfg, lr, pad_id=pad_id, autocast=autocast)

    with gradient_checkpointing(model, cfg.gradient_checkpointing):
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
            share_optimizer(smooth, rectify, cfg, second_lr_scale=joint_lambda)
            for step in range(steps):
                _backward_only_into(model, smooth, rectify, cfg, pad_id=pad_id, autocast=autocast)
                loss = _backward_only_into(model, rectify, smooth, cfg, pad_id=pad_id, autocast=autocast)
                _apply(smooth.optimizer, cfg, lr_at(cfg, first_step + step, total_steps))
                if on_step:
                    on_step(step, loss)
        else:
            raise ValueError(f"fedsdr.schedule: unknown schedule {schedule!r}")
    elapsed = time.perf_counter() - start
    smooth.stats.seconds += elapsed / 2
    rectify.stats.seconds += elapsed / 2
    return smooth.stats, rectify.stats


@contextmanager
def gradient_checkpointing(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Within the block, the model's decoder layers keep only their inputs for backward and
    recompute the rest (transformers' gradient checkpointing, non-reentrant, so the frozen
    base needs no input gradients). Off again afterwards: evaluation keeps its KV cache."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not enabled or not getattr(base, "supports_gradient_checkpointing", False):
        yield
        return
    if hasattr(base, "activation_checkpointing_enable"):  # its name since transformers 5.x
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        getattr(base, "activation_checkpointing_disable", base.gradient_checkpointing_disable)()


class _frozen:
    """Temporarily stop gradients into `frozen` (used so one stream cannot touch the other
    adapter), and put the `quiet` modules (its dropouts) in eval mode."""

    def __init__(self, frozen: Sequence[torch.nn.Parameter], quiet: Sequence[torch.nn.Module] = ()) -> None:
        self.frozen, self.quiet = list(frozen), [m for m in quiet if m.training]

    def __enter__(self) -> None:
        for p in self.frozen:
            p.requires_grad_(False)
        for m in self.quiet:
            m.train(False)

    def __exit__(self, *exc: object) -> None:
        for p in self.frozen:
            p.requires_grad_(True)
        for m in self.quiet:
            m.train(True)
