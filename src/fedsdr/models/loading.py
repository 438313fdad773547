"""Load the frozen base causal LM and its tokenizer; pick device and dtypes."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
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
from fedsdr.memory import checkpoint_maps, drop_mapped_pages
from fedsdr.models.adapters import AdapterSpec, attach_adapters
from fedsdr.models.attention import RECOMPUTE
from fedsdr.models.cpu_dtype import bf16_pays_off, cpu_matmul_probe
from fedsdr.models.gated_mlp import recompute_gated_mlps
from fedsdr.train import compact_lora_dropout

# oneDNN, behind torch's CPU bf16 matmuls, keeps a compiled primitive for each matmul shape it
# meets, 1024 by default, with the memory each one holds. Sequence lengths vary from batch to
# batch, so that cache grew the process by 0.3 GB over one pass of reference losses on the
# quickstart's test set. The shapes of one forward and backward pass fit in 64: no pass gets
# slower. oneDNN reads this at its first primitive, so any time before a model runs is in time;
# a value set by the user wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
# ideep (torch's layer over oneDNN) keeps its own cache of matmul primitives, per thread, 1024
# by default: ~10 MB for each new sequence length, so live memory grew ~80 MB per client trained
# (`bench_memory.py`). 32 keeps one pass's shapes at the same speed (`bench_step.py`).
os.environ.setdefault("LRU_CACHE_CAPACITY", "32")

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


def cpu_supports_bf16() -> bool:
    """Whether torch's CPU matmuls (oneDNN) run bf16 natively here: the CPU has the instructions
    (AVX512-bf16, AMX) and nothing turned them off (`ONEDNN_MAX_CPU_ISA=AVX2` does)."""
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
        # autocast runs the matmuls in bf16 where that is faster (`cpu_compute_dtype`).
        dtype = _DTYPES.get(cfg.dtype) or torch.float32
        compute = _DTYPES.get(cfg.compute_dtype) or cpu_compute_dtype(cfg.cache_dir)
    return Runtime(device=device, dtype=dtype, compute_dtype=compute)


def cpu_compute_dtype(cache_dir: Path | str | None = None) -> torch.dtype:
    """`compute_dtype = "auto"` on a CPU: bf16 where the CPU runs bf16 natively and its bf16
    matmuls are at least `BF16_MIN_SPEEDUP` x its fp32 ones (measured once per machine,
    `cpu_dtype.cpu_matmul_probe`), else fp32."""
    from fedsdr.models.cache import resolve_cache_dir

    if not cpu_supports_bf16():
        return torch.float32
    probe = cpu_matmul_probe(resolve_cache_dir(cache_dir or None))
    return torch.bfloat16 if bf16_pays_off(probe) else torch.float32


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


def load_base_model(source: str, runtime: Runtime, attn_implementation: str = "auto") -> PreTrainedModel:
    """Load the base model frozen, in eval mode, on the runtime's device; `attn_implementation`
    goes to transformers as it is, except "auto": the model's default, and on a CPU, where the
    default is SDPA, SDPA with a matmul backward (`attention.RECOMPUTE`: the same inference)."""
    chosen = {} if attn_implementation == "auto" else {"attn_implementation": attn_implementation}
    model = AutoModelForCausalLM.from_pretrained(source, dtype=runtime.dtype, **chosen)
    if attn_implementation == "auto" and runtime.device.type == "cpu" and model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(RECOMPUTE)
    model.to(runtime.device)
    model.requires_grad_(False)
    model.config.use_cache = True
    return model


def store_frozen_linears_for_autocast(model: torch.nn.Module, runtime: Runtime) -> int:
    """Store the frozen base Linear weights in the autocast dtype; returns how many.

    Under autocast every matmul casts its fp32 weight to bf16 on every call: a copy of the whole
    model per forward pass, and per decoding step in generation. Storing them once as bf16 gives
    the same values the cast gives (so the same results) without that copy, and halves their
    memory. A frozen output head tied to the input embeddings gets its own copy in that dtype
    (the embeddings stay as they are: their fp32 lookups feed the residual stream); for
    SmolLM2 that copy is 56 MB and saves a 113 MB cast on every decoding step. Left alone:
    trainable weights (LoRA, a trainable head), and runtimes without autocast.
    """
    if runtime.compute_dtype in (torch.float32, runtime.dtype):  # no autocast (see Runtime.autocast)
        return 0
    embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    get_head = getattr(base, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    maps = checkpoint_maps() if runtime.device.type == "cpu" else []
    count = 0
    for name, module in model.named_modules():
        if type(module) is not torch.nn.Linear or ".lora_" in name or module.weight.requires_grad:
            continue
        tied = id(module.weight) in embeddings
        if tied:
            if module is not head:
                continue
            module.weight = torch.nn.Parameter(module.weight.detach().to(runtime.compute_dtype), requires_grad=False)
        old = module.weight.detach()  # `to` swaps the parameter's data; this keeps the old bytes in view
        module.to(runtime.compute_dtype)
        if not tied:  # the tied embeddings still use theirs
            drop_mapped_pages(old, maps)  # else the whole fp32 file ends up resident next to the copies
        count += 1
    return count


def copy_off_the_checkpoint(model: torch.nn.Module, runtime: Runtime) -> int:
    """Copy into process memory the frozen CPU tensors still in the storage dtype, i.e. still
    views of the checkpoint file, which transformers memory-maps; returns how many.

    While one tensor views the map, every page of the file read at load stays resident and
    counts in the process's RSS. With the linears stored in bf16 (above), SmolLM2's remaining
    fp32 embeddings and norms kept its whole 540 MB fp32 file resident next to those copies.
    """
    if runtime.device.type != "cpu":
        return 0  # moving to the device copied them
    maps = checkpoint_maps()
    count = 0
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if ".lora_" not in name and tensor.dtype == runtime.dtype:
                old, tensor.data = tensor.data, tensor.data.clone()
                drop_mapped_pages(old, maps)
                count += 1
    return count


@contextlib.contextmanager
def device_peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """`with device_peak_memory(d) as peak:` ... then `peak` holds `device_peak_mb`: the most
    memory the CUDA allocator held during the block. Empty off CUDA, where the process's RSS is
    the figure (benchmarks/bench_memory.py)."""
    fields: dict[str, float] = {}
    if device.type != "cuda":
        yield fields
        return
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    yield fields
    fields["device_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20


_CACHE: dict[tuple[str, ...], tuple[PeftModel, PreTrainedTokenizerBase, Runtime, str]] = {}
_CACHE_SIZE = 2


def shared_model(
    cfg: ModelConfig, lora: LoraSettings, specs: list[AdapterSpec], seed: int
) -> tuple[PeftModel, PreTrainedTokenizerBase, Runtime, str]:
    """The base model with its adapters, built once per process and shared by every virtual
    client and the server of that process (each loads its own weights into the adapters
    before use). Returns (model, tokenizer, runtime, resolved model source)."""
    if cfg.threads:  # first: the runtime's dtype probe times the matmuls on these threads
        torch.set_num_threads(cfg.threads)
    runtime = resolve_runtime(cfg)
    source = resolve_model_source(cfg)
    key = (source, str(runtime), cfg.attn_implementation, lora.model_dump_json(), repr(specs))
    if key not in _CACHE:
        while len(_CACHE) >= _CACHE_SIZE:  # PEFT wraps the base in place: one copy per key
            _CACHE.pop(next(iter(_CACHE)))
        base = load_base_model(source, runtime, cfg.attn_implementation)
        model = attach_adapters(base, lora, specs, seed)
        compact_lora_dropout(model)  # a 1-byte mask for backward, fewer generator calls
        recompute_gated_mlps(model)  # the MLP keeps two of its three intermediate tensors
        store_frozen_linears_for_autocast(model, runtime)
        model.to(runtime.device)
        copy_off_the_checkpoint(model, runtime)
        _CACHE[key] = (model, load_tokenizer(source), runtime, source)
    return _CACHE[key]
