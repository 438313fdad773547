"""On-disk cache of distilled data, keyed by everything that determines it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from fedsdr.data.schema import Record
from fedsdr.distill.diagnostics import summarize
from fedsdr.distill.engine import DistillConfig, DistilledRow
from fedsdr.io import write_json_atomic, write_text_atomic

CACHE_VERSION = 2  # 2: the compute dtype is in the key
# Settings that do not change what a rewrite pass generates (the filters are applied again to
# cached rows, so the "paper" and "safe" profiles share one pass).
_NOT_IN_KEY = {"enabled", "refresh_every", "filters"}


def cache_key(
    model_id: str,
    adapter_fingerprint: str | None,
    records: Sequence[Record],
    cfg: DistillConfig,
    *,
    seed: int = 0,
    compute: str = "",
) -> str:
    """sha256 over the model, the dtype it computes in (`compute`: greedy texts differ between
    bf16 and fp32), the adapter, every record, the template, the generation settings and the
    seed (hex digest); not the filters, which `refilter` applies to cached rows."""
    from fedsdr.generation import decoding_settings

    payload = {
        "version": CACHE_VERSION,
        "model_id": model_id,
        "compute": compute,
        "decoding": decoding_settings(),
        "adapter": adapter_fingerprint,
        "seed": seed,
        "cfg": cfg.model_dump(mode="json", exclude=_NOT_IN_KEY),
        "records": [[r.id, r.instruction, r.input, r.output, r.answer, r.scorer] for r in records],
    }
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cache_paths(cache_dir: Path, key: str) -> tuple[Path, Path]:
    """(distilled JSONL, diagnostics JSON) for `key`."""
    stem = key[:16]
    return cache_dir / f"distilled-{stem}.jsonl", cache_dir / f"diagnostics-{stem}.json"


def load_or_rewrite(
    cache_dir: Path, key: str, compute: Callable[[], list[DistilledRow]]
) -> tuple[list[DistilledRow], bool]:
    """Rows for `key` from disk when present, else `compute()` and save them.

    Returns (rows, was_cached). The diagnostics file is written before the JSONL, whose
    presence marks a complete entry; both are written atomically.
    """
    cache_dir = Path(cache_dir)
    data_path, diag_path = cache_paths(cache_dir, key)
    if data_path.exists():
        with data_path.open(encoding="utf-8") as f:
            rows = [DistilledRow.from_json(json.loads(line)) for line in f if line.strip()]
        if not diag_path.exists():
            write_json_atomic(diag_path, summarize(rows))
        return rows, True
    rows = compute()
    write_json_atomic(diag_path, summarize(rows))
    lines = (json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in rows)
    write_text_atomic(data_path, "".join(lines))
    return rows, False
