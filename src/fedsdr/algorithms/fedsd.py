"""FedSD, federated self-distillation: a client-side data transform that composes with every
algorithm. Before local training the client has the model rewrite its own responses, filters
the rewrites, and trains on the result. Rewriting runs where the data lives; only numbers
(diagnostics) ever leave the client.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from fedsdr.algorithms.base import ClientSession, derive_seed
from fedsdr.data.schema import Record
from fedsdr.distill import (
    DistilledRow,
    cache_key,
    distilled_set,
    load_or_rewrite,
    refilter,
    rewrite_records,
    summarize,
)
from fedsdr.io import write_json_atomic, write_text_atomic
from fedsdr.models.adapters import AdapterState, activate, adapters_off, set_adapter_state


def rewrite_round(server_round: int, refresh_every: int) -> int:
    """The round whose model produced the distilled set in use at `server_round`
    (0 = the base model, before round 1)."""
    if refresh_every <= 0:
        return 0
    return ((server_round - 1) // refresh_every) * refresh_every


def _fingerprint(state: AdapterState) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(state[key]).tobytes())
    return digest.hexdigest()


def client_distilled_set(
    session: ClientSession, server_round: int, global_adapter: str, global_state: AdapterState
) -> list[Record]:
    """The client's distilled set for this round.

    Rewritten once per source model and cached on the client's disk, keyed by model, adapter,
    data, template and generation settings; a copy for the run goes to the client's own folder
    (`ClientDir.distilled_set` + diagnostics), which a resumed client reads back instead of
    rewriting with a later model.
    """
    cfg = session.cfg
    source_round = rewrite_round(server_round, cfg.distill.refresh_every)
    if session.distilled_from_round == source_round:
        return distilled_set(session.distilled_rows)
    run_copy = session.disk.distilled_set(source_round)
    use_global = source_round > 0

    def compute() -> list[DistilledRow]:
        model, tok = session.model, session.tokenizer
        seed = derive_seed(cfg.seed, "distill", session.client_id, source_round)
        progress = f"client {session.client_id}: rewriting"
        with session.runtime.autocast():
            if use_global:  # the current global model (W0 + global adapter) rewrites
                set_adapter_state(model, global_adapter, global_state)
                activate(model, [global_adapter], trainable=[])
                return rewrite_records(model, tok, session.data.train, cfg.distill, seed=seed, progress=progress)
            with adapters_off(model):  # the base model W0 rewrites
                return rewrite_records(model, tok, session.data.train, cfg.distill, seed=seed, progress=progress)

    if run_copy.exists():
        rows = read_rows(run_copy)
    else:
        fingerprint = _fingerprint(global_state) if use_global else None
        key = cache_key(cfg.model.name, fingerprint, session.data.train, cfg.distill, seed=cfg.seed,
                        compute=str(session.runtime.compute_dtype))
        rows = refilter(load_or_rewrite(session.cache_dir / "distill", key, compute)[0], cfg.distill.filters)
        write_json_atomic(session.disk.distill_diagnostics(source_round), summarize(rows))
        write_text_atomic(run_copy, "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in rows))
    session.distilled_rows = rows
    session.distilled_from_round = source_round
    return distilled_set(rows)


def read_rows(path: Path) -> list[DistilledRow]:
    with path.open(encoding="utf-8") as f:
        return [DistilledRow.from_json(json.loads(line)) for line in f if line.strip()]


def diagnostic_metrics(session: ClientSession) -> dict[str, float]:
    """The diagnostics of the client's distilled set, as numbers for the server."""
    summary = summarize(session.distilled_rows)
    # Every client reports the same keys (Flower aggregates only consistent records): a rate
    # over no records (e.g. consistency on open-ended data) is NaN, written as null.
    return {f"distill/{k}": float("nan") if v is None else float(v) for k, v in summary.items()}
