"""Evaluation throughput on the quickstart's evaluation sets, the base model, one process.

What it measures, each on the same loaded model and in this order:

- loss: reference loss of every global held-out record (forward only, response positions), the
  tokens all records start with run once and shared (`fedsdr.prefix`); side by side with the
  same losses from the full forward of every row ("loss, full forward"), alternating, best of
  `--loss-repeats` each, with the ratio and the largest difference of a domain's mean loss;
- multiple choice: the general suite (BIG-bench CRASS + BBH sources) ranked by log-likelihood,
  `--items` per task (prepared once from the bigbench sdist on PyPI; skipped with --no-general);
- generation: greedy answers of the records `eval.generate_per_domain` selects, within each
  domain's token budget, scored (accuracy, hallucination, ROUGE-L...); with `--flinear`, again
  with every linear as `F.linear` (`skinny_linear.SKINNY_ROWS = 0`, where on a CPU in fp32 the
  engine runs a decoding pass's linears as (W x^T)^T), side by side, with the ratio and whether
  the texts are the same.

It prints records/s for each, the share of generated answers that hit their budget
(`truncated`, per domain), and generated tokens/s. No cache is used: every figure is computed.

The loss at the machine's matmul rate: the FLOPs of the base model's linear layers over the
positions the loss path computes (every record's tokens after the shared prefix, the prefix
once; the LM head at the scored positions only; padding not counted) over the forward GFLOP/s of
those layers' shapes at M = 256 in the compute dtype, timed in the same run (`forward_rate`, as
`bench_rewrite.py`'s floor). A lower bound on any evaluation of these records' losses here, and
the loss path's time as a share of it.

Usage:
    .venv/bin/python benchmarks/bench_eval.py [--config configs/quickstart.toml] [--items 5]
        [--set eval.generate_per_domain=10] [--adapter-cost] [--flinear] [--json out.json]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import allocator_as_fedsdr, console, forward_flops, forward_rate, load, machine, parser, stopwatch, write_json  # noqa: E402, I001


def loss_floor(model: Any, tokenizer: Any, records: list[Any], system_prompt: str, runtime: Any) -> dict[str, Any]:
    """The seconds the reference losses of `records` take at the machine's forward matmul rate:
    the positions the loss path computes (after the prefix it shares, `shared_prefix_of`, that
    prefix once) through the decoder's linears, and the scored positions through the LM head."""
    from fedsdr.train import IGNORE, encode, shared_prefix_of

    examples = [encode(tokenizer, r, system_prompt) for r in records]
    prefix = shared_prefix_of(model, examples, runtime.autocast)
    shared = prefix.length if prefix is not None else 0
    positions = sum(len(e.input_ids) - shared for e in examples) + shared
    scored = sum(sum(1 for t in e.labels if t != IGNORE) for e in examples)
    rate = forward_rate(model, runtime.compute_dtype, runtime.device)
    flops = forward_flops(rate, positions, scored)
    return {"positions": positions, "scored": scored, "shared_prefix": shared, "matmul_m": rate["matmul_m"],
            "forward_gflops": rate["flops_per_s"] / 1e9, "tflop": flops / 1e12,
            "seconds_at_rate": flops / rate["flops_per_s"]}


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--items", type=int, default=5, help="general suite: items per task (default 5)")
    p.add_argument("--no-general", action="store_true", help="skip the multiple-choice suite")
    p.add_argument("--loss-repeats", type=int, default=2, help="loss: runs of each path (default 2)")
    p.add_argument("--adapter-cost", action="store_true",
                   help="generation also with the fresh (zero-output) adapter left on, as before base-model "
                   "evaluations switched adapters off; prints the ratio and whether the texts are the same")
    p.add_argument("--flinear", action="store_true",
                   help="generation also with every linear as F.linear; prints the ratio and the same texts")
    args = p.parse_args()
    allocator_as_fedsdr(args)
    cfg = load(args)

    from fedsdr.algorithms import get_algorithm
    from fedsdr.data.federated import build_federated_data
    from fedsdr.evaluate import Evaluator, generated_subset
    from fedsdr.models.adapters import activate
    from fedsdr.models.loading import shared_model

    algorithm = get_algorithm(cfg)
    model, tok, runtime, source = shared_model(cfg.model, cfg.lora, algorithm.adapters(cfg), cfg.seed)
    activate(model, [algorithm.global_adapter], trainable=[])
    records = build_federated_data(cfg.data, cfg.partition, cfg.seed).global_test
    figures: dict[str, Any] = {"machine": machine(), "compute_dtype": str(runtime.compute_dtype)}

    # what the server runs; no cache_dir, so every figure is computed. `base_model` switches the
    # (fresh, zero-output) adapter off, as base-model evaluations do.
    evaluator = Evaluator(model, tok, runtime.autocast, cfg.eval, source, system_prompt=cfg.data.system_prompt,
                          seed=cfg.seed)

    def run(recs: list[Any], generate: bool, adapters_off: bool = True) -> tuple[dict, list[dict], float]:
        with stopwatch() as elapsed:
            result, preds = evaluator(recs, generate=generate, base_model=adapters_off)
        return result, preds, elapsed()

    import fedsdr.evaluate as evaluate_module

    shared = evaluate_module.shared_prefix_of
    paths = {"loss": shared, "loss, full forward": lambda *args, **kwargs: None}
    run(records[:8], generate=False)  # warm-up
    results: dict[str, dict] = {}
    for _ in range(args.loss_repeats):
        for name, prefix_of in paths.items():
            evaluate_module.shared_prefix_of = prefix_of
            try:
                results[name], _, seconds = run(records, generate=False)
            finally:
                evaluate_module.shared_prefix_of = shared
            best = min(seconds, figures.get(name, {}).get("seconds", seconds))
            figures[name] = {"records": len(records), "seconds": best, "records_per_s": len(records) / best}
    floor = loss_floor(model, tok, records, cfg.data.system_prompt, runtime)
    floor["share_of_rate"] = floor["seconds_at_rate"] / figures["loss"]["seconds"]
    figures["loss_at_matmul_rate"] = floor
    figures["loss_shared_prefix_speedup"] = figures["loss, full forward"]["seconds"] / figures["loss"]["seconds"]
    figures["loss_max_domain_diff"] = max(abs(results["loss"][d]["loss"] - results["loss, full forward"][d]["loss"])
                                          for d in results["loss"])

    if not args.no_general:
        from fedsdr.data.bigbench import load_general_suite

        suite = load_general_suite(args.items, cfg.eval.general_few_shot, cfg.seed)
        _, _, seconds = run(suite, generate=False)
        choices = sum(len(r.choices or ()) for r in suite)
        figures["multiple_choice"] = {"records": len(suite), "choices": choices, "seconds": seconds,
                                      "records_per_s": len(suite) / seconds}

    chosen = [records[i] for i in generated_subset(cfg.eval, records)]
    result, preds, seconds = run(chosen, generate=True)
    new_tokens = sum(p.get("new_tokens", 0) for p in preds)
    figures["generation"] = {
        "records": len(chosen), "seconds": seconds, "records_per_s": len(chosen) / seconds,
        "new_tokens": new_tokens, "new_tokens_per_s": new_tokens / seconds,
        "truncated": {d: r.get("truncated") for d, r in result.items()},
        "budget": {d: max(p["budget"] for p in preds if p["domain"] == d) for d in result if d != "all"},
    }
    if args.adapter_cost:
        _, preds_on, seconds_on = run(chosen, generate=True, adapters_off=False)
        figures["generation_adapter_on"] = {
            "seconds": seconds_on, "speedup_off": seconds_on / seconds,
            "same_texts": sum(a["response"] == b["response"] for a, b in zip(preds, preds_on, strict=True)),
        }

    if args.flinear:
        from fedsdr.models import skinny_linear

        skinny_linear.SKINNY_ROWS, rows = 0, skinny_linear.SKINNY_ROWS  # a what-if, read at each call
        _, preds_flinear, seconds_flinear = run(chosen, generate=True)
        skinny_linear.SKINNY_ROWS = rows
        figures["generation_flinear"] = {
            "seconds": seconds_flinear, "speedup_skinny": seconds_flinear / seconds,
            "same_texts": sum(a["response"] == b["response"] for a, b in zip(preds, preds_flinear, strict=True)),
        }

    out = console()
    from rich.table import Table

    table = Table(title=f"evaluation throughput, base model ({cfg.model.name}, {runtime.compute_dtype})")
    for col in ("what", "records", "seconds", "records/s"):
        table.add_column(col, justify="left" if col == "what" else "right")
    for name in ("loss", "loss, full forward", "multiple_choice", "generation"):
        if name in figures:
            f = figures[name]
            table.add_row(name, str(f["records"]), f"{f['seconds']:.1f}", f"{f['records_per_s']:.2f}")
    out.print(table)
    out.print(f"loss: shared prefix / full forward = {figures['loss_shared_prefix_speedup']:.2f}x the speed; "
              f"largest difference of a domain's mean loss {figures['loss_max_domain_diff']:.2e}")
    out.print(f"loss at the machine's matmul rate ({floor['forward_gflops']:.0f} GFLOP/s forward at M = {floor['matmul_m']}): "
              f"{floor['positions']} positions ({floor['scored']} scored), {floor['tflop']:.2f} TFLOP, at least "
              f"{floor['seconds_at_rate']:.1f} s; the loss path ran at {floor['share_of_rate']:.2f} of that rate")
    gen = figures["generation"]
    out.print(f"generation: {gen['new_tokens_per_s']:.1f} new tokens/s; truncated share per domain "
              + ", ".join(f"{d} {v:.2f}" for d, v in gen["truncated"].items() if v is not None)
              + "; budgets " + ", ".join(f"{d} {b}" for d, b in gen["budget"].items()))
    if args.adapter_cost:
        on = figures["generation_adapter_on"]
        out.print(f"generation with the zero adapter on: {on['seconds']:.1f} s; adapters off = "
                  f"{on['speedup_off']:.2f}x the speed; same texts {on['same_texts']}/{len(preds)}")
    if args.flinear:
        fl = figures["generation_flinear"]
        out.print(f"generation with every linear as F.linear: {fl['seconds']:.1f} s; the engine's few-row linears "
                  f"as (W x^T)^T = {fl['speedup_skinny']:.2f}x the speed; same texts {fl['same_texts']}/{len(preds)}")
    write_json(args.json, figures)


if __name__ == "__main__":
    main()
