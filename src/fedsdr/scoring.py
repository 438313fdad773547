"""Scorers for verifiable records and text metrics for open-ended ones.

One extraction decides what a response states: `stated_answer(record, response, mode)`.

- strict: an explicit final answer only: the last `Answer:` / `Final answer:` line, `\\boxed{}`,
  a GSM-style `#### X` line, "the answer is X", or a response that is nothing but one short
  line (the terse tasks ask for the answer alone). With `answer_regex`, the regex's group
  instead (its last match).
- flexible: the strict answer, else (like lm-eval's GSM8K flexible-extract) the last number of
  the response for numeric records and the last non-empty line for the others.

Per record (`score_response`): `accuracy` = the strict answer is right, `accuracy_flexible` =
the flexible answer is right (>= accuracy), `stated` = a strict answer exists, and
`hallucination` = a strict answer is stated and wrong. Accuracy and hallucination therefore
rest on the same extraction: formatting moves `stated`, not the hallucination verdict alone.

`SCORERS` maps a scorer name to a callable `(record, answer, timeout) -> bool` that judges a
stated answer (the text `stated_answer` extracted; for "humaneval" the whole response); add an
entry to support a new answer format. Multiple-choice records ("choice") are scored by
log-likelihood in `fedsdr.choice`; their text scorer here accepts the choice's text or letter.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

from fedsdr.data.schema import CHOICE_SCORER, Record
from fedsdr.sandbox import run_python

Scorer = Callable[[Record, str, float], bool]
Mode = Literal["strict", "flexible"]

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
# The stated answer (one extraction for accuracy and hallucination)
# ---------------------------------------------------------------------------


def _regex_answer(text: str, answer_regex: str) -> str | None:
    """Group 1 of the last match of a user's answer regex, cleaned; None when it never matches."""
    matches = list(re.finditer(answer_regex, text))
    if not matches or matches[-1].group(1) is None:
        return None
    return _clean_answer(matches[-1].group(1))


def _last_number_text(text: str) -> str | None:
    """The last number of a text as written (the candidate `last_number` would parse)."""
    for candidate in reversed(_NUMBER.findall(text.replace("−", "-"))):
        if parse_number(candidate) is not None:
            return candidate
    return None


def _has_number(text: str) -> bool:
    return parse_number(text) is not None or last_number(text) is not None


def stated_answer(record: Record, response: str, mode: Mode = "strict", *, answer_regex: str = "") -> str | None:
    """The final answer `response` states for `record`, or None when it states none.

    strict: explicit markers only (see the module docstring), or `answer_regex`'s group when
    given. flexible: the strict answer, else the built-in markers (when a regex is set), else
    the last number (numeric records; also when the strict answer holds no number) or the last
    non-empty line (other scorers). HumanEval: the whole response when it contains code
    (a fence or a python statement line), in both modes.
    """
    if mode not in ("strict", "flexible"):
        raise ValueError(f"mode must be 'strict' or 'flexible', got {mode!r}")
    if record.scorer == "humaneval":
        return response if contains_code(response) else None
    strict = _regex_answer(response, answer_regex) if answer_regex else extract_final_answer(response)
    if mode == "strict":
        return strict
    if strict is None and answer_regex:
        strict = extract_final_answer(response)
    if record.scorer == "numeric":
        if strict is not None and _has_number(strict):
            return strict
        return _last_number_text(response)
    if strict is not None:
        return strict
    lines = [line for line in response.splitlines() if line.strip()]
    return _clean_answer(lines[-1]) if lines else None


# ---------------------------------------------------------------------------
# Scorers: each judges a stated answer
# ---------------------------------------------------------------------------


def _require_answer(record: Record) -> str:
    if record.answer is None:
        raise ValueError(f"record {record.id!r} uses scorer {record.scorer!r} but has no answer")
    return record.answer


def score_exact(record: Record, answer: str, timeout: float = 5.0) -> bool:
    """Normalised string equality (case, whitespace, end punctuation) of a stated answer."""
    return normalize_text(answer) == normalize_text(_require_answer(record))


def score_numeric(record: Record, answer: str, timeout: float = 5.0) -> bool:
    """Numeric equality (rel tol 1e-6) of a stated answer (the whole text as a number, else its
    last number: "1,234 dollars") to the record's answer."""
    reference = parse_number(_require_answer(record))
    if reference is None:
        raise ValueError(f"record {record.id!r}: answer {record.answer!r} is not a number")
    value = parse_number(answer)
    if value is None:
        value = last_number(answer)
    return value is not None and _numbers_equal(value, reference)


@functools.cache
def _rg_score_fn(task: str) -> Callable[[str | None, dict[str, Any]], float]:
    from reasoning_gym.factory import DATASETS

    if task not in DATASETS:
        raise ValueError(f"reasoning_gym has no dataset {task!r}")
    dataset_cls, config_cls = DATASETS[task]
    return dataset_cls(config=config_cls()).score_answer


def score_reasoning_gym(record: Record, answer: str, timeout: float = 5.0) -> bool:
    """The reasoning-gym dataset's own `score_answer` on a stated answer (full marks = correct;
    partial credit is wrong). Strict: markers or a one-line reply; flexible adds the last line."""
    task = record.meta.get("rg_task")
    entry = record.meta.get("entry")
    if not task or not isinstance(entry, dict):
        raise ValueError(f"record {record.id!r}: reasoning_gym scorer needs meta rg_task and entry")
    entry = json.loads(json.dumps(entry))  # a private copy: scorers may mutate it
    try:
        value = _rg_score_fn(task)(answer, entry)
    except Exception:  # a malformed answer must not crash an evaluation
        return False
    return value is not None and float(value) >= 1.0 - 1e-9


def score_choice(record: Record, answer: str, timeout: float = 5.0) -> bool:
    """A generated answer to a multiple-choice record: the right choice's text or its letter."""
    index = record.choice_index
    if index is None or record.choices is None:
        raise ValueError(f"record {record.id!r}: scorer 'choice' needs choices")
    if normalize_text(answer) == normalize_text(record.choices[index]):
        return True
    letter = answer.strip().strip("().:").strip().upper()
    return len(letter) == 1 and ord(letter) - ord("A") == index


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
    """Run the record's unit tests on the response's code in a contained subprocess
    (`fedsdr.sandbox.run_python`: rlimits, emptied environment, a private temp folder as the
    only writable place, no network, its processes killed at the end; a run past `timeout`
    seconds fails). The stated "answer" of a code record is the response itself when it
    contains code; both modes agree, so the tests run once per response."""
    program = humaneval_program(record, response)
    return run_python(program, timeout=timeout).ok


SCORERS: dict[str, Scorer] = {
    "exact": score_exact,
    "numeric": score_numeric,
    "reasoning_gym": score_reasoning_gym,
    "humaneval": score_humaneval,
    CHOICE_SCORER: score_choice,
}


def record_problem(record: Record) -> tuple[str, str] | None:
    """Why `record` cannot be scored, as (field, problem): an unknown scorer, a missing or
    non-numeric answer, a HumanEval record without tests...; None when it can. Loaders call it
    so that such a record stops the run when the data loads, before the model does."""
    if record.scorer is None or record.scorer == CHOICE_SCORER:
        return None  # open-ended, or checked by Record itself
    if record.scorer not in SCORERS:
        close = difflib.get_close_matches(record.scorer.lower(), SCORERS, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return "scorer", f"unknown scorer {record.scorer!r} (known scorers: {', '.join(sorted(SCORERS))}){hint}"
    if record.scorer in ("exact", "numeric") and (record.answer is None or not record.answer.strip()):
        return "answer", f"scorer {record.scorer!r} needs an answer"
    if record.scorer == "numeric" and parse_number(record.answer or "") is None:
        return "answer", f"scorer 'numeric' needs a number (e.g. 42, -3.5, 1,234, 3/4), got {record.answer!r}"
    meta = record.meta
    if record.scorer == "humaneval":
        missing = [k for k in ("test", "entry_point") if not isinstance(meta.get(k), str) or not meta[k].strip()]
        if missing:
            return "meta", (f"scorer 'humaneval' needs meta.test (the unit tests, defining check(candidate)) "
                            f"and meta.entry_point (the function's name); missing: {', '.join(missing)}")
    if record.scorer == "reasoning_gym" and (not meta.get("rg_task") or not isinstance(meta.get("entry"), dict)):
        return "meta", "scorer 'reasoning_gym' needs meta.rg_task (a dataset name) and meta.entry (an object)"
    return None


def _scorer(record: Record) -> Scorer:
    scorer = SCORERS.get(record.scorer or "")
    if scorer is None:
        known = ", ".join(sorted(SCORERS))
        raise ValueError(f"unknown scorer {record.scorer!r} (known scorers: {known})")
    return scorer


def score(
    record: Record, response: str, timeout: float = 5.0, *, mode: Mode = "flexible", answer_regex: str = ""
) -> bool | None:
    """Whether `response` is correct for a verifiable record (its `mode` answer is right); None for
    open-ended records. The default, flexible, accepts a right answer however it is written."""
    if record.scorer is None:
        return None
    scorer = _scorer(record)
    stated = stated_answer(record, response, mode, answer_regex=answer_regex)
    return stated is not None and bool(scorer(record, stated, timeout))


@dataclass(frozen=True)
class ResponseScore:
    """How one response fares on a verifiable record (see the module docstring)."""

    answer: str | None  # the strict stated answer
    answer_flexible: str | None
    accuracy: bool  # the strict answer is right
    accuracy_flexible: bool  # the flexible answer is right

    @property
    def stated(self) -> bool:
        return self.answer is not None

    @property
    def hallucination(self) -> bool:
        """A final answer is stated (strict) and it is wrong."""
        return self.stated and not self.accuracy

    def figures(self) -> dict[str, float]:
        """accuracy, accuracy_flexible, hallucination, stated as 0/1 floats."""
        return {
            "accuracy": float(self.accuracy),
            "accuracy_flexible": float(self.accuracy_flexible),
            "hallucination": float(self.hallucination),
            "stated": float(self.stated),
        }


def score_response(
    record: Record, response: str, *, timeout: float = 5.0, answer_regex: str = ""
) -> ResponseScore | None:
    """Strict and flexible verdicts of one response from one extraction per mode (the scorer
    runs at most twice, once when both modes state the same answer: code tests run once).
    None for open-ended records."""
    if record.scorer is None:
        return None
    scorer = _scorer(record)
    strict = stated_answer(record, response, "strict", answer_regex=answer_regex)
    flexible = stated_answer(record, response, "flexible", answer_regex=answer_regex)
    correct = strict is not None and bool(scorer(record, strict, timeout))
    if flexible == strict:
        correct_flexible = correct
    else:
        correct_flexible = flexible is not None and bool(scorer(record, flexible, timeout))
    return ResponseScore(strict, flexible, correct, correct_flexible or correct)


def states_wrong_answer(
    record: Record, response: str, timeout: float = 5.0, *, answer_regex: str = ""
) -> bool | None:
    """Hallucination: the response states a final answer (strict; code for HumanEval) and it is
    wrong. None for open-ended records."""
    result = score_response(record, response, timeout=timeout, answer_regex=answer_regex)
    return None if result is None else result.hallucination


def _excerpt(text: str, width: int = 80) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else "..." + flat[-width:]


def reference_self_check(
    records: Sequence[Record], *, answer_regex: str = "", timeout: float = 5.0
) -> dict[str, dict[str, Any]]:
    """Score each verifiable record's own reference `output` against its `answer` (strict, as
    evaluation does); HumanEval and multiple-choice records are skipped. Per domain:
    {"checked": n, "failed": k, "failed_flexible": k2, "example": "<id>: <reference excerpt>"}
    (example: the first failure, "" when none). A scorer error counts as a failure."""
    out: dict[str, dict[str, Any]] = {}
    for record in records:
        if record.scorer is None or record.scorer in ("humaneval", CHOICE_SCORER):
            continue
        entry = out.setdefault(record.domain, {"checked": 0, "failed": 0, "failed_flexible": 0, "example": ""})
        entry["checked"] += 1
        problem = None
        try:
            result = score_response(record, record.output, timeout=timeout, answer_regex=answer_regex)
            assert result is not None
            ok, ok_flexible = result.accuracy, result.accuracy_flexible
        except ValueError as e:
            ok = ok_flexible = False
            problem = str(e)
        if not ok:
            entry["failed"] += 1
            if not entry["example"]:
                detail = problem or f"{_excerpt(record.output)!r} (answer {record.answer!r})"
                entry["example"] = f"{record.id}: {detail}"
        if not ok_flexible:
            entry["failed_flexible"] += 1
    return out


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
