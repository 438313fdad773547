"""A tiny random Llama and an offline byte-level BPE tokenizer for the generation and
rewriting tests (fp32, CPU, seconds); and the tiny config's model with a LoRA adapter that
changes the output (for loss and gradient tests)."""

from __future__ import annotations

import torch
from conftest import tiny_config
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fedsdr.models.adapters import AdapterSpec, activate, fresh_adapter_state, set_adapter_state
from fedsdr.models.loading import shared_model

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is 6 times 7? The answer is 42.",
    "Answer the instruction yourself. Use the reference answer only as a guide.",
    "def add(a, b):\n    return a + b",
    "Federated learning trains one model across many clients.",
] * 20


def tiny_tokenizer(corpus: list[str] = CORPUS) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained offline on `corpus`; eos = pad = <|im_end|> (as in SmolLM2)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|im_end|>"
    )
    tok.chat_template = CHATML
    return tok


def tiny_model(tok: PreTrainedTokenizerFast, eos_scale: float = 2.0, kv_heads: int = 4) -> LlamaForCausalLM:
    """Random Llama (hidden 64, 2 layers, 4 heads over `kv_heads` key/value heads). Its eos logit
    is scaled so that some rows stop at eos and others run to their budget."""
    torch.manual_seed(0)
    eos = tok.eos_token_id
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        model.lm_head.weight[eos] *= eos_scale
    return model


def tiny_lora_model(*overrides: str):  # noqa: ANN201
    """The tiny config's shared model (with `overrides`) and its tokenizer, adapter "default"
    active and trainable, with a non-zero LoRA B so that the adapter changes the output and
    receives a gradient through every path."""
    cfg = tiny_config(*overrides)
    model, tok, _, _ = shared_model(cfg.model, cfg.lora, [AdapterSpec("default", cfg.lora.r, cfg.lora.alpha)],
                                    cfg.seed)
    state = fresh_adapter_state(model, "default", 1)
    gen = torch.Generator().manual_seed(2)
    for key, value in state.items():
        if "lora_B" in key:
            state[key] = (torch.randn(value.shape, generator=gen) * 0.05).numpy()
    set_adapter_state(model, "default", state)
    activate(model, ["default"], trainable=["default"])
    return model, tok
