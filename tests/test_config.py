"""Config files, `--set` overrides and validation errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsdr.config import ConfigError, RunConfig, apply_overrides, config_from_json, load_config

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "smoke.toml"
QUICKSTART = ROOT / "configs" / "quickstart.toml"


def config_error(path: Path | None = None, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


# --- shipped configs -----------------------------------------------------------------------


def test_smoke_config_loads() -> None:
    cfg = load_config(SMOKE)
    assert isinstance(cfg, RunConfig)
    assert cfg.name == "smoke"
    assert cfg.model.name == "tiny-random"
    assert cfg.lora.r == 4
    assert cfg.data.records_per_domain == 16
    assert cfg.partition.num_clients == 3
    assert cfg.train.lr == pytest.approx(5e-3)
    assert cfg.federation.rounds == 2
    assert cfg.distill.enabled is False


def test_quickstart_config_loads() -> None:
    cfg = load_config(str(QUICKSTART))  # a str path works too
    assert cfg.model.name == "smollm2-135m-instruct"
    assert cfg.data.domains == ["arithmetic", "gsm", "construction_faq", "word_sorting"]
    # sizes that decide: >= 100 held out per domain for loss, >= 50 generated answers per domain
    assert cfg.data.global_test_per_domain >= 100 and cfg.eval.generate_per_domain >= 50
    assert cfg.data.records_per_domain >= cfg.data.global_test_per_domain + 64
    assert cfg.partition.method == "domain"
    assert cfg.partition.num_clients == 4
    assert cfg.federation.algorithm == "fedavg"
    assert isinstance(cfg.lora.alpha, float) and cfg.lora.alpha == 16.0


def test_defaults_without_a_file() -> None:
    cfg = load_config()
    assert cfg == RunConfig()
    assert cfg.federation.rounds == 3


def test_json_round_trip() -> None:
    cfg = load_config(SMOKE, ["federation.algorithm=fedsdr", "lora.target_modules=['q_proj']"])
    assert config_from_json(cfg.to_json()) == cfg


# --- overrides -----------------------------------------------------------------------------


def test_overrides_apply_with_the_right_types() -> None:
    cfg = load_config(
        SMOKE,
        [
            "federation.rounds=5",
            'lora.target_modules=["q_proj"]',
            "model.name=foo",
            "train.lr=1e-4",
            "eval.generate=false",
            "data.domains=['code', 'gsm']",
            'name="quoted name"',
        ],
    )
    assert cfg.federation.rounds == 5 and type(cfg.federation.rounds) is int
    assert cfg.lora.target_modules == ["q_proj"]
    assert cfg.model.name == "foo"
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.eval.generate is False
    assert cfg.data.domains == ["code", "gsm"]
    assert cfg.name == "quoted name"
    # untouched values still come from the file
    assert cfg.lora.r == 4
    assert cfg.partition.num_clients == 3


def test_override_bare_string_with_spaces_and_separators() -> None:
    cfg = load_config(
        None, ["model.name = HuggingFaceTB/SmolLM2-135M", "data.source=/tmp/a=b.jsonl"]
    )
    assert cfg.model.name == "HuggingFaceTB/SmolLM2-135M"
    assert cfg.data.source == "/tmp/a=b.jsonl"  # only the first '=' splits


def test_later_override_wins() -> None:
    cfg = load_config(SMOKE, ["federation.rounds=5", "federation.rounds=7"])
    assert cfg.federation.rounds == 7


def test_apply_overrides_on_dict() -> None:
    data: dict = {"federation": {"rounds": 2}}
    out = apply_overrides(data, ["federation.rounds=5", "partition.alpha=0.3", "seed=4"])
    assert out is data
    assert data == {"federation": {"rounds": 5}, "partition": {"alpha": 0.3}, "seed": 4}


def test_override_without_equals() -> None:
    with pytest.raises(ConfigError, match="federation.rounds"):
        apply_overrides({}, ["federation.rounds"])


def test_override_through_a_value_is_an_error() -> None:
    with pytest.raises(ConfigError, match="model.name.x"):
        apply_overrides({"model": {"name": "a"}}, ["model.name.x=1"])


def test_unknown_key() -> None:
    msg = config_error(SMOKE, ["federation.roundz=3"])
    assert "federation.roundz" in msg
    assert "unknown key" in msg


def test_unknown_section() -> None:
    assert "modle" in config_error(None, ["modle.name=x"])


def test_unknown_key_in_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[train]\nlearning_rate = 0.1\n", encoding="utf-8")
    msg = config_error(path)
    assert "train.learning_rate" in msg
    assert str(path) in msg


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ('federation.rounds="x"', "federation.rounds"),
        ("federation.rounds=x", "federation.rounds"),
        ("lora.target_modules=q_proj", "lora.target_modules"),
        ("partition.method=random", "partition.method"),
        ("eval.generate=maybe", "eval.generate"),
    ],
)
def test_wrong_type(override: str, key: str) -> None:
    assert key in config_error(SMOKE, [override])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.lr=-1", "train.lr"),
        ("train.lr=0", "train.lr"),
        ("federation.rounds=0", "federation.rounds"),
        ("lora.dropout=1.0", "lora.dropout"),
        ("data.test_fraction=1", "data.test_fraction"),
        ("partition.alpha=0", "partition.alpha"),
    ],
)
def test_out_of_range(override: str, key: str) -> None:
    msg = config_error(SMOKE, [override])
    assert key in msg
    assert str(SMOKE) in msg


def test_several_errors_are_all_reported() -> None:
    msg = config_error(SMOKE, ["train.lr=-1", "federation.roundz=3"])
    assert "train.lr" in msg and "federation.roundz" in msg


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    msg = config_error(path)
    assert str(path) in msg
    assert "not found" in msg


def test_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[federation\nrounds = 3\n", encoding="utf-8")
    msg = config_error(path)
    assert str(path) in msg
    assert "TOML" in msg


@pytest.mark.parametrize("kind", ["latin-1", "directory"])
def test_unreadable_config_is_a_config_error(kind: str, tmp_path: Path) -> None:
    if kind == "directory":
        path = tmp_path
    else:
        path = tmp_path / "latin1.toml"
        path.write_bytes('name = "caf\u00e9"\n'.encode("latin-1"))
    assert str(path) in config_error(path)


# --- cross-field rules ---------------------------------------------------------------------


def test_fedsdr_turns_distillation_on() -> None:
    assert load_config(SMOKE).distill.enabled is False
    cfg = load_config(SMOKE, ['federation.algorithm="fedsdr"'])
    assert cfg.federation.algorithm == "fedsdr"
    assert cfg.distill.enabled is True
    # even when explicitly switched off: FedSDR's smooth stream needs distilled data
    cfg = load_config(SMOKE, ["federation.algorithm=fedsdr", "distill.enabled=false"])
    assert cfg.distill.enabled is True


def test_other_algorithms_leave_distillation_as_set() -> None:
    assert load_config(SMOKE, ["federation.algorithm=fedprox"]).distill.enabled is False
    assert (
        load_config(SMOKE, ["federation.algorithm=fedavg", "distill.enabled=true"]).distill.enabled
        is True
    )


def test_unknown_algorithm_stops_before_the_model_loads(capsys, monkeypatch) -> None:
    from fedsdr.cli import main
    from fedsdr.models import loading

    monkeypatch.setattr(loading, "load_base_model", lambda *a: pytest.fail("the model was loaded"))
    assert main(["run", "--config", str(SMOKE), "--set", "federation.algorithm=fedfoo", "--out", "/nonexistent"]) == 2
    assert "federation.algorithm" in capsys.readouterr().err


def test_assignment_is_validated() -> None:
    cfg = load_config(SMOKE)
    with pytest.raises(ValueError):
        cfg.federation.rounds = 0
    with pytest.raises(ValueError):
        cfg.train.lr = "fast"  # type: ignore[assignment]
