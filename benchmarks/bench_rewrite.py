"""FedSD rewriting throughput: the batched engine vs one `generate` call per record.

What it measures (both in one process, on the same model and the same N records):

- engine: `fedsdr.distill.rewrite_records` with the config's distill settings, exactly as a
  FedSD client calls it before round 1 (base model, adapters disabled, under the runtime's
  autocast): prompts built by `build_rewrite_messages`, sorted by length, left-padded,
  `distill.batch_size` per `generate` call, each output cut back to its own token budget.
- loop: the plain way -- for each record, the same chat prompt, the same token budget
  (`distill.budget(tokens of the reference)`), one `model.generate` call at batch 1, greedy,
  same dtype and autocast, adapters disabled.

Generated tokens are counted the same way for both: the new tokens of each record up to and
including its first eos, cut at its budget (pad/eos filler of finished rows is not counted).
tokens/s of the engine uses the time spent generating (`GenerationStats.seconds`: prompt
rendering, tokenisation, generate, decoding -- what the loop's time also covers); the wall time
of the whole `rewrite_records` call (plus filters and task scorers, which may run code tests)
is shown too. "identical" is the fraction of records whose rewrite text is the same from both;
greedy decoding should mostly agree (bf16 batched vs unbatched arithmetic can flip a
near-tie, after which the texts diverge). Sampling in the config is switched off: greedy only.

Read it as: speedup = engine tokens/s / loop tokens/s, on this machine at this moment.

Usage:
    .venv/bin/python benchmarks/bench_rewrite.py [--config configs/quickstart.toml]
        [--records 32] [--set distill.batch_size=8] [--json out.json]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import console, load, machine, parser, stopwatch, write_json  # noqa: E402


def pick_records(cfg: Any, n: int) -> list[Any]:
    """`n` training records taken round-robin over the clients (every domain represented)."""
    from fedsdr.data.federated import build_federated_data

    data = build_federated_data(cfg.data, cfg.partition, cfg.seed)
    pools = [list(c.train) for c in data.clients]
    records: list[Any] = []
    i = 0
    while len(records) < n and any(i < len(p) for p in pools):
        records.extend(p[i] for p in pools if i < len(p))
        i += 1
    return records[:n]


def loop_generate(
    model: Any, tokenizer: Any, records: list[Any], dcfg: Any
) -> tuple[list[str], list[int], list[bool], float]:
    """One greedy `generate` per record. Returns (texts, new tokens, finished, seconds)."""
    import torch

    from fedsdr.distill import build_rewrite_messages

    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    texts, counts, finished = [], [], []
    was_training = model.training
    model.eval()
    try:
        with stopwatch() as elapsed, torch.inference_mode():
            refs = tokenizer([r.output for r in records], add_special_tokens=False)["input_ids"]
            for record, ref in zip(records, refs, strict=True):
                budget = dcfg.budget(len(ref))
                prompt = tokenizer.apply_chat_template(
                    build_rewrite_messages(record, dcfg.template),
                    add_generation_prompt=True,
                    tokenize=False,
                )
                enc = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
                out = model.generate(
                    input_ids=enc["input_ids"],
                    attention_mask=enc["attention_mask"],
                    max_new_tokens=budget,
                    do_sample=False,
                    eos_token_id=eos_id,
                    pad_token_id=pad_id,
                    use_cache=True,
                )
                row = out[0, enc["input_ids"].shape[1] :].tolist()[:budget]
                if eos_id in row:
                    end = row.index(eos_id)
                    text_ids, count, done = row[:end], end + 1, True
                else:
                    text_ids, count, done = row, len(row), False
                texts.append(tokenizer.decode(text_ids, skip_special_tokens=True).strip())
                counts.append(count)
                finished.append(done)
        seconds = elapsed()
    finally:
        model.train(was_training)
    return texts, counts, finished, seconds


def run_engine(model: Any, tokenizer: Any, records: list[Any], dcfg: Any, seed: int) -> dict:
    from fedsdr.distill import rewrite_records
    from fedsdr.generation import GenerationStats

    stats = GenerationStats()
    with stopwatch() as elapsed:
        rows = rewrite_records(model, tokenizer, records, dcfg, seed=seed, stats=stats)
    return {"rows": rows, "stats": stats, "wall": elapsed()}


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=64, help="records to rewrite (default 64, about one client)")
    args = p.parse_args(argv)
    cfg = load(args)

    import torch
    from rich.table import Table

    from fedsdr.algorithms import get_algorithm
    from fedsdr.models.loading import shared_model

    out = console()
    with stopwatch() as total_elapsed:
        dcfg = cfg.distill.model_copy(deep=True)
        sampling_was_on = dcfg.do_sample
        dcfg.do_sample = False
        with stopwatch() as load_elapsed:
            model, tokenizer, runtime, _ = shared_model(
                cfg.model, cfg.lora, get_algorithm(cfg.federation.algorithm).adapters(cfg), cfg.seed
            )
        records = pick_records(cfg, args.records)
        refs = tokenizer([r.output for r in records], add_special_tokens=False)["input_ids"]
        budgets = [dcfg.budget(len(x)) for x in refs]
        out.print(
            f"[bold]bench_rewrite[/]: model {cfg.model.name}, {len(records)} records, "
            f"budgets {min(budgets)}-{max(budgets)} (sum {sum(budgets)}), "
            f"engine batch {dcfg.batch_size}, compute {runtime.compute_dtype}, "
            f"threads {torch.get_num_threads()}, load {load_elapsed():.1f} s"
            + (" [yellow](config samples: greedy forced)[/]" if sampling_was_on else "")
        )

        with runtime.autocast(), model.disable_adapter():  # what a FedSD client does in round 0
            with stopwatch() as warm_elapsed:
                warm = dcfg.model_copy(update={"min_new_tokens": 1, "max_new_tokens": 4})
                run_engine(model, tokenizer, records[:2], warm, cfg.seed)
                loop_generate(model, tokenizer, records[:1], warm)
            out.print(f"warm-up {warm_elapsed():.1f} s")
            engine = run_engine(model, tokenizer, records, dcfg, cfg.seed)
            stats = engine["stats"]
            out.print(
                f"  engine: {stats.new_tokens} tokens in {stats.seconds:.1f} s "
                f"({stats.calls} generate calls)"
            )
            texts, counts, finished, loop_seconds = loop_generate(model, tokenizer, records, dcfg)
            out.print(f"  loop: {sum(counts)} tokens in {loop_seconds:.1f} s")

    rows = engine["rows"]
    same = [r.rewrite == t for r, t in zip(rows, texts, strict=True)]
    engine_tps = stats.new_tokens / stats.seconds
    loop_tps = sum(counts) / loop_seconds
    by_domain: dict[str, list[bool]] = {}
    for r, s in zip(rows, same, strict=True):
        by_domain.setdefault(r.domain, []).append(s)
    figures: dict[str, Any] = {
        "config": args.config,
        "overrides": args.overrides,
        "model": cfg.model.name,
        "compute_dtype": str(runtime.compute_dtype),
        "machine": machine(),
        "records": len(records),
        "engine_batch_size": dcfg.batch_size,
        "budgets_sum": sum(budgets),
        "engine_new_tokens": stats.new_tokens,
        "engine_generate_seconds": stats.seconds,
        "engine_distill_wall_seconds": engine["wall"],
        "engine_generate_calls": stats.calls,
        "engine_tokens_per_s": engine_tps,
        "engine_tokens_per_s_wall": stats.new_tokens / engine["wall"],
        "loop_new_tokens": sum(counts),
        "loop_seconds": loop_seconds,
        "loop_generate_calls": len(records),
        "loop_tokens_per_s": loop_tps,
        "speedup": engine_tps / loop_tps,
        "identical_fraction": sum(same) / len(same),
        "identical_by_domain": {d: sum(v) / len(v) for d, v in sorted(by_domain.items())},
        "engine_finished": sum(not r.truncated for r in rows),
        "loop_finished": sum(finished),
        "different_ids": [r.id for r, s in zip(rows, same, strict=True) if not s],
        "loop_tokens_per_record": counts,
        "sampling_forced_off": sampling_was_on,
        "total_seconds": total_elapsed(),
    }

    table = Table(title=f"FedSD rewriting of {len(records)} records ({runtime.compute_dtype})")
    for col in ("", "new tokens", "seconds", "tokens/s", "generate calls", "finished (eos)"):
        table.add_column(col, justify="right")
    table.add_row(
        f"engine (batch {dcfg.batch_size})",
        str(stats.new_tokens),
        f"{stats.seconds:.1f}",
        f"{engine_tps:.1f}",
        str(stats.calls),
        str(figures["engine_finished"]),
    )
    table.add_row(
        "  whole rewrite_records (+ filters)",
        "",
        f"{engine['wall']:.1f}",
        f"{figures['engine_tokens_per_s_wall']:.1f}",
        "",
        "",
    )
    table.add_row(
        "loop (batch 1)",
        str(sum(counts)),
        f"{loop_seconds:.1f}",
        f"{loop_tps:.1f}",
        str(len(records)),
        str(sum(finished)),
    )
    table.add_row(
        "[bold]speedup engine / loop[/]", "", "", f"[bold]{engine_tps / loop_tps:.2f}x[/]"
    )
    table.add_row(
        "identical outputs",
        "",
        "",
        f"{sum(same)}/{len(same)} ({100 * sum(same) / len(same):.0f}%)",
    )
    for domain, v in sorted(by_domain.items()):
        table.add_row(f"  {domain}", "", "", f"{sum(v)}/{len(v)}")
    out.print(table)
    out.print(
        f"total {total_elapsed():.0f} s; threads {torch.get_num_threads()}, "
        f"load avg {machine()['load_avg_1m']:.2f}"
    )
    write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
