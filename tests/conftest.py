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
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist runs two workers (`-n 2` in pyproject.toml): each computes on one thread, or
    # their OMP threads fight over the cores (10-20x slower on 2 cores). The variables reach the
    # tests' subprocesses; set_num_threads covers a torch a plugin may have imported already.
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
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


# Modules whose tests share a costly module or session fixture (a grid run, a prepared SmolLM2,
# an lm-eval run): pytest-xdist runs each of them whole on one worker, so the fixture is built
# once while the other worker goes on with other tests. Every other test is its own unit.
WHOLE_MODULES = frozenset({"tests/test_grid.py", "tests/test_lm_eval.py", "tests/test_models_bundled.py"})


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist's, unknown under `-p no:xdist`
def pytest_xdist_make_scheduler(config: pytest.Config, log):  # noqa: ANN001, ANN201
    """`-n N` (xdist's `load`), but WHOLE_MODULES kept whole. (`--dist loadgroup` would do it by
    marks, but under pytest 9.2 xdist 3.8 can no longer tag the test ids it groups by.)"""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class WholeModulesScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module in WHOLE_MODULES else nodeid

    return WholeModulesScheduling(config, log)


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
