"""Every training reply is checked before aggregation; an offender is dropped, never raised.

A reply is rejected when it carries an error, lacks its MetricRecord, names a partition that
does not exist or that another reply already named, claims no examples or more than
`federation.max_num_examples`, reports metric keys that differ from the other replies' (Flower
aggregates only consistent records), or when its global adapter does not have exactly the
global adapter's keys, shapes and dtypes, holds a non-finite value, or moved further from the
global adapter than the update-norm bound (`federation.max_update_norm`, or
`update_norm_factor` x the round's lower-median update norm). Extra tensors (e.g. SCAFFOLD's control
variates) must be finite and, for keys the global adapter has, of its shapes.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Message

from fedsdr.config import FederationConfig


@dataclass(frozen=True)
class Rejection:
    """A reply that was not aggregated: who sent it (partition id when known) and why."""

    node_id: int
    partition_id: int | None
    reason: str


def _partition_id(msg: Message) -> int | None:
    if not msg.has_content():
        return None
    try:
        value = msg.content["metrics"]["partition-id"]
    except (KeyError, TypeError):
        return None
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return int(value)
    return None


def _arrays_problem(record: ArrayRecord, reference: dict[str, np.ndarray], *, exact: bool) -> str | None:
    """Why `record` does not fit the global adapter (None when it fits)."""
    arrays = {k: v.numpy() for k, v in record.items()}
    if exact and set(arrays) != set(reference):
        missing, extra = sorted(set(reference) - set(arrays))[:2], sorted(set(arrays) - set(reference))[:2]
        return f"adapter keys differ from the global adapter's (missing {missing}, unexpected {extra})"
    for key, value in arrays.items():
        if key in reference:
            if value.shape != reference[key].shape:
                return f"{key}: shape {value.shape}, the global adapter has {reference[key].shape}"
            if value.dtype != reference[key].dtype:
                return f"{key}: dtype {value.dtype}, the global adapter has {reference[key].dtype}"
        if not np.issubdtype(value.dtype, np.number) or not np.all(np.isfinite(value)):
            return f"{key}: non-finite values"
    return None


def update_norm(record: ArrayRecord, reference: dict[str, np.ndarray]) -> float:
    """L2 norm of (client adapter - global adapter) over all tensors."""
    return math.sqrt(sum(float(np.sum((v.numpy().astype(np.float64) - reference[k]) ** 2)) for k, v in record.items()))


def _reply_problem(msg: Message, reference: dict[str, np.ndarray], seen: set[int], num_clients: int,
                   fed: FederationConfig, uploads_global: bool) -> str | None:
    """Why one training reply is unfit for aggregation (None when it is fit), checked in order;
    `seen`: the partition ids of the replies accepted before it."""
    if msg.has_error():
        return f"client error: {msg.error.reason}"
    if "metrics" not in msg.content.metric_records:
        return "no MetricRecord 'metrics'"
    metrics = msg.content["metrics"]
    pid = _partition_id(msg)
    if pid is None or not 0 <= pid < num_clients:
        return f"partition-id {metrics.get('partition-id')!r} is not one of 0..{num_clients - 1}"
    if pid in seen:
        return f"partition-id {pid} already replied this round"
    n = metrics.get("num-examples")
    if not isinstance(n, int | float) or not math.isfinite(n) or n <= 0 or n > fed.max_num_examples:
        return f"num-examples {n!r} is not in 1..{fed.max_num_examples}"
    if "arrays" not in msg.content.array_records:
        return "no ArrayRecord 'arrays'"
    arrays = msg.content["arrays"]
    if not uploads_global and len(arrays):
        return "this algorithm uploads nothing, but the reply carries tensors"
    problem = _arrays_problem(arrays, reference, exact=True) if uploads_global else None
    for name, extra in msg.content.array_records.items():
        if problem is None and name != "arrays":
            problem = _arrays_problem(extra, reference, exact=False)
    return problem


def validate_replies(
    replies: list[Message], sent: ArrayRecord, num_clients: int, fed: FederationConfig, *, uploads_global: bool = True,
) -> tuple[list[Message], list[Rejection]]:
    """(replies fit for aggregation, rejections), in the order given."""
    reference = {k: v.numpy() for k, v in sent.items()}
    rejected: list[Rejection] = []
    candidates: list[Message] = []
    seen: set[int] = set()

    def reject(msg: Message, reason: str) -> None:
        rejected.append(Rejection(msg.metadata.src_node_id, _partition_id(msg), reason))

    for msg in replies:
        problem = _reply_problem(msg, reference, seen, num_clients, fed, uploads_global)
        if problem:
            reject(msg, problem)
            continue
        seen.add(_partition_id(msg))
        candidates.append(msg)

    # Flower averages metrics key by key: every reply must report the same keys.
    key_sets = Counter(frozenset(m.content["metrics"]) for m in candidates)
    usual = key_sets.most_common(1)[0][0] if key_sets else frozenset()
    consistent = []
    for msg in candidates:
        keys = frozenset(msg.content["metrics"])
        if keys != usual:
            reject(msg, f"metric keys differ from the other replies' ({sorted(keys ^ usual)[:3]})")
        else:
            consistent.append(msg)

    if not uploads_global or not consistent:
        return consistent, rejected
    norms = [update_norm(m.content["arrays"], reference) for m in consistent]
    # The lower median: with two replies, one huge update cannot raise its own bound.
    bound = fed.max_update_norm or fed.update_norm_factor * float(np.percentile(norms, 50, method="lower"))
    accepted = []
    for msg, norm in zip(consistent, norms, strict=True):
        if norm > bound and norm > 0:
            reject(msg, f"update norm {norm:.4g} exceeds the bound {bound:.4g}")
        else:
            accepted.append(msg)
    return accepted, rejected
