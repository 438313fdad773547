"""Time and memory of one training step for different `train.pass_tokens` and checkpointing.

    .venv/bin/python benchmarks/bench_step.py [--records 8] [--steps 3]
        [--passes 0,512,1024] [--checkpointing] [--json step.json]

One batch of the config's `--records` longest training records (all clients; the bundled
model and the quickstart by default) is trained for `--steps` optimizer steps with each
setting, every setting in its own fresh child process, from the same fresh adapter and seed:
`train.pass_tokens` from `--passes` (0: the whole batch in one pass), each also with gradient
checkpointing when `--checkpointing` is given. Per setting it prints seconds per step and
non-pad tokens/s (the first step, which meets new shapes, is left out when there are more),
the peak RSS during the steps (`VmHWM` reset before them) next to the RSS before them, and,
after them, what autograd keeps for backward in the first pass, per padded token
(`saved_tensors_hooks`, each storage counted once; with checkpointing, the layers' inputs). The losses of the steps are printed too: passes change only
rounding and dropout draws, not the step.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from _common import child_figures, console, load, machine, parser, status_kb, write_json


def child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from fedsdr.algorithms import get_algorithm
    from fedsdr.data.federated import build_federated_data
    from fedsdr.models.adapters import (
        activate,
        adapter_parameters,
        fresh_adapter_state,
        set_adapter_state,
    )
    from fedsdr.models.loading import release_freed_memory, shared_model
    from fedsdr.train import (
        collate,
        encode_all,
        gradient_checkpointing,
        make_stream,
        passes,
        response_loss,
        sft_steps,
    )

    cfg = load(args)
    algorithm = get_algorithm(cfg)
    model, tok, runtime, _ = shared_model(cfg.model, cfg.lora, algorithm.adapters(cfg), cfg.seed)
    adapter = algorithm.adapters(cfg)[0].name
    data = build_federated_data(cfg.data, cfg.partition, cfg.seed)
    examples, _ = encode_all(tok, [r for c in data.clients for r in c.train], cfg.model.max_seq_len,
                             cfg.data.system_prompt)
    batch = sorted(examples, key=lambda e: -len(e.input_ids))[: args.records]
    train = cfg.train.model_copy(update={"batch_size": len(batch), "length_grouping": False})
    set_adapter_state(model, adapter, fresh_adapter_state(model, adapter, cfg.seed))
    activate(model, [adapter], trainable=[adapter])

    release_freed_memory()
    rss_before = status_kb("VmRSS") / 1024
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM
    torch.manual_seed(cfg.seed)
    stream = make_stream(batch, adapter_parameters(model, adapter), train, seed=cfg.seed)
    seconds = []
    for step in range(args.steps):
        start = time.perf_counter()
        sft_steps(model, stream, train, steps=1, first_step=step, total_steps=args.steps,
                  pad_id=tok.pad_token_id, autocast=runtime.autocast)
        seconds.append(time.perf_counter() - start)
    peak_rss = status_kb("VmHWM") / 1024
    # what the first pass keeps for backward (after the timed steps, which it would disturb)
    first = passes(batch, train.pass_tokens)[0]
    tensors = collate(first, tok.pad_token_id)
    storages: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storages.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    model.train()
    with (gradient_checkpointing(model, train.gradient_checkpointing),
          torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t)):
        loss, _ = response_loss(model, tensors, runtime.autocast)
    del loss
    saved_per_token = sum(storages.values()) / tensors["input_ids"].numel()

    timed = seconds[1:] or seconds
    tokens = sum(len(e.input_ids) for e in batch)
    return {
        "pass_tokens": train.pass_tokens,
        "gradient_checkpointing": train.gradient_checkpointing,
        "passes": len(passes(batch, train.pass_tokens)),
        "records": len(batch),
        "tokens": tokens,
        "longest": len(batch[0].input_ids),
        "seconds_per_step": sum(timed) / len(timed),
        "tokens_per_s": tokens * len(timed) / sum(timed),
        "peak_rss_mib": peak_rss,
        "rss_before_mib": rss_before,
        "saved_per_token_kib": saved_per_token / 1024,
        "losses": stream.stats.losses,
        "compute_dtype": str(runtime.compute_dtype),
    }


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=8, help="the N longest training records, one batch")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--passes", default="0,512,1024", help="train.pass_tokens values, comma-separated")
    p.add_argument("--checkpointing", action="store_true", help="also each with gradient checkpointing")
    p.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_out:
        args.child_out.write_text(json.dumps(child(args)), encoding="utf-8")
        return 0

    from rich.table import Table

    out = console()
    settings = [(int(v), ckpt) for v in args.passes.split(",") for ckpt in ((False, True) if args.checkpointing else (False,))]
    results = []
    for pass_tokens, ckpt in settings:
        argv = ["--config", args.config, "--records", str(args.records), "--steps", str(args.steps)]
        for item in [*args.overrides, f"train.pass_tokens={pass_tokens}",
                     f"train.gradient_checkpointing={str(ckpt).lower()}"]:
            argv += ["--set", item]
        results.append(child_figures(__file__, argv, f"the child for pass_tokens={pass_tokens}"))
    first = results[0]
    table = Table(title=f"one training step on the {first['records']} longest training records "
                        f"({first['tokens']} tokens, longest {first['longest']}; {first['compute_dtype']})")
    for col in ("pass_tokens", "checkpointing", "passes", "s / step", "tokens/s", "peak RSS (MiB)",
                "RSS before", "kept for backward (KiB / token)", "losses"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(str(r["pass_tokens"]), "yes" if r["gradient_checkpointing"] else "no", str(r["passes"]),
                      f"{r['seconds_per_step']:.2f}", f"{r['tokens_per_s']:.0f}", f"{r['peak_rss_mib']:.0f}",
                      f"{r['rss_before_mib']:.0f}", f"{r['saved_per_token_kib']:.0f}",
                      " ".join(f"{x:.4f}" for x in r["losses"]))
    out.print(table)
    write_json(args.json, {"config": args.config, "overrides": args.overrides, "machine": machine(),
                           "steps": args.steps, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
