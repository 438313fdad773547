"""Evaluation on the tiny random model: multiple choice by log-likelihood, error bars,
truncation and per-domain budgets, per-record predictions; multiple-choice data loading."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from fedsdr.choice import choice_scores
from fedsdr.config import EvalConfig
from fedsdr.data.loaders import load_records
from fedsdr.data.schema import DataError, Record
from fedsdr.evaluate import evaluate_records, evaluate_with_predictions
from fedsdr.models.loading import (
    load_base_model,
    load_tokenizer,
    resolve_model_source,
    resolve_runtime,
)
from fedsdr.stats import binomial_se
from fedsdr.train import chat_messages

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():  # noqa: ANN201
    cfg = tiny_config()
    runtime = resolve_runtime(cfg.model)
    source = resolve_model_source(cfg.model)
    return load_base_model(source, runtime), load_tokenizer(source), runtime


def _mc(i: int, choices: tuple[str, ...], answer: str, domain: str = "mc") -> Record:
    return Record(id=f"mc-{i}", instruction=f"Question {i}: which one is right?" + " Think." * i,
                  output=choices[0], domain=domain, answer=answer, scorer="choice", choices=choices)


MC = [
    _mc(0, ("yes", "no"), "A"),
    _mc(1, ("The capital of France", "a list of words", "three numbers"), "2"),
    _mc(2, ("red", "green", "blue", "a much longer colour name"), "blue"),
    _mc(3, ("x", "y"), "B"),
    _mc(4, ("first answer", "second"), "first answer"),
]


def test_choice_logprob_equals_a_hand_computed_forward_pass(tiny) -> None:
    model, tok, runtime = tiny
    record = MC[1]
    system = "Be brief."
    prompt = tok.apply_chat_template(chat_messages(record, system), add_generation_prompt=True, tokenize=False)
    context = tok(prompt, add_special_tokens=False)["input_ids"]
    found = choice_scores(model, tok, [record], autocast=runtime.autocast, system_prompt=system, batch_size=4)[0]
    for choice, got in zip(record.choices or (), found["choice_logprobs"], strict=True):
        continuation = tok(choice, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([context + continuation])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        expected = sum(float(logp[len(context) - 1 + k, t]) for k, t in enumerate(continuation))
        assert got == pytest.approx(expected, abs=1e-4)


def test_choice_scores_do_not_depend_on_batching(tiny) -> None:
    model, tok, runtime = tiny
    one = choice_scores(model, tok, MC, autocast=runtime.autocast, batch_size=1)
    eight = choice_scores(model, tok, MC, autocast=runtime.autocast, batch_size=8)
    for a, b in zip(one, eight, strict=True):
        assert a["choice_logprobs"] == pytest.approx(b["choice_logprobs"], abs=1e-4)
        assert (a["pred"], a["pred_norm"]) == (b["pred"], b["pred_norm"])


def test_shared_context_equals_one_pass_per_choice(tiny) -> None:
    # The context is encoded once and its cache repeated for the choices: same scores as
    # running context + choice afresh for every choice.
    from fedsdr.choice import continuation_logprobs, shared_context_logprobs

    model, tok, runtime = tiny
    groups = []
    for record in MC:
        prompt = tok.apply_chat_template(chat_messages(record, ""), add_generation_prompt=True, tokenize=False)
        context = tok(prompt, add_special_tokens=False)["input_ids"]
        groups.append((context, [tok(c, add_special_tokens=False)["input_ids"] for c in record.choices or ()]))
    shared = shared_context_logprobs(model, groups, autocast=runtime.autocast, pad_id=tok.pad_token_id)
    pairs = [(context, c) for context, choices in groups for c in choices]
    flat = continuation_logprobs(model, tok, pairs, autocast=runtime.autocast, batch_size=3)
    assert [x for row in shared for x in row] == pytest.approx(flat, abs=1e-4)
    assert [len(row) for row in shared] == [len(r.choices or ()) for r in MC]


def test_acc_and_acc_norm_follow_the_argmax(tiny) -> None:
    model, tok, runtime = tiny
    for record, found in zip(MC, choice_scores(model, tok, MC, autocast=runtime.autocast), strict=True):
        scores = found["choice_logprobs"]
        assert len(scores) == len(record.choices or ()) and all(s < 0 for s in scores)
        normed = [s / len(c.encode("utf-8")) for s, c in zip(scores, record.choices or (), strict=True)]
        assert found["pred"] == scores.index(max(scores))
        assert found["pred_norm"] == normed.index(max(normed))
        assert found["acc"] == float(found["pred"] == record.choice_index)
        assert found["acc_norm"] == float(found["pred_norm"] == record.choice_index)


MIXED = [
    Record(id="m1", instruction="What is 2 + 3?", output="2 + 3 = 5\nAnswer: 5", domain="math", answer="5",
           scorer="numeric"),
    Record(id="m2", instruction="What is 6 * 7?", output="Answer: 42", domain="math", answer="42", scorer="numeric"),
    Record(id="m3", instruction="Is ten even?", output="yes", domain="math", answer="yes", scorer="exact"),
    Record(id="f1", instruction="What does a load-bearing wall do?", output="It carries the floors above.",
           domain="faq"),
    Record(id="f2", instruction="Why insulate a roof?", output="To keep the heat in during winter.", domain="faq"),
    *MC[:3],
]


def test_evaluate_with_predictions(tiny) -> None:
    model, tok, runtime = tiny
    cfg = EvalConfig(max_new_tokens=6, max_new_tokens_limit=6, max_new_tokens_per_domain={"faq": 3}, batch_size=4)
    result, preds = evaluate_with_predictions(model, tok, MIXED, cfg, autocast=runtime.autocast)
    assert set(result) == {"all", "math", "faq", "mc"}
    assert [p["id"] for p in preds] == [r.id for r in MIXED]
    json.dumps(preds)  # JSON-ready for predictions.jsonl

    by_id = {p["id"]: p for p in preds}
    # Generation: per-domain budgets, truncation flags, the same answer extraction.
    for p in preds:
        if p["scorer"] == "choice":
            continue
        assert p["budget"] == (3 if p["domain"] == "faq" else 6)
        assert 1 <= p["new_tokens"] <= p["budget"]
        assert p["truncated"] in (0.0, 1.0)
        if p["truncated"]:
            assert p["new_tokens"] == p["budget"]
        assert p["prompt"] == next(r.prompt for r in MIXED if r.id == p["id"])
    for rid in ("m1", "m2", "m3"):
        p = by_id[rid]
        assert set(p) >= {"accuracy", "accuracy_flexible", "hallucination", "stated", "stated_answer"}
        assert p["hallucination"] == float(p["stated"] and not p["accuracy"])
        assert p["accuracy"] <= p["accuracy_flexible"]
        assert "rougeL" not in p
    assert "rougeL" in by_id["f1"] and "accuracy" not in by_id["f1"]
    # Multiple choice: ranked, never generated.
    scored = choice_scores(model, tok, MC[:3], autocast=runtime.autocast, batch_size=4)
    for record, found in zip(MC[:3], scored, strict=True):
        p = by_id[record.id]
        assert "new_tokens" not in p and "gen_len" not in p
        assert p["response"] == (record.choices or ())[found["pred"]]
        assert (p["accuracy"], p["accuracy_flexible"], p["acc_norm"]) == (found["acc"], found["acc"], found["acc_norm"])
        assert "hallucination" not in p and "stated" not in p
        assert p["choice_logprobs"] == pytest.approx(found["choice_logprobs"], abs=1e-4)

    # Figures with error bars, per domain and overall.
    overall = result["all"]
    verifiable = [p for p in preds if "accuracy" in p]
    assert len(verifiable) == 6
    accuracy = sum(p["accuracy"] for p in verifiable) / 6
    assert overall["accuracy"] == pytest.approx(accuracy)
    assert overall["accuracy_se"] == pytest.approx(binomial_se(accuracy, 6))
    for key in ("hallucination", "stated", "accuracy_flexible", "truncated"):
        values = [p[key] for p in preds if key in p]
        assert overall[key] == pytest.approx(sum(values) / len(values))
        assert overall[f"{key}_se"] == pytest.approx(math.sqrt(overall[key] * (1 - overall[key]) / len(values)))
    tokens = sum(p["tokens"] for p in preds)
    assert overall["loss"] == pytest.approx(sum(p["loss"] * p["tokens"] for p in preds) / tokens, rel=1e-6)
    assert overall["loss_se"] > 0 and overall["perplexity_se"] > 0
    for key in ("rougeL", "gen_len", "length_ratio", "repeat4"):
        assert f"{key}_se" in overall and overall[f"{key}_se"] >= 0
    assert overall["num_examples"] == len(MIXED)
    assert set(result["mc"]) == {"num_examples", "loss", "loss_se", "perplexity", "perplexity_se",
                                 "accuracy", "accuracy_se", "accuracy_flexible", "accuracy_flexible_se",
                                 "acc_norm", "acc_norm_se"}
    assert result["mc"]["accuracy_flexible"] == result["mc"]["accuracy"]
    assert "accuracy" not in result["faq"] and "rougeL_se" in result["faq"]
    assert result["math"]["num_examples"] == 3 and "acc_norm" not in result["math"]

    # The old entry point returns the same figures (greedy decoding is deterministic).
    again = evaluate_records(model, tok, MIXED, cfg, autocast=runtime.autocast)
    assert again.keys() == result.keys()
    for key, figures in result.items():
        assert again[key] == pytest.approx(figures)


def test_evaluate_without_generation_still_ranks_choices(tiny) -> None:
    model, tok, runtime = tiny
    result, preds = evaluate_with_predictions(model, tok, MIXED, EvalConfig(generate=False),
                                              autocast=runtime.autocast)
    assert "accuracy" not in result["math"] and "gen_len" not in result["all"]
    assert "acc_norm" in result["mc"] and "loss" in result["math"]
    assert all(p["response"] is None for p in preds if p["scorer"] != "choice")
    assert evaluate_with_predictions(model, tok, [], EvalConfig(), autocast=runtime.autocast) == ({}, [])


# ---------------------------------------------------------------------------
# Config and loading
# ---------------------------------------------------------------------------


def test_answer_regex_is_validated() -> None:
    from fedsdr.config import ConfigError

    assert tiny_config("eval.answer_regex='<ans>(.*?)</ans>'").eval.answer_regex == "<ans>(.*?)</ans>"
    with pytest.raises(ConfigError, match="exactly one capturing group"):
        tiny_config("eval.answer_regex='(a)(b)'")
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        tiny_config("eval.answer_regex='(a'")
    with pytest.raises(ConfigError, match=">= 1"):
        tiny_config("eval.max_new_tokens_per_domain={code=0}")
    assert tiny_config("eval.max_new_tokens_per_domain={code=256}").eval.max_new_tokens_per_domain == {"code": 256}


def test_load_choices_from_jsonl_and_csv(tmp_path: Path) -> None:
    rows = [
        {"id": "q1", "instruction": "Capital of France?", "output": "Paris", "choices": ["Lyon", "Paris"],
         "answer": "B"},
        {"id": "q2", "instruction": "2 + 2?", "output": "4", "choices": ["3", "4", "5"], "answer": "1"},
    ]
    jsonl = tmp_path / "mc.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    csv_path = tmp_path / "mc.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "choices": json.dumps(r["choices"])})
    for path in (jsonl, csv_path):
        records = load_records(str(path))
        assert [r.scorer for r in records] == ["choice", "choice"]
        assert records[0].choices == ("Lyon", "Paris") and records[0].choice_index == 1
        assert records[1].choice_index == 1  # "1": the index (no choice's text is "1")


def test_load_choices_under_another_column_name(tmp_path: Path) -> None:
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps({"instruction": "q", "output": "a", "options": ["a", "b"], "answer": "a"}) + "\n",
                    encoding="utf-8")
    records = load_records(str(path), fields={"choices": "options"})
    assert records[0].choices == ("a", "b") and records[0].choice_index == 0


def test_bad_choice_data_names_the_line_and_record(tmp_path: Path) -> None:
    path = tmp_path / "mc.jsonl"
    good = {"id": "ok", "instruction": "q", "output": "a", "choices": ["a", "b"], "answer": "a"}
    bad = {"id": "q9", "instruction": "q", "output": "a", "choices": ["a", "b"], "answer": "zebra"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"mc\.jsonl:2: record 'q9': answer 'zebra' names none of its 2 choices"):
        load_records(str(path))
    csv_path = tmp_path / "mc.csv"
    csv_path.write_text("instruction,output,choices,answer\nq,a,not a list,a\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"mc\.csv:2: field 'choices' \(choices\) must be a list"):
        load_records(str(csv_path))


def test_domain_budgets_fit_the_longest_reference(tiny) -> None:
    from fedsdr.evaluate import domain_budgets

    _, tok, _ = tiny
    long = Record(id="g1", instruction="Solve.", output=" ".join(["step"] * 120) + " Answer: 4", domain="gsm",
                  answer="4", scorer="numeric")
    records = [*MIXED, long]
    n_long = len(tok(long.output, add_special_tokens=False)["input_ids"])
    cfg = EvalConfig(max_new_tokens=6, budget_ratio=1.5, max_new_tokens_limit=10_000,
                     max_new_tokens_per_domain={"faq": 3})
    budgets = domain_budgets(cfg, tok, records)
    assert budgets["faq"] == 3  # an explicit override wins
    assert budgets["gsm"] == -(-3 * n_long // 2) > n_long  # 1.5 x the longest reference: never cut off
    n_math = max(len(tok(r.output, add_special_tokens=False)["input_ids"]) for r in records if r.domain == "math")
    assert budgets["math"] == max(6, -(-3 * n_math // 2))
    assert domain_budgets(cfg.model_copy(update={"max_new_tokens": 500}), tok, records)["math"] == 500  # the floor
    assert domain_budgets(cfg.model_copy(update={"max_new_tokens_limit": 50}), tok, records)["gsm"] == 50


def test_generated_subset_and_generate_rounds() -> None:
    from fedsdr.evaluate import generated_subset

    cfg = EvalConfig(generate_per_domain=1)
    chosen = [MIXED[i].id for i in generated_subset(cfg, MIXED)]
    assert chosen == ["m1", "f1"]  # multiple choice never generates; one per domain, in order
    assert EvalConfig().generates_at(0, 3) and EvalConfig().generates_at(3, 3)
    assert not EvalConfig().generates_at(2, 3)
    assert EvalConfig(generate_every=2).generates_at(2, 5) and not EvalConfig(generate_every=2).generates_at(3, 5)
    assert EvalConfig(generate_every=[1]).generates_at(1, 3) and not EvalConfig(generate_every=[1]).generates_at(0, 3)
    assert not EvalConfig(generate=False).generates_at(0, 3)


def test_a_base_model_evaluation_runs_without_the_adapters_and_gives_the_same_results() -> None:
    from fedsdr.evaluate import Evaluator
    from fedsdr.models.adapters import AdapterSpec, activate, fresh_adapter_state, set_adapter_state
    from fedsdr.models.loading import shared_model

    cfg = tiny_config("eval.max_new_tokens=8", "lora.dropout=0.0")
    model, tok, runtime, source = shared_model(cfg.model, cfg.lora, [AdapterSpec("default", cfg.lora.r, cfg.lora.alpha)], 0)
    set_adapter_state(model, "default", fresh_adapter_state(model, "default", 3))  # lora_B = 0: adds nothing
    activate(model, ["default"], trainable=[])
    records = [Record(id=f"r{i}", instruction=f"What is {i} + {i}?", output=f"The answer is {2 * i}.",
                      domain="arithmetic", answer=str(2 * i)) for i in range(4)]
    lora_calls: list[int] = []
    hooks = [m.lora_A["default"].register_forward_hook(lambda *_: lora_calls.append(1))
             for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    evaluator = Evaluator(model, tok, runtime.autocast, cfg.eval, source)  # no cache: both computed
    try:
        skipped = evaluator(records, generate=True, base_model=True)
        assert not lora_calls  # the LoRA branch never ran
        assert not any(p.requires_grad for p in model.parameters())  # left frozen, as it found them
        with_adapter = evaluator(records, generate=True, base_model=False)
        assert lora_calls
    finally:
        for h in hooks:
            h.remove()
    assert skipped == with_adapter  # the same losses, scores and generated texts, exactly


def test_a_cached_base_evaluation_is_reused_only_under_the_same_compute_dtype(tiny, tmp_path: Path) -> None:
    """bf16 and fp32 evaluations of one model differ (rounding): each is cached under its own key."""
    import contextlib

    from fedsdr.evaluate import Evaluator

    model, tok, _ = tiny
    records = [Record(id=f"r{i}", instruction=f"Name {i} colours.", output="Red, green.", domain="faq")
               for i in range(3)]
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    cfg = EvalConfig()
    fp32_eval = Evaluator(model, tok, contextlib.nullcontext, cfg, "tiny", cache_dir=tmp_path)
    bf16_eval = Evaluator(model, tok, bf16, cfg, "tiny", cache_dir=tmp_path)
    fp32_result, _ = fp32_eval(records, generate=False, base_model=True)
    bf16_result, _ = bf16_eval(records, generate=False, base_model=True)
    assert len(list((tmp_path / "eval").glob("base-*.json"))) == 2
    assert bf16_result != fp32_result  # computed in bf16, not read from the fp32 entry
    assert fp32_eval(records, generate=False, base_model=True)[0] == fp32_result
    assert len(list((tmp_path / "eval").glob("base-*.json"))) == 2
