"""LoRA adapters via PEFT: attach, (re)initialise, read/write as arrays, save in PEFT format."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from peft import (
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from transformers import PreTrainedModel

from fedsdr.config import LoraSettings
from fedsdr.io import atomic_dir

AdapterState = dict[str, np.ndarray]


def peft_targets(targets: list[str]) -> str | list[str]:
    """`lora.target_modules` as peft's `LoraConfig` takes it: ["all-linear"] is its string "all-linear"."""
    return "all-linear" if targets == ["all-linear"] else list(targets)


@dataclass(frozen=True)
class AdapterSpec:
    """One named LoRA adapter: rank and alpha may differ per adapter; target modules are shared."""

    name: str
    r: int
    alpha: float

    def lora_config(self, lora: LoraSettings) -> LoraConfig:
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=lora.dropout,
            target_modules=peft_targets(lora.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )


def attach_adapters(
    base: PreTrainedModel, lora: LoraSettings, specs: list[AdapterSpec], seed: int
) -> PeftModel:
    """Wrap the frozen base with the given adapters, all active and summed in the forward pass."""
    torch.manual_seed(seed)  # PEFT initialises lora_A from the global RNG
    model = get_peft_model(base, specs[0].lora_config(lora), adapter_name=specs[0].name)
    for spec in specs[1:]:
        model.add_adapter(spec.name, spec.lora_config(lora))
    activate(model, [s.name for s in specs], trainable=[])
    return model


def activate(model: PeftModel, active: list[str], trainable: list[str]) -> None:
    """Make `active` adapters take part in the forward pass; only `trainable` ones get gradients.

    PEFT's `set_adapter` switches gradients back on for every active adapter, so freeze after it.
    """
    model.base_model.set_adapter(active if len(active) > 1 else active[0])
    for name, param in model.named_parameters():
        param.requires_grad_(any(f".{a}." in name for a in trainable) and "lora_" in name)


def adapter_parameters(model: PeftModel, adapter: str) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_" in n and f".{adapter}." in n]


def adapter_dropouts(model: torch.nn.Module, adapter: str) -> list[torch.nn.Module]:
    """The LoRA dropout modules of `adapter` (one per adapted layer)."""
    return [m.lora_dropout[adapter] for m in model.modules()
            if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict) and adapter in m.lora_dropout]


def get_adapter_state(model: PeftModel, adapter: str) -> AdapterState:
    """The adapter's tensors under PEFT's saved key names (adapter name stripped), as fp32 numpy."""
    state = get_peft_model_state_dict(model, adapter_name=adapter)
    return {k: v.detach().to("cpu", torch.float32).numpy().copy() for k, v in state.items()}


def set_adapter_state(model: PeftModel, adapter: str, state: Mapping[str, np.ndarray]) -> None:
    expected = set(get_peft_model_state_dict(model, adapter_name=adapter))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        raise ValueError(
            f"adapter {adapter!r}: tensors do not match (missing {missing}, unexpected {extra})"
        )
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    result = set_peft_model_state_dict(model, tensors, adapter_name=adapter)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"adapter {adapter!r}: unexpected keys {result.unexpected_keys[:3]}")


def fresh_adapter_state(model: PeftModel, adapter: str, seed: int) -> AdapterState:
    """A new LoRA initialisation drawn from `seed`: A ~ PEFT's kaiming-uniform, B = 0."""
    gen = torch.Generator().manual_seed(seed)
    state: AdapterState = {}
    for key, value in sorted(get_adapter_state(model, adapter).items()):
        if "lora_A" in key:
            bound = 1.0 / math.sqrt(value.shape[1])
            sample = torch.rand(value.shape, generator=gen, dtype=torch.float32) * 2 * bound - bound
            state[key] = sample.numpy()
        else:
            state[key] = np.zeros_like(value)
    return state


@contextlib.contextmanager
def adapters_off(model: PeftModel) -> Iterator[None]:
    """PEFT's `disable_adapter` (the base model alone), leaving every parameter's `requires_grad`
    as it found it: PEFT switches gradients on for every active adapter when it re-enables them."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    try:
        with model.disable_adapter():
            yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


def adds_nothing(state: Mapping[str, np.ndarray]) -> bool:
    """True when the adapter leaves the base model unchanged (every lora_B is zero, as at init)."""
    return all(not np.any(v) for k, v in state.items() if "lora_B" in k)


def to_arrayrecord(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Tensors in sorted key order: strategies that zip lists of arrays (FedAvgM) need one order."""
    return ArrayRecord({k: Array(np.ascontiguousarray(state[k])) for k in sorted(state)})


def from_arrayrecord(record: ArrayRecord) -> AdapterState:
    return {k: v.numpy() for k, v in record.items()}


def arrayrecord_nbytes(record: ArrayRecord) -> int:
    """Tensor bytes carried by a record (the payload, without serialisation headers)."""
    return int(sum(np.prod(a.shape, dtype=np.int64) * np.dtype(a.dtype).itemsize for a in record.values()))


def write_peft_adapter(
    folder: Path, state: Mapping[str, np.ndarray], spec: AdapterSpec, lora: LoraSettings, base_model: str
) -> None:
    """Write a standard PEFT adapter (adapter_config.json + adapter_model.safetensors) into `folder`."""
    config = spec.lora_config(lora)
    config.base_model_name_or_path = base_model
    config.save_pretrained(str(folder))
    save_numpy({k: np.ascontiguousarray(v) for k, v in state.items()}, str(Path(folder) / "adapter_model.safetensors"))


def save_peft_adapter(
    out_dir: Path, state: Mapping[str, np.ndarray], spec: AdapterSpec, lora: LoraSettings, base_model: str
) -> None:
    """A standard PEFT adapter folder, written atomically."""
    with atomic_dir(Path(out_dir)) as tmp:
        write_peft_adapter(tmp, state, spec, lora, base_model)


def load_adapter_file(folder: Path) -> AdapterState:
    return load_numpy(str(Path(folder) / "adapter_model.safetensors"))
