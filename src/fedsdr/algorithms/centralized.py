"""Centralized: one trainer on every client's training data pooled, with the federated runs' step
budget (a reference point; simulation only: the pool is rebuilt from `data.source`).

Each round the server sends the global adapter to one node, the same every round (the lowest
node id), which takes M * K optimizer steps from it on D = union_k D_k^train, M being the
number of clients a federated round of this config samples; its adapter is the new global one:

    theta <- theta - eta_l * grad L_D(theta)          (M * K steps, same batch size)

So R rounds take R * M * K steps of B examples: the federated run's steps, and its tokens in
expectation. Evaluation is the federated runs': the global model on the global held-out set
and on every client's test split. With FedSD the trainer trains on the pool's distilled set,
each record rewritten as a client rewrites its own (base model, or the global model on a
refresh), kept under the trainer's `pool/` folder.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedsdr.algorithms.base import ClientSession, sampling_kwargs
from fedsdr.algorithms.fedavg import FedAvg
from fedsdr.config import RunConfig
from fedsdr.data.federated import build_federated_data
from fedsdr.data.partition import ClientData
from fedsdr.runs import ClientDir


def clients_per_round(cfg: RunConfig) -> int:
    """M: how many clients Flower's FedAvg samples per round under this config."""
    n, fed = cfg.partition.num_clients, cfg.federation
    return max(int(n * fed.fraction_train), min(n, fed.min_train_clients))


class OneTrainer(FlowerFedAvg):
    """Flower's FedAvg, training on one node per round, always the same (the lowest node id);
    the mean of one reply is that reply's adapter."""

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        _, nodes = sample_nodes(grid, self.min_available_nodes, 1)  # waits for the nodes to connect
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, [min(nodes)], MessageType.TRAIN)


def pooled_session(session: ClientSession) -> ClientSession:
    """The trainer's view of the pool: every client's training records, its own model, and a
    `pool/` folder on its disk for the pool's distilled set."""
    cfg = session.cfg
    pool = [r for client in build_federated_data(cfg.data, cfg.partition, cfg.seed).clients for r in client.train]
    return ClientSession(cfg=cfg, client_id=session.client_id, model=session.model, tokenizer=session.tokenizer,
                         runtime=session.runtime, data=ClientData(session.client_id, pool, []),
                         disk=ClientDir(session.disk.root / "pool"), cache_dir=session.cache_dir)


class Centralized(FedAvg):
    """FedAvg's client step, on the pool, by the one trainer `OneTrainer` picks."""

    name = "centralized"

    def strategy(self, cfg: RunConfig) -> Strategy:
        return OneTrainer(**sampling_kwargs(cfg))

    def round_plan(self, session: ClientSession) -> dict[str, Any]:
        """M * K steps on the pool (raw, or its distilled set), seeded by the pool rather than by
        the trainer's client id."""
        steps = clients_per_round(session.cfg) * session.cfg.train.local_steps
        return {"steps": steps, "pool": pooled_session(session), "seed_scope": "pool"}
