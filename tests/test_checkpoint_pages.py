"""Loading a checkpoint: the pages of a memory-mapped safetensors file that a converted weight
no longer needs leave the resident set (`fedsdr.memory.drop_mapped_pages`), so the fp32 file
and the bf16 copies are never resident side by side; the data itself is never lost."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from fedsdr.memory import checkpoint_maps, drop_mapped_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and madvise: Linux")

MIB = 2**20


def _resident_bytes_of(path: Path) -> int:
    """Rss of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text(encoding="utf-8").splitlines():
        if line[:1].isdigit() or line[:1] in "abcdef" and "-" in line.split()[0]:
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


def test_a_converted_weights_pages_leave_the_resident_set(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    values = torch.randn(2 * MIB)  # 8 MiB of fp32
    path.write_bytes(values.numpy().tobytes())
    mapped = torch.from_file(str(path), shared=False, size=values.numel(), dtype=torch.float32)  # a private map
    first, second = mapped[: MIB], mapped[MIB:]
    assert torch.equal(mapped, values)  # every page read: resident
    assert _resident_bytes_of(path) >= 8 * MIB - 4096

    copy = first.to(torch.bfloat16)  # what loading does with a frozen linear
    dropped = drop_mapped_pages(first, checkpoint_maps())
    assert 4 * MIB - 2 * 4096 <= dropped <= 4 * MIB
    assert _resident_bytes_of(path) <= 4 * MIB + 4096  # the other weight's pages stay
    assert torch.equal(second, values[MIB:])  # untouched
    assert torch.equal(first, values[: MIB])  # read back from the file, not lost
    assert torch.equal(copy, values[: MIB].to(torch.bfloat16))


def test_nothing_outside_a_checkpoint_map_is_dropped(tmp_path: Path) -> None:
    heap = torch.randn(2 * MIB)
    kept = heap.clone()
    assert drop_mapped_pages(heap, checkpoint_maps()) == 0
    other = tmp_path / "weights.bin"  # a mapped file that is no safetensors checkpoint
    other.write_bytes(kept.numpy().tobytes())
    mapped = torch.from_file(str(other), shared=False, size=kept.numel(), dtype=torch.float32)
    assert mapped.sum().item() == pytest.approx(kept.sum().item())
    assert drop_mapped_pages(mapped, checkpoint_maps()) == 0
    assert torch.equal(heap, kept)
    assert torch.equal(mapped[::2], kept[::2])
    assert drop_mapped_pages(mapped[::2], [(0, 2**64)]) == 0  # not contiguous: not its own bytes
