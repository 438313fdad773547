"""Behaviour of the answer extraction, scorers and text metrics."""

from __future__ import annotations

import json
import os
import time

import pytest

from fedsdr.data.schema import DataError, Record
from fedsdr.scoring import (
    SCORERS,
    extract_final_answer,
    reference_self_check,
    repeated_ngram_rate,
    rouge_l,
    score,
    score_response,
    stated_answer,
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


def test_humaneval_runs_in_a_contained_subprocess(tmp_path) -> None:
    pid_code = (f"```python\nimport os\nassert os.getpid() != {os.getpid()}\n"
                "def add(a, b):\n    return a + b\n```")
    assert score(_he(), pid_code) is True
    marker = tmp_path / "pid"
    code = (f"```python\nopen({str(marker)!r}, 'w').write('x')\n"
            "def add(a, b):\n    return a + b\n```")
    assert score(_he(), code) is False and not marker.exists()


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


# ---------------------------------------------------------------------------
# One extraction for accuracy and hallucination
# ---------------------------------------------------------------------------


LONG = "Let me think about this problem carefully.\nFirst we add the numbers together.\n"


@pytest.mark.parametrize(
    ("response", "strict", "flexible"),
    [
        ("Answer: 42", "42", "42"),
        (LONG + "#### 42", "42", "42"),
        (LONG + "So \\boxed{42}.", "42", "42"),
        (LONG + "Thus the answer is 42.", "42", "42"),
        (LONG + "We get 40 and then 42 in total", None, "42"),  # no marker: flexible only
        (LONG + "Answer: I cannot tell\nmaybe 41", "I cannot tell", "41"),  # stated, no number
        (LONG + "nothing numeric here", None, None),
        ("42", "42", "42"),  # a reply that is only the answer states it
    ],
)
def test_stated_answer_numeric(response: str, strict: str | None, flexible: str | None) -> None:
    rec = _numeric("42")
    assert stated_answer(rec, response, "strict") == strict
    assert stated_answer(rec, response, "flexible") == flexible


def test_stated_answer_exact_flexible_takes_the_last_line() -> None:
    rec = Record(id="e", instruction="q", output="o", answer="blue", scorer="exact")
    response = "The sky scatters short wavelengths.\nSo its colour is:\nblue."
    assert stated_answer(rec, response, "strict") is None
    assert stated_answer(rec, response, "flexible") == "blue"
    with pytest.raises(ValueError, match="mode"):
        stated_answer(rec, response, "loose")  # type: ignore[arg-type]


def test_accuracy_and_hallucination_share_one_extraction() -> None:
    rec = _numeric("42")
    # The last number is right but no answer is stated: flexibly right, strictly not stated.
    unstated = score_response(rec, LONG + "We get 40 and then 42 in total")
    assert unstated is not None
    assert (unstated.accuracy, unstated.accuracy_flexible, unstated.stated, unstated.hallucination) == (
        False, True, False, False)
    # The same number stated wrongly: a hallucination, and wrong in both modes.
    wrong = score_response(rec, LONG + "Answer: 41")
    assert wrong is not None and wrong.figures() == {
        "accuracy": 0.0, "accuracy_flexible": 0.0, "hallucination": 1.0, "stated": 1.0}
    right = score_response(rec, LONG + "Answer: 42")
    assert right is not None and right.figures() == {
        "accuracy": 1.0, "accuracy_flexible": 1.0, "hallucination": 0.0, "stated": 1.0}
    # Consistency: accuracy <= accuracy_flexible, hallucination == stated and not accuracy.
    for response in ("Answer: 41", "42", "x 42", LONG + "41 then 42", LONG + "Answer: n/a\n42", "", "Answer: 42.0"):
        res = score_response(rec, response)
        assert res is not None
        assert res.accuracy <= res.accuracy_flexible
        assert res.hallucination == (res.stated and not res.accuracy)
        assert states_wrong_answer(rec, response) == res.hallucination
        assert score(rec, response, mode="strict") == res.accuracy
        assert score(rec, response) == res.accuracy_flexible
    assert score_response(Record(id="o", instruction="q", output="o"), "anything") is None


def test_answer_regex_replaces_the_builtin_markers_in_strict_mode() -> None:
    rec = _numeric("42")
    regex = r"RESULT=<(\d+)>"
    assert stated_answer(rec, "RESULT=<7> no wait RESULT=<42>", answer_regex=regex) == "42"
    assert stated_answer(rec, LONG + "Answer: 42", answer_regex=regex) is None  # strict: the regex only
    assert stated_answer(rec, LONG + "Answer: 42", "flexible", answer_regex=regex) == "42"
    res = score_response(rec, LONG + "RESULT=<41>", answer_regex=regex)
    assert res is not None and res.hallucination


def test_humaneval_tests_run_once_with_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    import fedsdr.scoring as scoring

    calls: list[float] = []
    real = scoring.score_humaneval

    def counting(record: Record, response: str, timeout: float = 5.0) -> bool:
        calls.append(timeout)
        return real(record, response, timeout)

    monkeypatch.setitem(SCORERS, "humaneval", counting)
    res = score_response(_he(), "```python\ndef add(a, b):\n    return 0\n```", timeout=2.5)
    assert res is not None and res.hallucination and not res.accuracy_flexible
    assert calls == [2.5]
    calls.clear()
    res = score_response(_he(), "I don't know.", timeout=2.5)
    assert res is not None and not res.stated and not res.accuracy
    assert calls == []  # no code: nothing to run


def test_choice_text_scorer_accepts_the_text_or_the_letter() -> None:
    rec = Record(id="c", instruction="q", output="Paris", answer="B", scorer="choice",
                 choices=("Lyon", "Paris", "Nice"))
    assert rec.choice_index == 1
    assert score(rec, "Answer: Paris") is True
    assert score(rec, "Answer: (B)") is True
    assert score(rec, "Answer: A") is False


@pytest.mark.parametrize(("answer", "index"), [("Paris", 1), (" paris ", 1), ("C", 2), ("(a)", 0), ("2", 2)])
def test_choice_answer_resolves_text_letter_or_index(answer: str, index: int) -> None:
    rec = Record(id="c", instruction="q", output="o", answer=answer, scorer="choice",
                 choices=["Lyon", "Paris", "Nice"])  # type: ignore[arg-type]
    assert rec.choice_index == index
    assert rec.choices == ("Lyon", "Paris", "Nice")


def test_choice_text_wins_over_its_index() -> None:
    rec = Record(id="c", instruction="q", output="o", answer="1", scorer="choice", choices=("0", "1"))
    assert rec.choice_index == 1


def test_choice_answer_matching_none_names_the_record() -> None:
    with pytest.raises(DataError, match=r"'mc-7'.*'Marseille'.*3 choices"):
        Record(id="mc-7", instruction="q", output="o", answer="Marseille", scorer="choice",
               choices=("Lyon", "Paris", "Nice"))
    with pytest.raises(DataError, match="at least two choices"):
        Record(id="mc-8", instruction="q", output="o", answer="A", scorer="choice", choices=("Lyon",))


def test_choice_record_json_round_trip() -> None:
    rec = Record(id="c", instruction="q", output="o", answer="B", scorer="choice", choices=("x", "y"))
    again = Record.from_json(json.loads(json.dumps(rec.to_json())))
    assert again == rec and again.choice_index == 1
    assert "choices" not in _numeric("1").to_json()  # records without choices keep their old form


def test_reference_self_check() -> None:
    records = [
        Record(id="g1", instruction="q", output="6 * 7 = 42\nAnswer: 42", domain="gsm", answer="42", scorer="numeric"),
        Record(id="g2", instruction="q", output="6 * 7 is 42 and that is all there is to it\nreally", domain="gsm",
               answer="42", scorer="numeric"),  # never states it: a strict failure, flexibly right
        Record(id="g3", instruction="q", output="Answer: 41", domain="gsm", answer="42", scorer="numeric"),
        Record(id="w1", instruction="q", output="apple pear", domain="words", answer="apple pear", scorer="exact"),
        Record(id="f1", instruction="q", output="free text", domain="faq"),
        _he(),
        Record(id="c1", instruction="q", output="x", domain="mc", answer="A", scorer="choice", choices=("x", "y")),
    ]
    report = reference_self_check(records)
    assert set(report) == {"gsm", "words"}  # open-ended, code and choice records are skipped
    assert report["gsm"]["checked"] == 3 and report["gsm"]["failed"] == 2
    assert report["gsm"]["failed_flexible"] == 1
    assert report["gsm"]["example"].startswith("g2: ") and "really" in report["gsm"]["example"]
    assert report["words"] == {"checked": 1, "failed": 0, "failed_flexible": 0, "example": ""}
    # A user format the built-in markers miss, declared by a regex.
    tagged = [Record(id="t1", instruction="q", output="so <ans>42</ans>", domain="d", answer="42", scorer="numeric"),
              Record(id="t2", instruction="q", output="it is 5 <ans>42</ans>\nbye now", domain="d",
                     answer="42", scorer="numeric")]
    assert reference_self_check(tagged)["d"]["failed"] == 1
    assert reference_self_check(tagged, answer_regex=r"<ans>(.*?)</ans>")["d"]["failed"] == 0


def test_reference_self_check_counts_scorer_errors() -> None:
    bad = Record(id="b1", instruction="q", output="Answer: x", domain="d", answer="not a number", scorer="numeric")
    report = reference_self_check([bad])
    assert report["d"]["failed"] == 1 and "not a number" in report["d"]["example"]


def test_bundled_references_state_their_answers_strictly() -> None:
    from fedsdr.data.benchmark import build_multi_domain

    report = reference_self_check(build_multi_domain(6, seed=0))
    assert report and all(entry["checked"] > 0 and entry["failed"] == 0 for entry in report.values()), report
