"""FedSDR: federated self-distillation with rectification (ICML 2026).

Two LoRA adapters on the same target modules, summed in the forward pass:
    h = W0 x + B_S A_S x * s_S + B_R A_R x * s_R
LoRA-S ("smooth") is local: created on a client's first round, kept on that client across
rounds, never sent. LoRA-R ("rectify") is global: the server sends, receives and aggregates it.

Local training on client k in round t (schedule "alternate" by default): each step takes one
batch of the distilled set, which updates only S, and one batch of raw data, which updates
only R; both adapters are active in every forward pass. Only R is uploaded, so each client
sends exactly the bytes of R, and any server strategy of the FedAvg family aggregates it.

Models that come out: the global model W0 + R, and client k's personalized model W0 + S_k + R.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from flwr.serverapp.strategy import Strategy

from fedsdr import progress
from fedsdr.algorithms.base import Algorithm, ClientSession, TrainResult, derive_seed
from fedsdr.algorithms.fedsd import distill_metrics, distilled_training_records
from fedsdr.config import RunConfig
from fedsdr.models.adapters import (
    AdapterSpec,
    AdapterState,
    activate,
    adapter_parameters,
    fresh_adapter_state,
    get_adapter_state,
    load_adapter_file,
    save_peft_adapter,
    set_adapter_state,
)
from fedsdr.train import dual_stream_steps, make_stream

SMOOTH, RECTIFY = "smooth", "rectify"


def smooth_dir(session: ClientSession, server_round: int) -> Path:
    """LoRA-S after `server_round`, as a PEFT adapter folder on the client's own disk."""
    return session.state_dir / "smooth" / f"round-{server_round:03d}"


def load_smooth(session: ClientSession, server_round: int, client_state: dict[str, Any]) -> AdapterState:
    """LoRA-S as this client left it after its last round before `server_round`.

    Kept in memory between rounds (Flower Context state), and on the client's own disk so a
    resumed run (or a SuperNode that restarts) continues from it; fresh on the first round.
    """
    if SMOOTH in client_state:
        return client_state[SMOOTH]
    earlier = [smooth_dir(session, r) for r in range(server_round - 1, 0, -1)]
    for folder in earlier:
        if (folder / "adapter_model.safetensors").exists():
            return load_adapter_file(folder)
    return fresh_adapter_state(session.model, SMOOTH, derive_seed(session.cfg.seed, "smooth-init", session.client_id))


class FedSDR(Algorithm):
    name = "fedsdr"
    global_adapter = RECTIFY

    def adapters(self, cfg: RunConfig) -> list[AdapterSpec]:
        s = cfg.fedsdr
        return [
            AdapterSpec(RECTIFY, s.rectify_r or cfg.lora.r, s.rectify_alpha or cfg.lora.alpha),
            AdapterSpec(SMOOTH, s.smooth_r or cfg.lora.r, s.smooth_alpha or cfg.lora.alpha),
        ]

    def strategy(self, cfg: RunConfig) -> Strategy:
        # LoRA-R is aggregated by any strategy of the FedAvg family.
        from fedsdr.algorithms import get_algorithm

        return get_algorithm(cfg.federation.server_strategy).strategy(cfg)

    def proximal_mu(self, config: dict[str, Any]) -> float:
        return float(config.get("proximal-mu", 0.0))

    def train(self, session: ClientSession, global_state: AdapterState, server_round: int,
              config: dict[str, Any], client_state: dict[str, Any]) -> TrainResult:
        cfg, model = session.cfg, session.model
        distilled = distilled_training_records(session, server_round, RECTIFY, global_state)
        distilled_examples, dropped_d = session.encoded(f"distilled-{session.distill_key}", distilled)
        raw_examples, dropped = session.raw_examples()

        set_adapter_state(model, RECTIFY, global_state)
        set_adapter_state(model, SMOOTH, load_smooth(session, server_round, client_state))
        activate(model, [RECTIFY, SMOOTH], trainable=[RECTIFY, SMOOTH])
        seed = lambda purpose: derive_seed(cfg.seed, purpose, server_round, session.client_id)  # noqa: E731
        smooth = make_stream(distilled_examples, adapter_parameters(model, SMOOTH), cfg.train, seed("smooth"),
                             lr_scale=(cfg.fedsdr.smooth_lr / cfg.train.lr) if cfg.fedsdr.smooth_lr else 1.0)
        rectify = make_stream(raw_examples, adapter_parameters(model, RECTIFY), cfg.train, seed("rectify"))
        torch.manual_seed(seed("dropout"))
        steps = cfg.train.local_steps
        with progress.task(f"client {session.client_id}: local steps (S+R)", steps) as advance:
            smooth_stats, rectify_stats = dual_stream_steps(
                model, smooth, rectify, cfg.train, schedule=cfg.fedsdr.schedule, steps=steps,
                first_step=(server_round - 1) * steps, total_steps=cfg.federation.rounds * steps,
                pad_id=session.tokenizer.pad_token_id, autocast=session.runtime.autocast,
                joint_lambda=cfg.fedsdr.joint_lambda, on_step=lambda step, loss: advance(1),
            )
        activate(model, [RECTIFY, SMOOTH], trainable=[])
        client_state[SMOOTH] = get_adapter_state(model, SMOOTH)  # stays on the client
        save_peft_adapter(smooth_dir(session, server_round), client_state[SMOOTH], self.adapters(cfg)[1],
                          cfg.lora, cfg.model.name)
        metrics = {
            "train_loss": rectify_stats.mean_loss,
            "smooth_loss": smooth_stats.mean_loss,
            "steps": float(steps),
            "tokens": float(rectify_stats.tokens + smooth_stats.tokens),
            "seconds": rectify_stats.seconds + smooth_stats.seconds,
            "dropped_too_long": float(dropped + dropped_d),
            **distill_metrics(session),
        }
        return TrainResult(get_adapter_state(model, RECTIFY), len(raw_examples), metrics)
