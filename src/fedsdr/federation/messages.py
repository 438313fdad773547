"""What travels between the ClientApp and the server besides adapter tensors: numbers only.

A training reply carries the global adapter (ArrayRecord "arrays") and a MetricRecord
"metrics" with `num-examples` and `partition-id` (Flower's conventions). An evaluation reply
carries one MetricRecord "eval-I" per (model, split) the client evaluated, mapping each metric
to its values per domain, in the order the ConfigRecord "evaluation" lists them: `models[I]`
and `splits[I]` name entry I, `domains` the columns ("all" first). A figure that does not apply
to a domain is NaN on the wire and absent once unpacked.
"""

from __future__ import annotations

import math
from typing import Any

from flwr.app import ConfigRecord, MetricRecord, RecordDict

# (model label, split) -> domain ("all" first) -> metric -> value
Evaluation = dict[tuple[str, str], dict[str, dict[str, float]]]

INDEX = "evaluation"
IDENTITY = "metrics"


def identity(num_examples: int, partition_id: int, **figures: float) -> MetricRecord:
    """The MetricRecord every reply carries (Flower's strategies weigh by `num-examples`)."""
    return MetricRecord({**figures, "num-examples": num_examples, "partition-id": partition_id})


def pack_evaluation(evaluation: Evaluation, num_examples: int, partition_id: int) -> RecordDict:
    entries = list(evaluation)
    domains = sorted({d for result in evaluation.values() for d in result}, key=lambda d: (d != "all", d))
    content = RecordDict({
        IDENTITY: identity(num_examples, partition_id),
        INDEX: ConfigRecord({"models": [m for m, _ in entries], "splits": [s for _, s in entries],
                             "domains": domains}),
    })
    for i, entry in enumerate(entries):
        result = evaluation[entry]
        metrics = sorted({m for figures in result.values() for m in figures})
        content[f"eval-{i}"] = MetricRecord({
            m: [float(result.get(d, {}).get(m, math.nan)) for d in domains] for m in metrics
        })
    return content


def unpack_evaluation(content: RecordDict) -> tuple[Evaluation, dict[str, Any]]:
    """(evaluation, identity figures) of an evaluation reply."""
    index = content[INDEX]
    domains = list(index["domains"])
    evaluation: Evaluation = {}
    for i, entry in enumerate(zip(index["models"], index["splits"], strict=True)):
        per_domain: dict[str, dict[str, float]] = {d: {} for d in domains}
        for metric, values in content[f"eval-{i}"].items():
            for domain, value in zip(domains, values, strict=True):
                if not math.isnan(value):
                    per_domain[domain][metric] = value
        evaluation[entry] = {d: figures for d, figures in per_domain.items() if figures}
    return evaluation, dict(content[IDENTITY])
