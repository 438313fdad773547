"""Local training of one adapter, the client step FedAvg runs, shared by SCAFFOLD, Local-only and
Centralized: the round's training examples (raw, or FedSD's distilled set) and K optimizer
steps of one stream from a starting state, with the same seeds as FedAvg's client."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from peft import PeftModel

from fedsdr.algorithms.base import ClientSession, TrainResult, derive_seed
from fedsdr.algorithms.fedsd import client_distilled_set, diagnostic_metrics
from fedsdr.console import task
from fedsdr.models.adapters import (
    AdapterState,
    activate,
    adapter_parameters,
    get_adapter_state,
    set_adapter_state,
)
from fedsdr.train import Example, Stream, lr_at, make_stream, sft_steps


def parameter_keys(model: PeftModel, adapter: str) -> list[str]:
    """The state key (as in `get_adapter_state`) of each tensor `adapter_parameters` lists, in its order."""
    marker = f".{adapter}."
    keys = [name.replace(marker, ".") for name, _ in model.named_parameters() if "lora_" in name and marker in name]
    if sorted(keys) != sorted(get_adapter_state(model, adapter)):
        raise ValueError(f"adapter {adapter!r}: parameter names do not map onto its state keys")
    return keys


def train_examples(
    session: ClientSession, server_round: int, rewriter: str, rewriter_state: AdapterState,
    *, pool: ClientSession | None = None,
) -> tuple[list[Example], int, dict[str, float]]:
    """(examples, records dropped as too long, FedSD diagnostics) the client trains on this round:
    the records of `pool` (default: the client's own), raw, or with FedSD their distilled set,
    rewritten by the base model or, on a refresh, by W0 + `rewriter` at `rewriter_state`."""
    source = pool or session
    prefix = "pool-" if pool is not None else ""
    if session.cfg.distill.enabled:
        records = client_distilled_set(source, server_round, rewriter, rewriter_state)
        examples, dropped = session.encoded(f"{prefix}distilled-{source.distilled_from_round}", records)
        return examples, dropped, diagnostic_metrics(source)
    examples, dropped = session.encoded(f"{prefix}raw", source.data.train)
    return examples, dropped, {}


@dataclass
class AdapterRound:
    """One adapter after a client's local steps."""

    state: AdapterState
    metrics: dict[str, float]
    lr_sum: float  # sum of the learning rates of the steps taken (K * eta_l under a constant schedule)


def train_adapter(
    session: ClientSession, adapter: str, start: AdapterState, examples: list[Example], server_round: int, *,
    steps: int, seed_scope: object = None, proximal_mu: float = 0.0,
    on_stream: Callable[[Stream, list[str]], None] | None = None,
) -> AdapterRound:
    """`steps` optimizer steps of `adapter` from `start` (only it active and trainable), the
    round's share of a schedule over `federation.rounds * steps` steps. `seed_scope` (default:
    the client id) picks the batches and dropout, as FedAvg's client does. `on_stream` sees the
    stream before training, with the state key of each of its parameters (e.g. to hook its
    optimizer)."""
    cfg, model = session.cfg, session.model
    scope = session.client_id if seed_scope is None else seed_scope
    set_adapter_state(model, adapter, start)
    activate(model, [adapter], trainable=[adapter])
    params = adapter_parameters(model, adapter)
    stream = make_stream(examples, params, cfg.train, seed=derive_seed(cfg.seed, "batches", server_round, scope),
                         proximal_mu=proximal_mu)
    if on_stream is not None:
        on_stream(stream, parameter_keys(model, adapter))
    torch.manual_seed(derive_seed(cfg.seed, "dropout", server_round, scope))
    first, total = (server_round - 1) * steps, cfg.federation.rounds * steps
    with task(f"client {session.client_id}: local steps", steps) as advance:
        stats = sft_steps(model, stream, cfg.train, steps=steps, first_step=first, total_steps=total,
                          pad_id=session.tokenizer.pad_token_id, autocast=session.runtime.autocast,
                          on_step=lambda step, loss: advance(1))
    activate(model, [adapter], trainable=[])
    metrics = {"train_loss": stats.mean_loss, "steps": float(steps), "tokens": float(stats.tokens),
               "seconds": stats.seconds}
    lr_sum = sum(lr_at(cfg.train, first + k, total) for k in range(steps))
    return AdapterRound(get_adapter_state(model, adapter), metrics, lr_sum)


def train_global_adapter(
    session: ClientSession, adapter: str, global_state: AdapterState, server_round: int, *,
    steps: int, pool: ClientSession | None = None, seed_scope: object = None, proximal_mu: float = 0.0,
) -> TrainResult:
    """FedAvg's client round: `steps` optimizer steps of the global `adapter` from `global_state`
    on the round's examples (`train_examples`, of `pool` when given); metrics are the FedSD
    diagnostics, the training metrics and `dropped_too_long`."""
    examples, dropped, metrics = train_examples(session, server_round, adapter, global_state, pool=pool)
    trained = train_adapter(session, adapter, global_state, examples, server_round, steps=steps,
                            seed_scope=seed_scope, proximal_mu=proximal_mu)
    metrics.update(trained.metrics, dropped_too_long=float(dropped))
    return TrainResult(trained.state, len(examples), metrics)
