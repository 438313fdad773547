"""`fedsdr distill`: FedSD's rewriting step alone, client by client, with its diagnostics."""

from __future__ import annotations

from pathlib import Path

from fedsdr import progress
from fedsdr.algorithms import get_algorithm
from fedsdr.algorithms.fedsd import distilled_training_records
from fedsdr.config import RunConfig
from fedsdr.distill import render_table, summarize
from fedsdr.federation.client import new_session
from fedsdr.io import write_json_atomic
from fedsdr.models.adapters import fresh_adapter_state


def distill_all(cfg: RunConfig, out: Path) -> dict[str, dict]:
    """Rewrite every client's training data with the base model (as before round 1)."""
    algorithm = get_algorithm(cfg.federation.algorithm)
    adapter = algorithm.adapters(cfg)[0].name
    per_client: dict[str, dict] = {}
    all_rows = []
    with progress.live():
        for client_id in range(cfg.partition.num_clients):
            session = new_session(cfg, client_id, out / "clients")
            unused = fresh_adapter_state(session.model, adapter, 0)  # round 1 rewrites with W0 only
            distilled_training_records(session, 1, adapter, unused)
            per_client[f"client-{client_id}"] = summarize(session.distill_rows)
            all_rows.extend(session.distill_rows)
    per_client["all"] = summarize(all_rows)
    write_json_atomic(out / "distill-diagnostics.json", per_client)
    progress.console.print(render_table(per_client))
    progress.console.print(f"distilled data and diagnostics in {out / 'clients'}")
    return per_client
