"""Time and memory of one training step for different `train.pass_tokens` and checkpointing.

    .venv/bin/python benchmarks/bench_step.py [--records 8] [--steps 3]
        [--passes 0,512,1024] [--checkpointing] [--json step.json]
    .venv/bin/python benchmarks/bench_step.py --config configs/quickstart-fedsdr.toml --passes 512 --frozen-dropout
    .venv/bin/python benchmarks/bench_step.py --passes 512 --attention sdpa,eager
    .venv/bin/python benchmarks/bench_step.py --passes 512 --gated-mlp

One batch of the config's `--records` longest training records (all clients; the bundled
model and the quickstart by default) is trained for `--steps` optimizer steps with each
setting, every setting in its own fresh child process, from the same fresh adapter and seed:
`train.pass_tokens` from `--passes` (0: the whole batch in one pass), each also with gradient
checkpointing when `--checkpointing` is given. Per setting it prints seconds per step and
non-pad tokens/s (the first step, which meets new shapes, is left out when there are more),
the peak RSS during the steps (`VmHWM` reset before them) next to the RSS before them, and,
after them, what autograd keeps for backward in the first pass, per padded token
(`saved_tensors_hooks`, each storage counted once, the model's parameters left out; with
checkpointing, the layers' inputs).
The losses of the steps are printed too: passes change only rounding and dropout draws, not
the step.

With a two-adapter config (FedSDR, FedDPA) a step is the algorithm's: one pass that trains
each adapter with the other one frozen (`train.dual_stream_steps`, both streams on the same
batch, so twice the tokens). `--frozen-dropout` runs each setting with `fedsdr.frozen_dropout`
off and on (the frozen adapter's LoRA dropout) and prints the speed ratio. `--attention`
runs each setting with each `model.attn_implementation` given and prints the speed ratio and
the peak's difference to the first. `--gated-mlp` runs each setting with the MLPs as transformers
writes them and with `fedsdr.models.gated_mlp`'s (the activation recomputed in backward, what
`shared_model` installs), and prints the speed ratio and the peaks' difference.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from _common import (
    allocator_as_fedsdr,
    child_figures,
    console,
    load,
    machine,
    parser,
    status_kb,
    synchronize,
    write_json,
)


def count_ops(run: Any) -> int:
    """How many ATen operators `run()` dispatches, backward included. Each is at least one
    kernel launch on a GPU, where for a model this small the host's few microseconds per
    operator, not the FLOPs, set the pace."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            Counter.calls += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        run()
    return Counter.calls


def child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from fedsdr.algorithms import get_algorithm
    from fedsdr.algorithms.dual import quiet_when_frozen
    from fedsdr.data.federated import build_federated_data
    from fedsdr.memory import release_freed_memory
    from fedsdr.models.adapters import (
        activate,
        adapter_parameters,
        fresh_adapter_state,
        set_adapter_state,
    )
    from fedsdr.models.gated_mlp import plain_gated_mlps, recompute_gated_mlps
    from fedsdr.models.loading import shared_model
    from fedsdr.train import (
        collate,
        dual_stream_steps,
        encode_all,
        gradient_checkpointing,
        make_stream,
        pass_budget,
        passes,
        response_loss,
        sft_steps,
    )

    cfg = load(args)
    algorithm = get_algorithm(cfg)
    model, tok, runtime, _ = shared_model(cfg.model, cfg.lora, algorithm.adapters(cfg), cfg.seed)
    if args.gated_mlp_in_child == "plain":  # transformers' own MLPs, for the comparison
        plain_gated_mlps(model)
    else:
        recompute_gated_mlps(model)  # as shared_model leaves them
    names = [spec.name for spec in algorithm.adapters(cfg)]
    data = build_federated_data(cfg.data, cfg.partition, cfg.seed)
    examples, _ = encode_all(tok, [r for c in data.clients for r in c.train], cfg.model.max_seq_len,
                             cfg.data.system_prompt)
    batch = sorted(examples, key=lambda e: -len(e.input_ids))[: args.records]
    train = cfg.train.model_copy(update={"batch_size": len(batch), "length_grouping": False})
    for name in names:
        set_adapter_state(model, name, fresh_adapter_state(model, name, cfg.seed))
    activate(model, names, trainable=names)

    release_freed_memory()
    rss_before = status_kb("VmRSS") / 1024
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM
    torch.manual_seed(cfg.seed)
    streams = [make_stream(batch, adapter_parameters(model, name), train, seed=cfg.seed,
                           quiet_when_frozen=quiet_when_frozen(cfg, model, name)) for name in names]

    def one_step(step: int) -> None:
        if len(streams) == 1:
            sft_steps(model, streams[0], train, steps=1, first_step=step, total_steps=args.steps + 1,
                      pad_id=tok.pad_token_id, autocast=runtime.autocast)
        else:  # a two-adapter algorithm's step: a pass for each adapter, the other one frozen
            dual_stream_steps(model, streams[1], streams[0], train, schedule=cfg.fedsdr.schedule, steps=1,
                              first_step=step, total_steps=args.steps + 1, pad_id=tok.pad_token_id,
                              autocast=runtime.autocast, joint_lambda=cfg.fedsdr.joint_lambda)

    seconds = []
    for step in range(args.steps):
        start = time.perf_counter()
        one_step(step)
        synchronize(runtime.device)
        seconds.append(time.perf_counter() - start)
    peak_rss = status_kb("VmHWM") / 1024
    losses = [loss for stream in streams for loss in stream.stats.losses]
    ops = count_ops(lambda: one_step(args.steps))  # one more step, untimed
    # what the first pass keeps for backward (after the timed steps, which it would disturb)
    budget = pass_budget(train, runtime.device, runtime.compute_dtype)
    first = passes(batch, budget)[0]
    tensors = collate(first, tok.pad_token_id)
    storages: dict[int, int] = {}
    # a matmul keeps its weight for the input's gradient: the model's own memory, not the pass's
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def keep(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:
            storages.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    model.train()
    with (gradient_checkpointing(model, train.gradient_checkpointing),
          torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t)):
        loss, _ = response_loss(model, tensors, runtime.autocast)
    del loss
    saved_per_token = sum(storages.values()) / tensors["input_ids"].numel()

    timed = seconds[1:] or seconds
    tokens = sum(len(e.input_ids) for e in batch) * len(streams)
    return {
        "adapters": names,
        "frozen_dropout": cfg.fedsdr.frozen_dropout if len(streams) > 1 else None,
        "attention": model.get_base_model().config._attn_implementation,
        "gated_mlp": args.gated_mlp_in_child,
        "pass_tokens": budget,
        "gradient_checkpointing": train.gradient_checkpointing,
        "passes": len(passes(batch, budget)),
        "records": len(batch),
        "tokens": tokens,
        "longest": len(batch[0].input_ids),
        "seconds_per_step": sum(timed) / len(timed),
        "tokens_per_s": tokens * len(timed) / sum(timed),
        "peak_rss_mib": peak_rss,
        "rss_before_mib": rss_before,
        "saved_per_token_kib": saved_per_token / 1024,
        "losses": losses,
        "ops_per_step": ops,
        "compute_dtype": str(runtime.compute_dtype),
    }


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=8, help="the N longest training records, one batch")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--passes", default="0,512,1024", help="train.pass_tokens values, comma-separated")
    p.add_argument("--checkpointing", action="store_true", help="also each with gradient checkpointing")
    p.add_argument("--frozen-dropout", action="store_true",
                   help="two-adapter configs: each setting with fedsdr.frozen_dropout off and on")
    p.add_argument("--attention", default="",
                   help="model.attn_implementation values, comma-separated (e.g. sdpa,eager); default: the config's")
    p.add_argument("--gated-mlp", action="store_true",
                   help="each setting with transformers' MLPs and with the recomputing gated MLP")
    p.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--gated-mlp-in-child", default="recomputing", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.gated_mlp and args.frozen_dropout:
        p.error("--gated-mlp and --frozen-dropout each pair their runs: give one of them")
    allocator_as_fedsdr(args)
    if args.child_out:
        args.child_out.write_text(json.dumps(child(args)), encoding="utf-8")
        return 0

    from rich.table import Table

    out = console()
    settings = [(int(v), ckpt, frozen, attn, mlp) for v in args.passes.split(",")
                for ckpt in ((False, True) if args.checkpointing else (False,))
                for attn in (args.attention.split(",") if args.attention else (None,))
                for frozen in ((False, True) if args.frozen_dropout else (None,))
                for mlp in (("plain", "recomputing") if args.gated_mlp else ("recomputing",))]
    results = []
    for pass_tokens, ckpt, frozen, attn, mlp in settings:
        argv = ["--config", args.config, "--records", str(args.records), "--steps", str(args.steps),
                "--gated-mlp-in-child", mlp]
        extra = [] if frozen is None else [f"fedsdr.frozen_dropout={str(frozen).lower()}"]
        extra += [] if attn is None else [f'model.attn_implementation="{attn}"']
        for item in [*args.overrides, f"train.pass_tokens={pass_tokens}",
                     f"train.gradient_checkpointing={str(ckpt).lower()}", *extra]:
            argv += ["--set", item]
        results.append(child_figures(__file__, argv, f"the child for pass_tokens={pass_tokens}"))
    first = results[0]
    table = Table(title=f"one training step ({' + '.join(first['adapters'])}) on the {first['records']} longest "
                        f"training records ({first['tokens']} tokens, longest {first['longest']}; "
                        f"{first['compute_dtype']})")
    for col in ("pass_tokens", "checkpointing", "attention", "frozen dropout", "MLP", "passes", "s / step", "tokens/s",
                "peak RSS (MiB)", "RSS before", "kept for backward (KiB / token)", "ATen ops / step", "losses"):
        table.add_column(col, justify="right")
    for r in results:
        frozen = "-" if r["frozen_dropout"] is None else ("on" if r["frozen_dropout"] else "off")
        table.add_row(str(r["pass_tokens"]), "yes" if r["gradient_checkpointing"] else "no", r["attention"], frozen,
                      r["gated_mlp"], str(r["passes"]),
                      f"{r['seconds_per_step']:.2f}", f"{r['tokens_per_s']:.0f}", f"{r['peak_rss_mib']:.0f}",
                      f"{r['rss_before_mib']:.0f}", f"{r['saved_per_token_kib']:.0f}", str(r["ops_per_step"]),
                      " ".join(f"{x:.4f}" for x in r["losses"]))
    out.print(table)
    for plain, recomputing in zip(results[::2], results[1::2], strict=False) if args.gated_mlp else ():
        out.print(f"pass_tokens {plain['pass_tokens']}: recomputing / plain MLP = "
                  f"{plain['seconds_per_step'] / recomputing['seconds_per_step']:.2f}x the speed, peak RSS "
                  f"{recomputing['peak_rss_mib'] - plain['peak_rss_mib']:+.0f} MiB, kept for backward "
                  f"{recomputing['saved_per_token_kib'] - plain['saved_per_token_kib']:+.0f} KiB per token")
    for off, on in zip(results[::2], results[1::2], strict=False) if args.frozen_dropout else ():
        out.print(f"pass_tokens {off['pass_tokens']}: frozen adapter's dropout off / on = "
                  f"{on['seconds_per_step'] / off['seconds_per_step']:.2f}x the speed")
    if args.attention and len(args.attention.split(",")) > 1:
        for r in results:
            key = ("pass_tokens", "gradient_checkpointing", "frozen_dropout", "gated_mlp")
            base = next(b for b in results if all(b[k] == r[k] for k in key))
            if r is not base:
                out.print(f"pass_tokens {r['pass_tokens']}, checkpointing {r['gradient_checkpointing']}: "
                          f"{r['attention']} / {base['attention']} = "
                          f"{base['seconds_per_step'] / r['seconds_per_step']:.2f}x the speed, peak RSS "
                          f"{r['peak_rss_mib'] - base['peak_rss_mib']:+.0f} MiB")
    write_json(args.json, {"config": args.config, "overrides": args.overrides, "machine": machine(),
                           "steps": args.steps, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
