"""`compute_dtype = "auto"` on a CPU: bf16 only where its matmuls are measurably faster than fp32,
decided once per machine and kept in fedsdr's cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedsdr.config import ModelConfig
from fedsdr.models import cpu_dtype, loading
from fedsdr.models.cpu_dtype import BF16_MIN_SPEEDUP, MatmulProbe


class FakeProbe:
    """Stands in for the timing: returns `next` and records each call in `measured`."""

    def __init__(self) -> None:
        self.next = MatmulProbe(100.0, 400.0, 2)
        self.measured: list[MatmulProbe] = []

    def __call__(self) -> MatmulProbe:
        self.measured.append(self.next)
        return self.next


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch) -> FakeProbe:
    fake = FakeProbe()
    monkeypatch.setattr(cpu_dtype, "_VERDICTS", {})  # no verdict of this process carried over
    monkeypatch.setattr(cpu_dtype, "measure_matmuls", fake)
    monkeypatch.setattr(loading, "cpu_supports_bf16", lambda: True)
    return fake


def test_the_probe_times_both_dtypes_at_a_layer_shape() -> None:
    probe = cpu_dtype.measure_matmuls((64, 96, 128), repeats=1)
    assert probe.fp32_gflops > 0 and probe.bf16_gflops > 0
    assert probe.threads == torch.get_num_threads()
    assert probe.bf16_speedup == pytest.approx(probe.bf16_gflops / probe.fp32_gflops)


@pytest.mark.parametrize(("fp32", "bf16", "chosen"), [
    (100.0, 400.0, torch.bfloat16),  # AMD EPYC with AVX512-bf16: ~4x
    (300.0, 165.0, torch.float32),  # Intel Xeon with AVX512-bf16, no AMX: 0.55x
    (100.0, 100.0 * BF16_MIN_SPEEDUP, torch.bfloat16),
    (100.0, 100.0 * BF16_MIN_SPEEDUP - 1, torch.float32),
])
def test_auto_computes_in_bf16_only_where_its_matmuls_are_faster(
        probe: FakeProbe, tmp_path: Path, fp32: float, bf16: float, chosen: torch.dtype) -> None:
    probe.next = MatmulProbe(fp32, bf16, 2)
    runtime = loading.resolve_runtime(ModelConfig(device="cpu", cache_dir=str(tmp_path)))
    assert runtime.compute_dtype == chosen and runtime.dtype == torch.float32
    assert len(probe.measured) == 1


def test_the_verdict_is_measured_once_per_machine_and_kept_in_the_cache(
        probe: FakeProbe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    probe.next = MatmulProbe(300.0, 165.0, 2)
    assert loading.cpu_compute_dtype(tmp_path) == torch.float32
    (stored,) = (tmp_path / "cpu-matmul").glob("*.json")
    figures = json.loads(stored.read_text(encoding="utf-8"))
    assert figures["bf16_speedup"] == pytest.approx(0.55) and figures["torch"] == torch.__version__
    monkeypatch.setattr(cpu_dtype, "_VERDICTS", {})  # another process on the same machine
    probe.next = MatmulProbe(100.0, 400.0, 2)  # would flip the choice if it were measured
    assert loading.cpu_compute_dtype(tmp_path) == torch.float32
    assert len(probe.measured) == 1
    stored.write_text("{not json", encoding="utf-8")  # a damaged file is measured again and replaced
    monkeypatch.setattr(cpu_dtype, "_VERDICTS", {})
    assert loading.cpu_compute_dtype(tmp_path) == torch.bfloat16
    assert len(probe.measured) == 2 and json.loads(stored.read_text(encoding="utf-8"))["bf16_speedup"] == 4.0


def test_no_probe_without_native_bf16_or_with_a_dtype_in_the_config(
        probe: FakeProbe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = str(tmp_path)
    assert loading.resolve_runtime(ModelConfig(device="cpu", compute_dtype="bfloat16", cache_dir=cache)
                                   ).compute_dtype == torch.bfloat16
    assert loading.resolve_runtime(ModelConfig(device="cpu", compute_dtype="float32", cache_dir=cache)
                                   ).compute_dtype == torch.float32
    monkeypatch.setattr(loading, "cpu_supports_bf16", lambda: False)
    assert loading.resolve_runtime(ModelConfig(device="cpu", cache_dir=cache)).compute_dtype == torch.float32
    assert probe.measured == [] and not (tmp_path / "cpu-matmul").exists()
