"""Evaluate a model on records: reference loss, task accuracy, hallucination, ROUGE-L, redundancy."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from fedsdr.config import EvalConfig
from fedsdr.data.schema import Record
from fedsdr.train import chat_messages, collate, encode, token_nll

METRICS = ("loss", "accuracy", "hallucination", "rougeL", "gen_len", "length_ratio", "repeat4")


@torch.no_grad()
def reference_losses(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, records: Sequence[Record], *,
    autocast: Callable, system_prompt: str = "", batch_size: int = 8,
) -> list[tuple[float, int]]:
    """Per record: (sum of response-token NLL, number of response tokens)."""
    model.eval()
    pad = tokenizer.pad_token_id
    examples = [encode(tokenizer, r, system_prompt) for r in records]
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        nll, mask = token_nll(model, collate([examples[i] for i in idx], pad), autocast)
        for row, i in enumerate(idx):
            out[i] = (float(nll[row].sum()), int(mask[row].sum()))
    return out


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def score_records(records: Sequence[Record], responses: Sequence[str], code_timeout: float) -> list[dict[str, float]]:
    """Per-record figures from generated responses (keys absent where a metric does not apply)."""
    from fedsdr import scoring

    rows = []
    for record, response in zip(records, responses, strict=True):
        words = scoring.word_count(response)
        row: dict[str, float] = {
            "gen_len": float(words),
            "length_ratio": words / max(1, scoring.word_count(record.output)),
            "repeat4": scoring.repeated_ngram_rate(response, 4),
        }
        if record.verifiable:
            row["accuracy"] = float(bool(scoring.score(record, response, timeout=code_timeout)))
            row["hallucination"] = float(bool(scoring.states_wrong_answer(record, response)))
        else:
            row["rougeL"] = scoring.rouge_l(response, record.output)
        rows.append(row)
    return rows


def _aggregate(rows: list[dict[str, float]], losses: list[tuple[float, int]]) -> dict[str, float]:
    result: dict[str, float] = {"num_examples": float(len(losses))}
    tokens = sum(n for _, n in losses)
    if tokens:
        result["loss"] = sum(s for s, _ in losses) / tokens
        result["perplexity"] = math.exp(min(50.0, result["loss"]))
    for key in METRICS[1:]:
        value = _mean([r[key] for r in rows if key in r])
        if value is not None:
            result[key] = value
    return result


def evaluate_records(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, records: Sequence[Record], cfg: EvalConfig, *,
    autocast: Callable, system_prompt: str = "", seed: int = 0, progress: str | None = None,
) -> dict[str, dict[str, float]]:
    """Figures overall (key "all") and per domain (key = domain name)."""
    if not records:
        return {}
    losses = reference_losses(model, tokenizer, records, autocast=autocast, system_prompt=system_prompt)
    rows: list[dict[str, float]] = [{} for _ in records]
    if cfg.generate:
        from fedsdr.generation import generate

        prompts = [chat_messages(r, system_prompt) for r in records]
        with autocast():
            responses = generate(
                model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                seed=seed, progress=progress,
            )
        rows = score_records(records, responses, cfg.code_timeout)
    by_domain: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_domain[r.domain].append(i)
    result = {"all": _aggregate(rows, losses)}
    for domain in sorted(by_domain):
        idx = by_domain[domain]
        result[domain] = _aggregate([rows[i] for i in idx], [losses[i] for i in idx])
    return result


def flatten(result: dict[str, dict[str, float]]) -> dict[str, float]:
    """{"all": {...}, "math": {...}} -> {"loss": .., "math/loss": ..}: the form MetricRecords carry."""
    flat = dict(result.get("all", {}))
    for domain, figures in result.items():
        if domain != "all":
            flat.update({f"{domain}/{k}": v for k, v in figures.items()})
    return flat


def unflatten(flat: dict[str, float]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    overall: dict[str, float] = {}
    domains: dict[str, dict[str, float]] = defaultdict(dict)
    for key, value in flat.items():
        if "/" in key:
            domain, metric = key.split("/", 1)
            domains[domain][metric] = value
        else:
            overall[key] = value
    return overall, dict(domains)
