"""Scorers for verifiable records and text metrics for open-ended ones.

`score(record, response)` dispatches on `record.scorer` through the `SCORERS` registry; add an
entry there (a callable `(record, response, timeout) -> bool`) to support a new answer format.
"""

from __future__ import annotations

import functools
import json
import math
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

from fedsdr.data.schema import Record

Scorer = Callable[[Record, str, float], bool]

# ---------------------------------------------------------------------------
# Final-answer extraction
# ---------------------------------------------------------------------------

_ANSWER_LINE = re.compile(
    r"^[ \t*_#>]*(?:final[ \t]+answer|answer)[ \t]*[*_]*[ \t]*:[ \t]*(.*)$",
    re.IGNORECASE | re.MULTILINE,
)
_GSM_LINE = re.compile(r"^\s*####\s*(.+?)\s*$", re.MULTILINE)
_ANSWER_IS = re.compile(r"the\s+(?:final\s+)?answer\s+is\s*:?\s*([^\n]+)", re.IGNORECASE)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_MAX_ONE_LINE = 80


def _boxed_contents(text: str) -> str | None:
    """Contents of the last `\\boxed{...}` (balanced braces), or None."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i]
    return None


def _clean_answer(text: str) -> str | None:
    """Strip whitespace, trailing periods and wrapping `$` / `**` / `\\boxed{}`."""
    previous = None
    text = text.strip()
    while text != previous:
        previous = text
        text = text.strip().rstrip(".").strip()
        for mark in ("**", "__"):  # "**Answer:** 42" leaves an unpaired "**"
            if text.count(mark) % 2 == 1:
                text = text[2:] if text.startswith(mark) else text.removesuffix(mark)
        for wrap in ("**", "$", "`"):
            if len(text) >= 2 * len(wrap) and text.startswith(wrap) and text.endswith(wrap):
                text = text[len(wrap) : -len(wrap)]
        if text.startswith("\\boxed") or text.startswith("\\fbox"):
            inner = _boxed_contents(text)
            if inner is not None:
                text = inner
    return text or None


def extract_final_answer(text: str) -> str | None:
    """The final answer a response states, or None when it states none.

    Priority: the last `Answer:` / `Final answer:` line, the last `\\boxed{...}`, a GSM-style
    `#### X` line, "the answer is X", and finally the whole text when it is one short line.
    """
    if not text or not text.strip():
        return None
    lines = text.splitlines()
    matches = list(_ANSWER_LINE.finditer(text))
    if matches:
        last = matches[-1]
        found = _clean_answer(last.group(1))
        if found is None:  # "Answer:" alone on its line: take the next non-empty line
            rest = text[last.end() :].strip().splitlines()
            found = _clean_answer(rest[0]) if rest else None
        if found is not None and (inner := _ANSWER_IS.search(found)) is not None:
            found = _clean_answer(re.split(r"\.\s", inner.group(1), maxsplit=1)[0]) or found
        if found is not None:
            return found
    boxed = _boxed_contents(text)
    if boxed is not None and (found := _clean_answer(boxed)) is not None:
        return found
    gsm = _GSM_LINE.findall(text)
    if gsm and (found := _clean_answer(gsm[-1])) is not None:
        return found
    said = _ANSWER_IS.findall(text)
    if said:
        sentence = re.split(r"\.\s", said[-1], maxsplit=1)[0]
        if (found := _clean_answer(sentence)) is not None:
            return found
    non_empty = [line for line in lines if line.strip()]
    if len(non_empty) == 1 and len(non_empty[0].strip()) <= _MAX_ONE_LINE:
        return _clean_answer(non_empty[0])
    return None


# ---------------------------------------------------------------------------
# Normalisation and numbers
# ---------------------------------------------------------------------------

_END_PUNCT = ".,;:?\"'`*$ \t\n"


def normalize_text(text: str) -> str:
    """Casefold, collapse whitespace, strip punctuation at the ends."""
    return " ".join(text.casefold().split()).strip(_END_PUNCT)


_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+(?:\.\d+)?)?|-?\.\d+")
_FRAC = re.compile(r"\\d?frac\s*\{\s*(-?[\d.,]+)\s*\}\s*\{\s*(-?[\d.,]+)\s*\}")


def parse_number(text: str) -> float | None:
    """Parse a whole string as one number: `1,234`, `-3.5`, `3/4`, `\\frac{3}{4}`, `$12`, `50%`."""
    s = text.strip().replace("\\$", "$").replace("\\%", "%").replace("\\!", "")
    s = _FRAC.sub(r"\1/\2", s)
    s = s.strip("$ ").removesuffix("%").strip()
    s = s.replace("−", "-").replace(" ", "")
    if re.fullmatch(r"[-+]?(?:\d{1,3}(?:,\d{3})+)(?:\.\d+)?", s):
        s = s.replace(",", "")
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            value = Fraction(num) / Fraction(den)
            return float(value)
        value = float(s)
    except (ValueError, ZeroDivisionError):
        return None
    return value if math.isfinite(value) else None


def last_number(text: str) -> float | None:
    """The last number written in a text (commas and simple fractions allowed)."""
    found = _NUMBER.findall(text.replace("−", "-"))
    for candidate in reversed(found):
        value = parse_number(candidate)
        if value is not None:
            return value
    return None


def _numbers_equal(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)


# ---------------------------------------------------------------------------
# Scorers
# ---------------------------------------------------------------------------


def _require_answer(record: Record) -> str:
    if record.answer is None:
        raise ValueError(f"record {record.id!r} uses scorer {record.scorer!r} but has no answer")
    return record.answer


def score_exact(record: Record, response: str, timeout: float = 5.0) -> bool:
    """Normalised string equality of the extracted answer and `record.answer`."""
    reference = _require_answer(record)
    stated = extract_final_answer(response)
    return stated is not None and normalize_text(stated) == normalize_text(reference)


def score_numeric(record: Record, response: str, timeout: float = 5.0) -> bool:
    """Numeric equality (rel tol 1e-6) of the stated answer, else the last number, to the answer."""
    reference = parse_number(_require_answer(record))
    if reference is None:
        raise ValueError(f"record {record.id!r}: answer {record.answer!r} is not a number")
    stated = extract_final_answer(response)
    if stated is not None:
        value = parse_number(stated)
        if value is None:
            value = last_number(stated)
    else:
        value = last_number(response)
    return value is not None and _numbers_equal(value, reference)


@functools.cache
def _rg_score_fn(task: str) -> Callable[[str | None, dict[str, Any]], float]:
    from reasoning_gym.factory import DATASETS

    if task not in DATASETS:
        raise ValueError(f"reasoning_gym has no dataset {task!r}")
    dataset_cls, config_cls = DATASETS[task]
    return dataset_cls(config=config_cls()).score_answer


def score_reasoning_gym(record: Record, response: str, timeout: float = 5.0) -> bool:
    """Score with the reasoning-gym dataset's own `score_answer` (full marks = correct)."""
    task = record.meta.get("rg_task")
    entry = record.meta.get("entry")
    if not task or not isinstance(entry, dict):
        raise ValueError(f"record {record.id!r}: reasoning_gym scorer needs meta rg_task and entry")
    stated = extract_final_answer(response)
    if stated is None:
        non_empty = [line.strip() for line in response.splitlines() if line.strip()]
        stated = non_empty[0] if len(non_empty) == 1 else None
    if stated is None:
        return False
    entry = json.loads(json.dumps(entry))  # a private copy: scorers may mutate it
    try:
        value = _rg_score_fn(task)(stated, entry)
    except Exception:  # a malformed answer must not crash an evaluation
        return False
    return value is not None and float(value) >= 1.0 - 1e-9


_FENCE = re.compile(r"```[ \t]*(python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
_CODE_LINE = re.compile(r"^\s*(?:def|return|import|from|class|for|while|if)\b", re.MULTILINE)


def extract_code(response: str) -> str:
    """The python code in a response: the first ```python block (else any fence), else the text."""
    blocks = _FENCE.findall(response)
    for lang, body in blocks:
        if lang:
            return body
    if blocks:
        return blocks[0][1]
    return response


def contains_code(response: str) -> bool:
    """Whether a response contains code (a fenced block or a python statement line)."""
    return "```" in response or bool(_CODE_LINE.search(response))


def humaneval_program(record: Record, response: str) -> str:
    """The test program for a HumanEval-style record: prompt, completion, tests, check call."""
    prompt = record.meta.get("prompt", "")
    test = record.meta.get("test")
    entry_point = record.meta.get("entry_point")
    if not test or not entry_point:
        raise ValueError(f"record {record.id!r}: humaneval scorer needs meta test and entry_point")
    code = extract_code(response)
    if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        # A full function: the prompt still goes first, for its imports and helpers; the
        # later definition overrides the stub.
        body = f"{prompt}\n\n{code}"
    else:
        # A body-only completion continues the prompt; indent it if the model did not.
        if code.strip() and not code.lstrip("\n")[:1].isspace():
            code = "\n".join(f"    {line}" if line.strip() else line for line in code.splitlines())
        body = prompt + code
    return f"{body}\n\n{test}\n\ncheck({entry_point})\n"


def score_humaneval(record: Record, response: str, timeout: float = 5.0) -> bool:
    """Run the record's unit tests on the response's code in an isolated subprocess."""
    program = humaneval_program(record, response)
    with tempfile.TemporaryDirectory(prefix="fedsdr-he-") as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(program, encoding="utf-8")
        try:
            done = subprocess.run(
                [sys.executable, "-I", str(path)],
                cwd=tmp,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return False
    return done.returncode == 0


SCORERS: dict[str, Scorer] = {
    "exact": score_exact,
    "numeric": score_numeric,
    "reasoning_gym": score_reasoning_gym,
    "humaneval": score_humaneval,
}


def score(record: Record, response: str, timeout: float = 5.0) -> bool | None:
    """Whether `response` is correct for a verifiable record; None for open-ended records."""
    if record.scorer is None:
        return None
    scorer = SCORERS.get(record.scorer)
    if scorer is None:
        known = ", ".join(sorted(SCORERS))
        raise ValueError(f"unknown scorer {record.scorer!r} (known scorers: {known})")
    return bool(scorer(record, response, timeout))


def states_wrong_answer(record: Record, response: str, timeout: float = 5.0) -> bool | None:
    """Hallucination: the response states a final answer (or code) and it is wrong.

    None for open-ended records.
    """
    if record.scorer is None:
        return None
    if record.scorer == "humaneval":
        stated = contains_code(response)
    else:
        stated = extract_final_answer(response) is not None
    if not stated:
        return False
    return not score(record, response, timeout)


# ---------------------------------------------------------------------------
# Text metrics
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (with stemming) of a prediction against a reference."""
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


def repeated_ngram_rate(text: str, n: int = 4) -> float:
    """Fraction of word n-grams that repeat an earlier n-gram of the same text (0 if too short)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    words = text.casefold().split()
    if len(words) < n:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    repeats = 0
    total = len(words) - n + 1
    for i in range(total):
        gram = tuple(words[i : i + n])
        if gram in seen:
            repeats += 1
        else:
            seen.add(gram)
    return repeats / total


def word_count(text: str) -> int:
    """Number of whitespace-separated words."""
    return len(text.split())
