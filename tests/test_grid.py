"""`fedsdr grid` on configs/grid-smoke.toml (tiny model, 2 seeds, about 2 minutes): the report's
files, resuming (finished cells are not run again), refusing a folder that holds another config,
and refusing a bad grid before anything runs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import ROOT

from fedsdr.cli import main
from fedsdr.config import ConfigError, load_config
from fedsdr.federation import engine
from fedsdr.grid import cell_command, flatten, load_grid, run_grid

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SMOKE = ROOT / "configs" / "grid-smoke.toml"
VERDICT = re.compile(r"^\*\*Claim (\d) verdict: (held|not held|inconclusive)\*\* — rests on (\d+) deciding "
                     r"comparisons?(?: of|, each of) ([\d–]+) paired items over (\d+) seeds?", re.MULTILINE)


@pytest.fixture(scope="module")
def grid_out(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> Path:
    """configs/grid-smoke.toml run once through the command line."""
    out = tmp_path_factory.mktemp("grid") / "smoke"
    assert main(["grid", "--config", str(SMOKE), "--out", str(out), "--in-process"]) == 0
    return out


def _forbid_runs(monkeypatch: pytest.MonkeyPatch) -> list:
    calls: list = []

    def fake(cfg, run, resume=False):  # noqa: ANN001, ANN202
        calls.append((run.root, resume))
        raise AssertionError(f"{run.root} ran again")

    monkeypatch.setattr(engine, "run_federation", fake)
    return calls


def test_grid_writes_results_claims_plots_and_page(grid_out: Path) -> None:
    grid = json.loads((grid_out / "grid.json").read_text())
    labels = list(dict.fromkeys(c["label"] for c in grid["cells"]))
    assert labels == ["FedAvg", "FedAvg+FedSD(paper)", "FedProx", "FedProx+FedSD(paper)", "FedSDR", "FedDPA",
                      "Local", "Centralized"]
    assert len(grid["cells"]) == 2 * len(labels)
    for cell in grid["cells"]:
        assert (grid_out / cell["folder"] / "summary.json").exists()
        assert cell["command"].startswith("fedsdr run --config ")
    results = json.loads((grid_out / "results.json").read_text())
    assert list(results["methods"]) == labels
    for m in results["methods"].values():
        assert m["seeds"] == [0, 1]
        loss = m["splits"]["global_test"]["all"]["loss"]
        assert loss["n_seeds"] == 2 and loss["lo"] <= loss["mean"] <= loss["hi"] and loss["std"] is not None
        assert m["cost"]["wall_seconds"]["mean"] > 0
    claims = (grid_out / "claims.md").read_text()
    verdicts = VERDICT.findall(claims)
    assert [n for n, *_ in verdicts] == ["1", "2", "3"]
    for _, _, comparisons, items, seeds in verdicts:
        assert int(comparisons) > 0 and int(items.split("–")[0]) > 0 and seeds == "2"
    assert "FedDPA" in claims.split("## Claim 3")[1]  # claim 3 compares against FedDPA too
    assert [c["verdict"] for c in results["claims"]] == [v for _, v, *_ in verdicts]
    md = (grid_out / "results.md").read_text()
    assert all(label in md for label in labels)
    for name in ("curves.png", "bars.png", "rewrite-paradox.png"):
        assert (grid_out / "plots" / name).stat().st_size > 1000
    page = (grid_out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert "fedsdr grid --config" in page and "fedsdr run --config" in page and "[[method]]" in page


def test_cells_of_a_seed_share_the_base_model_evaluation(grid_out: Path) -> None:
    grid = json.loads((grid_out / "grid.json").read_text())
    by_seed: dict[int, set] = {}
    for cell in grid["cells"]:
        summary = json.loads((grid_out / cell["folder"] / "summary.json").read_text())
        cfg = json.loads((grid_out / cell["folder"] / "config.json").read_text())
        assert cfg["model"]["cache_dir"] == ""  # one cache for all: round 0 computed once per seed
        by_seed.setdefault(cell["seed"], set()).add(round(summary["round0"]["loss"], 12))
    assert all(len(losses) == 1 for losses in by_seed.values()), by_seed


def test_rerun_skips_finished_cells(grid_out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _forbid_runs(monkeypatch)
    (grid_out / "report.html").unlink()
    assert main(["grid", "--config", str(SMOKE), "--out", str(grid_out)]) == 0
    assert calls == [] and (grid_out / "report.html").exists()


def test_report_redraws_from_the_folders_alone(grid_out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _forbid_runs(monkeypatch)
    for path in [grid_out / "report.html", grid_out / "claims.md", grid_out / "results.json", *grid_out.glob("plots/*")]:
        path.unlink()
    assert main(["report", str(grid_out)]) == 0 and calls == []
    assert (grid_out / "report.html").exists() and len(list(grid_out.glob("plots/*.png"))) == 3
    assert len(VERDICT.findall((grid_out / "claims.md").read_text())) == 3
    one = grid_out / "cells" / "fedsdr-seed0"  # a single run folder too
    assert main(["report", str(one)]) == 0 and (one / "report.html").exists() and (one / "results.md").exists()


def test_an_unfinished_cell_resumes_alone(grid_out: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "copy"
    shutil.copytree(grid_out, out)
    cell = out / "cells" / "fedavg-seed1"
    (cell / "summary.json").unlink()
    shutil.rmtree(cell / "checkpoints" / "round-002")
    real, calls = engine.run_federation, []

    def counting(cfg, run, resume=False):  # noqa: ANN001, ANN202
        calls.append((run.root, resume))
        return real(cfg, run, resume=resume)

    monkeypatch.setattr(engine, "run_federation", counting)
    outcome = run_grid(load_grid(SMOKE), out, report=False)
    assert calls == [(cell, True)]
    assert outcome["cells/fedavg-seed1"] == "resumed" and list(outcome.values()).count("skipped") == 15
    assert json.loads((cell / "summary.json").read_text())["rounds"] == 2


def test_a_cell_can_run_in_a_fresh_process(grid_out: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`fedsdr grid`'s default: the cell runs in a child interpreter (this process may not run
    it), resumes from its checkpoint there and finishes as it would in-process."""
    out = tmp_path / "copy"
    shutil.copytree(grid_out, out)
    cell = out / "cells" / "fedavg-seed1"
    finished = json.loads((cell / "summary.json").read_text())
    (cell / "summary.json").unlink()
    shutil.rmtree(cell / "checkpoints" / "round-002")
    calls = _forbid_runs(monkeypatch)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    outcome = run_grid(load_grid(SMOKE), out, report=False, fresh_process=True)
    assert calls == [] and outcome["cells/fedavg-seed1"] == "resumed"
    again = json.loads((cell / "summary.json").read_text())
    assert again["rounds"] == 2 and again["final"]["loss"] == pytest.approx(finished["final"]["loss"], rel=1e-4)
    assert json.loads((cell / "grid-timing.json").read_text())["sessions"] == 2


def test_a_cell_folder_with_another_config_is_refused(grid_out: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "copy"
    shutil.copytree(grid_out, out)
    path = out / "cells" / "fedprox-seed0" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["train"]["lr"] = 0.123
    path.write_text(json.dumps(cfg))
    calls = _forbid_runs(monkeypatch)
    (out / "cells" / "fedavg-seed0" / "summary.json").unlink()  # a cell that would run: it must not
    assert main(["grid", "--config", str(SMOKE), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cells/fedprox-seed0" in err and "train.lr" in err and "nothing ran" in err
    assert calls == []
    # a changed grid refuses every finished cell it would change
    with pytest.raises(ConfigError, match="holds another config"):
        run_grid(load_grid(SMOKE, ["train.lr=0.01"]), grid_out, report=False)


def test_unknown_algorithm_is_refused_before_anything_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    grid = tmp_path / "g.toml"
    grid.write_text(f'base = "{ROOT / "configs" / "smoke.toml"}"\nseeds = [0]\n'
                    '[[method]]\nalgorithm = "fedavg"\n[[method]]\nalgorithm = "fedmagic"\n')
    calls = _forbid_runs(monkeypatch)
    assert main(["grid", "--config", str(grid), "--out", str(tmp_path / "out")]) == 2
    assert "fedmagic" in capsys.readouterr().err and calls == []
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("text", "message"), [
    ('seeds = [0]\n[[method]]\nalgorithm = "fedavg"\n', "`base`"),
    ('base = "smoke.toml"\nseed = [0]\n[[method]]\nalgorithm = "fedavg"\n', "unknown grid key"),
    ('base = "smoke.toml"\nseeds = [0, 0]\n[[method]]\nalgorithm = "fedavg"\n', "distinct integers"),
    ('base = "smoke.toml"\n', "no [[method]]"),
    ('base = "smoke.toml"\n[[method]]\nalgorithm = "fedavg"\nfedsd = ["raw"]\n', "fedsd must list"),
    ('base = "smoke.toml"\n[[method]]\nalgorithm = "fedsdr"\nfedsd = ["none"]\n', "always trains on distilled"),
    ('base = "smoke.toml"\n[[method]]\nalgorithm = "fedavg"\n[[method]]\nalgorithm = "fedavg"\n', "twice"),
    ('base = "smoke.toml"\n[[method]]\nalgorithm = "fedavg"\nlr = 1\n', "unknown key"),
    ('base = "smoke.toml"\n[config]\ntrain.lrr = 1\n[[method]]\nalgorithm = "fedavg"\n', "lrr"),
])
def test_bad_grid_files(tmp_path: Path, text: str, message: str) -> None:
    shutil.copy(ROOT / "configs" / "smoke.toml", tmp_path / "smoke.toml")  # `base` is relative to the grid file
    path = tmp_path / "grid.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_grid(path)


def test_cells_are_ordinary_run_configs() -> None:
    grid = load_grid(SMOKE, ["train.local_steps=2"])
    assert [c.seed for c in grid.cells] == [0] * 8 + [1] * 8
    by_name = {(c.cell, c.seed): c for c in grid.cells}
    raw, fedsd, fedsdr = by_name[("fedavg", 0)], by_name[("fedavg-fedsd-paper", 1)], by_name[("fedsdr", 0)]
    assert not raw.config.distill.enabled and raw.config.name == "fedavg"
    assert fedsd.config.distill.enabled and fedsd.config.distill.filters.profile == "paper" and fedsd.config.seed == 1
    assert fedsdr.config.federation.algorithm == "fedsdr" and fedsdr.config.distill.filters.profile == "paper"
    assert all(c.config.train.local_steps == 2 and c.config.distill.max_new_tokens == 48 for c in grid.cells)
    # the command a cell prints builds the same config
    assert load_config(grid.base, fedsd.overrides) == fedsd.config
    assert "--set distill.enabled=true" in cell_command(grid, fedsd, Path("out"))


def test_flatten_writes_overrides_the_cli_parses() -> None:
    table = {"eval": {"suites": ["general"], "max_new_tokens_per_domain": {"code": 256}},
             "train": {"lr": 1e-05, "length_grouping": False}, "data": {"system_prompt": 'say "hi"'}}
    cfg = load_config(ROOT / "configs" / "smoke.toml", flatten(table))
    assert cfg.eval.suites == ["general"] and cfg.eval.max_new_tokens_per_domain == {"code": 256}
    assert cfg.train.lr == 1e-05 and cfg.train.length_grouping is False and cfg.data.system_prompt == 'say "hi"'


def test_claims_grid_builds() -> None:
    grid = load_grid(ROOT / "configs" / "grid-claims.toml")
    labels = list(dict.fromkeys(c.label for c in grid.cells))
    assert labels == ["FedAvg", "FedAvg+FedSD(paper)", "FedAvg+FedSD(safe)", "FedProx", "FedProx+FedSD(paper)",
                      "FedAdam", "FedAdam+FedSD(paper)", "SCAFFOLD", "SCAFFOLD+FedSD(paper)", "FedSDR", "FedDPA",
                      "Local", "Centralized"]
    assert len(grid.cells) == 3 * len(labels)
    assert all(c.config.eval.suites == ["general"] and c.config.data.domains == grid.cells[0].config.data.domains
               for c in grid.cells)
    assert len(grid.cells[0].config.data.domains) == 4 and grid.cells[0].config.partition.num_clients == 4
