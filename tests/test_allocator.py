"""The heap allocator (`fedsdr.memory`): the `fedsdr` command restarts itself once under
jemalloc where one is found, unless told not to, and a purge hands jemalloc's freed pages back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedsdr.memory import ALLOCATOR_ENV, JEMALLOC_ENV, find_jemalloc, with_jemalloc

JEMALLOC = find_jemalloc()
needs_jemalloc = pytest.mark.skipif(JEMALLOC is None or not sys.platform.startswith("linux"),
                                    reason="no jemalloc here (Ray's wheel ships one on Linux)")

# What the `fedsdr` command does first, then which allocator serves the (restarted) process.
RESTART_AND_REPORT = (
    "import sys; from fedsdr.memory import allocator, with_jemalloc; "
    "with_jemalloc(sys.orig_argv[1:]); print(allocator())"
)


def _child(code: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k not in (ALLOCATOR_ENV, JEMALLOC_ENV, "LD_PRELOAD")}
    proc = subprocess.run([sys.executable, "-c", code], env={**base, "OMP_NUM_THREADS": "1", **env},
                          capture_output=True, text=True, timeout=120, check=True)
    return proc.stdout.strip()


def test_a_jemalloc_path_given_must_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(JEMALLOC_ENV, str(tmp_path / "missing.so"))
    assert find_jemalloc() is None
    given = tmp_path / "libjemalloc.so"
    given.write_bytes(b"")
    monkeypatch.setenv(JEMALLOC_ENV, str(given))
    assert find_jemalloc() == given


@pytest.mark.parametrize(("name", "value", "named"), [
    (ALLOCATOR_ENV, "tcmalloc", "expected 'jemalloc' or 'system'"),
    (JEMALLOC_ENV, "/nowhere/libjemalloc.so", "no such file"),
])
def test_a_bad_allocator_setting_is_named(name: str, value: str, named: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"{name}=.*{named}"):
        with_jemalloc(["-c", "pass"])  # would restart as `python -c pass` were the setting good


def test_the_fedsdr_command_names_a_bad_allocator_setting() -> None:
    env = {**os.environ, ALLOCATOR_ENV: "tcmalloc", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "fedsdr.cli", "models", "--help"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"{ALLOCATOR_ENV}='tcmalloc'" in proc.stderr


@needs_jemalloc
def test_the_command_restarts_once_under_jemalloc() -> None:
    assert _child(RESTART_AND_REPORT) == "jemalloc"


@needs_jemalloc
def test_the_system_allocator_when_asked_for() -> None:
    assert _child(RESTART_AND_REPORT, **{ALLOCATOR_ENV: "system"}) == "glibc"


@needs_jemalloc
def test_no_restart_loop_when_the_preloaded_library_does_not_serve_malloc() -> None:
    # libm exports no malloc: preloaded, the process still runs glibc's, and the restart must
    # not happen again (it would loop forever).
    maps = Path("/proc/self/maps").read_text().splitlines()
    libm = next(line.split()[-1] for line in maps if "/libm.so" in line or "/libm-" in line)
    assert _child(RESTART_AND_REPORT, **{JEMALLOC_ENV: libm}) == "glibc"


@needs_jemalloc
def test_a_purge_hands_jemallocs_freed_pages_back() -> None:
    code = (
        "import torch; from pathlib import Path; from fedsdr.memory import release_freed_memory\n"
        "def rss(): return int(next(l for l in Path('/proc/self/status').read_text().splitlines()"
        " if l.startswith('VmRSS')).split()[1]) // 1024\n"
        "before = rss(); xs = [torch.ones(2**18) for _ in range(256)]\n"  # 256 MiB in 1 MiB tensors
        "del xs; kept = rss(); release_freed_memory(); print(before, kept, rss())"
    )
    # dirty_decay_ms:-1: jemalloc itself never hands freed pages back, so only the purge can
    before, kept, after = map(int, _child(code, LD_PRELOAD=str(JEMALLOC), MALLOC_CONF="dirty_decay_ms:-1").split())
    assert kept - before > 200  # freed, still resident
    assert after - before < 32  # handed back
