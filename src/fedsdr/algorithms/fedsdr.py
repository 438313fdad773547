"""FedSDR: federated self-distillation with rectification (ICML 2026).

Two LoRA adapters on the same target modules, summed in the forward pass:
    h = W0 x + B_S A_S x * s_S + B_R A_R x * s_R
LoRA-S ("smooth") is local: created on a client's first round, kept on that client across
rounds (the local state of `Algorithm`), never sent. LoRA-R ("rectify") is global: the server
sends, receives and aggregates it, with the strategy `federation.server_strategy` names.

Local training on client k in round t (schedule "alternate" by default): each step takes one
batch of the distilled set, which updates only S, and one batch of raw data, which updates
only R; both adapters are active in every forward pass (`fedsdr.algorithms.dual`). When the
server strategy is FedProx, R's stream adds mu/2 * ||R - R_global||^2 (S has no global
anchor). Only R is uploaded, so each client sends exactly the bytes of R.

Models that come out: the global model W0 + R, and client k's personalized model W0 + S_k + R.
"""

from __future__ import annotations

from fedsdr.algorithms.base import ClientSession
from fedsdr.algorithms.dual import DualAdapter, StreamExamples
from fedsdr.algorithms.fedsd import client_distilled_set, diagnostic_metrics
from fedsdr.models.adapters import AdapterState

SMOOTH, RECTIFY = "smooth", "rectify"


class FedSDR(DualAdapter):
    name = "fedsdr"
    global_adapter = RECTIFY
    local_adapter = SMOOTH

    def stream_examples(self, session: ClientSession, server_round: int, global_state: AdapterState) -> StreamExamples:
        """S learns from the distilled set, R from the raw data."""
        distilled = client_distilled_set(session, server_round, RECTIFY, global_state)
        distilled_examples, dropped_distilled = session.encoded(f"distilled-{session.distilled_from_round}", distilled)
        raw_examples, dropped_raw = session.raw_examples()
        return distilled_examples, raw_examples, dropped_raw + dropped_distilled, diagnostic_metrics(session)
