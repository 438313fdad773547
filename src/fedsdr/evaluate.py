"""Evaluate a model on records: reference loss, task accuracy, hallucination, ROUGE-L, redundancy.

Generation-scored records (everything but scorer "choice") are answered by greedy decoding
within their domain's token budget and scored by `fedsdr.scoring.score_response` (one answer
extraction for accuracy and hallucination); multiple-choice records are ranked by
log-likelihood (`fedsdr.choice`), no generation. Every figure M comes with `M_se`: the binomial
standard error for rates, a seeded bootstrap over records for the others (loss: ratio of
sums over resampled records).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from fedsdr.config import EvalConfig, RunConfig
from fedsdr.data.schema import Record
from fedsdr.generation import decoding_settings, generate_detailed
from fedsdr.io import write_text_atomic
from fedsdr.memory import release_freed_memory
from fedsdr.models.adapters import adapters_off
from fedsdr.models.attention import inference_attention
from fedsdr.train import (
    chat_messages,
    collate,
    compute_dtype_of,
    encode,
    shared_prefix_of,
    token_nll,
)

# Rates (0/1 per record): binomial standard errors.
RATE_METRICS = ("accuracy", "accuracy_flexible", "hallucination", "stated", "acc_norm", "truncated", "looped")
# Means of per-record figures: bootstrap standard errors.
MEAN_METRICS = ("rougeL", "gen_len", "length_ratio", "repeat4")
METRICS = ("loss", *RATE_METRICS, *MEAN_METRICS)
BOOTSTRAP_SEED = 0
BOOTSTRAP_RESAMPLES = 1000


@torch.no_grad()
def reference_losses(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, records: Sequence[Record], *,
    autocast: Callable, system_prompt: str = "", batch_size: int = 8,
) -> list[tuple[float, int]]:
    """Per record: (sum of response-token NLL, number of response tokens). The tokens every
    record starts with (the chat template's opening) are run once and shared (`fedsdr.prefix`)."""
    model.eval()
    pad = tokenizer.pad_token_id
    examples = [encode(tokenizer, r, system_prompt) for r in records]
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    prefix = shared_prefix_of(model, examples, autocast) if examples else None
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        nll, mask = token_nll(model, collate([examples[i] for i in idx], pad), autocast, prefix=prefix)
        for row, i in enumerate(idx):
            out[i] = (float(nll[row].sum()), int(mask[row].sum()))
    return out


def domain_budgets(cfg: EvalConfig, tokenizer: PreTrainedTokenizerBase, records: Sequence[Record]) -> dict[str, int]:
    """Each domain's generation budget: its override in `max_new_tokens_per_domain`, else
    `budget_ratio` x its longest reference in tokens, within [max_new_tokens, max_new_tokens_limit]."""
    longest: dict[str, int] = defaultdict(int)
    lengths = tokenizer([r.output for r in records], add_special_tokens=False)["input_ids"] if records else []
    for record, ids in zip(records, lengths, strict=True):
        longest[record.domain] = max(longest[record.domain], len(ids))
    return {
        domain: cfg.max_new_tokens_per_domain.get(
            domain, min(cfg.max_new_tokens_limit, max(cfg.max_new_tokens, math.ceil(cfg.budget_ratio * n)))
        )
        for domain, n in longest.items()
    }


def generated_subset(cfg: EvalConfig, records: Sequence[Record]) -> list[int]:
    """Indices of the records whose answers are generated: all but multiple choice, at most
    `generate_per_domain` per domain (the first ones, in the set's seeded order)."""
    taken: dict[str, int] = defaultdict(int)
    chosen = []
    for i, r in enumerate(records):
        if r.is_choice or (cfg.generate_per_domain and taken[r.domain] >= cfg.generate_per_domain):
            continue
        taken[r.domain] += 1
        chosen.append(i)
    return chosen


def _score_one(record: Record, response: str, code_timeout: float, answer_regex: str,
               finished: bool | None, looped: bool = False) -> tuple[dict[str, float], dict[str, Any]]:
    """(figures, extras for the prediction row) of one generated response."""
    from fedsdr import scoring

    words = scoring.word_count(response)
    row: dict[str, float] = {
        "gen_len": float(words),
        "length_ratio": words / max(1, scoring.word_count(record.output)),
        "repeat4": scoring.repeated_ngram_rate(response, 4),
    }
    if finished is not None:  # truncated: hit the token budget; looped: stopped repeating itself
        row["truncated"] = float(not finished and not looped)
        row["looped"] = float(looped)
    extras: dict[str, Any] = {}
    result = scoring.score_response(record, response, timeout=code_timeout, answer_regex=answer_regex)
    if result is not None:
        row.update(result.figures())
        if record.scorer != "humaneval":  # a code record's "answer" is the response itself
            extras = {"stated_answer": result.answer, "stated_answer_flexible": result.answer_flexible}
    else:
        row["rougeL"] = scoring.rouge_l(response, record.output)
    return row, extras


def score_records(
    records: Sequence[Record], responses: Sequence[str], code_timeout: float, *,
    answer_regex: str = "", finished: Sequence[bool] | None = None,
) -> list[dict[str, float]]:
    """Per-record figures from generated responses (keys absent where a metric does not apply):
    gen_len, length_ratio, repeat4, truncated and looped (when `finished` is given), and accuracy,
    accuracy_flexible, hallucination, stated (verifiable) or rougeL (open-ended)."""
    flags: Sequence[bool | None] = finished if finished is not None else [None] * len(records)
    return [
        _score_one(record, response, code_timeout, answer_regex, done)[0]
        for record, response, done in zip(records, responses, flags, strict=True)
    ]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _aggregate(rows: list[dict[str, float]], losses: list[tuple[float, int]]) -> dict[str, float]:
    """Figures and their standard errors over a set of records."""
    from fedsdr.stats import binomial_se, bootstrap_se

    result: dict[str, float] = {"num_examples": float(len(losses))}
    tokens = sum(n for _, n in losses)
    if tokens:
        loss = sum(s for s, _ in losses) / tokens
        loss_se = bootstrap_se([s for s, _ in losses], denominators=[n for _, n in losses],
                               seed=BOOTSTRAP_SEED, resamples=BOOTSTRAP_RESAMPLES)
        result["loss"], result["loss_se"] = loss, loss_se
        result["perplexity"] = math.exp(min(50.0, loss))
        result["perplexity_se"] = result["perplexity"] * loss_se  # delta method
    for key in RATE_METRICS:
        values = [r[key] for r in rows if key in r]
        if values:
            result[key] = _mean(values)
            result[f"{key}_se"] = binomial_se(result[key], len(values))
    for key in MEAN_METRICS:
        values = [r[key] for r in rows if key in r]
        if values:
            result[key] = _mean(values)
            result[f"{key}_se"] = bootstrap_se(values, seed=BOOTSTRAP_SEED, resamples=BOOTSTRAP_RESAMPLES)
    return result


def evaluate_with_predictions(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, records: Sequence[Record], cfg: EvalConfig, *,
    autocast: Callable, system_prompt: str = "", seed: int = 0, progress: str | None = None,
    generate: bool | None = None,
) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """(figures overall (key "all") and per domain, one prediction row per record).

    `generate` (default `cfg.generate`) says whether answers are generated this time; loss and
    multiple choice are always computed.

    A prediction row (JSON-ready, in the order of `records`): id, domain, scorer, prompt (the
    user turn), response (generated text; for a multiple-choice record the chosen choice; None
    when nothing was generated), reference (the record's output), answer, loss (per token) and
    tokens, every per-record figure (accuracy, hallucination, ... as 0/1 or values), and
    stated_answer / stated_answer_flexible, new_tokens and budget (generation) or choices,
    choice_index, pred, pred_norm, choice_logprobs (multiple choice).
    """
    if not records:
        return {}, []
    losses = reference_losses(model, tokenizer, records, autocast=autocast, system_prompt=system_prompt)
    rows: list[dict[str, float]] = [{} for _ in records]
    extras: list[dict[str, Any]] = [{"response": None} for _ in records]
    choice_idx = [i for i, r in enumerate(records) if r.is_choice]
    if choice_idx:  # log-likelihood ranking: cheap, no generation, so scored even without `generate`
        from fedsdr.choice import choice_scores

        scores = choice_scores(model, tokenizer, [records[i] for i in choice_idx], autocast=autocast,
                               system_prompt=system_prompt, batch_size=cfg.batch_size)
        for i, found in zip(choice_idx, scores, strict=True):
            record = records[i]
            assert record.choices is not None
            # No strict/flexible distinction in a ranking: both accuracies are `acc`.
            rows[i] = {"accuracy": found["acc"], "accuracy_flexible": found["acc"], "acc_norm": found["acc_norm"]}
            extras[i] = {"response": record.choices[found["pred"]], "choices": list(record.choices),
                         "choice_index": record.choice_index, "pred": found["pred"],
                         "pred_norm": found["pred_norm"], "choice_logprobs": found["choice_logprobs"]}
    gen_idx = generated_subset(cfg, records) if (cfg.generate if generate is None else generate) else []
    if gen_idx:
        per_domain = domain_budgets(cfg, tokenizer, records)
        budgets = [per_domain[records[i].domain] for i in gen_idx]
        prompts = [chat_messages(records[i], system_prompt) for i in gen_idx]
        with autocast():
            outputs = generate_detailed(
                model, tokenizer, prompts, max_new_tokens=budgets, batch_size=cfg.batch_size,
                seed=seed, progress=progress, repeat_stop=cfg.repeat_stop,
                numbers_alike=cfg.repeat_stop_numbers_alike,
            )
        for i, out, limit in zip(gen_idx, outputs, budgets, strict=True):
            rows[i], more = _score_one(records[i], out.text, cfg.code_timeout, cfg.answer_regex, out.finished,
                                       out.looped)
            extras[i] = {"response": out.text, **more, "new_tokens": out.num_tokens, "budget": limit}
    release_freed_memory()  # the KV caches and activations of this evaluation
    by_domain: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_domain[r.domain].append(i)
    result = {"all": _aggregate(rows, losses)}
    for domain in sorted(by_domain):
        idx = by_domain[domain]
        result[domain] = _aggregate([rows[i] for i in idx], [losses[i] for i in idx])
    predictions = []
    for i, record in enumerate(records):
        nll, n = losses[i]
        predictions.append({
            "id": record.id, "domain": record.domain, "scorer": record.scorer, "prompt": record.prompt,
            "reference": record.output, "answer": record.answer,
            "loss": nll / n if n else None, "tokens": n, **extras[i], **rows[i],
        })
    return result, predictions


def evaluate_records(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, records: Sequence[Record], cfg: EvalConfig, *,
    autocast: Callable, system_prompt: str = "", seed: int = 0, progress: str | None = None,
    generate: bool | None = None,
) -> dict[str, dict[str, float]]:
    """Figures overall (key "all") and per domain (key = domain name); see
    `evaluate_with_predictions` for the per-record rows as well."""
    result, _ = evaluate_with_predictions(
        model, tokenizer, records, cfg, autocast=autocast, system_prompt=system_prompt, seed=seed, progress=progress,
        generate=generate,
    )
    return result


@dataclass
class Evaluator:
    """One model's evaluation settings, shared by the server and the clients. Evaluations of
    the base model itself (every adapter adding zero, as at round 0) are cached on disk, keyed
    by the model, the records and the settings, and reused by every run that starts from it."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    autocast: Callable
    cfg: EvalConfig
    model_id: str  # the resolved model source (a folder or a hub id)
    system_prompt: str = ""
    seed: int = 0
    cache_dir: Path | None = None  # None: no reuse

    def __call__(self, records: Sequence[Record], *, generate: bool, base_model: bool, progress: str | None = None,
                 ) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
        def compute() -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
            # Adapters that add nothing are skipped: the same outputs (x + 0 is x), without the
            # LoRA branch's operators on every layer and decoding step.
            skip = base_model and hasattr(self.model, "disable_adapter")
            with adapters_off(self.model) if skip else contextlib.nullcontext():
                return evaluate_with_predictions(
                    self.model, self.tokenizer, records, self.cfg, autocast=self.autocast,
                    system_prompt=self.system_prompt, seed=self.seed, progress=progress, generate=generate,
                )

        if not (base_model and self.cache_dir is not None):
            return compute()
        key = _base_key(self.model_id, self.model, records, self.cfg, self.system_prompt, self.seed, generate,
                       compute=str(compute_dtype_of(self.model, self.autocast)))
        path = self.cache_dir / "eval" / f"base-{key[:24]}.json"
        if path.exists():
            try:
                cached = json.loads(path.read_text(encoding="utf-8"))
                if cached.get("key") == key:
                    return cached["result"], cached["predictions"]
            except (OSError, ValueError):
                pass  # unreadable: computed again and rewritten below
        result, predictions = compute()
        write_text_atomic(path, json.dumps({"key": key, "result": result, "predictions": predictions}))
        return result, predictions


# Settings that say when or where to evaluate, or which records (the records are in the key
# themselves), not how a record is evaluated.
_NOT_IN_BASE_KEY = {"clients", "every_round", "generate_every", "suites", "general_items_per_task",
                    "general_few_shot", "general_tasks"}


def _base_key(model_id: str, model: torch.nn.Module, records: Sequence[Record], cfg: EvalConfig, system_prompt: str,
              seed: int, generate: bool, compute: str = "") -> str:
    """sha256 over what determines a base-model evaluation: the model (its weight files' names,
    sizes and times when it is a folder), dtypes (the parameters' and `compute`, the one the
    matmuls run in), the records, the settings."""
    folder = Path(model_id)
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.glob("*.safetensors")) \
        if folder.is_dir() else []
    param = next(model.parameters())
    payload = {
        "version": 1, "model": model_id, "files": files, "dtype": str(param.dtype), "device": param.device.type,
        "compute": compute, "decoding": decoding_settings(),
        # what inference runs: a base evaluation under sdpa_recompute is SDPA's (up to the rounding
        # of its folded query heads, which it runs where transformers would repeat_kv)
        "attention": inference_attention(getattr(getattr(model, "config", None), "_attn_implementation", None)),
        "cfg": cfg.model_dump(mode="json", exclude=_NOT_IN_BASE_KEY), "system_prompt": system_prompt, "seed": seed, "generate": generate,
        "records": [r.to_json() for r in records], "torch": torch.__version__,
    }
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


SELF_CHECK_WARN = 0.05


def check_references(cfg: RunConfig, records: Sequence[Record]) -> dict[str, dict[str, Any]]:
    """The scorer checks itself: each verifiable record's own reference is scored against its
    answer. Per domain: checked, failed, failed_rate, an example; a warning naming the domain
    and a failing reference when more than 5% fail (accuracy would then measure formatting)."""
    from fedsdr.console import console
    from fedsdr.scoring import reference_self_check

    report = reference_self_check(records, answer_regex=cfg.eval.answer_regex)
    for domain, entry in sorted(report.items()):
        entry["failed_rate"] = entry["failed"] / entry["checked"] if entry["checked"] else 0.0
        if entry["failed_rate"] > SELF_CHECK_WARN:
            console.print(
                f"[yellow]warning[/] domain {domain!r}: {entry['failed']} of {entry['checked']} references score "
                f"as wrong against their own answer, e.g. {entry['example']}; accuracy there would measure "
                "formatting. Set eval.answer_regex to a regex with one group that extracts the answer."
            )
    return report


def suite_sets(cfg: RunConfig) -> dict[str, list[Record]]:
    """The held-out suites `eval.suites` names, by split name ("general": BIG-bench's CRASS and
    BBH source tasks)."""
    sets: dict[str, list[Record]] = {}
    if "general" in cfg.eval.suites:
        from fedsdr.data.bigbench import load_general_suite

        sets["general"] = load_general_suite(
            cfg.eval.general_items_per_task, cfg.eval.general_few_shot, cfg.seed,
            tasks=cfg.eval.general_tasks or None, cache_dir=Path(cfg.model.cache_dir) if cfg.model.cache_dir else None,
        )
    return sets
