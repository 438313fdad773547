"""Batched generation from chat prompts: the engine behind evaluation and rewriting.

Prompts are rendered with the tokenizer's chat template, sorted by length (then by token
budget) so each batch holds similar lengths, left-padded, and decoded with the KV cache. The
tokens all prompts of a call start with (the template's system turn, a rewrite instruction)
run through the model once; each prefill starts from their keys and values.
Each batch decodes up to the largest budget it holds; every output is then cut back to
its own budget, so batched greedy outputs equal one-at-a-time greedy outputs. Greedy rows
also draft tokens from their own prompt and output (prompt lookup: a rewrite copies much of
its reference), and one decoding pass checks each row's next token and its draft together.
A row stops at any end-of-turn id: the tokenizer's eos and every id the model's
generation config names (a chat turn may end on another token than eos). Optionally
(`repeat_stop`) a row also stops once its last tokens mostly repeat what it said before:
small models loop under greedy decoding, and a loop only ever ends at the budget.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from fedsdr.kv import with_cache
from fedsdr.memory import release_freed_memory
from fedsdr.models import skinny_linear
from fedsdr.prefix import SharedPrefix, shareable_length, shared_prefix

Messages = list[dict[str, str]]


@dataclass
class GenerationStats:
    """Counters accumulated over `generate` calls (pass the same object to accumulate)."""

    calls: int = 0  # batches of prompts taken in (the first, then each refill of freed slots)
    prefill_passes: int = 0  # forward passes over those prompts (a batch's similar lengths share one)
    records: int = 0  # prompts generated for
    prompt_tokens: int = 0  # real (non-pad) prompt tokens
    new_tokens: int = 0  # generated tokens per row, up to and including the first stop id
    seconds: float = 0.0  # wall time inside `generate`
    prefill_seconds: float = 0.0  # of which the prompts' forward passes (prefill)
    shared_prefix_tokens: int = 0  # prompt tokens every prompt of a call starts with, run once per call
    max_rows: int = 0  # most rows decoded together (the batch size, or fewer under `cache_bytes`)
    decode_passes: int = 0  # forward passes while decoding (one per step; a step may take drafts)
    drafted: int = 0  # tokens drafted by prompt lookup and checked in those passes
    accepted: int = 0  # of which the model's greedy choice confirmed (each saves a pass)
    prefill_positions: int = 0  # positions prefill passes computed: padding and the shared prefix included
    decode_positions: int = 0  # positions decoding passes computed: each row's token, its draft, pads

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Generation:
    """One output: decoded new text, its token count, whether it stopped at a stop id, and
    whether it was stopped because it looped (`repeat_stop`; then `finished` is False)."""

    text: str
    num_tokens: int
    finished: bool
    looped: bool = False


# A row loops when, of the LOOP_NGRAM-grams ending at its last LOOP_WINDOW tokens, at least
# `repeat_stop` (a share) already occurred earlier in the row. Calibrated on SmolLM2-135M's
# answers and the benchmark's references (scripts/calibrate_repeat_stop.py): at 0.8 it stops
# about half of the answers that ran to their budget (numbered steps that repeat one line with
# new numbers, a paragraph said again) and 1 of 444 references would trigger it.
LOOP_NGRAM = 4
LOOP_WINDOW = 64

# Prompt lookup: a row drafts what followed the last earlier occurrence of its latest
# LOOKUP_NGRAM (down to LOOKUP_MIN_NGRAM) tokens in its prompt and output, at most LOOKUP_DRAFT
# tokens, and a pass takes at most LOOKUP_TOKENS tokens over all rows (rows x (1 + draft)): on a
# CPU a decoding pass with few rows costs the read of the weights and the cache whatever it
# computes, while a full batch of long drafts would cost more compute than the passes it saves.
LOOKUP_NGRAM = 3
LOOKUP_MIN_NGRAM = 1
LOOKUP_DRAFT = 8
LOOKUP_TOKENS = 64


def decoding_settings() -> str:
    """The engine's greedy decoding settings that can move a near-tie (another batch shape rounds
    otherwise, and so do a pass's linears as (W x^T)^T): part of the keys of cached rewrites and base
    evaluations."""
    return (f"lookup:draft={LOOKUP_DRAFT},tokens={LOOKUP_TOKENS},ngram={LOOKUP_MIN_NGRAM}-{LOOKUP_NGRAM};"
            f"skinny_rows={skinny_linear.SKINNY_ROWS}")


# Columns masked out (left padding, rejected drafts) that rows attend over before the cache is
# compacted: one copy of the cache against every later pass reading them (and the room they
# take: the cache bound counts them, and the quickstart's longest bf16 rows keep 32 slots).
COMPACT_COLUMNS = 16


# With `numbers_alike` every number token counts as the same token: "12. The answer is 12."
# then repeats "13. The answer is 13."; with digits kept apart, a short numbered line is new in
# half its 4-grams and such a loop runs to the budget. Measured on the claims grid's answers
# (scripts/calibrate_repeat_stop.py, share 0.8): it stops 133 rather than 16 of the 729 answers
# that ran to their budget, and cuts short 88 of 3315 answers that ended on their own (gsm
# solutions that restate one equation; none of them was right), where digits apart cut none.
_NUMBER_TOKEN = re.compile(r"^[\sĠ▁]?\d+$")
_ANY_NUMBER = -1


def number_token_ids(tokenizer: Any) -> frozenset[int]:
    """The ids of the tokenizer's tokens that are a number (digits, after an optional space marker)."""
    return frozenset(i for token, i in tokenizer.get_vocab().items() if _NUMBER_TOKEN.match(token))


class LoopDetector:
    """Fed one token at a time; says when the row's last LOOP_WINDOW tokens mostly repeat."""

    def __init__(self, share: float, number_ids: frozenset[int] = frozenset()) -> None:
        self.share, self.number_ids = share, number_ids
        self.recent: deque[int] = deque(maxlen=LOOP_NGRAM)
        self.seen: set[tuple[int, ...]] = set()
        self.window: deque[bool] = deque(maxlen=LOOP_WINDOW)  # was each recent n-gram seen before?

    def push(self, token: int) -> bool:
        self.recent.append(_ANY_NUMBER if token in self.number_ids else token)
        if len(self.recent) < LOOP_NGRAM:
            return False
        gram = tuple(self.recent)
        self.window.append(gram in self.seen)
        self.seen.add(gram)
        return len(self.window) == LOOP_WINDOW and sum(self.window) >= self.share * LOOP_WINDOW


class _Lookup:
    """A row's n-gram index over its prompt and output, for prompt lookup drafts."""

    def __init__(self, prompt: Sequence[int]) -> None:
        self.context = list(prompt)
        self.ends: dict[tuple[int, ...], int] = {}  # n-gram -> where its last occurrence ends
        self.indexed = 0  # n-grams ending at or before this index are in `ends`

    def extend(self, tokens: Sequence[int]) -> None:
        self.context.extend(tokens)

    def draft(self, limit: int) -> list[int]:
        """Up to `limit` tokens: those that followed the last earlier occurrence of the
        longest trailing n-gram (LOOKUP_NGRAM down to LOOKUP_MIN_NGRAM tokens) seen before."""
        context = self.context
        # index every n-gram with a token after it; the trailing one is what is looked up
        for end in range(self.indexed + 1, len(context)):
            for n in range(LOOKUP_MIN_NGRAM, min(LOOKUP_NGRAM, end) + 1):
                self.ends[tuple(context[end - n:end])] = end
        self.indexed = max(self.indexed, len(context) - 1)
        if limit < 1:
            return []
        for n in range(min(LOOKUP_NGRAM, len(context)), LOOKUP_MIN_NGRAM - 1, -1):
            end = self.ends.get(tuple(context[-n:]))
            if end is not None:
                return context[end:end + limit]
        return []


def loops_within(tokens: Sequence[int], share: float, number_ids: frozenset[int] = frozenset()) -> bool:
    """Would a `LoopDetector(share, number_ids)` have stopped a row somewhere within `tokens`?"""
    detector = LoopDetector(share, number_ids)
    return any(detector.push(t) for t in tokens)


def stop_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Every id that ends a turn: the tokenizer's eos and the model's generation config
    `eos_token_id` (an int or a list). Raises ValueError when there is none."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    config = getattr(model, "generation_config", None)
    configured = getattr(config, "eos_token_id", None)
    if configured is not None:
        listed = configured if isinstance(configured, list | tuple) else [configured]
        ids.update(int(x) for x in listed)
    if not ids:
        raise ValueError("neither the tokenizer nor the model names an eos token: "
                         "generation could not stop")
    return frozenset(ids)


def generate(model: Any, tokenizer: Any, prompts: Sequence[Messages], **kwargs: Any) -> list[str]:
    """Generate one reply per chat prompt; outputs in the order of `prompts`.

    Takes `generate_detailed`'s keyword arguments (`max_new_tokens`, required; `batch_size`,
    `do_sample`, `temperature`, `top_p`, `seed`, `progress`, `stats`) and returns only the
    text of each of its outputs.
    """
    return [o.text for o in generate_detailed(model, tokenizer, prompts, **kwargs)]


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
    repeat_stop: float = 0.0,
    numbers_alike: bool = False,
    share_prefix: bool = True,
    split_prefill: bool = True,
    cache_bytes: int | None = None,
    prompt_lookup: int = LOOKUP_DRAFT,
    skinny_rows: int | None = None,
) -> list[Generation]:
    """Like `generate`, but each output also says how many tokens it used and whether it
    ended at a stop id (`stop_token_ids`; `finished=False`: it hit its token budget or looped).

    `repeat_stop` = s in (0, 1] stops a row once at least that share of its last LOOP_WINDOW
    tokens' 4-grams repeat earlier ones (`LoopDetector`), marking it `looped`; 0 (default)
    decodes to a stop id or the budget. `numbers_alike`: the stop counts every number token as
    the same token (a line repeated with new numbers is then a repeat).

    `share_prefix`: the tokens every prompt starts with (the chat template's system turn, a
    rewrite instruction) run through the model once, and each prompt's prefill covers only what
    follows (`fedsdr.prefix`); the same attention, up to rounding. Off: each prompt in full.

    `split_prefill`: on a CPU, the prompts a batch takes in are prefilled in passes of similar
    lengths (`prefill_passes`) rather than in one pass padded to the longest. Off, and on other
    devices (where a pass costs launches more than padding costs compute; not measured there):
    one pass per batch.

    `cache_bytes` bounds the KV cache: fewer than `batch_size` rows run together where that many
    rows of the longest prompt plus budget among them would need more (None: `CPU_CACHE_BYTES`
    on a CPU, no bound elsewhere; 0: no bound).

    `prompt_lookup` = k > 0 (greedy only): each decoding pass also checks up to k tokens a row
    drafts from its own prompt and output (`_Lookup`: what followed the last earlier occurrence
    of its latest tokens), keeping those the model's greedy choice confirms: the same greedy
    text (up to the rounding of another batch shape) in fewer serial passes, where a rewrite
    copies its reference or an answer repeats itself. 0: one token per pass.

    `skinny_rows`: on a CPU in fp32, a linear layer's input of at most that many rows (a
    decoding pass's) runs as (W x^T)^T, which MKL computes faster than x W^T for few rows
    (`fedsdr.models.skinny_linear`); equal up to rounding. None: `skinny_linear.SKINNY_ROWS`
    (read at the call); 0: every linear as `F.linear`."""
    if prompt_lookup < 0:
        raise ValueError(f"prompt_lookup must be >= 0 (0: off), got {prompt_lookup}")
    if not 0.0 <= repeat_stop <= 1.0:
        raise ValueError(f"repeat_stop must be a share in [0, 1] (0: off), got {repeat_stop}")
    n = len(prompts)
    budgets = _budgets(max_new_tokens, n)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stop_ids = stop_token_ids(model, tokenizer)
    eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else min(stop_ids)

    start = time.perf_counter()
    texts = [
        tokenizer.apply_chat_template(list(p), add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    # Rows with similar budgets (which follow the reference lengths) and prompts run together.
    order = sorted(range(n), key=lambda i: (budgets[i], len(ids[i])))
    device = next(model.parameters()).device
    results: list[Generation | None] = [None] * n
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    was_training = model.training
    model.eval()
    try:
        with _progress_bar(progress, n) as advance, torch.inference_mode(), \
                skinny_linear.skinny_linears(model, skinny_rows):

            def done(i: int, tokens: list[int], looped: bool) -> None:
                results[i] = _finish_row(tokenizer, tokens[: budgets[i]], stop_ids, looped)
                advance(1)

            prefix, prefix_seconds = None, 0.0
            if share_prefix and n > 1:
                start_prefix = time.perf_counter()
                shared = shareable_length(ids, [len(x) for x in ids])  # each row keeps a token to prefill
                prefix = shared_prefix(model, ids[0][:shared], contextlib.nullcontext, device)
                prefix_seconds = time.perf_counter() - start_prefix
            decoder = _Decoder(model, device, stop_ids, pad_id, do_sample, temperature, top_p,
                               torch.Generator(device=device).manual_seed(seed), repeat_stop,
                               number_token_ids(tokenizer) if repeat_stop and numbers_alike else frozenset(),
                               prefix, PASS_TOKENS if split_prefill and device.type == "cpu" else None,
                               0 if do_sample else prompt_lookup)
            decoder.prefill_seconds = prefix_seconds  # the shared prefix's forward is prefill too
            decoder.prefill_positions = prefix.length if prefix is not None else 0
            if cache_bytes is None:
                cache_bytes = CPU_CACHE_BYTES if device.type == "cpu" else 0
            cache_tokens = cache_bytes // cache_bytes_per_token(model, device) if cache_bytes else None
            decoder.run([(i, ids[i], budgets[i]) for i in order], batch_size, done, cache_tokens)
            calls, passes, prefill_seconds = decoder.prefills, decoder.prefill_passes, decoder.prefill_seconds
    finally:
        model.train(was_training)
    new_tokens = sum(r.num_tokens for r in results if r is not None)
    if stats is not None:
        stats.calls += calls
        stats.prefill_passes += passes
        stats.records += n
        stats.prompt_tokens += sum(len(x) for x in ids)
        stats.new_tokens += new_tokens
        stats.seconds += time.perf_counter() - start
        stats.prefill_seconds += prefill_seconds
        stats.shared_prefix_tokens += prefix.length if prefix is not None else 0
        stats.max_rows = max(stats.max_rows, decoder.max_rows)
        stats.decode_passes += decoder.decode_passes
        stats.drafted += decoder.drafted
        stats.accepted += decoder.accepted
        stats.prefill_positions += decoder.prefill_positions
        stats.decode_positions += decoder.decode_positions
    return [r for r in results if r is not None]


class _EngineCache(DynamicCache):
    """The engine's KV cache: a DynamicCache that appends each decoding step's keys and values in
    place, into room reserved ahead in chunks, where DynamicCache's `torch.cat` copies the whole
    cache of every layer on every step (the cost of a step then grows with the context). With a
    `dtype`, keys and values are stored in it: under CPU bf16 autocast, RoPE turns the keys into
    fp32 and SDPA casts every cached key back to bf16 on every step; storing them cast once gives
    the very same attention (the same rounding, done once) and halves the bytes each step reads.

    Batch edits (`batch_select_indices`, the engine's merge and left trim) replace a layer's
    tensors and let go of its room; the next step reserves fresh room. Layers other than plain
    `DynamicLayer` (sliding windows...) keep DynamicCache's own update."""

    ROOM = 64  # columns reserved ahead: one copy of the cache per 64 steps instead of one per step
    STEP = 16  # most columns a decoding step appends (one token, or one and its draft)

    def __init__(self, dtype: torch.dtype | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dtype = dtype
        self.room: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.grown = False  # some layer's room was replaced since the engine last looked

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self.dtype is not None:
            key_states, value_states = key_states.to(self.dtype), value_states.to(self.dtype)
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        if type(layer) is not DynamicLayer or layer.get_seq_length() == 0 or key_states.shape[-2] > self.STEP:
            # a prefill (after a shared prefix) is one concatenation; room is for decoding steps
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        keys, n, add = layer.keys, layer.keys.shape[-2], key_states.shape[-2]
        room = self.room.get(layer_idx)
        if (room is None or room[0].data_ptr() != keys.data_ptr() or room[0].stride() != keys.stride()
                or room[0].shape[:2] != keys.shape[:2] or room[0].shape[-2] < n + add):
            room = tuple(t.new_empty((*t.shape[:-2], n + add + self.ROOM, t.shape[-1])) for t in (keys, layer.values))
            room[0][..., :n, :], room[1][..., :n, :] = keys, layer.values
            self.room[layer_idx] = room
            self.grown = True
        room[0][..., n:n + add, :], room[1][..., n:n + add, :] = key_states, value_states
        layer.keys, layer.values = room[0][..., :n + add, :], room[1][..., :n + add, :]
        return layer.keys, layer.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.room.clear()  # each layer's old room goes as soon as its rows are copied out
        super().batch_select_indices(indices)


# The engine's KV cache on a CPU at most: 32 rows of 1,000 tokens (the quickstart's longest
# evaluation rows: a 202-token gsm prompt plus its 768-token budget) of SmolLM2-135M in bf16, 23 KB
# a token, so bf16 decodes its full batch; in fp32 (46 KB a token) such rows run 16 at a time.
CPU_CACHE_BYTES = 704 * 2**20


def cache_bytes_per_token(model: Any, device: torch.device) -> int:
    """Bytes one token takes in the engine's KV cache: keys and values of every layer, in the
    autocast dtype when autocast is on for `device` (`new_cache`), else the model's."""
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    else:
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    return config.num_hidden_layers * 2 * kv_heads * head_dim * dtype.itemsize


def new_cache(model: Any, device: torch.device) -> DynamicCache:
    """An empty engine KV cache for `model`, in the autocast dtype when autocast is on for
    `device` (attention then runs in that dtype anyway)."""
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    return _EngineCache(dtype, config=model.config)


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


# What one more prefill pass costs beyond its tokens, in prompt tokens' worth of time (python,
# masks, the LM head row): ~60 ms against ~0.42 ms per token for SmolLM2-135M in bf16 on the
# 2-core EPYC (ad-hoc timing of passes of 1-32 rows x 64-312 tokens). Used on CPUs only.
PASS_TOKENS = 128


def prefill_passes(lengths: Sequence[int], pass_tokens: int = PASS_TOKENS) -> list[list[int]]:
    """Split rows sorted by prompt length into runs prefilled one pass each, padded to the run's
    longest: the split with the least work, counted as `pass_tokens` per pass plus every token
    a pass computes, padding included. One pass of 32 rows pads a group of 90-300 token rewrite
    prompts by ~40%; passes of similar lengths compute those pads no more."""
    if any(a > b for a, b in itertools.pairwise(lengths)):
        raise ValueError("prefill_passes takes lengths sorted ascending")
    n = len(lengths)
    best, cut = [0] + [0] * n, [0] * (n + 1)  # best[j]: least work for rows[:j]; cut[j]: where its last run starts
    for j in range(1, n + 1):
        best[j], cut[j] = min((best[i] + pass_tokens + (j - i) * lengths[j - 1], i) for i in range(j))
    runs: list[list[int]] = []
    while n:
        runs.append(list(range(cut[n], n)))
        n = cut[n]
    return runs[::-1]


class _Decoder:
    """Greedy/sampled decoding with a KV cache and continuous batching: a row leaves the batch
    (and the cache) as soon as it emits a stop id or uses its own budget, and waiting prompts are
    prefilled into the freed slots, their cache left-padded to the batch's length. Positions
    are tracked per row, so left padding never shifts a row's positions. With a `prefix` that
    every prompt starts with, a prefill starts from its keys and values: a row's cache is then
    [prefix, padding, rest of its prompt], the padding masked out."""

    def __init__(self, model: Any, device: torch.device, stop_ids: frozenset[int], pad_id: int,
                 do_sample: bool, temperature: float, top_p: float, generator: torch.Generator,
                 repeat_stop: float = 0.0, number_ids: frozenset[int] = frozenset(),
                 prefix: SharedPrefix | None = None, pass_tokens: int | None = None,
                 lookup: int = 0) -> None:
        self.model, self.device, self.stop_ids, self.pad_id = model, device, stop_ids, pad_id
        self.prefix, self.pass_tokens, self.lookup = prefix, pass_tokens, lookup
        self.decode_passes = self.drafted = self.accepted = 0
        self.prefill_positions = self.decode_positions = 0  # what the passes computed, pads included
        self.repeat_stop, self.number_ids = repeat_stop, number_ids
        self.pick = lambda logits: _pick(logits.float(), do_sample, temperature, top_p, generator)
        self.prefills = 0  # refills (batches of new rows)
        self.max_rows = 0
        self.prefill_passes = 0  # forward passes over their prompts
        self.prefill_seconds = 0.0

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: DynamicCache) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                         **with_cache(self.model, cache), use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]

    def _prefill(self, rows: list[tuple[int, list[int], int]]):  # noqa: ANN202
        """Prefill `rows` in passes of similar lengths (`prefill_passes`, which takes them sorted
        by prompt length; one pass when `pass_tokens` is None), stacked into one cache in the
        order of `rows`."""
        skip = self.prefix.length if self.prefix is not None else 0
        lengths = [len(ids) - skip for _, ids, _ in rows]
        groups = [list(range(len(rows)))] if self.pass_tokens is None else prefill_passes(lengths, self.pass_tokens)
        parts = [self._prefill_pass([rows[j] for j in group]) for group in groups]
        self.prefills += 1
        if len(parts) == 1:
            return parts[0]
        cache, mask = _stack([(part[0], part[1]) for part in parts])
        return cache, mask, torch.cat([part[2] for part in parts]), torch.cat([part[3] for part in parts])

    def _prefill_pass(self, rows: list[tuple[int, list[int], int]]):  # noqa: ANN202
        skip = self.prefix.length if self.prefix is not None else 0
        width = max(len(ids) - skip for _, ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, (_, ids, _) in enumerate(rows):
            input_ids[j, width - len(ids) + skip:] = torch.tensor(ids[skip:])
            mask[j, width - len(ids) + skip:] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0) + skip
        cache = new_cache(self.model, self.device)
        if self.prefix is not None:
            self.prefix.fill(cache, len(rows))
            mask = torch.cat([mask.new_ones((len(rows), skip)), mask], dim=1)
        start = time.perf_counter()
        logits = self._forward(input_ids, mask, positions, cache)
        self.prefill_seconds += time.perf_counter() - start
        self.prefill_passes += 1
        self.prefill_positions += input_ids.numel()
        return cache, mask, positions[:, -1] + 1, logits

    def run(self, queue: list[tuple[int, list[int], int]], batch_size: int,
            done: Callable[[int, list[int], bool], None], cache_tokens: int | None = None) -> None:
        """Decode `queue` ((row id, prompt ids, budget), in the order rows are to be taken in),
        at most `batch_size` rows at a time, and at most as many as `cache_tokens` (rows x
        longest prompt plus budget among them, plus the masked columns drafts may leave) allows."""
        queue = list(queue)
        live: list[tuple[int, int]] = []  # (row id, budget)
        out: dict[int, list[int]] = {}
        loops: dict[int, LoopDetector] = {}
        need: dict[int, int] = {}  # live row -> the cache columns it can come to fill
        lookups: dict[int, _Lookup] = {}
        cache = mask = next_pos = logits = None
        # a row's columns: its prompt, its budget, and the masked ones drafts leave until compacted
        slack = COMPACT_COLUMNS + self.lookup if self.lookup else 0

        def emit(row: int, budget: int, token: int) -> bool:
            """Append `token` to `row`'s output; True when that ends the row (it is then done)."""
            tokens_so_far = out.setdefault(row, [])
            tokens_so_far.append(token)
            looped = bool(self.repeat_stop) and loops.setdefault(
                row, LoopDetector(self.repeat_stop, self.number_ids)).push(token)
            if token in self.stop_ids or len(tokens_so_far) >= budget or looped:
                loops.pop(row, None)
                need.pop(row, None)
                lookups.pop(row, None)
                done(row, out.pop(row), looped and token not in self.stop_ids and len(tokens_so_far) < budget)
                return True
            return False

        while queue or live:
            slots = batch_size
            if cache_tokens is not None and queue and len(live) <= batch_size // 2:  # a refill is possible
                waiting = [len(ids) + budget + slack for _, ids, budget in queue[:batch_size]]
                longest = max([need[row] for row, _ in live] + waiting)
                slots = max(1, min(batch_size, cache_tokens // longest))
            # Refill once half the slots are free: one prefill serves several new rows.
            if queue and len(live) <= slots // 2:
                take, queue = queue[: slots - len(live)], queue[slots - len(live):]
                need.update((i, len(ids) + budget + slack) for i, ids, budget in take)
                if self.lookup:
                    lookups.update((i, _Lookup(ids)) for i, ids, _ in take)
                if self.pass_tokens is not None:
                    take.sort(key=lambda row: len(row[1]))  # similar lengths share a prefill pass
                new_cache, new_mask, new_pos, new_logits = self._prefill(take)
                live_new = [(i, budget) for i, _, budget in take]
                if live:
                    cache, mask = _stack([(cache, mask), (new_cache, new_mask)])
                    next_pos = torch.cat([next_pos, new_pos])
                    logits = torch.cat([logits, new_logits])
                    live = live + live_new
                else:
                    cache, mask, next_pos, logits, live = new_cache, new_mask, new_pos, new_logits, live_new
                self.max_rows = max(self.max_rows, len(live))
            tokens = self.pick(logits)
            keep = [j for j, ((row, budget), token) in enumerate(zip(live, tokens.tolist(), strict=True))
                    if not emit(row, budget, token)]
            if not keep:
                live = []
                continue
            if len(keep) < len(live):
                cache, mask, next_pos, tokens = _select(keep, cache, mask, next_pos, tokens)
                live = [live[j] for j in keep]
            drafts = self._drafts(live, out, lookups, tokens) if self.lookup and _croppable(cache) else []
            if not any(drafts):
                mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
                logits = self._step(tokens[:, None], mask, next_pos[:, None], cache, 1)[:, -1, :]
                next_pos = next_pos + 1
                continue
            # One pass over each row's token and its draft; a row keeps the draft tokens its
            # greedy choices confirm, and goes on from the logits after the last of them.
            width = 1 + max(len(d) for d in drafts)
            step_ids = torch.full((len(live), width), self.pad_id, dtype=torch.long)
            step_mask = torch.zeros((len(live), width), dtype=torch.long)
            step_ids[:, 0], step_mask[:, 0] = tokens.cpu(), 1
            for j, draft in enumerate(drafts):
                step_ids[j, 1:1 + len(draft)] = torch.tensor(draft, dtype=torch.long)
                step_mask[j, 1:1 + len(draft)] = 1
            mask = torch.cat([mask, step_mask.to(self.device)], dim=1)
            positions = next_pos[:, None] + torch.arange(width, device=self.device)
            step_logits = self._step(step_ids.to(self.device), mask, positions, cache, width)
            greedy = step_logits.argmax(dim=-1).tolist()
            accepted, keep = [], []
            for j, ((row, budget), draft) in enumerate(zip(live, drafts, strict=True)):
                n = 0
                while n < len(draft) and greedy[j][n] == draft[n]:
                    n += 1
                self.drafted += len(draft)
                self.accepted += n
                accepted.append(n)
                if not any(emit(row, budget, token) for token in draft[:n]):
                    keep.append(j)
                    lookups[row].extend(draft[:n])
            columns = mask.shape[1] - width
            for j, n in enumerate(accepted):
                mask[j, columns + 1 + n:] = 0  # the rejected drafts' columns
            next_pos = next_pos + 1 + torch.tensor(accepted, device=self.device)
            index = torch.tensor(accepted, device=self.device)[:, None, None].expand(-1, 1, step_logits.shape[-1])
            logits = step_logits.gather(1, index).squeeze(1)
            if not keep:
                live = []
                continue
            unused = width - 1 - max(accepted[j] for j in keep)  # trailing columns no row kept
            if unused:
                mask = mask[:, :-unused]
                for layer in cache.layers:
                    layer.keys, layer.values = layer.keys[..., :-unused, :], layer.values[..., :-unused, :]
            if len(keep) < len(live):
                cache, mask, next_pos, logits = _select(keep, cache, mask, next_pos, logits)
                live = [live[j] for j in keep]
            if mask.shape[1] - int(mask.sum(dim=1).max()) >= COMPACT_COLUMNS:
                mask, cache = _compact(mask, cache)

    def _drafts(self, live: list[tuple[int, int]], out: dict[int, list[int]], lookups: dict[int, _Lookup],
                tokens: torch.Tensor) -> list[list[int]]:
        """Each live row's draft after its newest token (`tokens`), within its budget and the
        pass's LOOKUP_TOKENS."""
        limit = min(self.lookup, LOOKUP_TOKENS // len(live) - 1)
        drafts = []
        for (row, budget), token in zip(live, tokens.tolist(), strict=True):
            lookups[row].extend([token])
            drafts.append(lookups[row].draft(min(limit, budget - len(out[row]))))
        return drafts

    def _step(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache,
              keep: int) -> torch.Tensor:
        """One decoding pass: logits at the last `keep` positions of each row."""
        self.decode_passes += 1
        self.decode_positions += input_ids.numel()
        logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                            **with_cache(self.model, cache), use_cache=True, logits_to_keep=keep).logits
        if getattr(cache, "grown", False) and self.device.type == "cpu":
            # Every layer's room was just replaced by a larger one, which the freed rooms cannot
            # serve again: hand them back now, not after the allocator's ~10 s decay, when up to
            # a whole cache of them (~0.3 GB on the fp32 quickstart) sat resident at its peak.
            cache.grown = False
            release_freed_memory()
        return logits


def _croppable(cache: DynamicCache) -> bool:
    """Whether every layer of `cache` holds plain keys and values whose columns can be cut and
    moved (not a sliding window's, whose layers keep their own offsets)."""
    return all(type(layer) is DynamicLayer for layer in cache.layers)


def _select(keep: list[int], cache: DynamicCache, mask: torch.Tensor, next_pos: torch.Tensor,
            per_row: torch.Tensor):  # noqa: ANN202
    """Keep only the rows `keep` of the batch (the cache, mask, positions and a per-row tensor),
    then drop leading columns no remaining row attends to."""
    index = torch.tensor(keep, device=mask.device)
    cache.batch_select_indices(index)
    mask, next_pos, per_row = mask[index], next_pos[index], per_row[index]
    mask, cache = _trim_left(mask, cache)
    return cache, mask, next_pos, per_row


def _compact(mask: torch.Tensor, cache: DynamicCache):  # noqa: ANN202
    """Move each row's attended columns to the right end, in order, and drop the columns no row
    needs then: the masked-out columns (left padding, rejected drafts) go but for what the
    longest row leaves."""
    getattr(cache, "room", {}).clear()
    width = int(mask.sum(dim=1).max())
    index = torch.sort(mask, dim=1, stable=True).indices[:, -width:]  # masked columns first, then the rest in order
    for layer in cache.layers:
        gather = index[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
        layer.keys, layer.values = layer.keys.gather(2, gather), layer.values.gather(2, gather)
    return mask.gather(1, index), cache


def _stack(parts: Sequence[tuple[DynamicCache, torch.Tensor]]) -> tuple[DynamicCache, torch.Tensor]:
    """Stack (cache, mask) pairs on the batch axis into the first cache, each left-padded to the
    widest (padding masked out); every layer is written once into its stacked tensors. The other
    caches are consumed: each of their layers lets go of its tensors once copied (a caller's
    name for a refill's cache would otherwise keep its prefill resident beside the copy)."""
    for cache, _ in parts:
        getattr(cache, "room", {}).clear()  # each layer's old room goes once it is copied
    width = max(mask.shape[1] for _, mask in parts)
    rows = [mask.shape[0] for _, mask in parts]

    def stacked(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
        shape = list(tensors[0].shape)
        shape[0], shape[dim] = sum(rows), width
        out = tensors[0].new_zeros(shape)
        start = 0
        for t in tensors:
            out.narrow(0, start, t.shape[0]).narrow(dim, width - t.shape[dim], t.shape[dim]).copy_(t)
            start += t.shape[0]
        return out

    first = parts[0][0]
    for j, layer in enumerate(first.layers):
        layers = [cache.layers[j] for cache, _ in parts]
        layer.keys = stacked([x.keys for x in layers], -2)
        layer.values = stacked([x.values for x in layers], -2)
        for consumed in layers[1:]:
            consumed.keys = consumed.values = None
    return first, stacked([mask for _, mask in parts], 1)


def _trim_left(mask: torch.Tensor, cache: DynamicCache):  # noqa: ANN202
    """Drop leading columns that no remaining row attends to."""
    used = mask.any(dim=0).nonzero()
    start = int(used[0]) if len(used) else 0
    if start == 0:
        return mask, cache
    for layer in cache.layers:
        layer.keys = layer.keys[..., start:, :]
        layer.values = layer.values[..., start:, :]
    return mask[:, start:], cache


def _finish_row(tokenizer: Any, row: list[int], stop_ids: frozenset[int], looped: bool = False) -> Generation:
    """Cut a generated row at its first stop id and decode it."""
    end = next((j for j, token in enumerate(row) if token in stop_ids), None)
    if end is not None:
        return Generation(_decode(tokenizer, row[:end]), end + 1, True)
    return Generation(_decode(tokenizer, row), len(row), False, looped)


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
    from fedsdr.console import task

    return task(description, total)
