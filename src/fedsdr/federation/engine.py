"""Engines that run the same ServerApp logic and ClientApp: in one process, or on Ray.

`inprocess` (default): a Grid that hands each message straight to the ClientApp with that
node's Context, in this process; the base model is loaded once and shared by all virtual
clients. No Ray, no SuperLink, ~1 s to start.
`ray`: Flower's simulation engine (`flwr.simulation.run_simulation`), clients in Ray actors.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedsdr.config import RunConfig
from fedsdr.console import quiet_libraries, task
from fedsdr.memory import release_freed_memory
from fedsdr.runs import RunDir

SERVER_NODE_ID = 1


class InProcessGrid(Grid):
    """A Grid whose nodes are virtual clients in this process, each with its own Context
    (which persists across rounds, as on a SuperNode)."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: dict[str, Any] | None = None) -> None:
        self.client_app = client_app
        self._run = Run.create_empty(run_id=1)
        # Messages built by strategies read the sender's identity from here (a SuperLink
        # process sets it; we are the ServerApp process).
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SERVER_NODE_ID, 0
        self.contexts = {
            1000 + pid: Context(
                run_id=1, node_id=1000 + pid,
                node_config={"partition-id": pid, "num-partitions": num_nodes},
                state=RecordDict(), run_config=dict(run_config or {}),
            )
            for pid in range(num_nodes)
        }
        self._inbox: dict[str, Message] = {}
        self.sent: list[Message] = []  # every message that reached a client (for inspection)
        self.received: list[Message] = []  # every reply that reached the server

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            if msg.metadata.dst_node_id not in self.contexts:
                raise ValueError(f"no node {msg.metadata.dst_node_id}")
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            msg.metadata.__dict__["_src_node_id"] = SERVER_NODE_ID
            self._inbox[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._deliver([self._inbox.pop(mid) for mid in message_ids], timeout=None)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        # Clients run one after the other in this process, in the order they were sampled.
        ids = list(self.push_messages(messages))
        return self._deliver([self._inbox.pop(mid) for mid in ids], timeout=timeout)

    def _deliver(self, messages: list[Message], timeout: float | None) -> list[Message]:
        """Each message to its virtual client, one after the other; a client that raises answers
        with an error reply, one still busy after `timeout` seconds (each client gets the whole
        timeout: they do not run side by side here) gives no reply. Its thread cannot be
        stopped: it is left behind, as an offline node would be, and must not touch the shared
        model afterwards (a hang in the middle of training would)."""
        replies = []
        with task("clients", len(messages)) as advance:
            for msg in messages:
                self.sent.append(msg)
                box: list[Message] = []
                if timeout is None:  # no thread: each new thread costs the allocator an arena that it keeps
                    box.append(self._call(msg))
                else:
                    worker = threading.Thread(target=lambda m=msg, b=box: b.append(self._call(m)), daemon=True)
                    worker.start()
                    worker.join(timeout)
                release_freed_memory()  # one client's activations, before the next one's
                advance(1)
                if not box:
                    continue  # no reply in time
                reply = box[0]
                reply.metadata.__dict__["_message_id"] = str(uuid4())
                reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
                self.received.append(reply)
                replies.append(reply)
        return replies

    def _call(self, msg: Message) -> Message:
        try:
            return self.client_app(msg, self.contexts[msg.metadata.dst_node_id])
        except Exception as e:  # noqa: BLE001 - the ClientApp failing outside its handlers
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=type(e).__name__), reply_to=msg)


def run_inprocess(cfg: RunConfig, run: RunDir, resume: bool = False, grid: InProcessGrid | None = None) -> dict:
    from fedsdr.federation.client import client_app
    from fedsdr.federation.server import Server

    quiet_libraries()
    grid = grid or InProcessGrid(client_app, cfg.partition.num_clients)
    return Server(cfg, run).run_rounds(grid, resume=resume)


def run_ray(cfg: RunConfig, run: RunDir, resume: bool = False) -> dict:
    from flwr.simulation import run_simulation

    from fedsdr.federation.client import client_app
    from fedsdr.federation.server import Server

    quiet_libraries()
    result: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        result.update(Server(cfg, run).run_rounds(grid, resume=resume))

    started = time.perf_counter()
    run_simulation(
        server_app=server_app, client_app=client_app, num_supernodes=cfg.partition.num_clients,
        backend_config={"client_resources": {"num_cpus": cfg.federation.ray_client_cpus,
                                             "num_gpus": ray_client_gpus(cfg)},
                        "init_args": {"include_dashboard": False, "log_to_driver": True}},
    )
    if not result:
        raise RuntimeError(f"ray engine: the run ended without a result after {time.perf_counter() - started:.0f} s; "
                           "see the log above")
    return result


def ray_client_gpus(cfg: RunConfig) -> float:
    """GPUs per Ray client: the config's, else a share of one GPU per client when CUDA is there."""
    if cfg.federation.ray_client_gpus is not None:
        return cfg.federation.ray_client_gpus
    import torch

    on_gpu = cfg.model.device != "cpu" and torch.cuda.is_available()
    return 1.0 / cfg.partition.num_clients if on_gpu else 0.0


def run_federation(cfg: RunConfig, run: RunDir, resume: bool = False) -> dict:
    if cfg.federation.engine == "ray":
        return run_ray(cfg, run, resume)
    return run_inprocess(cfg, run, resume)
