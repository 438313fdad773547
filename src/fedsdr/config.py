"""Typed configuration tree: load a TOML file, apply `--set key=value` overrides, validate.

Every field documents itself; unknown keys are errors that name the key.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedsdr.distill.engine import DistillConfig


class ConfigError(ValueError):
    """A bad config file or override; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name: str = Field(
        "smollm2-135m-instruct",
        description="Bundled name ('smollm2-135m-instruct', 'tiny-random'), a local folder or a hub id.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Storage dtype of the frozen base weights. auto: bfloat16 on CUDA, float32 on CPU."
    )
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Autocast dtype for matmuls. auto: bfloat16 where the device supports it, else float32.",
    )
    device: str = Field("auto", description="'auto' (CUDA if present), 'cpu', 'cuda', 'cuda:1'...")
    cache_dir: str = Field("", description="Where bundled models are prepared; empty: ~/.cache/fedsdr.")
    max_seq_len: int = Field(384, ge=16, description="Records longer than this (prompt+response tokens) are dropped.")
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 keeps torch's default.")


class LoraSettings(_Section):
    r: int = Field(8, ge=1, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Module names that get LoRA; 'all-linear' as the only item means every linear layer.",
    )


class FieldMap(_Section):
    id: str = "id"
    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    domain: str = "domain"
    answer: str = "answer"
    scorer: str = "scorer"


class DataConfig(_Section):
    source: str = Field(
        "multi-domain",
        description="'multi-domain' (bundled benchmark), a file (.jsonl/.json/.csv/.parquet), a folder saved "
        "by `datasets`, or a `datasets` hub name.",
    )
    format: Literal["auto", "jsonl", "json", "csv", "parquet", "datasets"] = "auto"
    split: str = Field("train", description="Split to read for `datasets` sources.")
    fields: FieldMap = Field(default_factory=FieldMap, description="Column names in the source.")
    default_domain: str = Field("default", description="Domain of records whose source has no domain column.")
    records_per_domain: int = Field(64, ge=1, description="Bundled benchmark: records generated per domain.")
    domains: list[str] = Field(default_factory=list, description="Keep only these domains (empty: all).")
    global_test_per_domain: int = Field(6, ge=0, description="Held out per domain into the global test set.")
    test_fraction: float = Field(0.2, ge=0, lt=1, description="Per-client held-out fraction.")
    max_test_per_client: int = Field(0, ge=0, description="Cap on each client's test split (0: no cap).")
    system_prompt: str = Field("", description="System turn for training and evaluation (empty: the template's default).")


class PartitionConfig(_Section):
    num_clients: int = Field(4, ge=1)
    method: Literal["domain", "dirichlet", "k-domains", "iid"] = Field(
        "domain",
        description="domain: one domain per client; dirichlet: Dirichlet(alpha) over domains; "
        "k-domains: `domains_per_client` domains each; iid: uniform.",
    )
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration.")
    domains_per_client: int = Field(2, ge=1)


class TrainConfig(_Section):
    local_steps: int = Field(5, ge=1, description="Optimizer steps per client per round.")
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    scheduler: Literal["constant", "linear", "cosine"] = Field(
        "cosine", description="Learning-rate schedule over all rounds' local steps."
    )
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    max_grad_norm: float = Field(1.0, ge=0, description="0 disables clipping.")
    length_grouping: bool = Field(True, description="Group batches by length to cut padding.")


ALGORITHMS = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedsdr")


class FederationConfig(_Section):
    algorithm: Literal["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedsdr"] = "fedavg"
    server_strategy: Literal["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad"] = Field(
        "fedavg", description="FedSDR only: the strategy that aggregates LoRA-R."
    )
    rounds: int = Field(3, ge=1)
    engine: Literal["inprocess", "ray"] = "inprocess"
    fraction_train: float = Field(1.0, gt=0, le=1)
    min_train_clients: int = Field(1, ge=1)
    fraction_evaluate: float = Field(1.0, ge=0, le=1)
    proximal_mu: float = Field(0.01, ge=0, description="FedProx: weight of mu/2 * ||theta - theta_global||^2.")
    server_lr: float = Field(1.0, gt=0, description="FedAvgM: server learning rate; FedOpt: eta.")
    server_momentum: float = Field(0.9, ge=0, lt=1, description="FedAvgM momentum.")
    eta: float = Field(1e-2, gt=0, description="FedAdam/FedYogi/FedAdagrad server learning rate.")
    tau: float = Field(1e-3, gt=0, description="FedOpt adaptivity.")
    beta_1: float = Field(0.9, ge=0, lt=1)
    beta_2: float = Field(0.99, ge=0, lt=1)
    ray_client_cpus: float = Field(1.0, gt=0, description="ray engine: CPUs per virtual client.")


class EvalConfig(_Section):
    generate: bool = Field(True, description="Generate and score answers (False: reference loss only).")
    max_new_tokens: int = Field(128, ge=1)
    batch_size: int = Field(32, ge=1, description="Rows decoded together (continuous batching).")
    code_timeout: float = Field(5.0, gt=0, description="Seconds per code test run.")
    clients: bool = Field(True, description="Evaluate the global model on every client's test split.")


class FedSDRConfig(_Section):
    schedule: Literal["alternate", "joint", "sequential"] = "alternate"
    joint_lambda: float = Field(1.0, ge=0, description="joint schedule: weight of the raw loss.")
    smooth_r: int = Field(0, ge=0, description="LoRA-S rank (0: same as lora.r).")
    smooth_alpha: float = Field(0.0, ge=0, description="LoRA-S alpha (0: same as lora.alpha).")
    rectify_r: int = Field(0, ge=0, description="LoRA-R rank (0: same as lora.r).")
    rectify_alpha: float = Field(0.0, ge=0, description="LoRA-R alpha (0: same as lora.alpha).")
    smooth_lr: float = Field(0.0, ge=0, description="LoRA-S learning rate (0: same as train.lr).")


class RunConfig(_Section):
    extends: str = Field("", description="A config file this one builds on (path relative to this file).")
    name: str = Field("run", description="Label used in tables.")
    seed: int = 0
    out_dir: str = Field("", description="Default output folder (overridden by --out).")
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    data: DataConfig = Field(default_factory=DataConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    fedsdr: FedSDRConfig = Field(default_factory=FedSDRConfig)

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.federation.algorithm == "fedsdr" and not self.distill.enabled:
            # FedSDR's smooth stream is defined on distilled data.
            self.distill.enabled = True
        return self

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


def _parse_value(raw: str) -> Any:
    """Parse an override value as TOML (numbers, booleans, lists, quoted strings), else a bare string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides to a nested dict (in place) and return it."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. federation.rounds=5)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node[parts[-1]] = _parse_value(raw.strip())
    return data


def _format_error(err: ValidationError, origin: str) -> str:
    lines = [f"invalid config ({origin}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {loc}: {msg} (got {e.get('input')!r})" if e["type"] != "extra_forbidden" else f"  {loc}: {msg}")
    return "\n".join(lines)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_toml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a config file, following `extends` (the file's own keys win)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the config file: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    parent = data.pop("extends", "")
    if parent:
        parent_path = (path.parent / parent).resolve()
        if parent_path in seen:
            raise ConfigError(f"{path}: `extends` loops back to {parent_path}")
        data = _merge(_read_toml(parent_path, (*seen, path.resolve())), data)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a TOML config (or defaults when path is None), apply overrides, validate."""
    data: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        origin = str(path)
        data = _read_toml(Path(path))
    apply_overrides(data, overrides or [])
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e, origin)) from None


def config_from_json(text: str) -> RunConfig:
    return RunConfig.model_validate(json.loads(text))
