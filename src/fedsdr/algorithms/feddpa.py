"""FedDPA-style dual adapter (after Yang et al., 2024): FedSDR's machinery with both streams on
the same data, the ablation that isolates what FedSDR's rewriting adds.

Two LoRA adapters on the same target modules, summed in the forward pass:
    h = W0 x + B_L A_L x * s_L + B_G A_G x * s_G
the local adapter L ("dpa_local") stays on client k across rounds, never sent; the global
adapter G ("dpa_global") is sent, received and aggregated by the strategy
`federation.server_strategy` names (FedAvg by default; FedProx adds its term to G's stream).
Each local step (schedule `fedsdr.schedule`, "alternate" by default) takes one raw batch that
updates only L and one raw batch that updates only G, both adapters active:

    L <- L - eta_l * grad_L  l(batch_1; L, G)          G <- G - eta_l * grad_G  l(batch_2; L, G)

Ranks, alphas and L's learning rate come from the [fedsdr] section (L as LoRA-S, G as LoRA-R),
so FedDPA and FedSDR differ only in L's data: raw here, distilled in FedSDR. With FedSD
(`distill.enabled`) both streams train on the distilled set ("FedDPA + FedSD").
Models: global W0 + G, client k's personalized W0 + L_k + G.
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
from fedsdr.algorithms.one_adapter import train_examples
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

GLOBAL, LOCAL = "dpa_global", "dpa_local"


class FedDPA(Algorithm):
    name = "feddpa"
    global_adapter = GLOBAL

    def adapters(self, cfg: RunConfig) -> list[AdapterSpec]:
        s, lora = cfg.fedsdr, cfg.lora
        return [
            AdapterSpec(GLOBAL, s.rectify_r or lora.r, s.rectify_alpha or lora.alpha),
            AdapterSpec(LOCAL, s.smooth_r or lora.r, s.smooth_alpha or lora.alpha),
        ]

    def strategy(self, cfg: RunConfig) -> Strategy:
        return server_strategy(cfg)

    def train(self, session: ClientSession, global_state: AdapterState, server_round: int,
              config: dict[str, Any], local_state: LocalState, received: dict[str, AdapterState]) -> TrainResult:
        cfg, model = session.cfg, session.model
        examples, dropped, metrics = train_examples(session, server_round, GLOBAL, global_state)
        set_adapter_state(model, GLOBAL, global_state)
        set_adapter_state(model, LOCAL, local_state[LOCAL])
        activate(model, [GLOBAL, LOCAL], trainable=[GLOBAL, LOCAL])
        seed = lambda purpose: derive_seed(cfg.seed, purpose, server_round, session.client_id)  # noqa: E731
        local = make_stream(examples, adapter_parameters(model, LOCAL), cfg.train, seed("local"),
                            lr_scale=(cfg.fedsdr.smooth_lr or cfg.train.lr) / cfg.train.lr)
        shared = make_stream(examples, adapter_parameters(model, GLOBAL), cfg.train, seed("global"),
                             proximal_mu=proximal_mu(config))
        torch.manual_seed(seed("dropout"))
        steps = cfg.train.local_steps
        with task(f"client {session.client_id}: local steps (L+G)", steps) as advance:
            local_stats, global_stats = dual_stream_steps(
                model, local, shared, cfg.train, schedule=cfg.fedsdr.schedule, steps=steps,
                first_step=(server_round - 1) * steps, total_steps=cfg.federation.rounds * steps,
                pad_id=session.tokenizer.pad_token_id, autocast=session.runtime.autocast,
                joint_lambda=cfg.fedsdr.joint_lambda, on_step=lambda step, loss: advance(1),
            )
        activate(model, [GLOBAL, LOCAL], trainable=[])
        metrics.update(
            train_loss=global_stats.mean_loss, local_loss=local_stats.mean_loss, steps=float(steps),
            tokens=float(global_stats.tokens + local_stats.tokens),
            seconds=global_stats.seconds + local_stats.seconds, dropped_too_long=float(dropped),
        )
        return TrainResult(get_adapter_state(model, GLOBAL), len(examples), metrics,
                           local_state={LOCAL: get_adapter_state(model, LOCAL)})
