"""Local training: response-only loss, batching, schedule, and a loss that falls."""

from __future__ import annotations

import torch
from conftest import tiny_config

from fedsdr.algorithms import get_algorithm
from fedsdr.config import TrainConfig
from fedsdr.data.schema import Record
from fedsdr.models.adapters import (
    activate,
    adapter_parameters,
    fresh_adapter_state,
    set_adapter_state,
)
from fedsdr.models.loading import shared_model
from fedsdr.train import (
    IGNORE,
    batches,
    collate,
    encode,
    encode_all,
    lr_at,
    make_stream,
    response_loss,
    sft_steps,
)

RECORD = Record(id="r1", instruction="What is 2 + 3?", output="The answer is 5.", domain="arithmetic")


def _model():  # noqa: ANN202
    cfg = tiny_config()
    model, tok, runtime, _ = shared_model(cfg.model, cfg.lora, get_algorithm(cfg).adapters(cfg), cfg.seed)
    return cfg, model, tok, runtime


def test_labels_cover_only_the_response() -> None:
    _, _, tok, _ = _model()
    example = encode(tok, RECORD)
    first = next(i for i, lab in enumerate(example.labels) if lab != IGNORE)
    assert all(lab == IGNORE for lab in example.labels[:first])
    assert example.labels[first:] == example.input_ids[first:]
    prompt = tok.decode(example.input_ids[:first])
    target = tok.decode(example.labels[first:])
    assert "What is 2 + 3?" in prompt and "The answer is 5." not in prompt
    assert target.startswith("The answer is 5.") and "<|im_end|>" in target  # the turn's end is learned
    assert "user" not in target


def test_loss_is_the_mean_over_response_tokens_only() -> None:
    cfg, model, tok, runtime = _model()
    batch = collate([encode(tok, RECORD), encode(tok, RECORD.replace(instruction="Add two and three."))],
                    tok.pad_token_id)
    model.eval()
    with torch.no_grad():
        loss_sum, n = response_loss(model, batch, runtime.autocast)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    by_hand = torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(), targets[keep], reduction="sum")
    assert n == int(keep.sum()) == 2 * encode(tok, RECORD).num_target_tokens
    torch.testing.assert_close(loss_sum, by_hand, rtol=1e-4, atol=1e-4)
    # padding and prompt tokens carry no loss: the pad columns are ignored labels
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()


def test_too_long_records_are_dropped_and_counted() -> None:
    _, _, tok, _ = _model()
    long = RECORD.replace(id="long", output="word " * 400)
    examples, dropped = encode_all(tok, [RECORD, long], max_len=128)
    assert dropped == 1 and len(examples) == 1


def test_length_grouping_cuts_padding_and_is_seeded() -> None:
    _, _, tok, _ = _model()
    records = [RECORD.replace(id=str(i), output="ok " * (1 + (i * 7) % 60)) for i in range(64)]
    examples, _ = encode_all(tok, records, max_len=1024)

    def padding(grouped: bool) -> int:
        stream = batches(examples, 4, seed=3, length_grouping=grouped)
        total = 0
        for _ in range(16):
            b = next(stream)
            total += sum(max(len(e.input_ids) for e in b) - len(e.input_ids) for e in b)
        return total

    assert padding(True) < 0.5 * padding(False)
    first = [next(batches(examples, 4, seed=3)) for _ in range(1)]
    again = [next(batches(examples, 4, seed=3)) for _ in range(1)]
    assert first == again


def test_schedule() -> None:
    cfg = TrainConfig(lr=1e-3, scheduler="cosine", warmup_steps=2, min_lr_ratio=0.1)
    lrs = [lr_at(cfg, s, 20) for s in range(20)]
    assert lrs[0] < lrs[1] <= cfg.lr
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:], strict=False))
    assert abs(lr_at(cfg, 20, 20) - 1e-4) < 1e-9


def test_local_training_lowers_the_loss() -> None:
    cfg, model, tok, runtime = _model()
    set_adapter_state(model, "default", fresh_adapter_state(model, "default", 0))
    activate(model, ["default"], trainable=["default"])
    examples, _ = encode_all(tok, [RECORD.replace(id=str(i)) for i in range(8)], max_len=256)
    stream = make_stream(examples, adapter_parameters(model, "default"), TrainConfig(lr=1e-2, batch_size=4,
                         scheduler="constant"), seed=0)
    stats = sft_steps(model, stream, TrainConfig(lr=1e-2, batch_size=4, scheduler="constant"), steps=12,
                      first_step=0, total_steps=12, pad_id=tok.pad_token_id, autocast=runtime.autocast)
    assert stats.losses[-1] < 0.9 * stats.losses[0]
