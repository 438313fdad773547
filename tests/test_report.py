"""Reports from finished folders: summary.json with several splits, the comparison table with
95% intervals and paired differences, the three claims' verdicts, plots and report.html.
Run folders here are written by hand (no training), so each verdict is known in advance."""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config

from fedsdr.cli import main
from fedsdr.report import summarize, write_comparison
from fedsdr.report.claims import decide_claims
from fedsdr.report.collect import hierarchical_diff, load_collection, method_label, paired_metric
from fedsdr.report.html import markdown_to_html
from fedsdr.runs import RunDir, append_jsonl
from fedsdr.stats import paired_bootstrap_diff

N_ITEMS = 40


def _eval_row(server_round: int, scope: str, model: str, split: str, figures: dict) -> dict:
    se = {f"{k}_se": 0.01 for k in figures}
    return {"round": server_round, "scope": scope, "kind": "eval", "model": model, "split": split,
            "num_examples": float(N_ITEMS), **figures, **se, "generated": True,
            "domains": {"arith": {**figures, **se}, "faq": {"rougeL": 0.3, "rougeL_se": 0.02}}}


def fake_run(root: Path, *, algorithm: str = "fedavg", profile: str | None = None, seed: int = 0,
             acc: float = 0.5, halluc: float = 0.2, gen_len: float = 10.0, rewrites: dict | None = None,
             general: bool = False, rounds: int = 1) -> Path:
    """A finished run folder: config, metrics, predictions (per item: accuracy with rate `acc`,
    hallucination with rate `halluc`, gen_len around `gen_len`), summary, and optionally one
    client's FedSD rewrites (`rewrites`: consistency and length ratio of the rewrites)."""
    overrides = [f'federation.algorithm="{algorithm}"', f"seed={seed}", f"federation.rounds={rounds}",
                 f"distill.enabled={'true' if profile else 'false'}"]
    if profile:
        overrides.append(f'distill.filters.profile="{profile}"')
    cfg = tiny_config(*overrides)
    run = RunDir(root)
    run.write_config(cfg)
    rng = np.random.default_rng(zlib.crc32(repr((algorithm, profile, seed, acc)).encode()))
    correct = rng.random(N_ITEMS) < acc
    wrong_stated = (~correct) & (rng.random(N_ITEMS) < halluc / max(1e-9, 1 - acc))
    predictions = []
    for i in range(N_ITEMS):
        predictions.append({
            "round": rounds, "scope": "global", "model": "global", "split": "global_test", "id": f"arith-{i:04d}",
            "domain": "arith", "prompt": f"seed {seed}: what is {i} + 1?", "reference": str(i + 1),
            "response": "x", "loss": float(2.0 - acc + 0.1 * rng.standard_normal()), "tokens": 3,
            "accuracy": float(correct[i]), "hallucination": float(wrong_stated[i]),
            "gen_len": float(gen_len + rng.integers(-2, 3)), "repeat4": 0.0, "length_ratio": gen_len / 5,
        })
    run.append_predictions(predictions)
    figures = {"loss": 2.0 - acc, "accuracy": acc, "hallucination": halluc, "gen_len": gen_len, "rougeL": 0.3}
    base = {"loss": 2.5, "accuracy": 0.1, "hallucination": 0.3, "gen_len": 12.0, "rougeL": 0.2}
    rows = [_eval_row(0, "global", "global", "global_test", base)]
    if general:
        rows.append(_eval_row(0, "global", "global", "general", {"accuracy": 0.25, "loss": 1.0}))
    for r in range(1, rounds + 1):
        train = {"round": r, "scope": "client-0", "kind": "train", "num_examples": 10, "bytes_up": 1000,
                 "bytes_down": 1000, "train_loss": 1.0, "seconds": 0.5}
        if rewrites:
            train.update({f"distill/{k}": v for k, v in _diagnostics(rewrites).items()})
        rows += [train, _eval_row(r, "global", "global", "global_test", figures),
                 _eval_row(r, "client-0", "global", "client_test", figures)]
        if general:
            rows.append(_eval_row(r, "global", "global", "general", {"accuracy": 0.3, "loss": 0.9}))
        if algorithm == "fedsdr":
            rows.append(_eval_row(r, "client-0", "personalized", "client_test", figures))
    run.append_metrics(rows)
    if rewrites:
        _write_rewrites(run, seed, rewrites)
    run.write_summary(summarize(cfg, rows))
    return root


def _diagnostics(rw: dict) -> dict:
    return {"num_records": N_ITEMS, "num_verifiable": N_ITEMS, "consistency_before": rw["consistency"],
            "hallucination_before": 1 - rw["consistency"], "length_ratio_mean_before": rw["ratio"],
            "repeat4_before": 0.0, "consistency_after": 1.0, "length_ratio_mean_after": 1.0, "repeat4_after": 0.0,
            "kept_rate": rw["consistency"]}


def _write_rewrites(run: RunDir, seed: int, rw: dict) -> None:
    folder = run.client(0).distilled_set(0)
    rows = []
    for i in range(N_ITEMS):
        consistent = i < rw["consistency"] * N_ITEMS
        raw = "one two three four five"
        rewrite = " ".join(["word"] * int(5 * rw["ratio"]))
        rows.append({"id": f"train-{i}", "raw": raw, "rewrite": rewrite, "target": rewrite, "fallback": None,
                     "truncated": False, "length_ratio": len(rewrite.split()) / 5, "domain": "arith",
                     "consistent_rewrite": consistent, "consistent_target": consistent, "record": {}})
    append_jsonl(folder, rows)
    run.client(0).distill_diagnostics(0).write_text(json.dumps(_diagnostics(rw)))


# summary.json ----------------------------------------------------------------------
def test_summarize_takes_each_split_apart() -> None:
    cfg = tiny_config("distill.enabled=true", 'distill.filters.profile="paper"')
    rows = [
        _eval_row(0, "global", "global", "global_test", {"loss": 3.0}),
        _eval_row(0, "global", "global", "general", {"loss": 1.5, "accuracy": 0.2}),
        {"round": 1, "scope": "client-0", "kind": "train", "bytes_up": 10, "seconds": 1.0, "distill/kept_rate": 0.5},
        {"round": 1, "scope": "client-1", "kind": "train", "bytes_up": 30, "seconds": 2.0, "distill/kept_rate": 0.7},
        _eval_row(1, "global", "global", "general", {"loss": 1.4, "accuracy": 0.3}),  # general row first
        _eval_row(1, "global", "global", "global_test", {"loss": 2.0}),
        _eval_row(1, "client-0", "global", "client_test", {"accuracy": 0.4}),
        _eval_row(1, "client-1", "global", "client_test", {"accuracy": 0.6}),
        _eval_row(1, "client-0", "personalized", "client_test", {"accuracy": 0.8}),
        _eval_row(1, "client-0", "personalized", "general", {"accuracy": 0.1}),
    ]
    s = summarize(cfg, rows)
    assert s["final"]["split"] == "global_test" and s["final"]["loss"] == 2.0
    assert s["round0"]["split"] == "global_test" and s["round0"]["loss"] == 3.0
    assert s["final_general"]["accuracy"] == 0.3 and s["round0_general"]["accuracy"] == 0.2
    clients = s["clients_final"]
    assert clients["global"]["client_test"]["accuracy"] == pytest.approx(0.5)
    assert clients["global"]["client_test"]["clients"] == 2
    assert clients["global"]["client_test"]["accuracy_se"] == pytest.approx(np.sqrt(2 * 0.01**2) / 2)
    assert clients["personalized"]["client_test"]["accuracy"] == 0.8
    assert clients["personalized"]["general"]["accuracy"] == 0.1
    assert s["fedsd_profile"] == "paper" and s["rounds_planned"] == cfg.federation.rounds
    assert s["bytes_up_per_client_round"] == 20 and s["distill"]["client-1"]["kept_rate"] == 0.7


def test_summarize_reads_rows_without_a_split() -> None:
    rows = [{"round": 0, "scope": "global", "kind": "eval", "model": "global", "loss": 3.0},
            {"round": 1, "scope": "global", "kind": "eval", "model": "global", "loss": 2.0},
            {"round": 1, "scope": "client-0", "kind": "eval", "model": "global", "loss": 1.0}]
    s = summarize(tiny_config(), rows)
    assert s["final"]["loss"] == 2.0 and s["clients_final"]["global"]["client_test"]["loss"] == 1.0


def test_summarize_keeps_the_largest_gpu_memory_of_a_client_round() -> None:
    train = [{"round": r, "scope": f"client-{c}", "kind": "train", "seconds": 1.0, "device_peak_mb": mb}
             for r, c, mb in [(1, 0, 900.0), (1, 1, 1174.5), (2, 0, 1000.0)]]
    rows = [{"round": 0, "scope": "global", "kind": "eval", "model": "global", "loss": 3.0}, *train]
    assert summarize(tiny_config(), rows)["device_peak_mb"] == 1174.5
    for row in train:  # a CPU run's rows carry no such figure, and neither does its summary
        del row["device_peak_mb"]
    assert "device_peak_mb" not in summarize(tiny_config(), rows)


# statistics ----------------------------------------------------------------------------
def test_hierarchical_diff_one_seed_is_the_item_bootstrap() -> None:
    d = list(np.random.default_rng(0).normal(0.3, 1.0, 50))
    assert hierarchical_diff([d]) == paired_bootstrap_diff(d, [0.0] * len(d))
    assert hierarchical_diff([[0.5] * 10, [0.5] * 8]) == (0.5, 0.5, 0.5)


def test_hierarchical_diff_widens_with_seeds_that_disagree() -> None:
    rng = np.random.default_rng(1)
    agree = [list(rng.normal(0.2, 0.5, 100)) for _ in range(3)]
    disagree = [list(rng.normal(m, 0.5, 100)) for m in (-0.5, 0.2, 0.9)]
    _, lo_a, hi_a = hierarchical_diff(agree)
    mean, lo_d, hi_d = hierarchical_diff(disagree)
    assert lo_a > 0 and lo_d < mean < hi_d
    assert hi_d - lo_d > 2 * (hi_a - lo_a)


# comparison (fedsdr compare) -------------------------------------------------------------
def test_comparison_shows_intervals_and_marks_paired_differences(tmp_path: Path) -> None:
    a = fake_run(tmp_path / "a", acc=0.9, halluc=0.05)
    b = fake_run(tmp_path / "b", profile="paper", acc=0.1, halluc=0.6)
    other_seed = fake_run(tmp_path / "c", algorithm="fedprox", seed=3, acc=0.5)
    summaries = [json.loads((p / "summary.json").read_text()) for p in (a, b, other_seed)]
    paired = write_comparison(tmp_path, summaries, run_dirs=[a, b, other_seed])
    md = (tmp_path / "comparison.md").read_text()
    assert "0.900 ± 0.020" in md  # 1.96 x se 0.01, rounded
    assert "FedAvg+FedSD(paper)" in md
    ab = next(p for p in paired if p["a"] == "FedAvg" and p["b"] == "FedAvg+FedSD(paper)")
    assert ab["accuracy"]["excludes_zero"] and ab["accuracy"]["mean"] > 0.5 and ab["accuracy"]["n_items"] == N_ITEMS
    assert ab["hallucination"]["hi"] < 0 and ab["loss"]["hi"] < 0
    assert "rougeL" in ab and ab["rougeL"] is None  # no open-ended item
    assert re.search(r"FedAvg − FedAvg\+FedSD\(paper\) \| \+0\.\d+ \[\+0\.\d+, \+0\.\d+\]\*", md)
    # another seed means other records: no pair
    ac = next(p for p in paired if p["b"] == "FedProx")
    assert ac["accuracy"] is None and "no shared items" in md
    data = json.loads((tmp_path / "comparison.json").read_text())
    assert len(data["runs"]) == 3 and len(data["paired"]) == 3


def test_pairs_need_the_same_prompt_not_only_the_same_id(tmp_path: Path) -> None:
    from fedsdr.report.collect import load_run

    a = load_run(fake_run(tmp_path / "a", seed=0))
    b = load_run(fake_run(tmp_path / "b", seed=0, profile="paper"))
    assert paired_metric({0: a}, {0: b}, "accuracy")["n_items"] == N_ITEMS
    rows = [json.loads(line) for line in (b.root / "predictions.jsonl").read_text().splitlines()]
    for row in rows[:5]:
        row["prompt"] = "something else"
    (b.root / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    b._predictions = None
    assert paired_metric({0: a}, {0: b}, "accuracy")["n_items"] == N_ITEMS - 5


# claims and the report ---------------------------------------------------------------------
@pytest.fixture
def claims_folder(tmp_path: Path) -> Path:
    """Two seeds: FedSD helps FedAvg (accuracy 0.2 -> 0.8) but hallucinates and pads (rewrites
    inconsistent, twice as long; models hallucinate more, answer longer); FedSDR is worse than
    FedAvg+FedSD on accuracy."""
    root = tmp_path / "runs"
    for seed in (0, 1):
        fake_run(root / f"fedavg-{seed}", seed=seed, acc=0.2, halluc=0.02, gen_len=10, general=True)
        fake_run(root / f"fedsd-{seed}", seed=seed, profile="paper", acc=0.8, halluc=0.2, gen_len=20,
                 rewrites={"consistency": 0.5, "ratio": 2.0}, general=True)
        fake_run(root / f"fedsdr-{seed}", algorithm="fedsdr", profile="paper", seed=seed, acc=0.3, halluc=0.4,
                 gen_len=12, rewrites={"consistency": 0.5, "ratio": 2.0}, general=True)
    return root


def test_claims_decided_from_paired_intervals(claims_folder: Path) -> None:
    claims = decide_claims(load_collection(claims_folder))
    assert [c.verdict for c in claims] == ["held", "held", "not held"]
    c1, c2, c3 = claims
    assert c1.deciding[0].result["n_seeds"] == 2 and c1.deciding[0].result["n_items"] == 2 * N_ITEMS
    assert {c.metric for c in c2.deciding} == {"hallucination", "length_ratio", "gen_len"}
    assert any(c.source == "rewrites" for c in c2.deciding)
    assert "FedDPA: not in this grid" in c3.missing
    assert any(c.verdict == "not held" and c.metric == "accuracy" for c in c3.deciding)


def test_report_of_a_folder_of_runs(claims_folder: Path) -> None:
    assert main(["report", str(claims_folder)]) == 0
    claims_md = (claims_folder / "claims.md").read_text()
    lines = re.findall(r"^\*\*Claim (\d) verdict: (held|not held|inconclusive)\*\* — rests on (\d+) deciding "
                       r"comparisons?(?: of|, each of) ([\d–]+) paired items over (\d+) seeds?", claims_md, re.MULTILINE)
    assert [(n, v) for n, v, *_ in lines] == [("1", "held"), ("2", "held"), ("3", "not held")]
    assert all(seeds == "2" for *_, seeds in lines)
    results = json.loads((claims_folder / "results.json").read_text())
    assert set(results["methods"]) == {"FedAvg", "FedAvg+FedSD(paper)", "FedSDR"}
    fedavg = results["methods"]["FedAvg"]
    acc = fedavg["splits"]["global_test"]["all"]["accuracy"]
    assert acc["n_seeds"] == 2 and acc["ci"] == "seeds" and acc["lo"] <= acc["mean"] <= acc["hi"]
    assert fedavg["splits"]["general"]["all"]["accuracy"]["mean"] == pytest.approx(0.3)
    assert "arith" in fedavg["splits"]["global_test"]
    assert results["methods"]["FedSDR"]["clients"]["personalized/client_test"]["accuracy"]["n_seeds"] == 2
    assert results["methods"]["FedAvg+FedSD(paper)"]["rewrite"]["length_ratio_mean_before"]["mean"] == 2.0
    md = (claims_folder / "results.md").read_text()
    assert "held-out suite 'general'" in md and "FedSD rewrites" in md
    for name in ("curves.png", "bars.png", "rewrite-paradox.png"):
        assert (claims_folder / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (claims_folder / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing fetched from a network
    assert "<script" not in page and "Claim 3 verdict: not held" in page.replace("</strong>", "").replace(
        '<strong class="verdict-not-held">', "").replace("<strong>", "")


def test_report_of_one_run(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "run", profile="paper", rewrites={"consistency": 0.5, "ratio": 2.0}, rounds=2)
    assert main(["report", str(run)]) == 0
    assert (run / "results.md").exists() and (run / "report.html").exists() and not (run / "claims.md").exists()
    results = json.loads((run / "results.json").read_text())
    [(label, m)] = results["methods"].items()
    assert label == "FedAvg+FedSD(paper)"
    acc = m["splits"]["global_test"]["all"]["accuracy"]
    assert acc["ci"] == "items" and acc["hi"] - acc["lo"] == pytest.approx(2 * 1.959963984540054 * 0.01)


def test_report_refuses_what_is_not_a_run(tmp_path: Path) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_method_labels() -> None:
    assert method_label("fedavg", None) == "FedAvg"
    assert method_label("fedavg", "paper") == "FedAvg+FedSD(paper)"
    assert method_label("fedsdr", "paper") == "FedSDR"
    assert method_label("scaffold", "safe") == "SCAFFOLD+FedSD(safe)"


def test_markdown_to_html_escapes_and_builds_tables() -> None:
    out = markdown_to_html("# T <x>\n\n| a | b \\| c |\n|---|---:|\n| **held** | `1 < 2` |\n\n- one\n- two\n")
    assert "<h1>T &lt;x&gt;</h1>" in out
    assert '<th class="r">b | c</th>' in out
    assert '<strong class="verdict-held">held</strong>' in out and "<code>1 &lt; 2</code>" in out
    assert "<ul><li>one</li><li>two</li></ul>" in out


def test_compare_command_writes_intervals_and_paired_differences(tmp_path: Path, one_torch_thread: None,
                                                                 capsys: pytest.CaptureFixture) -> None:
    from conftest import ROOT

    out = tmp_path / "cmp"
    assert main(["compare", "--config", str(ROOT / "configs/smoke.toml"), "--config",
                 str(ROOT / "configs/smoke-fedsd.toml"), "--set", "federation.rounds=1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Paired differences" in printed and "±" in printed
    md = (out / "comparison.md").read_text()
    assert re.search(r"\| FedAvg \| .*\d\.\d{3} ± \d\.\d{3}", md)
    data = json.loads((out / "comparison.json").read_text())
    [pair] = data["paired"]
    assert pair["a"] == "FedAvg" and pair["b"].startswith("FedAvg+FedSD")
    assert pair["loss"]["n_items"] == data["runs"][0]["final"]["num_examples"] and pair["loss"]["n_seeds"] == 1
    assert main(["report", str(out)]) == 0 and (out / "claims.md").exists() and (out / "report.html").exists()
