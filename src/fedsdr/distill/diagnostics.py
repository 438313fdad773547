"""Rewrite diagnostics (the Rewrite Paradox made visible), before and after filtering.

"before" is measured over every rewrite; "after" over the final training targets.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from rich.table import Table

from fedsdr.distill.engine import DistilledRow
from fedsdr.distill.filters import REASONS

Summary = dict[str, float | int | None]


def summarize(rows: Sequence[DistilledRow]) -> Summary:
    """Flat JSON-able metrics of one set of rows (one client, or all).

    Rates over no records are None. p90 interpolates linearly between order statistics.
    """
    from fedsdr.scoring import repeated_ngram_rate, word_count

    out: Summary = {"num_records": len(rows)}
    verifiable = [r for r in rows if r.record.verifiable]
    out["num_verifiable"] = len(verifiable)
    for stage in ("before", "after"):
        texts = [r.rewrite if stage == "before" else r.target for r in rows]
        raw_words = [max(1, word_count(r.raw)) for r in rows]
        ratios = [word_count(t) / w for t, w in zip(texts, raw_words, strict=True)]
        verdicts = [
            bool(r.consistent_rewrite if stage == "before" else r.consistent_target)
            for r in verifiable
        ]
        consistency = _mean([float(v) for v in verdicts])
        out[f"consistency_{stage}"] = consistency
        out[f"hallucination_{stage}"] = None if consistency is None else 1.0 - consistency
        out[f"length_ratio_mean_{stage}"] = _mean(ratios)
        out[f"length_ratio_median_{stage}"] = statistics.median(ratios) if ratios else None
        out[f"length_ratio_p90_{stage}"] = _quantile(ratios, 0.9)
        out[f"repeat4_{stage}"] = _mean([repeated_ngram_rate(t, 4) for t in texts])
    for reason in REASONS:
        out[f"fallback_{reason}"] = sum(r.fallback == reason for r in rows)
    kept = sum(r.fallback is None for r in rows)
    out["num_kept"] = kept
    out["num_fallback"] = len(rows) - kept
    out["num_truncated"] = sum(r.truncated for r in rows)
    out["kept_rate"] = kept / len(rows) if rows else None
    return out


def render_table(per_client: dict[str, Summary]) -> Table:
    """One row per client (e.g. "client-0", ..., "all"), the headline metrics as columns."""
    columns = [
        ("records", "num_records"),
        ("kept", "kept_rate"),
        ("consist. before", "consistency_before"),
        ("consist. after", "consistency_after"),
        ("len ratio before", "length_ratio_mean_before"),
        ("len ratio after", "length_ratio_mean_after"),
        ("rep4 before", "repeat4_before"),
        ("rep4 after", "repeat4_after"),
        *[(f"fb {reason}", f"fallback_{reason}") for reason in REASONS],
    ]
    table = Table(title="Self-distillation diagnostics")
    table.add_column("client")
    for header, _ in columns:
        table.add_column(header, justify="right")
    for name, summary in per_client.items():
        table.add_row(name, *[_fmt(summary.get(key)) for _, key in columns])
    return table


def _fmt(value: float | int | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.3f}"


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _quantile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between order statistics (numpy's default method)."""
    if not values:
        return None
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
