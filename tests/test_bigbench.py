"""The BIG-bench general suite, against a tiny fake sdist (nothing is downloaded)."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from fedsdr.data import bigbench
from fedsdr.data.bigbench import load_general_suite, prepare_bigbench
from fedsdr.data.schema import Record
from fedsdr.models.cache import MARKER_FILE, read_marker

ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks"


def _crass() -> dict:
    examples = [
        {
            "input": f"A man drinks {i} cups of coffee. What would have happened if he had not?",
            "target_scores": {
                f"He would have been tired {i}.": 1,
                "That is not possible.": 0,
                f"He would have been awake {i}.": 0,
            },
        }
        for i in range(10)
    ]
    # two right options: the second is dropped from the choices, kept in also_correct
    examples.append(
        {"input": "Two right answers?", "target_scores": {"yes": 0, "maybe": 1, "perhaps": 1}}
    )
    examples.append({"input": "No right answer.", "target_scores": {"x": 0, "y": 0}})  # skipped
    return {"name": "crass_ai", "append_choices_to_input": True, "examples": examples}


def _counting() -> dict:
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    return {
        "name": "object_counting",
        "examples": [
            {
                "input": f"I have {n} apples. How many fruits do I have?",
                "target": [words[n], str(n)],
            }
            for n in range(1, 10)
        ],
    }


def _deduction(k: int) -> dict:
    """Three questions per paragraph, as in BIG-bench (same input, different options)."""
    examples = []
    for p in range(4):
        paragraph = f"On a shelf ({k} objects, shelf {p}) there are books. The red one is left."
        for q in range(3):
            examples.append(
                {
                    "input": paragraph,
                    "target_scores": {
                        f"The red book is position {q}.": 1,
                        f"The blue book is position {q}.": 0,
                        f"The green book is position {q}.": 0,
                    },
                }
            )
    return {
        "name": f"logical_deduction_{k}",
        "task_prefix": f"The following paragraphs each describe a set of {k} objects.\n\n",
        "example_input_prefix": "",
        "examples": examples,
    }


def _dyck() -> dict:
    return {
        "name": "dyck_languages",
        "task_prefix": "Complete the rest of the sequence.\n",
        "example_input_prefix": "\nInput: ",
        "examples": [
            {"input": "[ ( < >", "target_scores": {")": 0, ") ]": 1, "]": 0, "> )": 0}},
            {"input": "{ [", "target_scores": {"] }": 1, "}": 0}},
        ],
    }


def _words() -> dict:
    return {
        "name": "word_sorting",
        "task_prefix": "Sort the following words alphabetically:",
        "example_input_prefix": "\nList: ",
        "examples": [{"input": "pear apple fig", "target": "apple fig pear"}],
    }


def make_fake_sdist(path: Path) -> Path:
    members = {
        f"{ROOT}/crass_ai/task.json": json.dumps(_crass()),
        f"{ROOT}/object_counting/task.json": json.dumps(_counting()),
        f"{ROOT}/logical_deduction/task.json": json.dumps({"name": "logical_deduction"}),
        f"{ROOT}/logical_deduction/three_objects/task.json": json.dumps(_deduction(3)),
        f"{ROOT}/logical_deduction/five_objects/task.json": json.dumps(_deduction(5)),
        f"{ROOT}/dyck_languages/task.json": json.dumps(_dyck()),
        f"{ROOT}/word_sorting/task.json": json.dumps(_words()),
        f"{ROOT}/not_in_the_suite/task.json": json.dumps(
            {"examples": [{"input": "x", "target": "y"}]}
        ),
        f"{ROOT}/boolean_expressions/task.py": "print('a program, not json')\n",
        "bigbench-1.0.0/setup.py": "from setuptools import setup\n",
    }
    with tarfile.open(path, "w:gz") as tf:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A fake sdist, named by $FEDSDR_BIGBENCH_SDIST, and a private cache."""
    monkeypatch.setenv("FEDSDR_CACHE", str(tmp_path / "default-cache"))
    sdist = make_fake_sdist(tmp_path / "bigbench-1.0.0.tar.gz")
    monkeypatch.setenv(bigbench.SDIST_ENV, str(sdist))
    return sdist, tmp_path / "cache"


DOMAINS = ("crass_ai", "object_counting", "logical_deduction", "dyck_languages", "word_sorting")


def _by_id(records: list[Record]) -> dict[str, Record]:
    return {r.id: r for r in records}


def test_records_are_parsed(fake):
    _, cache = fake
    records = load_general_suite(items_per_task=100, few_shot=0, seed=0, cache_dir=cache)
    domains = [r.domain for r in records]
    assert {d: domains.count(d) for d in set(domains)} == {
        "crass_ai": 11,  # the item without a right option is skipped
        "object_counting": 9,
        "logical_deduction": 24,  # both subtasks, under the parent's name
        "dyck_languages": 2,
        "word_sorting": 1,
    }
    assert "not_in_the_suite" not in domains
    rec = _by_id(records)

    mc = rec["bigbench-crass_ai-00003"]
    assert mc.scorer == "choice" and mc.answer == "He would have been tired 3."
    assert mc.output == mc.answer and mc.choices[mc.choice_index] == mc.answer
    assert sorted(mc.choices) == sorted(
        ["He would have been tired 3.", "That is not possible.", "He would have been awake 3."]
    )
    assert mc.instruction.startswith("A man drinks 3 cups of coffee.")
    for choice in mc.choices:
        assert f"\n- {choice}" in mc.instruction
    assert mc.instruction.endswith(bigbench.MC_SUFFIX)
    assert mc.meta["task"] == "crass_ai" and mc.meta["subtask"] is None

    # options are shuffled (BIG-bench often lists the right one first), deterministically
    firsts = [
        rec[f"bigbench-crass_ai-{i:05d}"].choices.index(rec[f"bigbench-crass_ai-{i:05d}"].answer)
        for i in range(10)
    ]
    assert len(set(firsts)) > 1

    two = rec["bigbench-crass_ai-00010"]
    assert two.answer == "maybe" and two.choices is not None
    assert "perhaps" not in two.choices and two.meta["also_correct"] == ["perhaps"]

    count = rec["bigbench-object_counting-00006"]
    assert count.scorer == "numeric" and count.answer == "7" and count.choices is None
    assert count.meta["targets"] == ["seven", "7"]
    assert count.instruction.endswith(bigbench.TEXT_SUFFIX)

    sub = rec["bigbench-logical_deduction-three_objects-00004"]
    assert sub.domain == "logical_deduction" and sub.meta["subtask"] == "three_objects"
    assert sub.instruction.startswith("The following paragraphs each describe a set of 3 objects.")
    assert sub.answer == "The red book is position 1." and len(sub.choices) == 3

    dyck = rec["bigbench-dyck_languages-00000"]
    assert dyck.scorer == "exact" and dyck.answer == ") ]" and dyck.choices is None
    assert "Input: [ ( < >" in dyck.instruction

    words = rec["bigbench-word_sorting-00000"]
    assert words.scorer == "exact" and words.answer == "apple fig pear"
    assert "Sort the following words alphabetically:\n\nList: pear apple fig" in words.instruction

    for r in records:  # survives the JSONL round trip
        assert Record.from_json(json.loads(json.dumps(r.to_json()))) == r


def test_sampling_is_deterministic(fake):
    _, cache = fake
    a = load_general_suite(items_per_task=3, few_shot=2, seed=7, cache_dir=cache)
    b = load_general_suite(items_per_task=3, few_shot=2, seed=7, cache_dir=cache)
    assert [r.to_json() for r in a] == [r.to_json() for r in b]
    c = load_general_suite(items_per_task=3, few_shot=2, seed=8, cache_dir=cache)
    assert [r.id for r in a] != [r.id for r in c]
    tasks = ["word_sorting", "crass_ai"]
    only = load_general_suite(items_per_task=3, few_shot=0, seed=7, tasks=tasks, cache_dir=cache)
    assert [r.domain for r in only] == ["word_sorting"] + ["crass_ai"] * 3


def test_few_shot_items_are_never_evaluated(fake):
    _, cache = fake
    for seed in range(5):
        records = load_general_suite(items_per_task=4, few_shot=3, seed=seed, cache_dir=cache)
        pool = _by_id(load_general_suite(items_per_task=100, few_shot=0, seed=0, cache_dir=cache))
        evaluated = {r.id for r in records}
        questions = {r.meta["question"] for r in records}
        # dyck_languages (2 items) and word_sorting (1) cannot spare 3 shots: none evaluated
        assert {r.domain for r in records} == set(DOMAINS) - {"dyck_languages", "word_sorting"}
        for r in records:
            shots = r.meta["few_shot_ids"]
            assert len(shots) == 3 and len(set(shots)) == 3
            assert not evaluated & set(shots)
            # never a shot on the same paragraph as an evaluated question
            assert not questions & {pool[s].meta["question"] for s in shots}
            assert r.instruction.count("\nAnswer: ") == 3
            for s in shots:
                assert f"{pool[s].meta['question']}" in r.instruction
                assert f"Answer: {pool[s].answer}" in r.instruction
            zero_shot = pool[r.id].instruction
            prefix = r.meta["prefix"]
            assert r.instruction.endswith(zero_shot.removeprefix(prefix).lstrip())
            assert r.answer == pool[r.id].answer and r.choices == pool[r.id].choices


def test_cache_is_reused_without_the_tarball(fake, monkeypatch):
    sdist, cache = fake
    first = load_general_suite(items_per_task=5, few_shot=1, seed=0, cache_dir=cache)
    folder = cache / "datasets" / bigbench.SUITE_NAME
    marker = read_marker(folder)
    assert marker["sdist_sha256"] == bigbench.sha256_file(sdist)
    assert marker["tasks"]["crass_ai"]["count"] == 11
    assert marker["tasks"]["crass_ai"]["source_examples"] == 12
    assert marker["tasks"]["logical_deduction"]["subtasks"] == {
        "five_objects": 12,
        "three_objects": 12,
    }
    assert not list(folder.parent.glob(".*tmp-*")), "temporary folder left behind"

    def no_tarball(*a, **k):
        raise AssertionError("the tarball was read again")

    monkeypatch.setattr(bigbench.tarfile, "open", no_tarball)
    sdist.unlink()
    again = load_general_suite(items_per_task=5, few_shot=1, seed=0, cache_dir=cache)
    assert [r.to_json() for r in again] == [r.to_json() for r in first]
    assert prepare_bigbench(cache_dir=cache) == folder


def test_corrupted_cache_is_detected_and_rebuilt(fake, monkeypatch):
    _, cache = fake
    first = load_general_suite(items_per_task=5, few_shot=0, seed=0, cache_dir=cache)
    file = cache / "datasets" / bigbench.SUITE_NAME / "crass_ai.jsonl"
    original = file.read_text()
    file.write_text(original.replace("He would have been tired 3.", "He would have slept 3."))

    reads = []
    real_open = tarfile.open
    monkeypatch.setattr(
        bigbench.tarfile, "open", lambda *a, **k: reads.append(a) or real_open(*a, **k)
    )
    again = load_general_suite(items_per_task=5, few_shot=0, seed=0, cache_dir=cache)
    assert len(reads) == 1  # rebuilt from the sdist
    assert file.read_text() == original
    assert [r.to_json() for r in again] == [r.to_json() for r in first]

    # a file deleted from the cache is rebuilt too
    file.unlink()
    assert load_general_suite(items_per_task=5, few_shot=0, seed=0, cache_dir=cache) == first
    assert len(reads) == 2


def test_sdist_argument_and_default_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSDR_CACHE", str(tmp_path / "default"))
    monkeypatch.delenv(bigbench.SDIST_ENV, raising=False)
    sdist = make_fake_sdist(tmp_path / "elsewhere.tar.gz")
    folder = prepare_bigbench(sdist=sdist, progress=False)
    assert folder == tmp_path / "default" / "datasets" / "bigbench-general"
    assert (folder / MARKER_FILE).is_file() and (folder / "crass_ai.jsonl").is_file()
    assert len(load_general_suite(items_per_task=2, few_shot=0, seed=0)) == 2 + 2 + 2 + 2 + 1


def test_unreachable_pypi_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv(bigbench.SDIST_ENV, raising=False)

    def no_pypi(cmd, **kw):
        assert "--no-deps" in cmd and "bigbench==1.0.0" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(bigbench.subprocess, "run", no_pypi)
    with pytest.raises(RuntimeError) as err:
        prepare_bigbench(cache_dir=tmp_path, progress=False)
    msg = str(err.value)
    assert "PyPI" in msg and "No matching distribution" in msg and bigbench.SDIST_ENV in msg
    assert not (tmp_path / "datasets" / "bigbench-general").exists()


def test_bad_arguments(fake):
    _, cache = fake
    with pytest.raises(ValueError, match="unknown BIG-bench task"):
        load_general_suite(items_per_task=2, few_shot=0, seed=0, tasks=["crass"], cache_dir=cache)
    with pytest.raises(ValueError, match="not in the prepared sdist"):
        load_general_suite(items_per_task=2, few_shot=0, seed=0, tasks=["snarks"], cache_dir=cache)
    with pytest.raises(ValueError, match="items_per_task"):
        load_general_suite(items_per_task=0, few_shot=0, seed=0, cache_dir=cache)


def test_large_tasks_are_capped_deterministically(fake, monkeypatch):
    _, cache = fake
    monkeypatch.setattr(bigbench, "MAX_ITEMS_PER_TASK", 5)
    folder = prepare_bigbench(cache_dir=cache, progress=False)
    entry = read_marker(folder)["tasks"]["crass_ai"]
    assert (entry["count"], entry["usable"], entry["source_examples"]) == (5, 11, 12)
    kept = [json.loads(line)["id"] for line in (folder / "crass_ai.jsonl").open()]
    assert kept == sorted(kept) and len(kept) == 5  # source order
    assert (cache / "locks" / "bigbench-general.lock").exists()
    other = prepare_bigbench(cache_dir=cache.parent / "other", progress=False)
    assert (other / "crass_ai.jsonl").read_bytes() == (folder / "crass_ai.jsonl").read_bytes()


def test_general_suite_in_a_run(fake, tmp_path) -> None:
    """eval.suites = ["general"]: the server evaluates the global model and each client its
    personalized model on the same items, at the generation rounds; each domain is a task."""
    import json as _json

    from fedsdr.cli import main

    out = tmp_path / "run"
    code = main(["run", "--config", "configs/smoke-fedsdr.toml", "--out", str(out), "--set", "federation.rounds=2",
                 "--set", 'eval.suites=["general"]', "--set", "eval.general_items_per_task=2",
                 "--set", f'model.cache_dir="{tmp_path / "cache"}"', "--set", "eval.every_round=false"])
    assert code == 0
    rows = [_json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    general = [r for r in rows if r.get("split") == "general"]
    assert {(r["round"], r["model"]) for r in general} == {(0, "global"), (2, "global"), (0, "personalized"),
                                                           (2, "personalized")}
    assert all(set(r["domains"]) <= set(DOMAINS) and "accuracy" in r for r in general)
    assert not [r for r in rows if r["round"] == 1 and r["kind"] == "eval"]  # every_round = false
    preds = [_json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    server_items = {p["id"] for p in preds if p["split"] == "general" and p["round"] == 2}
    client_items = {p["id"] for p in (_json.loads(x) for x in (out / "clients/client-0/predictions.jsonl")
                                      .read_text().splitlines()) if p["split"] == "general" and p["round"] == 2}
    assert server_items and server_items == client_items
