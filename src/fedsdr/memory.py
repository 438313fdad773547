"""The process's memory: which heap allocator runs, handing freed memory back, jemalloc, and
the pages of a memory-mapped checkpoint that loading no longer needs.

A training step allocates and frees hundreds of activation tensors of 0.5-3 MiB each. glibc's
malloc serves them from one heap that fragments: on the quickstart round its resident set
stayed ~0.6 GiB above the live bytes (`benchmarks/bench_memory.py --sample-live`). jemalloc
(size-classed extents, the allocator PyTorch's CPU performance guide recommends) keeps the
resident set close to the live bytes at the same speed. An allocator can only be chosen when
a process starts, so `fedsdr` (the CLI) restarts itself once with jemalloc preloaded when it
finds one (`with_jemalloc`), unless `FEDSDR_ALLOCATOR=system`.

Where jemalloc comes from, in this order: `FEDSDR_JEMALLOC` (a path), the system's
`libjemalloc` (Debian: `apt install libjemalloc2`), the copy Ray's wheel ships (Ray is
installed with Flower's simulation extra).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import sys
from pathlib import Path

ALLOCATOR_ENV = "FEDSDR_ALLOCATOR"  # "jemalloc" (the default, where one is found) or "system"
JEMALLOC_ENV = "FEDSDR_JEMALLOC"  # the path of a libjemalloc.so to preload
_ARENAS_ALL = 4096  # jemalloc's MALLCTL_ARENAS_ALL: "arena.4096.purge" purges every arena


def _process_symbols() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None)
    except (OSError, TypeError):  # Windows has no "this process" library handle
        return None


# A process keeps the allocator it started with: look its symbols up once.
_SYMBOLS = _process_symbols()


def allocator() -> str:
    """'jemalloc' when jemalloc serves this process's malloc, 'glibc', or 'other'."""
    if _SYMBOLS is None:
        return "other"
    if hasattr(_SYMBOLS, "mallctl"):
        return "jemalloc"
    if sys.platform.startswith("linux") and hasattr(_SYMBOLS, "malloc_trim"):
        return "glibc"
    return "other"


def release_freed_memory() -> None:
    """Hand the heap memory freed by the last phase (a client's training, an evaluation) back to
    the OS, so that the next phase starts from the live bytes: glibc keeps freed chunks of its
    heap resident (`malloc_trim`), jemalloc keeps freed pages for ~10 s (a purge). Takes
    milliseconds; a no-op under other allocators."""
    kind = allocator()
    if kind == "jemalloc":
        _SYMBOLS.mallctl(f"arena.{_ARENAS_ALL}.purge".encode(), None, None, None, ctypes.c_size_t(0))
    elif kind == "glibc":
        _SYMBOLS.malloc_trim(0)


def find_jemalloc() -> Path | None:
    """A libjemalloc that can be preloaded, or None (see the module's docstring for the order)."""
    given = os.environ.get(JEMALLOC_ENV)
    if given:
        return Path(given) if Path(given).is_file() else None
    name = ctypes.util.find_library("jemalloc")
    if name:
        for folder in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                       "/usr/local/lib"):
            if (Path(folder) / name).is_file():
                return Path(folder) / name
    spec = importlib.util.find_spec("ray")  # without importing Ray
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            bundled = Path(folder) / "core" / "libjemalloc.so"
            if bundled.is_file():
                return bundled
    return None


def with_jemalloc(argv: list[str]) -> None:
    """Restart this process as `python ARGV...` (`os.execve`) with jemalloc preloaded, where the
    platform is Linux, glibc's malloc runs, a jemalloc is found, and `FEDSDR_ALLOCATOR` is not
    `system`. Returns (doing nothing) in every other case, and after a restart that did not
    take (the library preloaded, yet not serving malloc). Call it before anything heavy runs.
    Raises ValueError for a `FEDSDR_ALLOCATOR` it does not know or a `FEDSDR_JEMALLOC` that is
    no file."""
    wanted = os.environ.get(ALLOCATOR_ENV, "jemalloc")
    if wanted not in ("jemalloc", "system"):
        raise ValueError(f"{ALLOCATOR_ENV}={wanted!r}: expected 'jemalloc' or 'system'")
    if not sys.platform.startswith("linux") or wanted == "system" or allocator() != "glibc":
        return
    library = find_jemalloc()
    if library is None and os.environ.get(JEMALLOC_ENV):
        raise ValueError(f"{JEMALLOC_ENV}={os.environ[JEMALLOC_ENV]!r}: no such file")
    preloaded = os.environ.get("LD_PRELOAD", "")
    if library is None or str(library) in preloaded.split(":"):
        return
    env = {**os.environ, "LD_PRELOAD": ":".join(p for p in (str(library), preloaded) if p)}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv], env)


_MADV_DONTNEED = 4  # Linux
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def checkpoint_maps(suffix: str = ".safetensors") -> list[tuple[int, int]]:
    """(start, end) of this process's private (copy-on-write) mappings of files named `*suffix`
    (transformers memory-maps safetensors checkpoints and its tensors view them); [] where
    `/proc/self/maps` does not exist."""
    try:
        lines = Path("/proc/self/maps").read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    spans = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[1] in ("r--p", "rw-p") and fields[5].endswith(suffix):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            spans.append((start, end))
    return spans


def drop_mapped_pages(tensor: object, maps: list[tuple[int, int]]) -> int:
    """Drop from the resident set the whole pages of `tensor`'s bytes, when they lie in one of
    `maps` (`checkpoint_maps()`); returns the bytes dropped (0 elsewhere, or off Linux).

    Only for a tensor that was just converted or copied and that nothing uses any more: the
    kernel drops its pages of the private file map (they leave RSS; touched again, they would
    be read back from the file, and any write to them would be gone). Pages it shares with a
    neighbouring tensor are kept.
    """
    if _SYMBOLS is None or not maps or not tensor.is_contiguous():  # type: ignore[attr-defined]
        return 0
    first = tensor.data_ptr()  # type: ignore[attr-defined]
    last = first + tensor.numel() * tensor.element_size()  # type: ignore[attr-defined]
    if not any(start <= first and last <= end for start, end in maps):
        return 0
    start, end = -(-first // _PAGE) * _PAGE, last // _PAGE * _PAGE
    if end <= start or _SYMBOLS.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED):
        return 0
    return end - start
