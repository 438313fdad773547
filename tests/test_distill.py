"""FedSD rewriting: prompt, filters, engine wiring, diagnostics and the cache."""

from __future__ import annotations

import json

import pytest
from rich.console import Console
from tiny_llama import tiny_model, tiny_tokenizer
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

import fedsdr.generation as generation
from fedsdr.data.schema import Record
from fedsdr.distill import (
    DistillConfig,
    DistilledRow,
    FilterConfig,
    RewriteTemplate,
    build_rewrite_messages,
    cache_key,
    check_rewrite,
    distilled_set,
    load_or_rewrite,
    render_table,
    rewrite_records,
    summarize,
)
from fedsdr.generation import Generation, GenerationStats

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny() -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Random Llama (hidden 64, 2 layers, 4 heads) + offline byte-level BPE, eos = pad; some rows
    stop at eos, others hit the budget."""
    tok = tiny_tokenizer(["What is 6 times 7? The answer is 42.", "Use the reference only as a guide."] * 20)
    return tiny_model(tok), tok


MATH = Record(
    id="m1",
    instruction="What is 6 times 7?",
    output="6 times 7 is 42.\nAnswer: 42",
    domain="arithmetic",
    answer="42",
    scorer="numeric",
)
FAQ = Record(
    id="f1",
    instruction="How long does concrete take to cure?",
    output="Concrete reaches most of its strength in about 28 days of curing.",
    domain="faq",
)
NO_TRUNC = False


# --- prompt -----------------------------------------------------------------------------


def test_rewrite_messages() -> None:
    record = FAQ.replace(input="Context: {reference} in braces")
    messages = build_rewrite_messages(record, RewriteTemplate())
    assert [m["role"] for m in messages] == ["system", "user"]
    system, user = messages[0]["content"], messages[1]["content"]
    assert "yourself" in system and "guide" in system and "not mention" in system
    assert user.index(record.instruction) < user.index(record.output)
    assert "Context: {reference} in braces" in user  # record text is never re-substituted
    custom = RewriteTemplate(system="", user="Q: {instruction}\nREF: {reference}")
    assert build_rewrite_messages(FAQ, custom) == [
        {"role": "user", "content": f"Q: {FAQ.instruction}\nREF: {FAQ.output}"}
    ]
    with pytest.raises(ValueError, match="reference"):
        RewriteTemplate(user="{instruction} only")


# --- filters ----------------------------------------------------------------------------

CLEAN_MATH = "Six sevens make 42.\nAnswer: 42"
CLEAN_FAQ = "Concrete gains most of its strength after roughly 28 days."
LOOPING = "the cat sat down " * 6  # 17 of 21 4-grams repeat
INFLATED = " ".join(f"Week {i}: the slab keeps curing and hardening." for i in range(6))  # 48 words
CASES = [  # record, rewrite, truncated, expected reason
    (FAQ, CLEAN_FAQ, NO_TRUNC, None),
    (MATH, CLEAN_MATH, NO_TRUNC, None),
    (FAQ, "   \n ", NO_TRUNC, "degenerate"),
    (FAQ, CLEAN_FAQ, True, "degenerate"),
    (FAQ, LOOPING, NO_TRUNC, "degenerate"),
    (FAQ, "As the Reference Answer says, about 28 days.", NO_TRUNC, "leak"),
    (FAQ, "My response: around 28 days.", NO_TRUNC, "leak"),
    (FAQ, INFLATED, NO_TRUNC, "inflation"),
    (MATH, "Six sevens make 41.\nAnswer: 41", NO_TRUNC, "answer_inconsistent"),
    (FAQ, LOOPING + " the reference answer", NO_TRUNC, "degenerate"),  # order: first wins
]


@pytest.mark.parametrize(("record", "rewrite", "truncated", "reason"), CASES)
def test_filters_fire(record: Record, rewrite: str, truncated: bool, reason: str | None) -> None:
    assert check_rewrite(record, rewrite, truncated, FilterConfig()) == reason


def test_paper_profile_keeps_all_but_empty_rewrites_and_leaks() -> None:
    paper = FilterConfig(profile="paper")
    expected = {"degenerate": None, "inflation": None, "answer_inconsistent": None, "leak": "leak", None: None}
    for record, rewrite, truncated, reason in CASES:
        want = "degenerate" if not rewrite.strip() else expected[reason]
        if reason == "degenerate" and "reference answer" in rewrite:
            want = "leak"
        assert check_rewrite(record, rewrite, truncated, paper) == want, rewrite


def test_a_sentence_for_a_one_word_reference_is_not_inflation() -> None:
    yes = Record(id="y", instruction="Is 7 prime?", output="Yes", domain="logic", answer="Yes", scorer="exact")
    sentence = "Yes: seven has no divisors other than one and itself, so it is prime."  # 14 words vs 1
    assert check_rewrite(yes, sentence, False, FilterConfig(answer_consistency=False)) is None
    assert check_rewrite(yes, sentence, False, FilterConfig(answer_consistency=False, inflation_floor=1)) == "inflation"


def test_filter_switches_and_thresholds() -> None:
    off = FilterConfig(leak=False, degenerate=False, inflation=False, answer_consistency=False)
    for record, rewrite, truncated, _ in CASES:
        assert check_rewrite(record, rewrite, truncated, off) is None
    assert check_rewrite(FAQ, INFLATED, False, FilterConfig(max_length_ratio=10)) is None
    assert check_rewrite(FAQ, LOOPING, False, FilterConfig(max_repeat_rate=0.9)) is None
    assert check_rewrite(FAQ, "See the given text.", False, FilterConfig()) is None
    assert check_rewrite(FAQ, "See the given text.", False, FilterConfig(leak_phrases=["given"]))
    # A precomputed verdict is used instead of running the scorer again.
    assert check_rewrite(MATH, CLEAN_MATH, False, FilterConfig(), consistent=False)
    with pytest.raises(ValueError):
        FilterConfig(unknown=True)


# --- engine -----------------------------------------------------------------------------


def test_targets_fall_back_to_raw(monkeypatch) -> None:
    """Each crafted rewrite goes through rewrite_records; fired rules restore the raw output."""
    records = [rec.replace(id=f"r{i}") for i, (rec, *_) in enumerate(CASES)]

    def fake_generate(model, tokenizer, prompts, *, max_new_tokens, **kwargs):
        assert len(prompts) == len(records) == len(max_new_tokens)
        return [Generation(text, 5, not trunc) for _, text, trunc, _ in CASES]

    monkeypatch.setattr(generation, "generate_detailed", fake_generate)

    class Tok:
        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [t.split() for t in texts]}

    rows = rewrite_records(None, Tok(), records, DistillConfig(enabled=True), seed=0)
    for row, (record, rewrite, truncated, reason) in zip(rows, CASES, strict=True):
        assert row.fallback == reason
        assert row.truncated == truncated
        assert row.rewrite == rewrite.strip()
        assert row.target == (record.output if reason else rewrite.strip())
    math_rows = [r for r in rows if r.record.verifiable]
    assert [r.consistent_rewrite for r in math_rows] == [True, False]
    assert all(r.consistent_target for r in math_rows)
    assert [r.output for r in distilled_set(rows)] == [r.target for r in rows]
    assert [r.id for r in distilled_set(rows)] == [r.id for r in records]


def test_config() -> None:
    cfg = DistillConfig()
    assert (cfg.budget(1), cfg.budget(100), cfg.budget(1000)) == (32, 200, 256)
    assert DistillConfig(max_new_tokens_ratio=1.5).budget(21) == 32
    assert DistillConfig(max_new_tokens_ratio=1.5, min_new_tokens=1).budget(21) == 32
    assert DistillConfig(max_new_tokens_ratio=1.5, min_new_tokens=1).budget(11) == 17
    with pytest.raises(ValueError):
        DistillConfig(min_new_tokens=300)
    with pytest.raises(ValueError):
        DistillConfig(nope=1)
    with pytest.raises(ValueError):
        DistillConfig(filters={"max_length_ratio": -1})


def test_distill_on_tiny_model(tiny) -> None:
    model, tok = tiny
    records = [MATH.replace(id=f"m{i}") for i in range(3)] + [
        FAQ.replace(id=f"f{i}") for i in range(3)
    ]
    cfg = DistillConfig(enabled=True, min_new_tokens=4, max_new_tokens=12, batch_size=4)
    stats = GenerationStats()
    rows = rewrite_records(model, tok, records, cfg, seed=0, stats=stats)
    assert [r.id for r in rows] == [r.id for r in records]
    assert stats.calls == 2 and stats.records == 6
    # A random model writes noise: nothing it writes passes the answer check.
    assert all(r.fallback is not None and r.target == r.raw for r in rows)
    assert any(r.truncated for r in rows)
    assert all(r.fallback == "degenerate" for r in rows if r.truncated)
    again = rewrite_records(model, tok, records, cfg, seed=0)
    assert again == rows  # greedy: deterministic


# --- diagnostics ------------------------------------------------------------------------


def _row(record: Record, rewrite: str, fallback: str | None, cr=None, ct=None) -> DistilledRow:
    return DistilledRow(
        id=record.id,
        raw=record.output,
        rewrite=rewrite,
        target=record.output if fallback else rewrite,
        fallback=fallback,
        truncated=False,
        length_ratio=len(rewrite.split()) / max(1, len(record.output.split())),
        record=record,
        consistent_rewrite=cr,
        consistent_target=ct,
    )


def hand_rows() -> list[DistilledRow]:
    a = Record(id="a", instruction="i", output="a b c d")
    b = Record(id="b", instruction="i", output="x y", answer="1", scorer="numeric")
    c = Record(id="c", instruction="i", output="m n o p", answer="1", scorer="numeric")
    d = Record(id="d", instruction="i", output="one two three four five six seven eight")
    return [
        _row(a, "a b c d e f", None),  # ratio 1.5, kept
        _row(b, "p q r s t u v w", "inflation", True, True),  # ratio 4.0
        _row(c, "k l", "answer_inconsistent", False, True),  # ratio 0.5
        _row(d, "w w w w w w w w", "degenerate"),  # ratio 1.0, 4 of 5 4-grams repeat
    ]


def test_summarize_hand_computed() -> None:
    s = summarize(hand_rows())
    expected = {
        "num_records": 4,
        "num_verifiable": 2,
        "consistency_before": 0.5,
        "hallucination_before": 0.5,
        "length_ratio_mean_before": 1.75,  # (1.5 + 4 + 0.5 + 1) / 4
        "length_ratio_median_before": 1.25,
        "length_ratio_p90_before": 3.25,  # sorted [.5, 1, 1.5, 4]: 1.5 + 0.7 * 2.5
        "repeat4_before": 0.2,  # (0 + 0 + 0 + 0.8) / 4
        "consistency_after": 1.0,
        "hallucination_after": 0.0,
        "length_ratio_mean_after": 1.125,  # (1.5 + 1 + 1 + 1) / 4
        "length_ratio_median_after": 1.0,
        "length_ratio_p90_after": 1.35,  # sorted [1, 1, 1, 1.5]: 1 + 0.7 * 0.5
        "repeat4_after": 0.0,
        "fallback_degenerate": 1,
        "fallback_leak": 0,
        "fallback_inflation": 1,
        "fallback_answer_inconsistent": 1,
        "num_kept": 1,
        "num_fallback": 3,
        "num_truncated": 0,
        "kept_rate": 0.25,
    }
    assert s.keys() == expected.keys()
    for key, value in expected.items():
        assert s[key] == pytest.approx(value), key
    json.dumps(s, allow_nan=False)
    empty = summarize([])
    assert empty["num_records"] == 0 and empty["kept_rate"] is None
    assert empty["consistency_before"] is None
    json.dumps(empty, allow_nan=False)


def test_render_table() -> None:
    rows = hand_rows()
    table = render_table({"client-0": summarize(rows[:2]), "all": summarize(rows)})
    console = Console(record=True, width=250)
    console.print(table)
    text = console.export_text()
    assert "client-0" in text and "all" in text and "0.250" in text


# --- cache ------------------------------------------------------------------------------


def test_cache_key_covers_inputs() -> None:
    cfg = DistillConfig()
    base = cache_key("m", None, [MATH, FAQ], cfg)
    assert base == cache_key("m", None, [MATH, FAQ], DistillConfig(enabled=True, refresh_every=2))
    # the filters are applied again to cached rows: both profiles share one rewriting pass
    assert base == cache_key("m", None, [MATH, FAQ], DistillConfig(filters={"profile": "paper"}))
    changed = [
        cache_key("other", None, [MATH, FAQ], cfg),
        cache_key("m", "adapter-sha", [MATH, FAQ], cfg),
        cache_key("m", None, [MATH, FAQ.replace(output="different")], cfg),
        cache_key("m", None, [MATH, FAQ.replace(input="more")], cfg),
        cache_key("m", None, [FAQ, MATH], cfg),
        cache_key("m", None, [MATH, FAQ], DistillConfig(template={"system": "Be terse."})),
        cache_key("m", None, [MATH, FAQ], DistillConfig(temperature=0.5)),
        cache_key("m", None, [MATH, FAQ], cfg, seed=1),
        cache_key("m", None, [MATH, FAQ], cfg, compute="torch.bfloat16"),
    ]
    assert len({base, *changed}) == len(changed) + 1


def test_refilter_chooses_targets_again_under_other_filters() -> None:
    from fedsdr.distill import refilter

    records = [rec.replace(id=f"r{i}") for i, (rec, *_) in enumerate(CASES)]
    safe = [refilter([_fresh_row(r, text, trunc)], FilterConfig())[0] for r, (_, text, trunc, _) in zip(records, CASES,
                                                                                               strict=True)]
    assert [r.fallback for r in safe] == [reason for *_, reason in CASES]
    paper = refilter(safe, FilterConfig(profile="paper"))
    assert [r.fallback for r in paper] == [check_rewrite(r.record, r.rewrite, r.truncated, FilterConfig(profile="paper"))
                                           for r in safe]
    assert all(r.target == (r.raw if r.fallback else r.rewrite) for r in paper)
    assert sum(r.fallback is None for r in paper) > sum(r.fallback is None for r in safe)


def _fresh_row(record: Record, rewrite: str, truncated: bool) -> DistilledRow:
    from fedsdr.distill.filters import is_consistent

    return DistilledRow(id=record.id, raw=record.output, rewrite=rewrite.strip(), target=record.output,
                        fallback="leak", truncated=truncated, length_ratio=1.0, record=record,
                        consistent_rewrite=is_consistent(record, rewrite.strip()))


def test_cache_prevents_second_generation(tiny, tmp_path) -> None:
    model, tok = tiny
    records = [MATH, FAQ, FAQ.replace(id="f2", output="Twenty-eight days.")]
    cfg = DistillConfig(enabled=True, min_new_tokens=4, max_new_tokens=10, batch_size=2)
    key = cache_key("tiny", None, records, cfg)
    stats = GenerationStats()

    def compute() -> list[DistilledRow]:
        return rewrite_records(model, tok, records, cfg, seed=0, stats=stats)

    rows, cached = load_or_rewrite(tmp_path, key, compute)
    assert not cached and stats.calls == 2
    again, cached = load_or_rewrite(tmp_path, key, compute)
    assert cached and stats.calls == 2  # no generation the second time
    assert again == rows
    lines = (tmp_path / f"distilled-{key[:16]}.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert len(lines) == 3
    for field in ("id", "raw", "rewrite", "target", "fallback", "truncated", "length_ratio"):
        assert field in first
    assert first["domain"] == "arithmetic"
    diagnostics = json.loads((tmp_path / f"diagnostics-{key[:16]}.json").read_text())
    assert diagnostics == pytest.approx(summarize(rows))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
