"""What travels between the ClientApp and the server besides adapter tensors: numbers only.

A training reply carries the global adapter (ArrayRecord "arrays") and a MetricRecord
"metrics" with `num-examples` and `partition-id` (Flower's conventions). An evaluation reply
carries, for each model the client evaluated (a label such as "global" or "personalized"),
one MetricRecord under that label mapping each metric to its values per domain, in the order
the ConfigRecord "evaluation" lists (`models`, `domains`; domain "all" first). A figure that
does not apply to a domain is NaN on the wire and absent once unpacked.
"""

from __future__ import annotations

import math
from typing import Any

from flwr.app import ConfigRecord, MetricRecord, RecordDict

# label -> domain ("all" first) -> metric -> value
Evaluation = dict[str, dict[str, dict[str, float]]]

INDEX = "evaluation"
IDENTITY = "metrics"


def identity(num_examples: int, partition_id: int, **figures: float) -> MetricRecord:
    """The MetricRecord every reply carries (Flower's strategies weigh by `num-examples`)."""
    return MetricRecord({**figures, "num-examples": num_examples, "partition-id": partition_id})


def pack_evaluation(evaluation: Evaluation, num_examples: int, partition_id: int) -> RecordDict:
    labels = list(evaluation)
    if set(labels) & {INDEX, IDENTITY}:
        raise ValueError(f"model labels may not be {INDEX!r} or {IDENTITY!r}")
    domains = sorted({d for result in evaluation.values() for d in result}, key=lambda d: (d != "all", d))
    content = RecordDict({
        IDENTITY: identity(num_examples, partition_id),
        INDEX: ConfigRecord({"models": labels, "domains": domains}),
    })
    for label, result in evaluation.items():
        metrics = sorted({m for figures in result.values() for m in figures})
        content[label] = MetricRecord({
            m: [float(result.get(d, {}).get(m, math.nan)) for d in domains] for m in metrics
        })
    return content


def unpack_evaluation(content: RecordDict) -> tuple[Evaluation, dict[str, Any]]:
    """(evaluation, identity figures) of an evaluation reply."""
    index = content[INDEX]
    domains = list(index["domains"])
    evaluation: Evaluation = {}
    for label in index["models"]:
        per_domain: dict[str, dict[str, float]] = {d: {} for d in domains}
        for metric, values in content[label].items():
            for domain, value in zip(domains, values, strict=True):
                if not math.isnan(value):
                    per_domain[domain][metric] = value
        evaluation[label] = per_domain
    return evaluation, dict(content[IDENTITY])
