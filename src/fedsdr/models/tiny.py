"""A tiny randomly initialised Llama with a ChatML tokenizer, built offline in seconds.

For tests and smoke runs: every code path the bundled SmolLM2 takes (chat template, pad
equal to eos, no BOS added, tied embeddings, Llama architecture) runs against a model of
~0.1 M parameters. Its outputs are noise; only shapes and plumbing are meaningful.

Token choices mirror SmolLM2: ``<|endoftext|>`` = 0 (unk), ``<|im_start|>`` = 1 (bos,
never added automatically), ``<|im_end|>`` = 2 (eos), and pad = eos = ``<|im_end|>``.
Pad equal to eos is deliberate: code that derives label masks from pad ids instead of the
attention mask, or stops at the first pad, breaks on the tiny model as it would on SmolLM2.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedsdr.models import cache

TINY_NAME = "tiny-random"
TINY_FORMAT = 1
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TARGET_VOCAB = 768
MAX_POSITIONS = 1024

# SmolLM2-135M-Instruct's chat template, verbatim (default system prompt included).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by "
    "Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_SUBJECTS = ["The model", "A client", "The server", "Each student", "My friend", "The city"]
_VERBS = ["learns", "sends", "answers", "reads", "writes", "counts", "finds", "checks"]
_OBJECTS = [
    "the question",
    "a short answer",
    "the capital of France",
    "three numbers",
    "the final result",
    "a list of words",
    "the weather today",
    "an adapter update",
]
_CODE = [
    "def add(a, b):\n    return a + b",
    "for i in range(10):\n    print(i * i)",
    "import math\nx = math.sqrt(16.0)",
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y",
    "if n % 2 == 0:\n    result = 'even'\nelse:\n    result = 'odd'",
    "values = [v for v in data if v > 0]",
    'with open("file.txt") as f:\n    text = f.read()',
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)",
]


def _corpus() -> list[str]:
    """A few hundred lines of English, arithmetic, code and chat markup (deterministic)."""
    lines: list[str] = []
    for i, s in enumerate(_SUBJECTS):
        for j, v in enumerate(_VERBS):
            o = _OBJECTS[(i + j) % len(_OBJECTS)]
            lines.append(f"{s} {v} {o}.")
            lines.append(f"Why does {s.lower()} {v.rstrip('s')} {o}? Because it is useful.")
    for a in range(0, 40, 3):
        for b in range(1, 30, 7):
            lines.append(f"What is {a} + {b}? The answer is {a + b}.")
            lines.append(f"{a} * {b} = {a * b}; {a} - {b} = {a - b}")
    lines.extend(_CODE * 4)
    for k, o in enumerate(_OBJECTS):
        lines.append(
            f"<|im_start|>user\nPlease explain {o}.<|im_end|>\n"
            f"<|im_start|>assistant\nSure: {o} is item number {k}.<|im_end|>"
        )
    lines.append("Paris is the capital of France. Stockholm is the capital of Sweden.")
    lines.append("0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14 -7 #### answer: 42")
    return lines


def build_tiny_tokenizer():
    """A byte-level BPE (~768 tokens) trained on :func:`_corpus`, as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TARGET_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        model_max_length=MAX_POSITIONS,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _build(out_dir: Path, seed: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    ids = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        bos_token_id=ids[1],
        eos_token_id=ids[2],
        pad_token_id=ids[2],
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.eval()
    with cache.quiet_hf_progress(True):
        model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    marker = {"name": TINY_NAME, "format": TINY_FORMAT, "seed": seed}
    (out_dir / cache.MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")


def build_tiny_model_dir(cache_dir: Path | None = None, seed: int = 0) -> Path:
    """Return a folder with the tiny random Llama for ``seed``, building it once (~2 s).

    Same seed, same bytes. Cached under ``<cache>/models/tiny-random-seed<seed>``.
    """
    cache_root = cache.resolve_cache_dir(cache_dir)
    final = cache_root / "models" / f"{TINY_NAME}-seed{seed}"
    expected = {"name": TINY_NAME, "format": TINY_FORMAT, "seed": seed}

    def ready() -> bool:
        marker = cache.read_marker(final)
        return (
            marker is not None
            and all(marker.get(k) == v for k, v in expected.items())
            and (final / "model.safetensors").is_file()
        )

    if ready():
        return final
    with cache.file_lock(cache_root / "locks" / f"{final.name}.lock"):
        if not ready():
            cache.build_atomically(final, lambda tmp: _build(tmp, seed))
    return final
