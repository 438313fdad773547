"""Frozen base Linear weights stored in the autocast dtype give the same losses, gradients and
greedy text as fp32 weights cast by autocast on every call."""

from __future__ import annotations

import torch
from conftest import tiny_config

from fedsdr.data.federated import build_federated_data
from fedsdr.generation import generate_detailed
from fedsdr.models.adapters import AdapterSpec, activate, adapter_parameters, attach_adapters
from fedsdr.models.loading import (
    Runtime,
    load_base_model,
    load_tokenizer,
    resolve_model_source,
    store_frozen_linears_for_autocast,
)
from fedsdr.train import _decoder_and_head, collate, encode, response_loss

BF16 = Runtime(device=torch.device("cpu"), dtype=torch.float32, compute_dtype=torch.bfloat16)


def _model(cfg, cast: bool):  # noqa: ANN001, ANN202
    source = resolve_model_source(cfg.model)
    model = attach_adapters(load_base_model(source, BF16), cfg.lora, [AdapterSpec("default", 4, 8.0)], seed=0)
    torch.manual_seed(1)
    for p in adapter_parameters(model, "default"):  # a non-zero LoRA-B, so the adapter matters
        p.data.normal_(0, 0.05)
    activate(model, ["default"], trainable=["default"])
    cast_count = store_frozen_linears_for_autocast(model, BF16) if cast else 0
    return model, load_tokenizer(source), cast_count


def test_bf16_frozen_linears_match_autocast_of_fp32() -> None:
    torch.set_num_threads(1)
    cfg = tiny_config("lora.dropout=0")
    (ref, tok, _), (cast, _, count) = _model(cfg, False), _model(cfg, True)
    assert count > 0
    assert all(m.weight.dtype == torch.float32 for n, m in cast.named_modules()
               if isinstance(m, torch.nn.Linear) and ".lora_" in n)  # trainable weights stay fp32
    embeddings = cast.get_input_embeddings().weight
    assert embeddings.dtype == torch.float32
    # The tied head gets its own copy in the compute dtype; the reference stays tied in fp32.
    head = cast.get_base_model().get_output_embeddings().weight
    assert head.dtype == torch.bfloat16 and head is not embeddings
    torch.testing.assert_close(head, embeddings.to(torch.bfloat16), rtol=0, atol=0)
    assert ref.get_base_model().get_output_embeddings().weight is ref.get_input_embeddings().weight

    records = build_federated_data(cfg.data, cfg.partition, cfg.seed).clients[0].train[:4]
    batch = collate([encode(tok, r) for r in records], tok.pad_token_id)
    # The loss projects only the scored positions on both (the check of that path runs under
    # autocast, which the bf16-stored weights need).
    assert all(_decoder_and_head(m, batch, BF16.autocast) is not None for m in (ref, cast))
    grads = []
    for model in (ref, cast):
        model.train()
        loss, count_tokens = response_loss(model, batch, BF16.autocast)
        loss.backward()
        grads.append([p.grad.clone() for p in adapter_parameters(model, "default")])
        model.zero_grad(set_to_none=True)
        model.eval()
    assert count_tokens > 0
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)

    prompts = [[{"role": "user", "content": r.instruction}] for r in records]
    texts = []
    for model in (ref, cast):
        with BF16.autocast():
            texts.append([g.text for g in generate_detailed(model, tok, prompts, max_new_tokens=12)])
    assert texts[0] == texts[1]


def test_no_tensor_keeps_the_checkpoint_file_mapped() -> None:
    """transformers memory-maps the safetensors file; a tensor left viewing it keeps every page
    read at load resident. After the bf16 copies, the remaining fp32 tensors are copied too."""
    import gc
    from pathlib import Path

    from fedsdr.models.loading import copy_off_the_checkpoint

    source = resolve_model_source(tiny_config().model)
    files = [str(f) for f in Path(source).glob("*.safetensors")]

    def mapped() -> bool:
        gc.collect()
        maps = Path("/proc/self/maps").read_text()
        return any(f in maps for f in files)

    model = load_base_model(source, BF16)
    assert files and mapped()  # the weights view the file
    store_frozen_linears_for_autocast(model, BF16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert mapped()  # the fp32 embeddings and norms still do
    assert copy_off_the_checkpoint(model, BF16) > 0
    assert not mapped()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
