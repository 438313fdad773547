"""Typed configuration tree: load a TOML file, apply `--set key=value` overrides, validate.

Every field documents itself; unknown keys are errors that name the key.
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


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
        description="Autocast dtype for matmuls. auto: on a GPU its bfloat16 (float16 without); on a CPU bfloat16 "
        "where the CPU has native bf16 and its bf16 matmuls are >= 1.3x its fp32 ones (timed once per machine), "
        "else float32.",
    )
    device: str = Field("auto", description="'auto' (CUDA if present), 'cpu', 'cuda', 'cuda:1'...")
    attn_implementation: str = Field(
        "auto",
        description="transformers' attention implementation: 'auto' (the model's default: 'sdpa' for Llama; "
        "on a CPU 'sdpa_recompute' in its place: SDPA for inference and fp32 training, a faster matmul backward "
        "for bf16 training), "
        "'sdpa', 'eager', or another transformers accepts ('flash_attention_2' with flash-attn on CUDA...).",
    )
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
    choices: str = "choices"  # multiple choice: a list (CSV: a JSON list in the cell)


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
    test_source: str = Field(
        "",
        description="Your own global test set (any supported source, same field mapping); replaces the "
        "records held out by global_test_per_domain.",
    )
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
    pass_tokens: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto",
        description="Most padded tokens (rows x longest row) in one forward/backward pass: a batch longer than "
        "that is split, longest rows first, into passes whose gradients add up to the batch's (the same step up "
        "to rounding and dropout draws). Bounds the activations kept for backward, the bulk of training memory. "
        "0: each batch in one pass. auto: on a CPU 512 in bf16 and 384 in fp32, 0 on an accelerator (where every extra pass costs "
        "thousands more kernel launches and memory is rarely what binds).",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute each decoder layer's activations in backward instead of keeping them: "
        "less memory, slower steps.",
    )
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    scheduler: Literal["constant", "linear", "cosine"] = Field(
        "cosine", description="Learning-rate schedule over all rounds' local steps."
    )
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    max_grad_norm: float = Field(1.0, ge=0, description="0 disables clipping.")
    length_grouping: bool = Field(True, description="Group batches by length to cut padding.")


class FederationConfig(_Section):
    algorithm: str = Field(
        "fedavg",
        description="fedavg, fedprox, scaffold, fedavgm, fedadam, fedyogi, fedadagrad, fedsdr, feddpa, or the "
        "reference points local and centralized (the registry in `fedsdr.algorithms` checks the name before "
        "anything loads).",
    )
    server_strategy: str = Field(
        "fedavg",
        description="Algorithms with a local adapter (FedSDR): the single-adapter algorithm whose server "
        "strategy aggregates the global adapter, and whose client term (FedProx's) its stream gets.",
    )
    rounds: int = Field(3, ge=1)
    engine: Literal["inprocess", "ray"] = "inprocess"
    fraction_train: float = Field(1.0, gt=0, le=1)
    min_train_clients: int = Field(1, ge=1)
    fraction_evaluate: float = Field(1.0, ge=0, le=1)
    proximal_mu: float = Field(0.01, ge=0, description="FedProx: weight of mu/2 * ||theta - theta_global||^2.")
    server_lr: float = Field(1.0, gt=0, description="FedAvgM: server learning rate; FedOpt: eta; SCAFFOLD: eta_g.")
    scaffold_correction: Literal["step", "gradient"] = Field(
        "step",
        description="SCAFFOLD: where c - c_i enters a local step. step: y <- y - lr * (optimizer direction + c - c_i), "
        "the units option II's c_i estimates under any optimizer. gradient: added to the clipped gradient before "
        "AdamW (the paper's SGD step read literally; with AdamW, c_i is in update units, not gradient units).",
    )
    server_momentum: float = Field(0.9, ge=0, lt=1, description="FedAvgM momentum.")
    eta: float = Field(1e-2, gt=0, description="FedAdam/FedYogi/FedAdagrad server learning rate.")
    tau: float = Field(1e-3, gt=0, description="FedOpt adaptivity.")
    beta_1: float = Field(0.9, ge=0, lt=1)
    beta_2: float = Field(0.99, ge=0, lt=1)
    trimmed_beta: float = Field(0.2, ge=0, lt=0.5, description="FedTrimmedAvg: fraction trimmed at each end.")
    num_malicious_clients: int = Field(0, ge=0, description="Krum, MultiKrum, Bulyan: clients assumed hostile.")
    multikrum_select: int = Field(1, ge=1, description="MultiKrum: client adapters averaged.")
    ray_client_cpus: float = Field(1.0, gt=0, description="ray engine: CPUs per virtual client.")
    ray_client_gpus: float | None = Field(
        None, ge=0, description="ray engine: GPUs per virtual client (unset: 1 / clients when CUDA is present, else 0)."
    )
    round_timeout: float | None = Field(
        None,
        gt=0,
        description="Seconds a round waits for nodes to connect and for replies; then it goes on with the "
        "replies it has (at least min_train_clients). The in-process engine, whose clients run one after "
        "the other, gives each client this long. None: wait for every sampled client.",
    )
    max_update_norm: float = Field(
        0.0,
        ge=0,
        description="Largest L2 norm of a client's update (its adapter minus the global one) that is "
        "aggregated; 0: update_norm_factor x the round's median update norm.",
    )
    update_norm_factor: float = Field(10.0, gt=1, description="See max_update_norm.")
    max_num_examples: int = Field(
        1_000_000, ge=1, description="A reply claiming more training examples than this is rejected."
    )
    # Differential privacy of the global adapter (fedsdr.dp): Flower's clipping wrappers.
    dp: Literal["none", "server-fixed", "server-adaptive", "client-fixed", "client-adaptive"] = Field(
        "none",
        description="Clip each client's update to dp_clipping_norm (fixed, or adaptive: tracking a quantile "
        "of the update norms) on the server or on the client (Flower's mod), and add Gaussian noise "
        "(dp_noise_multiplier x norm / sampled clients) to the aggregate. See fedsdr.dp.",
    )
    dp_noise_multiplier: float = Field(1.0, ge=0, description="DP: noise std / clipping norm (z); 0: clip only.")
    dp_clipping_norm: float = Field(
        1.0, gt=0, description="DP: L2 bound on a client's update (adaptive: its initial value)."
    )
    dp_delta: float | None = Field(
        None, gt=0, lt=1, description="DP: the delta epsilon is reported at (unset: min(1e-5, num_clients^-1.1))."
    )
    dp_target_quantile: float = Field(
        0.5, ge=0, le=1, description="Adaptive DP: fraction of updates the clipping norm should leave unclipped."
    )
    dp_clipped_count_stddev: float | None = Field(
        None, gt=0, description="Adaptive DP: noise on the clipped count (unset: sampled clients / 20, Flower's)."
    )


class EvalConfig(_Section):
    generate: bool = Field(
        True, description="Generate and score answers (False: reference loss and multiple choice only)."
    )
    generate_every: int | list[int] = Field(
        0,
        description="Rounds whose evaluation generates answers (loss and multiple choice run every round). "
        "0: round 0 and the last round; N > 0: also every N-th round; a list: exactly those rounds.",
    )
    every_round: bool = Field(
        True,
        description="Evaluate (loss, multiple choice) after every round; False: only at the rounds that "
        "generate answers (generate_every), to save time on large grids.",
    )
    generate_per_domain: int = Field(
        0, ge=0, description="Generate answers for at most this many records per domain (0: all of them)."
    )
    max_new_tokens: int = Field(128, ge=1, description="Smallest token budget of a domain (see budget_ratio).")
    budget_ratio: float = Field(
        1.5, gt=0, description="A domain's token budget is budget_ratio x its longest reference "
        "(in tokens), at least max_new_tokens and at most max_new_tokens_limit, so worked "
        "solutions are not cut off."
    )
    max_new_tokens_limit: int = Field(512, ge=1, description="Largest token budget of a domain.")
    repeat_stop: float = Field(
        0.8, ge=0, le=1, description="Stop a generated answer once this share of the 4-grams of its last 64 "
        "tokens repeat earlier ones (a greedy loop, which would only end at the budget); reported as "
        "`looped`, apart from `truncated`. 0: off (decode to end of turn or the budget)."
    )
    repeat_stop_numbers_alike: bool = Field(
        False, description="The loop stop counts every number as the same token, so a line said again with "
        "new numbers ('12. The answer is 12.') is a repeat. It stops more loops, and also cuts short worked "
        "solutions that restate one equation with other numbers."
    )
    suites: list[Literal["general"]] = Field(
        default_factory=list,
        description="Held-out suites no client trains on. 'general': BIG-bench's CRASS and BBH source tasks "
        "(multiple choice by log-likelihood, offline from the bigbench sdist on PyPI).",
    )
    general_items_per_task: int = Field(20, ge=1, description="General suite: items per task.")
    general_few_shot: int = Field(0, ge=0, description="General suite: solved examples before each item.")
    general_tasks: list[str] = Field(default_factory=list, description="General suite: tasks (empty: all).")
    batch_size: int = Field(32, ge=1, description="Rows decoded together (continuous batching).")
    code_timeout: float = Field(5.0, gt=0, description="Seconds per code test run.")
    clients: bool = Field(True, description="Evaluate the global model on every client's test split.")
    max_new_tokens_per_domain: dict[str, int] = Field(
        default_factory=dict, description="Token budget per domain, overriding max_new_tokens (e.g. {code = 256})."
    )
    answer_regex: str = Field(
        "",
        description="A regex with one group that extracts the stated answer from references and responses "
        "(strict mode; the last match counts). Empty: the built-in markers (Answer:, ####, \\boxed{}, "
        "'the answer is').",
    )

    @field_validator("max_new_tokens_per_domain")
    @classmethod
    def _check_budgets(cls, value: dict[str, int]) -> dict[str, int]:
        bad = {k: v for k, v in value.items() if v < 1}
        if bad:
            raise ValueError(f"token budgets must be >= 1, got {bad}")
        return value

    @field_validator("answer_regex")
    @classmethod
    def _check_answer_regex(cls, value: str) -> str:
        import re

        if not value:
            return value
        try:
            groups = re.compile(value).groups
        except re.error as e:
            raise ValueError(f"answer_regex {value!r} is not a valid regular expression: {e}") from None
        if groups != 1:
            raise ValueError(
                f"answer_regex {value!r} must have exactly one capturing group (the answer), it has {groups}; "
                "make other groups non-capturing with (?:...)"
            )
        return value

    def evaluates_at(self, server_round: int, last_round: int) -> bool:
        """Is the model evaluated after `server_round`?"""
        return self.every_round or self.generates_at(server_round, last_round) or server_round in (0, last_round)

    def generates_at(self, server_round: int, last_round: int) -> bool:
        """Does the evaluation after `server_round` generate answers?"""
        if not self.generate:
            return False
        if isinstance(self.generate_every, list):
            return server_round in self.generate_every
        every = self.generate_every
        return server_round in (0, last_round) or (every > 0 and server_round % every == 0)


DEFAULT_LEAK_PHRASES = [
    "reference answer",
    "reference response",
    "reference solution",
    "the reference",
    "your response",
    "my response",
    "the provided answer",
    "the provided response",
    "the given answer",
    "the given response",
    "as mentioned in the reference",
    "according to the reference",
]


class FilterConfig(_Section):
    """Which fallback rules are on, and their thresholds."""

    profile: Literal["safe", "paper"] = Field(
        "safe",
        description="safe: every rule below that is switched on. paper: FedSD as the paper states it, keeping "
        "every rewrite except empty ones and (when `leak` is on) those that talk about the reference.",
    )
    leak: bool = Field(True, description="Fall back when the rewrite mentions the reference.")
    degenerate: bool = Field(
        True,
        description="Fall back on empty, truncated (no eos within budget) or looping rewrites.",
    )
    inflation: bool = Field(True, description="Fall back when the rewrite is much longer.")
    max_length_ratio: float = Field(
        2.5, gt=0, description="Inflation bound: words(rewrite) > max_length_ratio x max(inflation_floor, words(reference))."
    )
    inflation_floor: int = Field(
        16,
        ge=1,
        description="Words a reference counts as at least, so a one-sentence answer to a one-word reference "
        "is not inflation.",
    )
    answer_consistency: bool = Field(
        True,
        description="On verifiable records, fall back unless the task scorer accepts the rewrite.",
    )
    max_repeat_rate: float = Field(
        0.5, ge=0, le=1, description="Looping bound on the repeated 4-gram rate of the rewrite."
    )
    leak_phrases: list[str] = Field(
        default_factory=lambda: list(DEFAULT_LEAK_PHRASES),
        description="Case-insensitive phrases that reveal the rewrite is talking about the reference.",
    )


DEFAULT_SYSTEM = (
    "Answer the instruction yourself, in your own words. A reference answer is provided: "
    "use it only as a guide to get the content right. Do not mention, quote or refer to it."
)
DEFAULT_USER = "{instruction}\n\nReference answer (for guidance only):\n{reference}"


class RewriteTemplate(_Section):
    """Text of the rewrite prompt; rendered with the model's own chat template."""

    system: str = Field(
        DEFAULT_SYSTEM,
        description="System line. Empty string: no system message (the chat template may "
        "then insert its own default).",
    )
    user: str = Field(
        DEFAULT_USER,
        description="User message; `{instruction}` is the record's prompt (instruction and "
        "input), `{reference}` its reference output.",
    )

    @field_validator("user")
    @classmethod
    def _has_placeholders(cls, value: str) -> str:
        missing = [p for p in ("{instruction}", "{reference}") if p not in value]
        if missing:
            raise ValueError(f"user template lacks {', '.join(missing)}")
        return value


class DistillConfig(_Section):
    """FedSD: rewriting the clients' data with the model before (or during) training."""

    enabled: bool = Field(False, description="Train on distilled data (Algorithm + FedSD).")
    refresh_every: int = Field(
        0,
        ge=0,
        description="0: rewrite once before round 1 with the base model; R > 0: rewrite again "
        "with the current global model every R rounds.",
    )
    do_sample: bool = Field(False, description="Sample rewrites instead of greedy decoding.")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature (do_sample only).")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling mass (do_sample only).")
    max_new_tokens_ratio: float = Field(
        2.0, gt=0, description="Token budget per record = ratio * tokens(reference), clamped."
    )
    min_new_tokens: int = Field(32, ge=1, description="Lower clamp of the token budget.")
    max_new_tokens: int = Field(256, ge=1, description="Upper clamp of the token budget.")
    batch_size: int = Field(32, ge=1, description="Rows decoded together (continuous batching).")
    template: RewriteTemplate = Field(
        default_factory=RewriteTemplate, description="Text of the rewrite prompt."
    )
    filters: FilterConfig = Field(
        default_factory=FilterConfig, description="Fallback rules (rewrite -> raw output)."
    )

    @model_validator(mode="after")
    def _check_budget(self) -> DistillConfig:
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError("min_new_tokens must be <= max_new_tokens")
        return self

    def budget(self, reference_tokens: int) -> int:
        """Token budget for a reference of `reference_tokens` tokens."""
        raw = math.ceil(self.max_new_tokens_ratio * reference_tokens)
        return max(self.min_new_tokens, min(self.max_new_tokens, raw))


class FedSDRConfig(_Section):
    schedule: Literal["alternate", "joint", "sequential"] = "alternate"
    joint_lambda: float = Field(
        1.0,
        ge=0,
        description="joint schedule: weight of the raw loss. Both adapters share one AdamW, which is "
        "invariant to a loss scale, so the weight acts as LoRA-R's learning-rate factor "
        "(lambda * L_raw under SGD is lambda * lr for R).",
    )
    frozen_dropout: bool = Field(
        False,
        description="Whether the adapter a pass does not train (frozen for it) keeps its LoRA dropout in that "
        "pass. The paper does not say. Off (our default): it is a fixed part of the model for that pass, like "
        "the frozen base, and a FedSDR step is cheaper (`benchmarks/bench_step.py --frozen-dropout`).",
    )
    smooth_r: int | None = Field(None, ge=1, description="LoRA-S rank (unset: lora.r).")
    smooth_alpha: float | None = Field(None, gt=0, description="LoRA-S alpha (unset: lora.alpha).")
    rectify_r: int | None = Field(None, ge=1, description="LoRA-R rank (unset: lora.r).")
    rectify_alpha: float | None = Field(None, gt=0, description="LoRA-R alpha (unset: lora.alpha).")
    smooth_lr: float | None = Field(None, gt=0, description="LoRA-S learning rate (unset: train.lr).")


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
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: extends must be a config file path in quotes, got {type(parent).__name__} "
                          f"{parent!r} (e.g. extends = \"base.toml\")")
    if parent:
        parent_path = (path.parent / parent).resolve()
        if parent_path in seen:
            raise ConfigError(f"{path}: `extends` loops back to {parent_path}")
        if not parent_path.is_file():
            raise ConfigError(f"{path}: extends = {parent!r}: config file not found: {parent_path}")
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
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e, origin)) from None
    if cfg.federation.dp != "none":
        from fedsdr.dp import check  # DP settings against the algorithm and the client counts

        check(cfg)
    return cfg


def config_from_json(text: str) -> RunConfig:
    return RunConfig.model_validate(json.loads(text))
