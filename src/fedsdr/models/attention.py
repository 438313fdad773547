"""Attention for training on a CPU: SDPA's results, with a backward made of batched matmuls.

torch's CPU flash-attention kernel (what `sdpa` runs there) has a slow bf16 backward: in a bf16
LoRA step of SmolLM2 it took 18% of the step, against ~3% for its forward (`torch.profiler`,
16 quickstart records in passes of 512 tokens). transformers' `eager` attention backpropagates
with batched matmuls and is faster, but keeps every layer's attention probabilities for backward
(+374 MiB at the quickstart's peak). `RECOMPUTE` keeps what flash attention keeps (the scaled
queries, keys, values and the mask) and recomputes the probabilities in backward with one more
matmul, like flash attention does, but over the whole (short) rows at once.

Without a gradient to compute (generation, evaluation) it calls transformers' SDPA, so inference
computes what `sdpa` computes; its masks are SDPA's. One difference: with several queries per row
under a mask (a prefill, a decoding pass that checks drafted tokens), where transformers copies
every key/value head once per query head it serves (`repeat_kv`: with a long KV cache, 3x the
cache written per layer and pass, most of a pass's time), the query heads that share a key/value
head become rows of one SDPA call against it, as transformers does for a single query. (SDPA's
own `enable_gqa` ran as fast in an ad-hoc timing, but whether its CPU kernel copies the keys and
values is its own affair; folding the heads copies none.)
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

RECOMPUTE = "sdpa_recompute"
# Above this many attention scores per call (batch x heads x queries x keys) the whole-row
# matmuls and fp32 softmax temporaries outgrow the caches and the flash kernel is faster
# (bf16, 2-core EPYC, jemalloc: 1.3-3.5x faster below, 0.4-0.8x from ~1.2M up).
MAX_SCORES = 1 << 20
# Compute dtypes whose flash kernel trains about as fast (fp32 on that CPU: 0.8-1.1x either way
# for rows of 64-512 tokens): left to SDPA.
SDPA_DTYPES: frozenset[torch.dtype] = frozenset({torch.float32})


class _RecomputedAttention(torch.autograd.Function):
    """softmax(q k^T * scale + bias) v over grouped-query heads, in `dtype` (the autocast dtype
    or the inputs'); the softmax in fp32 as transformers' eager attention has it."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,  # noqa: ANN001
                bias: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
        batch, heads, length, dim = query.shape
        kv_heads = key.shape[1]
        # the query heads that share a key/value head become rows of one matmul against it
        ctx.input_dtypes = (query.dtype, key.dtype, value.dtype)
        scaled = (query.to(dtype) * scale).reshape(batch, kv_heads, -1, dim)
        key, value = key.to(dtype), value.to(dtype)
        probs = _probabilities(scaled, key, bias)
        out = torch.matmul(probs.to(dtype), value)
        ctx.save_for_backward(scaled, key, value, bias)
        ctx.scale = scale
        return out.view(batch, heads, length, dim)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        scaled, key, value, bias = ctx.saved_tensors
        dtype = scaled.dtype
        grad = grad.to(dtype).reshape(scaled.shape)
        probs = _probabilities(scaled, key, bias)
        grad_value = torch.matmul(probs.to(dtype).transpose(-1, -2), grad)
        grad_probs = torch.matmul(grad, value.transpose(-1, -2)).float()
        grad_scores = torch.ops.aten._softmax_backward_data(grad_probs, probs, -1, dtype).to(dtype)
        grad_query = torch.matmul(grad_scores, key).mul_(ctx.scale)
        grad_key = torch.matmul(grad_scores.transpose(-1, -2), scaled)
        query_dtype, key_dtype, value_dtype = ctx.input_dtypes
        heads_shape = (scaled.shape[0], -1, bias.shape[-2], scaled.shape[-1])
        return (grad_query.view(heads_shape).to(query_dtype), grad_key.to(key_dtype),
                grad_value.to(value_dtype), None, None, None)


def _probabilities(scaled: torch.Tensor, key: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """fp32 softmax of the scores, (batch, kv heads, groups x length, keys)."""
    batch, kv_heads, rows, _ = scaled.shape
    length, keys = bias.shape[-2:]
    scores = torch.matmul(scaled, key.transpose(-1, -2)).view(batch, kv_heads, rows // length, length, keys)
    scores.add_(bias.unsqueeze(2))
    return torch.softmax(scores, -1, dtype=torch.float32).view(batch, kv_heads, rows, keys)


def _additive(mask: torch.Tensor | None, length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An SDPA mask (boolean: True attends; float: added) as a float bias; None: causal (queries
    and keys the same `length`). Masked positions get the dtype's lowest finite value, so a row
    with nothing to attend to (padding) averages instead of producing NaN."""
    if mask is not None and mask.dtype != torch.bool:
        return mask.to(dtype)
    if mask is None:
        mask = torch.ones(length, length, dtype=torch.bool, device=device).tril_()[None, None]
    return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, torch.finfo(dtype).min)


def _sdpa_does_it(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, dtype: torch.dtype, dropout: float,
                  kwargs: dict[str, Any]) -> bool:
    """Whether the call is SDPA's: nothing to backpropagate, too many scores (`MAX_SCORES`), a
    compute dtype whose flash kernel is fast enough (`SDPA_DTYPES`), or what the matmul path does
    not handle (attention dropout, position biases, softcapping, heads that do not group, a mask
    that is not one per row, no mask with a cache or in a bidirectional layer)."""
    batch, heads, length, _ = query.shape
    keys = key.shape[2]
    if not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)):
        return True
    if batch * heads * length * keys > MAX_SCORES or dtype in SDPA_DTYPES:
        return True
    if dropout or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None or heads % key.shape[1]:
        return True
    if attention_mask is not None:
        return attention_mask.dim() != 4 or attention_mask.shape[1] != 1
    causal = kwargs.get("is_causal")
    return length != keys or not (getattr(module, "is_causal", True) if causal is None else causal)


def recompute_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: (batch, heads, length, dim) in, (batch, length, heads,
    dim) out; SDPA itself wherever `_sdpa_does_it`."""
    device = query.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
    if _sdpa_does_it(module, query, key, value, attention_mask, dtype, dropout, kwargs):
        if _grouped_inference(module, query, attention_mask, dropout, kwargs):
            # the query heads that share a key/value head become rows of one call against it,
            # each row's mask repeated for them: no copy of the keys and values
            batch, heads, length, dim = query.shape
            groups = module.num_key_value_groups
            out = torch.nn.functional.scaled_dot_product_attention(
                query.reshape(batch, heads // groups, groups * length, dim), key, value,
                attn_mask=attention_mask.repeat(1, 1, groups, 1), scale=scaling)
            return out.view(batch, heads, length, dim).transpose(1, 2).contiguous(), None
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    bias = _additive(attention_mask, query.shape[2], dtype, query.device)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = _RecomputedAttention.apply(query, key, value, bias, scale, dtype)
    return out.transpose(1, 2).contiguous(), None


def _grouped_inference(module: torch.nn.Module, query: torch.Tensor, attention_mask: torch.Tensor | None,
                       dropout: float, kwargs: dict[str, Any]) -> bool:
    """Whether an SDPA call is inference over several queries per row, under a mask, with key/value
    heads shared by groups of query heads: where transformers would `repeat_kv` (one query: it
    folds the group into the queries; no mask: it asks SDPA for grouped heads itself)."""
    return (not torch.is_grad_enabled() and query.device.type == "cpu" and query.shape[2] > 1
            and attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[1] == 1
            and getattr(module, "num_key_value_groups", 1) > 1
            and not dropout and kwargs.get("position_bias") is None and kwargs.get("softcap") is None)


def inference_attention(name: str | None) -> str | None:
    """The attention inference runs under the implementation `name`: SDPA for `RECOMPUTE`."""
    return "sdpa" if name == RECOMPUTE else name


AttentionInterface.register(RECOMPUTE, recompute_attention)
AttentionMaskInterface.register(RECOMPUTE, sdpa_mask)
