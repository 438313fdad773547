"""FedDPA-style dual adapter (after Yang et al., 2024): FedSDR's machinery with both streams on
the same data, the ablation that isolates what FedSDR's rewriting adds (`fedsdr.algorithms.dual`).

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

from fedsdr.algorithms.base import ClientSession
from fedsdr.algorithms.dual import DualAdapter, StreamExamples
from fedsdr.algorithms.one_adapter import train_examples
from fedsdr.models.adapters import AdapterState

GLOBAL, LOCAL = "dpa_global", "dpa_local"


class FedDPA(DualAdapter):
    name = "feddpa"
    global_adapter = GLOBAL
    local_adapter = LOCAL

    def stream_examples(self, session: ClientSession, server_round: int,
                        global_state: AdapterState) -> StreamExamples:
        """Both adapters learn from the same data: raw, or with FedSD the distilled set."""
        examples, dropped, metrics = train_examples(session, server_round, GLOBAL, global_state)
        return examples, examples, dropped, metrics
