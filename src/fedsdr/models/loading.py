"""Load the frozen base causal LM and its tokenizer; pick device and dtypes."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedsdr.config import LoraSettings, ModelConfig
from fedsdr.models.adapters import AdapterSpec, attach_adapters

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    """Where and in which precision the model runs."""

    device: torch.device
    dtype: torch.dtype  # storage dtype of the frozen base weights
    compute_dtype: torch.dtype  # autocast dtype for matmuls

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        if self.compute_dtype == torch.float32 or self.compute_dtype == self.dtype:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.compute_dtype)


def _cpu_supports_bf16() -> bool:
    try:
        return bool(
            torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        )
    except (AttributeError, RuntimeError):
        return False


def resolve_runtime(cfg: ModelConfig) -> Runtime:
    """Turn the config's 'auto' choices into a concrete device and dtypes."""
    device = torch.device(
        "cuda"
        if cfg.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if cfg.device == "auto"
        else cfg.device
    )
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        dtype = _DTYPES.get(cfg.dtype) or (torch.bfloat16 if bf16 else torch.float16)
        compute = _DTYPES.get(cfg.compute_dtype) or dtype
    else:
        # On CPU the frozen weights stay fp32 (exact reference losses, stable LoRA updates);
        # autocast runs the matmuls in bf16 where the CPU has native bf16 (about 2x the FLOP/s).
        dtype = _DTYPES.get(cfg.dtype) or torch.float32
        compute = _DTYPES.get(cfg.compute_dtype) or (
            torch.bfloat16 if _cpu_supports_bf16() else torch.float32
        )
    return Runtime(device=device, dtype=dtype, compute_dtype=compute)


def resolve_model_source(cfg: ModelConfig) -> str:
    """Bundled name -> prepared local folder; folders and hub ids pass through."""
    from fedsdr.models.resolve import resolve_model_path

    return resolve_model_path(cfg.name, Path(cfg.cache_dir) if cfg.cache_dir else None)


def load_tokenizer(source: str) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(source)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        raise ValueError(f"model {source!r}: the tokenizer has no chat template; fedsdr needs one")
    return tok


def load_base_model(source: str, runtime: Runtime) -> PreTrainedModel:
    """Load the base model frozen, in eval mode, on the runtime's device."""
    model = AutoModelForCausalLM.from_pretrained(source, dtype=runtime.dtype)
    model.to(runtime.device)
    model.requires_grad_(False)
    model.config.use_cache = True
    return model


_CACHE: dict[tuple[str, ...], tuple[PeftModel, PreTrainedTokenizerBase, Runtime, str]] = {}
_CACHE_SIZE = 2


def shared_model(
    cfg: ModelConfig, lora: LoraSettings, specs: list[AdapterSpec], seed: int
) -> tuple[PeftModel, PreTrainedTokenizerBase, Runtime, str]:
    """The base model with its adapters, built once per process and shared by every virtual
    client and the server of that process (each loads its own weights into the adapters
    before use). Returns (model, tokenizer, runtime, resolved model source)."""
    runtime = resolve_runtime(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    source = resolve_model_source(cfg)
    key = (source, str(runtime), lora.model_dump_json(), repr(specs))
    if key not in _CACHE:
        while len(_CACHE) >= _CACHE_SIZE:  # PEFT wraps the base in place: one copy per key
            _CACHE.pop(next(iter(_CACHE)))
        base = load_base_model(source, runtime)
        model = attach_adapters(base, lora, specs, seed)
        model.to(runtime.device)
        _CACHE[key] = (model, load_tokenizer(source), runtime, source)
    return _CACHE[key]
