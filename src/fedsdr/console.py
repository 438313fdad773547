"""The console: one shared rich display (rounds, clients, steps and generation bars nest in it),
and keeping library chatter (Flower INFO logs, weight-loading bars, deprecations) off it."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# Off a terminal (logs, CI) rich would wrap tables at 80 columns: give them room.
console = Console(width=None if sys.stdout.isatty() else 160)
_active: Progress | None = None


def enabled() -> bool:
    """Bars on a terminal; FEDSDR_PROGRESS=1 forces them on, =0 off."""
    setting = os.environ.get("FEDSDR_PROGRESS", "")
    return setting == "1" or (setting != "0" and sys.stdout.isatty())


@contextmanager
def live() -> Iterator[None]:
    """Open the shared display for the duration of a command (no-op when not a terminal)."""
    global _active
    if _active is not None or not enabled():
        yield
        return
    _active = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), console=console, transient=False,
    )
    try:
        with _active:
            yield
    finally:
        _active = None


@contextmanager
def task(description: str | None, total: int) -> Iterator[Callable[[int], None]]:
    """Yield `advance(k)` for a bar in the shared display; a no-op without one."""
    if description is None or _active is None:
        yield lambda k: None
        return
    progress = _active
    task_id = progress.add_task(description, total=total)
    try:
        yield lambda k: progress.advance(task_id, k)
    finally:
        progress.remove_task(task_id)


def quiet_libraries() -> None:
    """Keep Flower, transformers and Ray logs, bars and telemetry off the console."""
    for key, value in {
        "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "TOKENIZERS_PARALLELISM": "false",
    }.items():
        os.environ.setdefault(key, value)
    import logging
    import warnings

    import transformers

    logging.getLogger("flwr").setLevel(logging.WARNING)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", message="Classes: .* will NOT be used", category=UserWarning)
