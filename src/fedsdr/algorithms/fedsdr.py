"""FedSDR: federated self-distillation with rectification (ICML 2026).

Two LoRA adapters on the same target modules, summed in the forward pass:
    h = W0 x + B_S A_S x * s_S + B_R A_R x * s_R
LoRA-S ("smooth") is local: created on a client's first round, kept on that client across
rounds (the local state of `Algorithm`), never sent. LoRA-R ("rectify") is global: the server
sends, receives and aggregates it, with the strategy `federation.server_strategy` names.

Local training on client k in round t (schedule "alternate" by default): each step takes one
batch of the distilled set, which updates only S, and one batch of raw data, which updates
only R; both adapters are active in every forward pass. When the server strategy is FedProx,
R's stream adds mu/2 * ||R - R_global||^2 (S has no global anchor). Only R is uploaded, so
each client sends exactly the bytes of R.

Models that come out: the global model W0 + R, and client k's personalized model W0 + S_k + R.
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.serverapp.strategy import Strategy

from fedsdr.algorithms.aggregators import server_strategy
from fedsdr.algorithms.base import (
    Algorithm,
    ClientSession,
    LocalState,
    TrainResult,
    derive_seed,
    proximal_mu,
)
from fedsdr.algorithms.fedsd import client_distilled_set, diagnostic_metrics
from fedsdr.config import RunConfig
from fedsdr.console import task
from fedsdr.models.adapters import (
    AdapterSpec,
    AdapterState,
    activate,
    adapter_parameters,
    get_adapter_state,
    set_adapter_state,
)
from fedsdr.train import dual_stream_steps, make_stream

SMOOTH, RECTIFY = "smooth", "rectify"


class FedSDR(Algorithm):
    name = "fedsdr"
    global_adapter = RECTIFY

    def adapters(self, cfg: RunConfig) -> list[AdapterSpec]:
        s, lora = cfg.fedsdr, cfg.lora
        return [
            AdapterSpec(RECTIFY, s.rectify_r or lora.r, s.rectify_alpha or lora.alpha),
            AdapterSpec(SMOOTH, s.smooth_r or lora.r, s.smooth_alpha or lora.alpha),
        ]

    def strategy(self, cfg: RunConfig) -> Strategy:
        return server_strategy(cfg)

    def train(self, session: ClientSession, global_state: AdapterState, server_round: int,
              config: dict[str, Any], local_state: LocalState, received: dict[str, AdapterState]) -> TrainResult:
        cfg, model = session.cfg, session.model
        distilled = client_distilled_set(session, server_round, RECTIFY, global_state)
        distilled_examples, dropped_d = session.encoded(f"distilled-{session.distilled_from_round}", distilled)
        raw_examples, dropped = session.raw_examples()

        set_adapter_state(model, RECTIFY, global_state)
        set_adapter_state(model, SMOOTH, local_state[SMOOTH])
        activate(model, [RECTIFY, SMOOTH], trainable=[RECTIFY, SMOOTH])
        seed = lambda purpose: derive_seed(cfg.seed, purpose, server_round, session.client_id)  # noqa: E731
        smooth = make_stream(distilled_examples, adapter_parameters(model, SMOOTH), cfg.train, seed("smooth"),
                             lr_scale=(cfg.fedsdr.smooth_lr or cfg.train.lr) / cfg.train.lr)
        rectify = make_stream(raw_examples, adapter_parameters(model, RECTIFY), cfg.train, seed("rectify"),
                              proximal_mu=proximal_mu(config))
        torch.manual_seed(seed("dropout"))
        steps = cfg.train.local_steps
        with task(f"client {session.client_id}: local steps (S+R)", steps) as advance:
            smooth_stats, rectify_stats = dual_stream_steps(
                model, smooth, rectify, cfg.train, schedule=cfg.fedsdr.schedule, steps=steps,
                first_step=(server_round - 1) * steps, total_steps=cfg.federation.rounds * steps,
                pad_id=session.tokenizer.pad_token_id, autocast=session.runtime.autocast,
                joint_lambda=cfg.fedsdr.joint_lambda, on_step=lambda step, loss: advance(1),
            )
        activate(model, [RECTIFY, SMOOTH], trainable=[])
        metrics = {
            "train_loss": rectify_stats.mean_loss,
            "smooth_loss": smooth_stats.mean_loss,
            "steps": float(steps),
            "tokens": float(rectify_stats.tokens + smooth_stats.tokens),
            "seconds": rectify_stats.seconds + smooth_stats.seconds,
            "dropped_too_long": float(dropped + dropped_d),
            **diagnostic_metrics(session),
        }
        return TrainResult(get_adapter_state(model, RECTIFY), len(raw_examples), metrics,
                           local_state={SMOOTH: get_adapter_state(model, SMOOTH)})
