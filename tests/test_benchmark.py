"""The bundled multi-domain benchmark: determinism, shape, and self-consistent references."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from fedsdr.data.benchmark import DOMAINS, build_multi_domain, champ_verifiable_answer
from fedsdr.data.schema import Record
from fedsdr.scoring import extract_final_answer, score

N = 16


@pytest.fixture(scope="module")
def records() -> list[Record]:
    return build_multi_domain(N, seed=0)


def test_domains_and_counts(records: list[Record]) -> None:
    assert len(DOMAINS) >= 6
    counts = Counter(r.domain for r in records)
    assert set(counts) == set(DOMAINS)
    assert all(c == N for c in counts.values())
    verifiable = {r.domain for r in records if r.verifiable}
    assert len(verifiable) >= 3
    assert any(not r.verifiable for r in records)  # an open-ended domain too


def test_ids_unique_and_formatted(records: list[Record]) -> None:
    ids = [r.id for r in records]
    assert len(set(ids)) == len(ids)
    assert records[0].id == f"{DOMAINS[0]}-0000"
    assert f"arithmetic-{N - 1:04d}" in ids


def test_deterministic_and_seed_dependent(records: list[Record]) -> None:
    again = build_multi_domain(N, seed=0)
    assert [r.to_json() for r in again] == [r.to_json() for r in records]
    other = build_multi_domain(N, seed=1)
    for domain in DOMAINS:
        a = [r.prompt for r in records if r.domain == domain]
        b = [r.prompt for r in other if r.domain == domain]
        assert a != b, domain


def test_domain_subset_and_unknown() -> None:
    subset = build_multi_domain(4, seed=0, domains=["code", "gsm"])
    assert [r.domain for r in subset] == ["code"] * 4 + ["gsm"] * 4
    full = build_multi_domain(4, seed=0)
    assert [r.to_json() for r in subset[4:]] == [r.to_json() for r in full if r.domain == "gsm"]
    with pytest.raises(ValueError, match="nope"):
        build_multi_domain(4, domains=["nope"])


def test_examples_are_short(records: list[Record]) -> None:
    assert max(len(r.prompt) + len(r.output) for r in records) <= 1200


def test_meta_is_json_serialisable(records: list[Record]) -> None:
    for r in records:
        assert Record.from_json(json.loads(json.dumps(r.to_json()))) == r


def test_every_reference_output_scores_correct(records: list[Record]) -> None:
    for r in records:
        if r.verifiable:
            assert score(r, r.output) is True, r.id
        else:
            assert score(r, r.output) is None


def test_answer_styles_are_heterogeneous(records: list[Record]) -> None:
    by_domain = {d: [r for r in records if r.domain == d] for d in DOMAINS}
    for d in ("arithmetic", "word_sorting"):  # terse: the output is just the answer
        assert all("\n" not in r.output and extract_final_answer(r.output) for r in by_domain[d])
    for d in ("gsm", "competition_math"):  # worked solutions ending with an answer line
        for r in by_domain[d]:
            assert "\n" in r.output and r.output.splitlines()[-1].startswith("Answer: ")
            assert "Answer: <answer>" in r.instruction
    for r in by_domain["code"]:
        assert r.output.startswith("```python\n") and r.output.endswith("```")
        assert f"def {r.meta['entry_point']}" in r.output
        assert set(r.meta) >= {"prompt", "test", "entry_point"}
    assert all(r.scorer is None for r in by_domain["construction_faq"])


def test_wrong_answers_score_false(records: list[Record]) -> None:
    for r in records:
        if r.scorer in ("numeric", "reasoning_gym"):
            assert score(r, "Answer: 123456789") is False, r.id


def test_champ_answer_classification() -> None:
    assert champ_verifiable_answer("239") == ("239", "numeric")
    assert champ_verifiable_answer("C(10, 5), or equivalently 252") == ("252", "numeric")
    assert champ_verifiable_answer("100 (i.e., all values)") == ("100", "numeric")
    assert champ_verifiable_answer("0 is the only possible value") == ("0", "numeric")
    assert champ_verifiable_answer("No") == ("No", "exact")
    assert champ_verifiable_answer("2^(n-1)") == ("2^(n-1)", "exact")
    assert champ_verifiable_answer("No integer solutions") == (None, None)


def test_fewer_when_source_is_small() -> None:
    code = build_multi_domain(1000, seed=0, domains=["code"])
    assert 50 <= len(code) < 164
