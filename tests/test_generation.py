"""The batched generation engine on a tiny random Llama (fp32, CPU, seconds)."""

from __future__ import annotations

import pytest
import torch
from tiny_llama import tiny_model, tiny_tokenizer
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from fedsdr.generation import GenerationStats, generate, generate_detailed
from fedsdr.kv import with_cache

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    return tiny_model(tok)


def chat(i: int) -> list[dict[str, str]]:
    messages = [{"role": "user", "content": f"item {i} " * (i % 5 + 1) + "what is 6 times 7?"}]
    if i % 3 == 0:
        messages.insert(0, {"role": "system", "content": "Be brief."})
    return messages


PROMPTS = [chat(i) for i in range(24)]
BUDGETS = [10 + i % 13 for i in range(24)]


def test_batched_equals_unbatched_greedy(model, tok) -> None:
    # The ChatML prompts contain <|im_end|> (= eos = pad) mid-prompt: a mask derived from
    # pad ids would corrupt them; the tokenizer's attention mask does not.
    batched = generate_detailed(model, tok, PROMPTS, max_new_tokens=BUDGETS, batch_size=8)
    single = [
        generate_detailed(model, tok, [p], max_new_tokens=b)[0]
        for p, b in zip(PROMPTS, BUDGETS, strict=True)
    ]
    # fp32 on CPU: left padding + attention mask reproduce unpadded greedy decoding exactly
    # here (24/24). Rows mix eos-stops and budget-stops, and budgets differ within a batch.
    assert batched == single
    assert 0 < sum(g.finished for g in batched) < len(batched)
    for g, b in zip(batched, BUDGETS, strict=True):
        assert g.num_tokens <= b
        assert g.finished or g.num_tokens == b
    assert generate(model, tok, PROMPTS, max_new_tokens=BUDGETS, batch_size=8) == [
        g.text for g in batched
    ]


def test_order_preserved(model, tok) -> None:
    forward = generate(model, tok, PROMPTS, max_new_tokens=BUDGETS, batch_size=5)
    backward = generate(model, tok, PROMPTS[::-1], max_new_tokens=BUDGETS[::-1], batch_size=5)
    assert backward == forward[::-1]
    assert len(set(forward)) > 1


def test_seeded_sampling_is_reproducible(model, tok) -> None:
    kwargs = dict(max_new_tokens=12, batch_size=4, do_sample=True, temperature=1.0, top_p=0.95)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = generate(model, tok, PROMPTS[:8], seed=7, **kwargs)
    after = torch.rand(3)
    b = generate(model, tok, PROMPTS[:8], seed=7, **kwargs)
    c = generate(model, tok, PROMPTS[:8], seed=8, **kwargs)
    greedy = generate(model, tok, PROMPTS[:8], max_new_tokens=12, batch_size=4)
    assert a == b
    assert a != c
    assert a != greedy
    assert torch.equal(before, after)  # the global RNG stream is left untouched


def test_stats_count_calls_and_tokens(model, tok) -> None:
    stats = GenerationStats()
    out = generate_detailed(model, tok, PROMPTS[:10], max_new_tokens=9, batch_size=4, stats=stats)
    # calls = prefills: the first 4 rows, then refills whenever half of the 4 slots are free
    assert 3 <= stats.calls <= 5
    assert stats.records == 10
    assert stats.new_tokens == sum(g.num_tokens for g in out)
    assert stats.seconds > 0 and stats.tokens_per_second > 0
    calls = stats.calls
    generate(model, tok, PROMPTS[:3], max_new_tokens=4, batch_size=16, stats=stats)
    assert stats.calls == calls + 1 and stats.records == 13


def test_stats_count_the_positions_the_passes_computed(model, tok) -> None:
    """One row at a time, no shared prefix, no drafts: the prefill computes each prompt's tokens,
    and decoding one position per new token after the first (the prefill's logits pick the first).
    Batched, the passes also compute pads (these prompts share no prefix) and rejected drafts."""
    one = GenerationStats()
    out = generate_detailed(model, tok, PROMPTS[:6], max_new_tokens=BUDGETS[:6], batch_size=1,
                            share_prefix=False, prompt_lookup=0, stats=one)
    assert one.prefill_positions == one.prompt_tokens
    assert one.decode_positions == sum(g.num_tokens - 1 for g in out) == one.decode_passes
    batched = GenerationStats()
    generate_detailed(model, tok, PROMPTS[:6], max_new_tokens=BUDGETS[:6], batch_size=6, stats=batched)
    assert batched.shared_prefix_tokens == 0 and batched.prefill_positions > batched.prompt_tokens
    assert batched.decode_positions >= batched.decode_passes + batched.drafted


def test_state_restored_and_progress(model, tok) -> None:
    model.train()
    side = tok.padding_side
    out = generate(model, tok, PROMPTS[:6], max_new_tokens=6, batch_size=4, progress="gen")
    assert model.training
    model.eval()
    assert tok.padding_side == side
    assert out == generate(model, tok, PROMPTS[:6], max_new_tokens=6, batch_size=4)
    assert generate(model, tok, [], max_new_tokens=6) == []


def test_bad_arguments(model, tok) -> None:
    with pytest.raises(ValueError, match="budgets"):
        generate(model, tok, PROMPTS[:3], max_new_tokens=[4, 4])
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, tok, PROMPTS[:3], max_new_tokens=0)


def test_peft_model(tok) -> None:
    from peft import LoraConfig, get_peft_model

    base_out = generate(tiny_model(tok), tok, PROMPTS[:6], max_new_tokens=8, batch_size=4)
    peft_model = get_peft_model(
        tiny_model(tok), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    # LoRA B starts at zero: the adapted model equals the base model.
    assert generate(peft_model, tok, PROMPTS[:6], max_new_tokens=8, batch_size=4) == base_out


def test_stop_token_ids(tok) -> None:
    from types import SimpleNamespace

    from fedsdr.generation import stop_token_ids

    eos = tok.eos_token_id
    as_list = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[eos, 7, 9]))
    assert stop_token_ids(as_list, tok) == {eos, 7, 9}
    as_int = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=5))
    assert stop_token_ids(as_int, tok) == {eos, 5}
    assert stop_token_ids(SimpleNamespace(), tok) == {eos}
    nameless = SimpleNamespace(eos_token_id=None)
    with pytest.raises(ValueError, match="eos"):
        stop_token_ids(SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=None)), nameless)


def test_stops_on_every_end_of_turn_id(tok) -> None:
    # A chat turn that ends on another token than the tokenizer's eos (as Llama 3's <|eot_id|>):
    # the model's generation config lists both. Take the token the model emits third for one
    # prompt and name it an end-of-turn id: generation must stop right there.
    model = tiny_model(tok)
    eos = tok.eos_token_id
    prompt = PROMPTS[1]
    enc = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    ids = tok(enc, add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode():
        free = model.generate(**ids, max_new_tokens=12, do_sample=False, eos_token_id=eos,
                              pad_token_id=eos)[0, ids["input_ids"].shape[1]:].tolist()
    stop_at = next(j for j in range(1, len(free)) if free[j] not in free[:j] and free[j] != eos)
    other = free[stop_at]
    before = generate_detailed(model, tok, [prompt], max_new_tokens=12)[0]
    assert before.num_tokens > stop_at + 1  # with eos alone it runs past `other`

    model.generation_config.eos_token_id = [eos, other]
    batch = [PROMPTS[0], prompt, *PROMPTS[2:8]]
    outputs = generate_detailed(model, tok, batch, max_new_tokens=12, batch_size=4)
    row = outputs[1]
    assert row.finished
    assert row.num_tokens == stop_at + 1
    assert row.text == tok.decode(free[:stop_at], skip_special_tokens=True)
    # the same stop as transformers' own generate with the same config
    with torch.inference_mode():
        lib = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=eos)
    assert lib.shape[1] - ids["input_ids"].shape[1] == stop_at + 1
    # eos still stops the other rows, and no row runs past either stop id
    for g in outputs:
        assert g.finished or g.num_tokens == 12


def test_loop_detector_needs_a_mostly_repeated_window() -> None:
    from fedsdr.generation import LOOP_WINDOW, loops_within

    block = list(range(10, 22))  # 12 tokens said again and again
    assert loops_within(list(range(100, 140)) + block * 8, 0.8)
    assert not loops_within(list(range(100, 140)) + block * 3, 0.8)  # 36 repeated tokens < 0.8 x 64
    assert not loops_within(list(range(300)), 0.8)  # nothing repeats
    assert not loops_within([7] * (LOOP_WINDOW + 2), 0.8)  # window not yet full of 4-grams
    assert loops_within([7] * (LOOP_WINDOW + 4), 0.8)
    # one 24-token line repeated with a new step number each time (a typical greedy loop)
    steps = [t for k in range(8) for t in (200 + k, *range(1, 24))]
    assert loops_within(list(range(100, 130)) + steps, 0.8)


def test_numbers_alike_catches_a_short_line_repeated_with_new_numbers(tok) -> None:
    from fedsdr.generation import loops_within, number_token_ids

    numbers = number_token_ids(tok)
    assert tok.convert_tokens_to_ids("7") in numbers and tok.convert_tokens_to_ids("The") not in numbers
    lines = "".join(f"{k}. The answer is {k + 1}.\n" for k in range(12, 60))
    ids = tok("Let me count.\n" + lines, add_special_tokens=False)["input_ids"]
    assert not loops_within(ids, 0.8)  # each line's numbers make half its 4-grams new
    assert loops_within(ids, 0.8, numbers)
    prose = tok("Add 3 and 4 to get 7. Then double 7 to get 14, and take away 5: 9 is left.",
                add_special_tokens=False)["input_ids"]
    assert not loops_within(prose, 0.8, numbers)


def test_repeat_stop_flags_loops_and_keeps_batching_exact(model, tok) -> None:
    budgets = [160] * len(PROMPTS)
    plain = generate_detailed(model, tok, PROMPTS, max_new_tokens=budgets, batch_size=8)
    stopped = generate_detailed(model, tok, PROMPTS, max_new_tokens=budgets, batch_size=8, repeat_stop=0.8)
    single = [generate_detailed(model, tok, [p], max_new_tokens=160, repeat_stop=0.8)[0] for p in PROMPTS]
    assert stopped == single  # a row's stop depends on that row alone
    looped = [j for j, g in enumerate(stopped) if g.looped]
    assert looped, "the random model should loop under greedy decoding"
    for full, cut in zip(plain, stopped, strict=True):
        if cut.looped:  # stopped early, a prefix of the loop it would have run to the budget
            assert not cut.finished and cut.num_tokens < 160
            assert full.text.startswith(cut.text)
        else:
            assert cut == full
    with pytest.raises(ValueError, match="repeat_stop"):
        generate_detailed(model, tok, PROMPTS[:1], max_new_tokens=8, repeat_stop=1.5)


@pytest.mark.parametrize("bf16", [True, False])
def test_engine_cache_gives_the_same_logits_as_the_plain_cache(model, tok, bf16) -> None:  # noqa: ANN001
    """The engine's cache appends in place into reserved room (no copy of the cache per step)
    and, under CPU bf16 autocast, keeps keys and values in bf16, where attention runs anyway:
    prefill and every decode step give bit-identical logits, also across a batch edit and
    past the reserved room."""
    import contextlib

    from transformers import DynamicCache

    from fedsdr.generation import new_cache

    ids = torch.tensor([tok("What is 6 times 7? The answer is", add_special_tokens=False)["input_ids"]] * 3)
    ids[1, :3] = tok.pad_token_id
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    runs = []
    with torch.inference_mode(), autocast:
        for cache in (DynamicCache(config=model.config), new_cache(model, torch.device("cpu"))):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            step_mask, logits = mask, [model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                             **with_cache(model, cache), use_cache=True).logits[:, -1]]
            in_place = []
            for step in range(90):  # past the first reserved room (64 columns ahead)
                if step == 30:  # a row leaves the batch, as in the engine
                    keep = torch.tensor([0, 1])
                    cache.batch_select_indices(keep)
                    step_mask, positions, logits = step_mask[keep], positions[keep], [x[keep] for x in logits]
                token = logits[-1].argmax(-1, keepdim=True)
                step_mask = torch.cat([step_mask, step_mask.new_ones((len(token), 1))], dim=1)
                positions = positions[:, -1:] + 1
                before = cache.layers[0].keys.data_ptr()
                logits.append(model(input_ids=token, attention_mask=step_mask, position_ids=positions,
                                    **with_cache(model, cache), use_cache=True).logits[:, -1])
                in_place.append(cache.layers[0].keys.data_ptr() == before)
            runs.append((torch.stack(logits[31:]), cache.layers[0].keys.dtype, sum(in_place)))
    (plain, plain_dtype, plain_in_place), (engine, engine_dtype, engine_in_place) = runs
    # under autocast RoPE made the plain keys fp32; the engine's are in the compute dtype
    assert (plain_dtype, engine_dtype) == ((torch.float32, torch.bfloat16) if bf16 else (torch.float32,) * 2)
    assert torch.equal(plain, engine)
    assert plain_in_place == 0 and engine_in_place >= 85  # fresh room only now and then


def test_a_shared_prompt_prefix_runs_once_and_gives_the_same_greedy_text(model, tok) -> None:
    """Prompts that open alike (one system turn, as the rewrite prompts do) share the keys and
    values of what they have in common: the prefix runs once per call, each prefill covers only
    the rest, and the greedy outputs are those of full prefills (fp32: exactly), across
    refills that merge caches of other widths and rows that leave the batch."""
    system = {"role": "system", "content": "Answer in your own words, and keep it short please."}
    prompts = [[system, *chat(i)[-1:]] for i in range(24)]
    budgets = [2 + i % 7 for i in range(24)]  # rows stop at their budget or at eos, at different steps
    full, shared = GenerationStats(), GenerationStats()
    plain = generate_detailed(model, tok, prompts, max_new_tokens=budgets, batch_size=6, share_prefix=False,
                              stats=full)
    out = generate_detailed(model, tok, prompts, max_new_tokens=budgets, batch_size=6, stats=shared)
    assert out == plain
    assert 0 < sum(g.finished for g in out) < len(out)
    rendered = [tok(tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False),
                    add_special_tokens=False)["input_ids"] for p in prompts]
    common = next(j for j in range(min(map(len, rendered))) if len({r[j] for r in rendered}) > 1)
    assert shared.shared_prefix_tokens == common >= 8 and full.shared_prefix_tokens == 0
    assert shared.prompt_tokens == full.prompt_tokens  # counted in full either way
    one = generate_detailed(model, tok, prompts[:1], max_new_tokens=budgets[0], stats=shared)
    assert one == plain[:1] and shared.shared_prefix_tokens == common  # one prompt: nothing to share


def test_prefill_passes_pick_the_least_padded_work() -> None:
    from fedsdr.generation import prefill_passes

    # one pass: 50 + 4 x 100 = 450; the three short rows apart: (50 + 30) + (50 + 100) = 230
    assert prefill_passes([10, 10, 10, 100], pass_tokens=50) == [[0, 1, 2], [3]]
    assert prefill_passes([10, 10, 10, 100], pass_tokens=1000) == [[0, 1, 2, 3]]  # a pass costs more than the pads
    assert prefill_passes([7] * 5, pass_tokens=0) == [[0, 1, 2, 3, 4]]  # nothing to save: one pass
    assert prefill_passes([1, 2, 3], pass_tokens=0) == [[0], [1], [2]]
    assert prefill_passes([], pass_tokens=8) == []
    runs = prefill_passes([90, 95, 100, 140, 150, 160, 300, 310], pass_tokens=128)
    assert [j for run in runs for j in run] == list(range(8)) and len(runs) == 3
    with pytest.raises(ValueError, match="sorted"):
        prefill_passes([3, 1])


@pytest.mark.parametrize("share_prefix", [True, False])
def test_prompts_prefilled_in_passes_of_similar_lengths_give_the_same_greedy_text(
        model, tok, monkeypatch, share_prefix: bool) -> None:
    """A batch of prompts is prefilled in several passes (rows of similar length), their caches
    merged: fp32 greedy outputs equal those of one padded pass per batch, and of each prompt alone."""
    import fedsdr.generation as engine

    monkeypatch.setattr(engine, "PASS_TOKENS", 0)  # split: a pass per prompt length
    outputs, passes = {}, {}
    for pass_tokens in (0, None):  # None: split_prefill off, one pass per batch
        stats = GenerationStats()
        outputs[pass_tokens] = generate_detailed(model, tok, PROMPTS, max_new_tokens=BUDGETS, batch_size=8,
                                                 share_prefix=share_prefix, split_prefill=pass_tokens is not None,
                                                 stats=stats)
        passes[pass_tokens] = (stats.calls, stats.prefill_passes)
    calls, one_pass_each = passes[None]
    assert one_pass_each == calls
    assert passes[0][0] == calls and passes[0][1] > 2 * calls  # the same batches, more passes
    assert outputs[0] == outputs[None]
    single = [generate_detailed(model, tok, [p], max_new_tokens=b)[0] for p, b in zip(PROMPTS, BUDGETS, strict=True)]
    assert outputs[0] == single


def test_a_cache_budget_runs_fewer_rows_together_and_gives_the_same_greedy_text(model, tok) -> None:
    """`cache_bytes` caps the rows decoded together by their KV cache: fewer rows, more refills,
    the same fp32 greedy outputs."""
    from fedsdr.generation import cache_bytes_per_token

    per_token = cache_bytes_per_token(model, torch.device("cpu"))
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    assert per_token == config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * 4  # fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cache_bytes_per_token(model, torch.device("cpu")) == per_token // 2
    ids = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True) for p in PROMPTS]
    longest = max(len(x if isinstance(x, list) else x["input_ids"]) + b for x, b in zip(ids, BUDGETS, strict=True))
    outputs, stats = {}, {}
    for budget in (0, 3 * longest * per_token):  # 0: no bound; then room for three of the longest rows
        stats[budget] = GenerationStats()
        outputs[budget] = generate_detailed(model, tok, PROMPTS, max_new_tokens=BUDGETS, batch_size=8,
                                            cache_bytes=budget, stats=stats[budget])
    bounded = 3 * longest * per_token
    assert stats[0].max_rows == 8 and 1 <= stats[bounded].max_rows <= 3
    assert stats[bounded].calls > stats[0].calls
    assert outputs[bounded] == outputs[0]


def test_a_lookup_drafts_what_followed_the_last_earlier_occurrence_of_the_latest_tokens() -> None:
    from fedsdr.generation import _Lookup

    lookup = _Lookup([1, 2, 3, 4, 5, 2, 3])
    assert lookup.draft(3) == [4, 5, 2]  # (5, 2, 3) is new; (2, 3) ended at index 3
    lookup.extend([9])
    assert lookup.draft(4) == []  # 9 never occurred before
    lookup.extend([1, 2])
    assert lookup.draft(8) == [3, 4, 5, 2, 3, 9, 1, 2]  # the longest match wins: (1, 2) at the start
    assert lookup.draft(0) == []


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_prompt_lookup_confirms_drafts_in_fewer_passes_and_keeps_the_greedy_text(
        tok, monkeypatch, kv_heads: int) -> None:
    """Drafted tokens checked in one pass give fp32 greedy outputs equal to one token per pass,
    in fewer passes; so does moving every row's columns together after each pass (`_compact`).
    With grouped key/value heads, the passes that check drafts run SDPA's grouped kernel under a
    mask (`fedsdr.models.attention`)."""
    import fedsdr.generation as engine
    from fedsdr.models.attention import RECOMPUTE

    model = tiny_model(tok, kv_heads=kv_heads)
    model.set_attn_implementation(RECOMPUTE)
    outputs, stats = {}, {}
    for lookup in (0, 8):
        stats[lookup] = GenerationStats()
        outputs[lookup] = generate_detailed(model, tok, PROMPTS, max_new_tokens=BUDGETS, batch_size=8,
                                            prompt_lookup=lookup, stats=stats[lookup])
    assert outputs[8] == outputs[0]
    assert stats[0].drafted == 0 and stats[0].decode_passes >= max(BUDGETS) - 1
    assert 0 < stats[8].accepted <= stats[8].drafted
    assert stats[8].decode_passes < stats[0].decode_passes
    monkeypatch.setattr(engine, "COMPACT_COLUMNS", 1)  # compact after every pass
    assert generate_detailed(model, tok, PROMPTS, max_new_tokens=BUDGETS, batch_size=8) == outputs[0]
    single = [generate_detailed(model, tok, [p], max_new_tokens=b, prompt_lookup=0)[0]
              for p, b in zip(PROMPTS, BUDGETS, strict=True)]
    assert outputs[8] == single
    with pytest.raises(ValueError, match="prompt_lookup"):
        generate_detailed(model, tok, PROMPTS[:1], max_new_tokens=4, prompt_lookup=-1)


def test_sampling_drafts_nothing(model, tok) -> None:
    stats = GenerationStats()
    generate_detailed(model, tok, PROMPTS[:6], max_new_tokens=12, do_sample=True, stats=stats)
    assert stats.drafted == 0


def test_rooms_outgrown_during_decoding_are_handed_back_at_once(model, tok, monkeypatch) -> None:
    """Each time decoding outgrows the cache's reserved room (every `_EngineCache.ROOM` steps) the
    engine hands the freed rooms back to the OS once (they cannot serve the larger rooms that
    follow; left to the allocator's decay they kept ~0.3 GB resident); the text is unchanged."""
    import fedsdr.generation as generation

    calls = []

    def counted() -> None:
        calls.append(1)
        release()

    release = generation.release_freed_memory
    prompts, budget = PROMPTS[:2], 3 * generation._EngineCache.ROOM
    stats = GenerationStats()
    before = generate_detailed(model, tok, prompts, max_new_tokens=budget, batch_size=2, stats=stats,
                               repeat_stop=0.0)
    monkeypatch.setattr(generation, "release_freed_memory", counted)
    after = generate_detailed(model, tok, prompts, max_new_tokens=budget, batch_size=2, repeat_stop=0.0)
    assert after == before
    longest = max(g.num_tokens for g in before)
    assert longest > generation._EngineCache.ROOM  # the random model runs on past one room
    assert len(calls) >= longest // (generation._EngineCache.ROOM + 16)
