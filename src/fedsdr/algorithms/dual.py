"""Two adapters on one model, one global and one local, trained together on each client: the
shared client step of FedSDR and the FedDPA-style ablation, which differ only in the data each
stream trains on (`stream_examples`).

Both adapters sit on the same target modules and are summed in the forward pass
(h = W0 x + B_L A_L x * s_L + B_G A_G x * s_G). Each local step (schedule `fedsdr.schedule`,
"alternate" by default) takes one batch of the local stream, which updates only the local
adapter, and one batch of the global stream, which updates only the global adapter; both are
active in every forward pass. The global stream carries the server strategy's proximal term
when it sends one (FedProx). Only the global adapter is uploaded and aggregated, by the
strategy `federation.server_strategy` names. Ranks, alphas and the local learning rate come
from the [fedsdr] section (the local adapter as LoRA-S, the global one as LoRA-R).
"""

from __future__ import annotations

from typing import Any, ClassVar

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
from fedsdr.config import RunConfig
from fedsdr.console import task
from fedsdr.models import adapters as ad
from fedsdr.train import Example, dual_stream_steps, make_stream

# (local stream's examples, global stream's examples, records dropped as too long, FedSD
# diagnostics): what `DualAdapter.stream_examples` gives a round.
StreamExamples = tuple[list[Example], list[Example], int, dict[str, float]]


def quiet_when_frozen(cfg: RunConfig, model: torch.nn.Module, adapter: str) -> list[torch.nn.Module]:
    """What goes to eval mode while `adapter` is frozen for the other adapter's pass: its LoRA
    dropouts (a fixed part of the model then, like the base), unless `fedsdr.frozen_dropout`
    (the paper does not say)."""
    return [] if cfg.fedsdr.frozen_dropout else ad.adapter_dropouts(model, adapter)


class DualAdapter(Algorithm):
    """A global adapter (aggregated) and a local adapter (kept on its client)."""

    local_adapter: ClassVar[str]

    def adapters(self, cfg: RunConfig) -> list[ad.AdapterSpec]:
        s, lora = cfg.fedsdr, cfg.lora
        return [
            ad.AdapterSpec(self.global_adapter, s.rectify_r or lora.r, s.rectify_alpha or lora.alpha),
            ad.AdapterSpec(self.local_adapter, s.smooth_r or lora.r, s.smooth_alpha or lora.alpha),
        ]

    def strategy(self, cfg: RunConfig) -> Strategy:
        return server_strategy(cfg)

    def stream_examples(self, session: ClientSession, server_round: int,
                        global_state: ad.AdapterState) -> StreamExamples:
        """(local stream's examples, global stream's examples, records dropped as too long,
        FedSD diagnostics) for this round."""
        raise NotImplementedError

    def train(self, session: ClientSession, global_state: ad.AdapterState, server_round: int,
              config: dict[str, Any], local_state: LocalState, received: dict[str, ad.AdapterState]) -> TrainResult:
        cfg, model, g, loc = session.cfg, session.model, self.global_adapter, self.local_adapter
        local_examples, global_examples, dropped, metrics = self.stream_examples(session, server_round, global_state)
        ad.set_adapter_state(model, g, global_state)
        ad.set_adapter_state(model, loc, local_state[loc])
        ad.activate(model, [g, loc], trainable=[g, loc])
        seed = lambda purpose: derive_seed(cfg.seed, purpose, server_round, session.client_id)  # noqa: E731
        local = make_stream(local_examples, ad.adapter_parameters(model, loc), cfg.train, seed(loc),
                            lr_scale=(cfg.fedsdr.smooth_lr or cfg.train.lr) / cfg.train.lr,
                            quiet_when_frozen=quiet_when_frozen(cfg, model, loc))
        glob = make_stream(global_examples, ad.adapter_parameters(model, g), cfg.train, seed(g),
                           proximal_mu=proximal_mu(config), quiet_when_frozen=quiet_when_frozen(cfg, model, g))
        torch.manual_seed(seed("dropout"))
        steps = cfg.train.local_steps
        with task(f"client {session.client_id}: local steps ({loc} + {g})", steps) as advance:
            local_stats, global_stats = dual_stream_steps(
                model, local, glob, cfg.train, schedule=cfg.fedsdr.schedule, steps=steps,
                first_step=(server_round - 1) * steps, total_steps=cfg.federation.rounds * steps,
                pad_id=session.tokenizer.pad_token_id, autocast=session.runtime.autocast,
                joint_lambda=cfg.fedsdr.joint_lambda, on_step=lambda step, loss: advance(1),
            )
        ad.activate(model, [g, loc], trainable=[])
        metrics.update(
            train_loss=global_stats.mean_loss, local_loss=local_stats.mean_loss, steps=float(steps),
            tokens=float(global_stats.tokens + local_stats.tokens),
            seconds=global_stats.seconds + local_stats.seconds, dropped_too_long=float(dropped),
        )
        return TrainResult(ad.get_adapter_state(model, g), len(global_examples), metrics,
                           local_state={loc: ad.get_adapter_state(model, loc)})
