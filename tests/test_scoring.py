"""Behaviour of the answer extraction, scorers and text metrics."""

from __future__ import annotations

import os
import time

import pytest

from fedsdr.data.schema import Record
from fedsdr.scoring import (
    SCORERS,
    extract_final_answer,
    repeated_ngram_rate,
    rouge_l,
    score,
    states_wrong_answer,
    word_count,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Some steps.\nAnswer: 42", "42"),
        ("Answer: 1\nwait, no\nFinal answer: 2.", "2"),
        ("**Answer:** 17", "17"),
        ("answer: $3/4$", "3/4"),
        (
            "We get \\boxed{\\frac{1}{2}} at the end.\nThat's it, we are done here now.",
            "\\frac{1}{2}",
        ),
        ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),
        ("Adding them up, the answer is 15. Done.\nMore text here.", "15"),
        ("  7  ", "7"),
        ("Paris.", "Paris"),
        ("first line\nsecond line", None),
        ("x " * 60, None),
        ("", None),
        ("Answer:\n  12", "12"),
    ],
)
def test_extract_final_answer(text: str, expected: str | None) -> None:
    assert extract_final_answer(text) == expected


def _numeric(answer: str) -> Record:
    return Record(id="n-1", instruction="q", output="o", answer=answer, scorer="numeric")


def test_numeric_scorer() -> None:
    rec = _numeric("1234")
    assert score(rec, "so...\nAnswer: 1,234") is True
    assert score(rec, "Answer: 1234.0 dollars") is True
    assert score(rec, "Answer: 1235") is False
    assert score(rec, "I computed 12 then 1234 in total") is True  # last number, nothing stated
    assert score(rec, "no number here at all, sorry about that, it is very long text") is False
    assert score(_numeric("3/4"), "Answer: 0.75") is True
    assert score(_numeric("0.75"), "\\boxed{\\frac{3}{4}}") is True
    assert score(_numeric("-25"), "-25") is True
    assert score(_numeric("-25"), "25") is False


def test_exact_scorer_normalises() -> None:
    rec = Record(id="e", instruction="q", output="o", answer="No", scorer="exact")
    assert score(rec, "Answer: no.") is True
    assert score(rec, "Answer: Yes") is False
    assert score(rec, "a long explanation\nwithout any stated answer") is False


def test_open_ended_scores_none() -> None:
    rec = Record(id="o", instruction="q", output="o")
    assert score(rec, "anything") is None
    assert states_wrong_answer(rec, "anything") is None


def test_unknown_scorer_names_it_and_known_ones() -> None:
    rec = Record(id="u", instruction="q", output="o", answer="1", scorer="nope")
    with pytest.raises(ValueError, match="nope") as err:
        score(rec, "1")
    assert "numeric" in str(err.value) and "humaneval" in str(err.value)


def test_scorers_registry_is_extensible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(SCORERS, "always", lambda record, response, timeout: True)
    rec = Record(id="a", instruction="q", output="o", scorer="always")
    assert score(rec, "whatever") is True


def test_states_wrong_answer() -> None:
    rec = _numeric("10")
    assert states_wrong_answer(rec, "Answer: 11") is True
    assert states_wrong_answer(rec, "Answer: 10") is False
    # No stated answer: not a hallucination, even though it is not correct.
    assert states_wrong_answer(rec, "I am not sure how to do this.\nLet me think more.") is False


def test_reasoning_gym_scorer() -> None:
    entry = {
        "question": "Calculate 2 + 3.",
        "answer": "5",
        "metadata": {"source_dataset": "basic_arithmetic", "source_index": 0},
    }
    rec = Record(
        id="rg",
        instruction=entry["question"],
        output="5",
        answer="5",
        scorer="reasoning_gym",
        meta={"rg_task": "basic_arithmetic", "entry": entry},
    )
    assert score(rec, "5") is True
    assert score(rec, "Answer: 5") is True
    assert score(rec, "Answer: 6") is False
    assert score(rec, "Answer: 55") is False  # partial credit is not correct


HE_PROMPT = 'def add(a: int, b: int) -> int:\n    """Add two numbers."""\n'
HE_TEST = (
    "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
)


def _he() -> Record:
    return Record(
        id="he",
        instruction="complete",
        output="",
        scorer="humaneval",
        meta={"prompt": HE_PROMPT, "test": HE_TEST, "entry_point": "add"},
    )


def test_humaneval_correct_and_wrong() -> None:
    good = f"Here you go:\n```python\n{HE_PROMPT}    return a + b\n```\nDone."
    assert score(_he(), good) is True
    assert score(_he(), "    return a + b\n") is True  # body-only completion
    assert score(_he(), "```python\ndef add(a, b):\n    return a - b\n```") is False
    assert score(_he(), "```python\ndef add(a, b) return\n```") is False  # syntax error
    assert states_wrong_answer(_he(), "```python\ndef add(a, b):\n    return 0\n```") is True
    assert states_wrong_answer(_he(), "I don't know.") is False


def test_humaneval_infinite_loop_times_out() -> None:
    looping = "```python\ndef add(a, b):\n    while True:\n        pass\n```"
    start = time.monotonic()
    assert score(_he(), looping, timeout=1.0) is False
    assert time.monotonic() - start < 10


def test_humaneval_runs_in_a_subprocess(tmp_path) -> None:
    marker = tmp_path / "pid"
    code = (
        f"```python\nimport os\nopen({str(marker)!r}, 'w').write(str(os.getpid()))\n"
        "def add(a, b):\n    return a + b\n```"
    )
    assert score(_he(), code) is True
    assert marker.read_text() != str(os.getpid())


def test_rouge_l() -> None:
    text = "The permit takes ten weeks to process."
    assert rouge_l(text, text) == pytest.approx(1.0)
    assert rouge_l("completely unrelated words", text) == 0.0
    assert 0.0 < rouge_l("The permits take weeks", text) < 1.0  # stemming matches plurals


def test_repeated_ngram_rate() -> None:
    assert repeated_ngram_rate("go to the shop and " * 20) > 0.8
    assert repeated_ngram_rate("The quick brown fox jumps over the lazy dog.") == 0.0
    assert repeated_ngram_rate("too short") == 0.0


def test_word_count() -> None:
    assert word_count("one two  three\nfour") == 4
    assert word_count("") == 0
