"""The general-ability suite: BIG-bench tasks (CRASS and BBH's sources), offline from PyPI.

Source: the PyPI sdist ``bigbench==1.0.0`` (Apache-2.0, 358 MB). It is fetched once with
``pip download`` (or given as a file: ``sdist=`` / ``$FEDSDR_BIGBENCH_SDIST``), and only the
``bigbench/benchmark_tasks/<task>[/<subtask>]/task.json`` members of :data:`TASKS` are
read, straight from the tarball (the package itself needs tensorflow and is never
installed). The converted records are cached as one JSONL file per task in
``<cache>/datasets/bigbench-general/`` with a manifest (the marker file) holding each
file's sha256; it is written atomically under a file lock, and every later call checks
the checksums (a corrupted cache is rebuilt).

Conversion (every item of every task is kept in the cache; sampling happens at load):

- multiple choice (``target_scores``: option -> score): ``scorer="choice"``, ``choices`` =
  the options in a fixed shuffled order (BIG-bench often lists the right one first),
  ``answer`` = the right option's text (``target`` when given). Options that are right too
  (``"3"`` beside ``"three"``, ``"circle"`` beside ``"ellipse"``) are dropped from the
  choices and kept in ``meta["also_correct"]``, so exactly one choice is right. Items with
  no positive option are skipped.
- text target (``target``: a string or a list of accepted strings), and ``dyck_languages``
  (84 options: its right option becomes the target): ``scorer="numeric"`` when the
  answer is an integer (a numeral is preferred among accepted targets, e.g. object_counting's
  ``["nine", "9"]``), else ``"exact"``; all accepted targets in ``meta["targets"]``.
- at most :data:`MAX_ITEMS_PER_TASK` items per task are kept (a fixed-seed subsample).
- ``domain`` = the task name (subtasks such as ``logical_deduction/three_objects`` share
  their parent's domain; the subtask is in ``meta["subtask"]``). ``output`` = the answer.
- The instruction: the task's ``task_prefix``, the input (after its ``example_input_prefix``),
  the options as a list (multiple choice), and a one-line reply instruction.

Public API: :func:`load_general_suite` and :func:`prepare_bigbench`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from fedsdr import console as progress_console
from fedsdr.data.schema import CHOICE_SCORER, Record
from fedsdr.models.cache import (
    MARKER_FILE,
    build_atomically,
    file_lock,
    read_marker,
    resolve_cache_dir,
    sha256_file,
)

logger = logging.getLogger(__name__)

PACKAGE = "bigbench==1.0.0"
SDIST_NAME = "bigbench-1.0.0.tar.gz"
SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
SDIST_ENV = "FEDSDR_BIGBENCH_SDIST"
SUITE_NAME = "bigbench-general"
# Bump when the conversion changes, so caches written by older code are rebuilt.
FORMAT = 1

TASKS: tuple[str, ...] = (
    "crass_ai",
    "causal_judgment",
    "date_understanding",
    "disambiguation_qa",
    "formal_fallacies_syllogisms_negation",
    "geometric_shapes",
    "hyperbaton",
    "logical_deduction",
    "movie_recommendation",
    "navigate",
    "object_counting",
    "penguins_in_a_table",
    "reasoning_about_colored_objects",
    "ruin_names",
    "salient_translation_error_detection",
    "snarks",
    "sports_understanding",
    "temporal_sequences",
    "tracking_shuffled_objects",
    "dyck_languages",
    "word_sorting",
)
# Items kept per task (a fixed-seed subsample in source order; hyperbaton alone has 50 000):
# far more than an evaluation samples, and it keeps the cache at ~20 MB instead of ~75 MB.
MAX_ITEMS_PER_TASK = 2000
# Multiple-choice tasks whose right option is better asked for as text (too many options).
TEXT_TASKS = frozenset({"dyck_languages"})

MC_SUFFIX = "Reply with only the correct option, exactly as written."
TEXT_SUFFIX = "Reply with only the final answer."

_MEMBER = re.compile(r"^[^/]+/bigbench/benchmark_tasks/([^/]+)/(?:([^/]+)/)?task\.json$")
_INTEGER = re.compile(r"^-?\d+$")


# --------------------------------------------------------------------------- conversion


def _options_block(choices: list[str] | tuple[str, ...] | None) -> str:
    if not choices:
        return ""
    return "\nOptions:\n" + "\n".join(f"- {c}" for c in choices)


def compose_instruction(record: Record, shots: Sequence[Record] = ()) -> str:
    """The instruction of a converted record, with ``shots`` (records of the same task) as
    worked examples before it: task prefix, each shot's question and ``Answer: ...``, the
    question with its options, the reply instruction."""
    prefix = record.meta.get("prefix", "")
    parts = [prefix] if prefix else []
    for shot in shots:
        question = shot.meta["question"] + _options_block(shot.choices)
        parts.append(f"{question}\nAnswer: {shot.answer}")
    parts.append(record.meta["question"] + _options_block(record.choices))
    parts.append(MC_SUFFIX if record.scorer == CHOICE_SCORER else TEXT_SUFFIX)
    return "\n\n".join(parts)


def _clean(text: Any) -> str:
    return str(text).strip()


def _convert_example(
    task: str, subtask: str | None, index: int, example: dict[str, Any], spec: dict[str, Any]
) -> Record | None:
    """One BIG-bench example as a record (zero-shot instruction), or None when unusable."""
    question = _clean(f"{spec.get('example_input_prefix', '')}{example.get('input', '')}")
    if not question:
        return None
    meta: dict[str, Any] = {
        "source": "bigbench",
        "task": task,
        "subtask": subtask,
        "source_index": index,
        "prefix": _clean(spec.get("task_prefix", "")),
        "question": question,
    }
    scores = example.get("target_scores")
    target = example.get("target")
    choices: list[str] | None = None
    if isinstance(scores, dict) and scores:
        options = {_clean(k): float(v) for k, v in scores.items() if _clean(k)}
        best = max(options.values(), default=0.0)
        if best <= 0:
            return None
        right = [k for k, v in options.items() if v == best]
        named = _clean(target) if isinstance(target, str) else None
        answer = named if named in right else right[0]
        if task in TEXT_TASKS:
            targets = [answer]
        else:
            others = [k for k in right if k != answer]
            choices = [k for k in options if k not in others]
            random.Random(f"fedsdr-bigbench:{task}:{subtask}:{index}").shuffle(choices)
            if others:
                meta["also_correct"] = others
    else:
        accepted = target if isinstance(target, list) else [target]
        targets = [_clean(t) for t in accepted if t is not None and _clean(t)]
        if not targets:
            return None
        numerals = [t for t in targets if _INTEGER.match(t)]
        answer = numerals[0] if numerals else targets[0]
    if choices is not None:
        if len(choices) < 2:
            return None
        scorer = CHOICE_SCORER
    else:
        scorer = "numeric" if _INTEGER.match(answer) else "exact"
        meta["targets"] = targets
    name = f"{task}-{subtask}" if subtask else task
    record = Record(
        id=f"bigbench-{name}-{index:05d}",
        instruction="",
        output=answer,
        domain=task,
        answer=answer,
        scorer=scorer,
        meta=meta,
        choices=tuple(choices) if choices is not None else None,
    )
    return record.replace(instruction=compose_instruction(record))


def _read_task_files(
    sdist: Path, tasks: tuple[str, ...]
) -> dict[str, list[tuple[str | None, dict]]]:
    """task -> [(subtask, parsed task.json)] for the wanted tasks, in one pass over the tarball."""
    wanted = set(tasks)
    found: dict[str, list[tuple[str | None, dict]]] = {}
    try:
        with tarfile.open(sdist, "r|gz") as tf:
            for member in tf:
                match = _MEMBER.match(member.name)
                if not match or match.group(1) not in wanted or not member.isfile():
                    continue
                fh = tf.extractfile(member)
                if fh is None:
                    continue
                spec = json.loads(fh.read().decode("utf-8"))
                found.setdefault(match.group(1), []).append((match.group(2), spec))
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        raise RuntimeError(f"Could not read BIG-bench tasks from {sdist}: {e}") from e
    for specs in found.values():
        specs.sort(key=lambda s: s[0] or "")  # subtasks in a stable order
    return found


def convert_sdist(sdist: Path, tasks: tuple[str, ...] = TASKS) -> dict[str, dict[str, Any]]:
    """task -> {"records": [...], "source_examples": n, "usable": m, "subtasks": {name: count}}
    for the tasks found; at most :data:`MAX_ITEMS_PER_TASK` records per task."""
    converted: dict[str, dict[str, Any]] = {}
    for task, specs in _read_task_files(sdist, tasks).items():
        records: list[Record] = []
        source = 0
        subtasks: dict[str, int] = {}
        for subtask, spec in specs:
            examples = spec.get("examples") or []
            source += len(examples)
            before = len(records)
            for index, example in enumerate(examples):
                record = _convert_example(task, subtask, index, example, spec)
                if record is not None:
                    records.append(record)
            if subtask:
                subtasks[subtask] = len(records) - before
        usable = len(records)
        if len(records) > MAX_ITEMS_PER_TASK:
            keep = random.Random(f"fedsdr-bigbench-cap:{task}").sample(
                range(len(records)), MAX_ITEMS_PER_TASK
            )
            records = [records[i] for i in sorted(keep)]
            subtasks = {name: sum(r.meta["subtask"] == name for r in records) for name in subtasks}
        if records:
            converted[task] = {
                "records": records,
                "source_examples": source,
                "usable": usable,
                "subtasks": subtasks,
            }
    return converted


# --------------------------------------------------------------------------- the sdist


def _status(progress: bool, text: str) -> None:
    if progress:
        progress_console.console.print(f"BIG-bench: {text}")
    else:
        logger.info("BIG-bench: %s", text)


def _download_sdist(downloads: Path) -> Path:
    target = downloads / SDIST_NAME
    downloads.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        "--disable-pip-version-check", "--progress-bar", "off", PACKAGE, "-d", str(downloads),
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        detail = (proc.stderr or proc.stdout or "").strip()[-2000:]
        ok = proc.returncode == 0
    except OSError as e:
        detail, ok = str(e), False
    if not ok or not target.is_file():
        raise RuntimeError(
            f"Could not download {PACKAGE} (358 MB sdist) from PyPI; PyPI must be reachable the "
            f"first time the BIG-bench suite is prepared.\npip said: {detail or '(nothing)'}\n"
            f"Download it by hand and retry:\n    {' '.join(cmd)}\n"
            f"or point ${SDIST_ENV} at a copy of {SDIST_NAME}."
        )
    return target


def _locate_sdist(cache: Path, sdist: Path | str | None, progress: bool) -> tuple[Path, str]:
    """The sdist to read and its sha256: ``sdist``, else ``$FEDSDR_BIGBENCH_SDIST``, else the
    cached download (fetched with pip when absent). A download must match
    :data:`SDIST_SHA256`; a file given by the user only logs a difference."""
    given = sdist if sdist is not None else os.environ.get(SDIST_ENV) or None
    if given is not None:
        path = Path(given).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"BIG-bench sdist {path} does not exist")
        digest = sha256_file(path)
        if digest != SDIST_SHA256:
            logger.warning(
                "%s: sha256 %s is not that of %s (%s)", path, digest, PACKAGE, SDIST_SHA256
            )
        return path, digest
    path = cache / "downloads" / SDIST_NAME
    if not path.is_file():
        _status(progress, f"downloading {PACKAGE} from PyPI (358 MB, once)")
        path = _download_sdist(path.parent)
    digest = sha256_file(path)
    if digest != SDIST_SHA256:
        raise RuntimeError(
            f"Checksum mismatch for {path}:\n  expected sha256 {SDIST_SHA256}\n"
            f"  actual   sha256 {digest}\nDelete the file and retry."
        )
    return path, digest


# --------------------------------------------------------------------------- the cache


def _expected_marker() -> dict[str, Any]:
    return {
        "name": SUITE_NAME,
        "format": FORMAT,
        "source_package": PACKAGE,
        "requested": list(TASKS),
    }


def _is_prepared(folder: Path) -> bool:
    """The marker matches this code and every task file has its recorded sha256."""
    marker = read_marker(folder)
    if marker is None or any(marker.get(k) != v for k, v in _expected_marker().items()):
        return False
    entries = marker.get("tasks")
    if not isinstance(entries, dict) or not entries:
        return False
    for entry in entries.values():
        try:
            if sha256_file(folder / entry["file"]) != entry["sha256"]:
                logger.warning(
                    "BIG-bench cache %s: %s is corrupted; rebuilding", folder, entry["file"]
                )
                return False
        except (OSError, KeyError, TypeError):
            return False
    return True


def prepare_bigbench(
    cache_dir: Path | None = None, sdist: Path | str | None = None, progress: bool = True
) -> Path:
    """Return the folder of the converted BIG-bench tasks, building it on first use.

    First use: locate (or ``pip download``) the sdist, read the :data:`TASKS` task.json
    files from it, convert, write ``<task>.jsonl`` files and the manifest atomically under
    a file lock (~10 s plus the download). Later calls verify the checksums and return.
    ``sdist``: a local ``bigbench-1.0.0.tar.gz`` to read instead (also ``$FEDSDR_BIGBENCH_SDIST``).
    """
    cache = resolve_cache_dir(cache_dir)
    final = cache / "datasets" / SUITE_NAME
    if _is_prepared(final):
        return final
    with file_lock(
        cache / "locks" / f"{SUITE_NAME}.lock",
        on_wait=lambda: _status(progress, "waiting for another process that is preparing it"),
    ):
        if _is_prepared(final):  # another process finished meanwhile
            return final
        t0 = time.perf_counter()
        path, digest = _locate_sdist(cache, sdist, progress)
        _status(progress, f"reading {len(TASKS)} tasks from {path.name}")
        converted = convert_sdist(path, TASKS)
        if not converted:
            raise RuntimeError(f"{path} holds none of the BIG-bench tasks {list(TASKS)}")
        missing = [t for t in TASKS if t not in converted]
        if missing:
            logger.warning("BIG-bench: %s not found in %s", ", ".join(missing), path)

        def build(tmp: Path) -> None:
            entries: dict[str, Any] = {}
            for task, found in converted.items():
                file = f"{task}.jsonl"
                records = found["records"]
                text = "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in records)
                (tmp / file).write_text(text, encoding="utf-8")
                entries[task] = {
                    "file": file,
                    "sha256": sha256_file(tmp / file),
                    "count": len(records),
                    "source_examples": found["source_examples"],
                    "usable": found["usable"],
                    "subtasks": found["subtasks"],
                }
            marker = _expected_marker() | {
                "sdist": path.name,
                "sdist_sha256": digest,
                "tasks": entries,
                "missing": missing,
                "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")

        build_atomically(final, build)
        total = sum(len(c["records"]) for c in converted.values())
        _status(progress, f"{total} items of {len(converted)} tasks ready in {final}")
    return final


def available_tasks(cache_dir: Path | None = None) -> dict[str, int]:
    """task -> number of items in the prepared cache (preparing it when needed)."""
    marker = read_marker(prepare_bigbench(cache_dir, progress=False)) or {}
    return {task: entry["count"] for task, entry in marker.get("tasks", {}).items()}


class _Corrupted(RuntimeError):
    pass


def _read_task(folder: Path, entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of one task file, checked against the manifest's sha256."""
    data = (folder / entry["file"]).read_bytes()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise _Corrupted(f"{folder / entry['file']}: checksum mismatch")
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


# --------------------------------------------------------------------------- sampling


def _sample_task(
    rows: list[dict[str, Any]], task: str, items_per_task: int, few_shot: int, seed: int
) -> Iterator[Record]:
    rng = random.Random(f"fedsdr-bigbench-sample:{task}:{seed}")
    order = list(range(len(rows)))
    rng.shuffle(order)
    n_eval = min(items_per_task, max(len(rows) - few_shot, 0) if few_shot else len(rows))
    if n_eval == 0:
        logger.warning(
            "BIG-bench %s: %d items leave none to evaluate beside %d shots",
            task,
            len(rows),
            few_shot,
        )
    chosen = order[:n_eval]
    # Shots never share an input with an evaluated item (logical_deduction asks several
    # questions about one paragraph: a shot on the same paragraph would give it away).
    asked = {rows[i]["meta"]["question"] for i in chosen}
    held = [i for i in order[n_eval:] if rows[i]["meta"]["question"] not in asked]
    if few_shot and chosen and len(held) < few_shot:
        logger.warning("BIG-bench %s: only %d few-shot examples available", task, len(held))
    for i in chosen:
        record = Record.from_json(rows[i])
        if few_shot:
            shots = [Record.from_json(rows[j]) for j in rng.sample(held, min(few_shot, len(held)))]
            record = record.replace(
                instruction=compose_instruction(record, shots),
                meta=record.meta | {"few_shot_ids": [s.id for s in shots]},
            )
        yield record


def load_general_suite(
    items_per_task: int,
    few_shot: int,
    seed: int,
    tasks: list[str] | None = None,
    cache_dir: Path | None = None,
) -> list[Record]:
    """The general-ability suite: ``items_per_task`` records of each task (fewer when the task
    has fewer than ``items_per_task + few_shot``), each with ``few_shot`` worked examples of
    the same task prepended to its instruction, drawn from items not evaluated. Deterministic in (items_per_task, few_shot,
    seed, tasks). ``tasks``: names from :data:`TASKS` (default: all of them).
    """
    if items_per_task < 1:
        raise ValueError(f"items_per_task must be >= 1, got {items_per_task}")
    if few_shot < 0:
        raise ValueError(f"few_shot must be >= 0, got {few_shot}")
    wanted = list(TASKS) if tasks is None else list(dict.fromkeys(tasks))
    unknown = [t for t in wanted if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown BIG-bench task(s) {unknown}; known: {list(TASKS)}")
    for attempt in range(2):
        folder = prepare_bigbench(cache_dir)
        entries = (read_marker(folder) or {}).get("tasks", {})
        if tasks is not None:
            absent = [t for t in wanted if t not in entries]
            if absent:
                raise ValueError(f"BIG-bench task(s) {absent} are not in the prepared sdist")
        try:
            rows = {t: _read_task(folder, entries[t]) for t in wanted if t in entries}
            break
        except (_Corrupted, OSError, ValueError, KeyError) as e:
            if attempt:
                raise RuntimeError(f"BIG-bench cache {folder} is unreadable: {e}") from e
            logger.warning("BIG-bench cache %s: %s; rebuilding", folder, e)
            (folder / MARKER_FILE).unlink(missing_ok=True)  # forces the rebuild
    records: list[Record] = []
    for task in wanted:
        if task in rows:
            records.extend(_sample_task(rows[task], task, items_per_task, few_shot, seed))
    return records
