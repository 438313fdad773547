"""The three claims fedsdr exists to test (ALGORITHMS.md), each decided by paired intervals.

1. X + FedSD beats X, for the federated algorithms X in the grid (accuracy decides; reference
   loss is shown: FedSD trains towards its rewrites, so loss on the raw references is not a fair
   judge of it).
2. FedSD raises hallucination and redundancy relative to raw training (the Rewrite Paradox):
   on the rewrites themselves (each rewrite against its raw response: hallucination vs 0,
   length ratio vs 1; repeated 4-grams shown) and in the trained models (X + FedSD against X:
   hallucination and generated length decide; repeat4 and length ratio shown).
3. FedSDR beats FedSD and the baselines: against FedAvg + FedSD, FedAvg and FedDPA on accuracy
   and hallucination.

Each comparison is a paired difference (per seed, the same items; interval from
`collect.hierarchical_diff`) judged by `fedsdr.stats.verdict`. A claim is held when every
deciding comparison holds, not held when any is contradicted (its interval excludes 0 the other
way), else inconclusive; comparisons the grid cannot make are listed, not counted. FedSD means
the paper's profile ("paper") where the grid has it, else the other one it has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedsdr.report.collect import DISTILLING, Collection, Run, diff_result, paired_metric
from fedsdr.stats import verdict

REFERENCE_POINTS = {"local", "centralized", "feddpa"}  # not "algorithms X" of claim 1
PROFILE_PREFERENCE = ("paper", "", "safe")


@dataclass
class Check:
    """One paired comparison a − b on one metric, expected to have sign `expected`."""

    a: str
    b: str
    metric: str
    expected: int
    deciding: bool
    source: str = "models"  # "models": trained models' predictions; "rewrites": FedSD's rewrites
    result: dict[str, Any] | None = None
    note: str = ""

    @property
    def verdict(self) -> str | None:
        if not self.result:
            return None
        return verdict(self.result["lo"], self.result["hi"], self.expected)

    def to_json(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "metric": self.metric, "expected_sign": self.expected,
                "deciding": self.deciding, "source": self.source, "result": self.result,
                "verdict": self.verdict, "note": self.note}


@dataclass
class Claim:
    number: int
    statement: str
    checks: list[Check] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @property
    def deciding(self) -> list[Check]:
        return [c for c in self.checks if c.deciding and c.result]

    @property
    def verdict(self) -> str:
        verdicts = [c.verdict for c in self.deciding]
        if not verdicts:
            return "inconclusive"
        if "not held" in verdicts:
            return "not held"
        return "held" if all(v == "held" for v in verdicts) else "inconclusive"

    def basis(self) -> str:
        """How many comparisons, items and seeds the verdict rests on."""
        checks = self.deciding
        if not checks:
            return "rests on 0 comparisons (0 items, 0 seeds)"
        items = sorted({c.result["n_items"] for c in checks})
        seeds = sorted({c.result["n_seeds"] for c in checks})
        def span(v: list[int]) -> str:
            return str(v[0]) if len(v) == 1 else f"{v[0]}–{v[-1]}"

        what = f"{span(items)} paired items over {span(seeds)} seed{'s' if seeds[-1] > 1 else ''}"
        if len(checks) == 1:
            return f"rests on 1 deciding comparison of {what}"
        return f"rests on {len(checks)} deciding comparisons, each of {what}"

    def to_json(self) -> dict[str, Any]:
        return {"claim": self.number, "statement": self.statement, "verdict": self.verdict, "basis": self.basis(),
                "checks": [c.to_json() for c in self.checks], "missing": self.missing}


# who is who in a collection --------------------------------------------------------
@dataclass
class Method:
    label: str
    name: str  # the method without its FedSD variant ("FedAvg")
    algorithm: str
    profile: str | None
    runs: dict[int, Run]


def methods_of(collection: Collection) -> list[Method]:
    out = []
    for label, runs in collection.methods().items():
        first = next(iter(runs.values()))
        out.append(Method(label, first.method, first.algorithm,
                          first.profile, runs))
    return out


def _fedsd_variant(methods: list[Method], name: str) -> Method | None:
    candidates = {m.profile: m for m in methods if m.name == name and m.profile is not None
                  and m.algorithm not in DISTILLING}
    return next((candidates[p] for p in PROFILE_PREFERENCE if p in candidates), None)


def _raw(methods: list[Method], algorithm: str) -> Method | None:
    return next((m for m in methods if m.algorithm == algorithm and m.profile is None), None)


def fedsd_pairs(methods: list[Method]) -> list[tuple[Method, Method]]:
    """(X + FedSD, X) for every method X trained on raw data that also has a FedSD variant."""
    pairs = []
    for raw in methods:
        if raw.profile is None and raw.algorithm not in DISTILLING:
            fedsd = _fedsd_variant(methods, raw.name)
            if fedsd:
                pairs.append((fedsd, raw))
    return pairs


def _check(a: Method, b: Method, metric: str, expected: int, deciding: bool, note: str = "") -> Check:
    return Check(a.label, b.label, metric, expected, deciding, "models", paired_metric(a.runs, b.runs, metric),
                 note)


# the claims --------------------------------------------------------------------------
def claim_fedsd_beats_raw(methods: list[Method]) -> Claim:
    claim = Claim(1, "X + FedSD beats X on accuracy, for every federated algorithm X in the grid")
    pairs = fedsd_pairs(methods)
    for fedsd, raw in pairs:
        reference = raw.algorithm in REFERENCE_POINTS
        acc = _check(fedsd, raw, "accuracy", +1, not reference,
                     "reference point, not one of the algorithms X" if reference else "")
        loss = _check(fedsd, raw, "loss", -1, False, "shown, not deciding: FedSD trains towards its rewrites")
        if acc.result is None and not reference:  # no verifiable item generated: loss decides
            loss.deciding, loss.note = True, "deciding: no accuracy items"
        claim.checks += [acc, loss]
        for other in methods:  # the other FedSD profiles of X: shown beside the paper's
            if other.name == raw.name and other.profile is not None and other is not fedsd \
                    and other.algorithm not in DISTILLING:
                claim.checks.append(_check(other, raw, "accuracy", +1, False, f"{other.profile} profile, shown"))
    have = {raw.name for _, raw in pairs}
    for m in methods:
        if m.profile is None and m.algorithm not in DISTILLING | REFERENCE_POINTS and m.name not in have:
            claim.missing.append(f"{m.label}: no {m.name}+FedSD cell")
    if not pairs:
        claim.missing.append("no algorithm has both a raw and a FedSD cell")
    return claim


def _rewrite_runs(methods: list[Method]) -> dict[int, Run]:
    """Per seed, one run whose FedSD rewrites stand for all (the base model rewrites the same
    data whatever the algorithm): a paper-profile cell first."""
    ranked = sorted((m for m in methods if m.profile is not None),
                    key=lambda m: (m.algorithm in DISTILLING,
                                   PROFILE_PREFERENCE.index(m.profile) if m.profile in PROFILE_PREFERENCE else 9))
    out: dict[int, Run] = {}
    for m in ranked:
        for seed, run in m.runs.items():
            if seed not in out and run.rewrites():
                out[seed] = run
    return dict(sorted(out.items()))


def rewrite_differences(runs: dict[int, Run]) -> dict[str, dict[str, Any] | None]:
    """Each rewrite against its raw response, per seed over every client's records:
    hallucination (1 - answer consistency, verifiable records) - 0, length ratio - 1,
    repeat4(rewrite) - repeat4(raw)."""
    from fedsdr.scoring import repeated_ngram_rate

    halluc: dict[int, list[float]] = {}
    ratio: dict[int, list[float]] = {}
    repeat: dict[int, list[float]] = {}
    for seed, run in runs.items():
        rows = run.rewrites()
        halluc[seed] = [0.0 if r["consistent_rewrite"] else 1.0 for r in rows if r.get("consistent_rewrite") is not None]
        ratio[seed] = [float(r["length_ratio"]) - 1.0 for r in rows if r.get("length_ratio") is not None]
        repeat[seed] = [repeated_ngram_rate(r.get("rewrite") or "", 4) - repeated_ngram_rate(r.get("raw") or "", 4)
                        for r in rows]
    return {"hallucination": diff_result(halluc), "length_ratio": diff_result(ratio), "repeat4": diff_result(repeat)}


def claim_rewrite_paradox(methods: list[Method]) -> Claim:
    claim = Claim(2, "FedSD raises hallucination and redundancy relative to raw training (the Rewrite Paradox)")
    runs = _rewrite_runs(methods)
    if runs:
        diffs = rewrite_differences(runs)
        source = next(iter(runs.values())).label
        for metric, deciding in (("hallucination", True), ("length_ratio", True), ("repeat4", False)):
            claim.checks.append(Check(f"rewrites ({source})", "raw responses", metric, +1, deciding, "rewrites",
                                      diffs[metric]))
    else:
        claim.missing.append("rewrites: no FedSD cell with its distilled data on disk")
    pairs = fedsd_pairs(methods)
    for fedsd, raw in pairs:
        reference = raw.algorithm in REFERENCE_POINTS
        note = "reference point" if reference else ""
        claim.checks += [
            _check(fedsd, raw, "hallucination", +1, not reference, note),
            _check(fedsd, raw, "gen_len", +1, not reference, note),
            _check(fedsd, raw, "repeat4", +1, False, "shown, not deciding"),
            _check(fedsd, raw, "length_ratio", +1, False, "shown, not deciding"),
        ]
    if not pairs:
        claim.missing.append("trained models: no algorithm has both a raw and a FedSD cell")
    return claim


def claim_fedsdr_beats(methods: list[Method]) -> Claim:
    claim = Claim(3, "FedSDR beats FedAvg + FedSD, FedAvg and FedDPA on accuracy and hallucination")
    candidates = [m for m in methods if m.algorithm == "fedsdr"]
    fedsdr = next((m for p in PROFILE_PREFERENCE for m in candidates if m.profile == p), None) \
        or (candidates[0] if candidates else None)
    if fedsdr is None:
        claim.missing.append("no FedSDR cell")
        return claim
    fedavg = _raw(methods, "fedavg")
    others = [("FedAvg + FedSD", _fedsd_variant(methods, fedavg.name) if fedavg else None),
              ("FedAvg", fedavg), ("FedDPA", _raw(methods, "feddpa"))]
    for what, other in others:
        if other is None:
            claim.missing.append(f"{what}: not in this grid")
            continue
        claim.checks += [_check(fedsdr, other, "accuracy", +1, True), _check(fedsdr, other, "hallucination", -1, True),
                         _check(fedsdr, other, "loss", -1, False, "shown, not deciding")]
    return claim


def decide_claims(collection: Collection) -> list[Claim]:
    methods = methods_of(collection)
    return [claim_fedsd_beats_raw(methods), claim_rewrite_paradox(methods), claim_fedsdr_beats(methods)]


# claims.md ----------------------------------------------------------------------------
RULE = ("Each comparison is a paired difference A − B on the same items (per seed: the global model's "
        "last-round predictions on the global held-out set, aligned by record id; for rewrites, each "
        "rewrite against its own raw response), with a 95% interval from a bootstrap over seeds and the "
        "items within them (one seed: over items). A comparison **holds** when its interval excludes 0 "
        "in the claimed direction and **contradicts** the claim when it excludes 0 the other way. A claim "
        "is **held** when every deciding comparison holds, **not held** when any contradicts it, else "
        "**inconclusive**. The seed-level column is the Student-t interval over the seeds' mean "
        "differences (two seeds or more), shown for reference.")


def _fmt_interval(lo: float | None, hi: float | None, digits: int = 3) -> str:
    if lo is None or hi is None:
        return "-"
    return f"[{lo:+.{digits}f}, {hi:+.{digits}f}]"


def claim_rows(claim: Claim) -> tuple[list[str], list[list[str]]]:
    header = ["A", "B", "metric", "claimed", "A − B [95% CI]", "seed-level t", "items x seeds", "verdict",
              "decides"]
    rows = []
    for c in claim.checks:
        r = c.result
        digits = 1 if c.metric == "gen_len" else 3
        rows.append([
            c.a, c.b, c.metric, "A > B" if c.expected > 0 else "A < B",
            f"{r['mean']:+.{digits}f} {_fmt_interval(r['lo'], r['hi'], digits)}" if r else "no shared items",
            _fmt_interval(r.get("seed_lo"), r.get("seed_hi"), digits) if r else "-",
            f"{r['n_items']} x {r['n_seeds']}" if r else "-",
            c.verdict or "-", ("yes" if c.deciding else "no") + (f" ({c.note})" if c.note else ""),
        ])
    return header, rows


def claims_markdown(claims: list[Claim], title: str = "") -> str:
    from fedsdr.report.tables import TableData, to_markdown

    md = f"# Claims{': ' + title if title else ''}\n\n{RULE}\n\n"
    for claim in claims:
        md += f"## Claim {claim.number}: {claim.statement}\n\n"
        md += f"**Claim {claim.number} verdict: {claim.verdict}** — {claim.basis()}.\n\n"
        if claim.deciding and min(c.result["n_seeds"] for c in claim.deciding) < 3:
            md += ("With fewer than 3 seeds the variation between seeds is poorly estimated: the verdict is "
                   "provisional (compare the seed-level column).\n\n")
        if claim.checks:
            header, rows = claim_rows(claim)
            md += to_markdown(TableData("", header, rows))
        if claim.missing:
            md += "Not decided here: " + "; ".join(claim.missing) + ".\n\n"
    return md
