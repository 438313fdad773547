"""Shared fixtures: a tiny random model, small configs, no hub access, no progress bars, a
cache of the session's own."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["FEDSDR_PROGRESS"] = "0"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# fedsdr's cache (rewrites, base-model evaluations) in a folder of this test session, not in
# ~/.cache/fedsdr: a rerun on the same machine would otherwise read an earlier run's rewrites
# instead of computing them (their keys are deterministic), and tests would leave files there.
_CACHE = tempfile.mkdtemp(prefix="fedsdr-test-cache-")
os.environ["FEDSDR_CACHE"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

import pytest  # noqa: E402

from fedsdr.config import RunConfig, load_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def tiny_config(*overrides: str) -> RunConfig:
    """configs/smoke.toml (tiny random model, bundled benchmark) with overrides."""
    return load_config(ROOT / "configs" / "smoke.toml", list(overrides))


@pytest.fixture
def smoke_config() -> RunConfig:
    return tiny_config()


@pytest.fixture(scope="module")
def one_torch_thread():  # noqa: ANN201
    """Tiny-model matmuls are too small to share: with 2 OMP threads on a busy 2-core machine
    such tests ran 10x slower. Modules opt in with `pytestmark`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_numbers_only(reply, domains: set[str]) -> None:  # noqa: ANN001
    """A client's reply carries adapter tensors and numbers; the one ConfigRecord says which
    figure is which (model labels, domain names) and holds nothing else."""
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

    for name, record in reply.content.items():
        if isinstance(record, ConfigRecord):
            assert name == "evaluation" and set(record) == {"models", "splits", "domains"}
            assert set(record["models"]) <= {"global", "personalized"}
            assert set(record["splits"]) <= {"client_test", "general"}
            assert set(record["domains"]) <= domains | {"all"}
            continue
        assert isinstance(record, ArrayRecord | MetricRecord), type(record)
        if isinstance(record, MetricRecord):
            values = [x for v in record.values() for x in (v if isinstance(v, list) else [v])]
            assert all(isinstance(x, int | float) for x in values)


# Fixtures of the loopback deployment tests: a FLWR_HOME of the test's own, and the Flower
# processes it starts, stopped at teardown.
@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    from deploy_utils import flower_env

    return flower_env(tmp_path)


@pytest.fixture
def procs(tmp_path: Path, env: dict[str, str]):  # noqa: ANN201
    from deploy_utils import running_processes

    yield from running_processes(tmp_path, env)
