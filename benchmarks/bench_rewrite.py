"""FedSD rewriting throughput: the engine against the best library paths and a one-record loop.

What it measures (all in one process, on the same model and the same N records, greedy, each
record with its own token budget `distill.budget(tokens of the reference)`, the same stop ids
-- the tokenizer's eos and every end-of-turn id of the model's generation config -- the base
model with adapters disabled, under the runtime's autocast, as a FedSD client rewrites before
round 1):

- engine: `fedsdr.distill.rewrite_records` with the config's distill settings (the batched
  generation engine `fedsdr.generation`: length-sorted, left-padded, KV cache, rows leave
  the batch at their stop or budget and waiting prompts take their slots).
- bucketed: `model.generate` with length-bucketed batches: prompts sorted by length, batches
  of `distill.batch_size` (or `--batch-size`), left padding; each batch decodes up to its
  largest budget, each row is then cut back to its own budget.
- continuous: transformers' own continuous batching, the manager behind `generate_batch`,
  with one request per record so each keeps its own budget and the stop ids (`generate_batch`
  itself takes one budget for all), at most the batch size in flight, its cache sized for
  them (left to itself it sizes the cache from free memory: on a CPU, most of the RAM). Its paged cache takes the weights' dtype and its model
  runs in a background thread, outside autocast: where the runtime computes in bf16 over fp32
  weights, it runs on a copy of the base model in bf16. When the installed transformers has no
  `transformers.generation.continuous_batching`, the row says "not available in
  transformers X.Y".
- loop: one `model.generate` call per record at batch 1.
- unshared: the engine with every prompt prefilled in full (`share_prefix=False`), where the
  engine runs the opening all rewrite prompts share (system turn, instruction) once per call:
  what that sharing saves.
- onepass: the engine with each batch's prompts prefilled in one pass padded to the longest
  (`split_prefill=False`), where the engine prefills rows of similar lengths together: what
  that saves.
- nolookup: the engine decoding one token per pass (`prompt_lookup=0`), where the engine also
  checks the tokens each row drafts from its prompt and output in the same pass: what those
  drafts save (the engine's row shows its passes, drafted and confirmed tokens).
- flinear: the engine with every linear layer as `F.linear` (`skinny_rows=0`), where on a CPU
  in fp32 the engine runs a decoding pass's linears (few rows) as (W x^T)^T: what that saves.

Generated tokens are counted the same way for every path: the new tokens of each record up
to and including its first stop id, cut at its budget (filler after a row finished is not
counted). tokens/s uses the time spent generating: prompt rendering, tokenisation,
generation, decoding (for the engine `GenerationStats.seconds`; the wall time of the whole
`rewrite_records` call, which adds filters and task scorers, is shown too). "same as engine"
is the share of records whose text equals the engine's rewrite; greedy decoding should mostly
agree (bf16 arithmetic differs slightly between batch shapes and can flip a near-tie).

Targets: engine / best library path (bucketed, continuous) >= 1.3; engine / loop >= 8.

The engine at the machine's matmul rate (`matmul_floor`, measured after the paths): the FLOPs
of the base model's linear layers over every position the engine's passes computed (pads and
rejected drafts included; the LM head at each prompt's last position and at every decoding
position), over the forward GFLOP/s of those layers' shapes at M = 256 in the compute dtype.
Attention and everything outside the linears count nothing, so this is a lower bound on the
engine's time for the work it did, and the loop's time over it the most engine / loop could
reach with that work; the engine's prefill and decoding are shown as shares of that rate.

Flags:
    --config PATH       run config (default configs/quickstart.toml)
    --set KEY=VALUE     config override, repeatable (e.g. --set distill.batch_size=8)
    --records N         records to rewrite (default 64, about one client)
    --batch-size B      batch of the bucketed path (default: distill.batch_size)
    --paths LIST        comma-separated subset of engine,bucketed,continuous,loop,unshared,onepass,nolookup,flinear
                        (default all;
                        the engine always runs: the others are compared with it)
    --profile           after the timed paths, run the engine once more under torch's profiler
                        and print where its time went: matmuls, attention, cache edits (row
                        selects, stacking, compaction), the other tensor ops, and the rest of the
                        wall time (Python, the profiler's own cost); the profiled run is slower
                        than the timed one, so read its shares, not its seconds
    --lookup-tokens N   the engine's prompt-lookup budget per pass (`generation.LOOKUP_TOKENS`,
                        64): a what-if for tuning it, not a setting of fedsdr
    --json PATH         also write every figure as JSON

Usage:
    .venv/bin/python benchmarks/bench_rewrite.py [--config configs/quickstart.toml]
        [--records 64] [--paths engine,bucketed,continuous,loop,unshared,onepass,nolookup,flinear] [--profile]
        [--json out.json]
"""

from __future__ import annotations

import importlib.util
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    allocator_as_fedsdr,
    console,
    cpu_bf16,
    describe_bf16,
    forward_flops,
    forward_rate,
    load,
    machine,
    parser,
    stopwatch,
    write_json,
)

PATHS = ("engine", "bucketed", "continuous", "loop", "unshared", "onepass", "nolookup", "flinear")


@dataclass
class PathResult:
    """One path's outputs in record order, with what it cost."""

    texts: list[str]
    finished: list[bool]  # stopped at a stop id (not at the budget)
    tokens: int  # new tokens, per record up to and including its first stop id
    seconds: float
    calls: int  # generate calls (batches); requests for the continuous path
    prefill_seconds: float = 0.0  # engine only: of `seconds`, the prompts' forward passes
    prompt_tokens: int = 0  # engine only
    shared_prefix_tokens: int = 0  # engine only: the prompt tokens all prompts start with, run once per call
    prefill_passes: int = 0  # engine only: forward passes over the prompts (a call's similar lengths share one)
    record_seconds: list[float] | None = None  # loop only: each record's own generate call
    decode_passes: int = 0  # engine only: forward passes while decoding
    drafted: int = 0  # engine only: prompt-lookup tokens checked in those passes
    accepted: int = 0  # engine only: of which confirmed
    prefill_positions: int = 0  # engine only: positions its prefill passes computed, pads included
    decode_positions: int = 0  # engine only: positions its decoding passes computed (tokens, drafts, pads)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


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


def prompts_and_budgets(tokenizer: Any, records: list[Any], dcfg: Any) -> tuple[list[list[int]], list[int]]:
    """The engine's prompt ids (chat template, generation prompt) and per-record budgets."""
    from fedsdr.distill import build_rewrite_messages

    texts = [
        tokenizer.apply_chat_template(
            build_rewrite_messages(r, dcfg.template), add_generation_prompt=True, tokenize=False
        )
        for r in records
    ]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    refs = tokenizer([r.output for r in records], add_special_tokens=False)["input_ids"]
    return ids, [dcfg.budget(len(x)) for x in refs]


def finish(tokenizer: Any, row: list[int], budget: int, stops: frozenset[int]) -> tuple[str, int, bool]:
    """Cut a generated row at its budget and first stop id: (text, tokens counted, finished)."""
    row = row[:budget]
    end = next((j for j, t in enumerate(row) if t in stops), None)
    kept, count = (row, len(row)) if end is None else (row[:end], end + 1)
    return tokenizer.decode(kept, skip_special_tokens=True).strip(), count, end is not None


def run_engine(model: Any, tokenizer: Any, records: list[Any], dcfg: Any, seed: int) -> tuple[PathResult, Any, float]:
    """The engine as FedSD calls it. Returns (result, the distilled rows, whole-call wall time)."""
    from fedsdr.distill import rewrite_records
    from fedsdr.generation import GenerationStats

    stats = GenerationStats()
    with stopwatch() as elapsed:
        rows = rewrite_records(model, tokenizer, records, dcfg, seed=seed, stats=stats)
    result = PathResult([r.rewrite for r in rows], [not r.truncated for r in rows], stats.new_tokens,
                        stats.seconds, stats.calls, stats.prefill_seconds, stats.prompt_tokens,
                        stats.shared_prefix_tokens, stats.prefill_passes, decode_passes=stats.decode_passes,
                        drafted=stats.drafted, accepted=stats.accepted,
                        prefill_positions=stats.prefill_positions, decode_positions=stats.decode_positions)
    return result, rows, elapsed()


def run_bucketed(model: Any, tokenizer: Any, records: list[Any], dcfg: Any, batch_size: int,
                 stops: frozenset[int]) -> PathResult:
    """`model.generate` on length-bucketed, left-padded batches."""
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops)
    n = len(records)
    texts, counts, finished = [""] * n, [0] * n, [False] * n
    calls = 0
    with stopwatch() as elapsed, torch.inference_mode():
        ids, budgets = prompts_and_budgets(tokenizer, records, dcfg)
        order = sorted(range(n), key=lambda i: len(ids[i]))
        for start in range(0, n, batch_size):
            rows = order[start:start + batch_size]
            width = max(len(ids[i]) for i in rows)
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, i in enumerate(rows):  # left padding
                input_ids[j, width - len(ids[i]):] = torch.tensor(ids[i])
                mask[j, width - len(ids[i]):] = 1
            out = model.generate(
                input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device),
                max_new_tokens=max(budgets[i] for i in rows), do_sample=False,
                eos_token_id=sorted(stops), pad_token_id=pad_id, use_cache=True,
            )
            calls += 1
            for j, i in enumerate(rows):
                texts[i], counts[i], finished[i] = finish(
                    tokenizer, out[j, width:].tolist(), budgets[i], stops
                )
    return PathResult(texts, finished, sum(counts), elapsed(), calls)


def continuous_available() -> str | None:
    """None when transformers has continuous batching, else why not."""
    import transformers

    if importlib.util.find_spec("transformers.generation.continuous_batching") is None:
        major_minor = ".".join(transformers.__version__.split(".")[:2])
        return f"not available in transformers {major_minor}"
    return None


def continuous_model(model: Any, runtime: Any) -> Any:
    """The base model for continuous batching. Its paged KV cache takes the weights' dtype and
    its model runs in a background thread, outside the caller's autocast: where the runtime
    computes in another dtype than its weights (bf16 autocast over fp32 weights), a copy of
    the base model in the compute dtype (and with SDPA where fedsdr trains with its own attention,
    whose inference is SDPA's). Call it with the adapters disabled (the copy keeps
    them disabled)."""
    import copy

    from fedsdr.models.attention import inference_attention

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    attention = base.config._attn_implementation
    if runtime.compute_dtype == base.dtype and inference_attention(attention) == attention:
        return base
    # a copy also where the model trains with fedsdr's own attention (which continuous batching
    # refuses): the copy runs the attention inference runs
    cb_model = copy.deepcopy(base).to(runtime.compute_dtype)
    cb_model.set_attn_implementation(inference_attention(attention))
    return cb_model


def run_continuous(base: Any, tokenizer: Any, records: list[Any], dcfg: Any, batch_size: int,
                   stops: frozenset[int]) -> PathResult:
    """transformers' continuous batching: the `generate_batch` manager, one request per record,
    at most `batch_size` requests in flight. Its cache is sized for them: left to itself it
    sizes the cache (and the attention masks over it) from the free memory, which on a CPU is
    most of the machine's RAM."""
    from math import ceil

    from transformers import ContinuousBatchingConfig, GenerationConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    n = len(records)
    texts, counts, finished = [""] * n, [0] * n, [False] * n
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops)
    with stopwatch() as elapsed:
        ids, budgets = prompts_and_budgets(tokenizer, records, dcfg)
        gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=max(budgets),
                                   eos_token_id=sorted(stops), pad_token_id=pad_id)
        longest = max(len(x) for x in ids)
        hints = WorkloadHints(max_prompt_length=longest, max_generated_length=max(budgets),
                              num_requests=n)
        cb_cfg = ContinuousBatchingConfig()
        in_flight = min(n, batch_size)
        cb_cfg.max_requests_per_batch = in_flight
        cb_cfg.num_blocks = in_flight * (ceil((longest + max(budgets)) / cb_cfg.page_size) + 1)
        cb_cfg.max_batch_tokens = min(8192, in_flight * longest)
        with base.continuous_batching_context_manager(
            generation_config=gen_cfg, continuous_batching_config=cb_cfg, block=True, timeout=5,
            workload_hints=hints,
        ) as manager:
            request_of = {}
            for i in range(n):
                rid = manager.add_request(ids[i], request_id=f"r{i}", max_new_tokens=budgets[i],
                                          eos_token_id=sorted(stops))
                request_of[rid] = i
            done = 0
            while done < n:
                result = manager.get_result(timeout=1)
                if result is None:
                    if not manager.is_running():
                        raise RuntimeError("continuous batching stopped before every request finished")
                    continue
                if result.is_finished():
                    if result.error is not None:
                        raise RuntimeError(f"continuous batching: {result.error}")
                    i = request_of[result.request_id]
                    texts[i], counts[i], finished[i] = finish(
                        tokenizer, list(result.generated_tokens), budgets[i], stops
                    )
                    done += 1
    return PathResult(texts, finished, sum(counts), elapsed(), n)


def run_loop(model: Any, tokenizer: Any, records: list[Any], dcfg: Any, stops: frozenset[int]) -> PathResult:
    """One greedy `model.generate` per record, batch 1."""
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops)
    texts, counts, finished, seconds = [], [], [], []
    with stopwatch() as elapsed, torch.inference_mode():
        ids, budgets = prompts_and_budgets(tokenizer, records, dcfg)
        for prompt, budget in zip(ids, budgets, strict=True):
            start = time.perf_counter()
            input_ids = torch.tensor([prompt], device=model.device)
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                 max_new_tokens=budget, do_sample=False, eos_token_id=sorted(stops),
                                 pad_token_id=pad_id, use_cache=True)
            text, count, done = finish(tokenizer, out[0, len(prompt):].tolist(), budget, stops)
            texts.append(text)
            counts.append(count)
            finished.append(done)
            seconds.append(time.perf_counter() - start)
    return PathResult(texts, finished, sum(counts), elapsed(), len(records), record_seconds=seconds)


def run_variant(model: Any, tokenizer: Any, records: list[Any], dcfg: Any, seed: int, **engine: Any) -> PathResult:
    """The engine's generation as `rewrite_records` calls it, with one of its options turned off
    (`share_prefix=False`: every prompt prefilled in full; `split_prefill=False`: a batch's
    prompts prefilled in one padded pass; `prompt_lookup=0`: one token per decoding pass;
    `skinny_rows=0`: every linear layer as `F.linear`)."""
    from fedsdr.distill import build_rewrite_messages
    from fedsdr.generation import GenerationStats, generate_detailed

    _, budgets = prompts_and_budgets(tokenizer, records, dcfg)
    stats = GenerationStats()
    outputs = generate_detailed(model, tokenizer, [build_rewrite_messages(r, dcfg.template) for r in records],
                                max_new_tokens=budgets, batch_size=dcfg.batch_size, do_sample=False, seed=seed,
                                stats=stats, **engine)
    return PathResult([o.text.strip() for o in outputs], [o.finished for o in outputs], stats.new_tokens,
                      stats.seconds, stats.calls, stats.prefill_seconds, stats.prompt_tokens,
                      prefill_passes=stats.prefill_passes, decode_passes=stats.decode_passes,
                      drafted=stats.drafted, accepted=stats.accepted)


def matmul_floor(model: Any, engine: PathResult, records: int, compute: Any, device: Any) -> dict[str, Any]:
    """What the engine's forward passes would take at the machine's matmul rate (`forward_rate`):
    the FLOPs of the base model's linear layers over every position the passes computed (pads
    and rejected drafts included; the LM head at each prompt's last position and at every
    decoding position) over the forward rate at the model's shapes with M = MATMUL_M rows,
    measured here. Attention and everything outside the linears count nothing: a lower bound."""
    rate = forward_rate(model, compute, device)
    prefill = forward_flops(rate, engine.prefill_positions, records) / rate["flops_per_s"]
    decode = forward_flops(rate, engine.decode_positions, engine.decode_positions) / rate["flops_per_s"]
    return {"matmul_m": rate["matmul_m"], "forward_gflops": rate["flops_per_s"] / 1e9, "body_params": rate["body_params"],
            "head_params": rate["head_params"], "prefill_positions": engine.prefill_positions,
            "decode_positions": engine.decode_positions, "prefill_seconds_at_rate": prefill,
            "decode_seconds_at_rate": decode, "seconds_at_rate": prefill + decode,
            "prefill_share_of_rate": prefill / engine.prefill_seconds if engine.prefill_seconds else None,
            "decode_share_of_rate": decode / (engine.seconds - engine.prefill_seconds)}


# torch ops by what they do in the engine, for `--profile` (the rest are "other tensor ops")
OP_GROUPS = {
    "matmuls": ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul"),
    "attention": ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu"),
    "cache edits": ("aten::index", "aten::index_select", "aten::gather", "aten::cat", "aten::narrow",
                    "aten::copy_", "aten::slice"),
}


def profile_engine(run_engine_once: Any) -> dict[str, Any]:
    """Run the engine once under torch's CPU profiler; seconds by group of ops (self time) and
    the wall time left outside torch ops."""
    from torch.profiler import ProfilerActivity, profile

    with stopwatch() as elapsed, profile(activities=[ProfilerActivity.CPU]) as prof:
        run_engine_once()
    wall = elapsed()
    groups = dict.fromkeys([*OP_GROUPS, "other tensor ops"], 0.0)
    top: list[tuple[str, float, int]] = []
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        group = next((g for g, names in OP_GROUPS.items() if event.key in names), "other tensor ops")
        groups[group] += seconds
        top.append((event.key, seconds, event.count))
    groups["outside torch ops"] = max(0.0, wall - sum(groups.values()))
    top.sort(key=lambda row: -row[1])
    return {"wall_seconds": wall, "groups": groups,
            "top_ops": [{"op": name, "seconds": sec, "calls": calls} for name, sec, calls in top[:12]]}


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=64, help="records to rewrite (default 64, about one client)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="batch of the bucketed path (default distill.batch_size)")
    p.add_argument("--paths", default=",".join(PATHS),
                   help=f"comma-separated subset of {','.join(PATHS)} (default all)")
    p.add_argument("--profile", action="store_true",
                   help="also run the engine once under torch's profiler and print where its time went")
    p.add_argument("--lookup-tokens", type=int, default=None,
                   help="the engine's prompt-lookup budget, tokens a decoding pass takes over all rows "
                        "(generation.LOOKUP_TOKENS; default the engine's own)")
    args = p.parse_args(argv)
    allocator_as_fedsdr(args)
    if args.lookup_tokens is not None and args.lookup_tokens < 1:
        raise SystemExit(f"--lookup-tokens must be >= 1, got {args.lookup_tokens}")
    paths = [x.strip() for x in args.paths.split(",") if x.strip()]
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        raise SystemExit(f"--paths: unknown {unknown}; choose from {', '.join(PATHS)}")
    cfg = load(args)

    import torch
    import transformers
    from rich.table import Table

    from fedsdr import generation
    from fedsdr.algorithms import get_algorithm
    from fedsdr.generation import stop_token_ids
    from fedsdr.models.adapters import adapters_off
    from fedsdr.models.loading import shared_model

    if args.lookup_tokens is not None:
        generation.LOOKUP_TOKENS = args.lookup_tokens  # read at each pass: a what-if, not a setting
    out = console()
    with stopwatch() as total_elapsed:
        dcfg = cfg.distill.model_copy(deep=True)
        sampling_was_on = dcfg.do_sample
        dcfg.do_sample = False
        batch_size = args.batch_size or dcfg.batch_size
        with stopwatch() as load_elapsed:
            model, tokenizer, runtime, _ = shared_model(
                cfg.model, cfg.lora, get_algorithm(cfg).adapters(cfg), cfg.seed
            )
        stops = stop_token_ids(model, tokenizer)
        records = pick_records(cfg, args.records)
        _, budgets = prompts_and_budgets(tokenizer, records, dcfg)
        unavailable = continuous_available() if "continuous" in paths else None
        out.print(
            f"[bold]bench_rewrite[/]: model {cfg.model.name}, {len(records)} records, "
            f"budgets {min(budgets)}-{max(budgets)} (sum {sum(budgets)}), batch {batch_size}, "
            f"stop ids {sorted(stops)}, compute {runtime.compute_dtype} "
            f"({describe_bf16(cpu_bf16())}), threads {torch.get_num_threads()}, "
            f"transformers {transformers.__version__}, load {load_elapsed():.1f} s"
            + (" [yellow](config samples: greedy forced)[/]" if sampling_was_on else "")
        )

        def run(path: str, recs: list[Any], d: Any) -> Any:
            if path == "engine":
                return run_engine(model, tokenizer, recs, d, cfg.seed)
            if path == "bucketed":
                return run_bucketed(model, tokenizer, recs, d, batch_size, stops)
            if path == "continuous":
                return run_continuous(cb_model, tokenizer, recs, d, batch_size, stops)
            if path == "unshared":
                return run_variant(model, tokenizer, recs, d, cfg.seed, share_prefix=False)
            if path == "onepass":
                return run_variant(model, tokenizer, recs, d, cfg.seed, split_prefill=False)
            if path == "nolookup":
                return run_variant(model, tokenizer, recs, d, cfg.seed, prompt_lookup=0)
            if path == "flinear":
                return run_variant(model, tokenizer, recs, d, cfg.seed, skinny_rows=0)
            return run_loop(model, tokenizer, recs, d, stops)

        active = ["engine"] + [x for x in PATHS[1:] if x in paths and not (x == "continuous" and unavailable)]
        results: dict[str, Any] = {}
        was_training = model.training
        model.eval()
        try:
            with runtime.autocast(), adapters_off(model):  # what a FedSD client does in round 0
                cb_model = continuous_model(model, runtime) if "continuous" in active else None
                with stopwatch() as warm_elapsed:
                    warm = dcfg.model_copy(update={"min_new_tokens": 1, "max_new_tokens": 4})
                    for path in active:
                        run(path, records[:2], warm)
                    # and every prompt through the engine: its first full-size caches (the
                    # allocator's first growth to them) would otherwise fall on its timed run
                    run("engine", records, warm)
                out.print(f"warm-up {warm_elapsed():.1f} s")
                for path in active:
                    results[path] = run(path, records, dcfg)
                    r = results[path][0] if path == "engine" else results[path]
                    out.print(f"  {path}: {r.tokens} tokens in {r.seconds:.1f} s")
                profiled = profile_engine(lambda: run("engine", records, dcfg)) if args.profile else None
        finally:
            model.train(was_training)

    engine, rows, engine_wall = results.pop("engine")
    floor = matmul_floor(model, engine, len(records), runtime.compute_dtype, runtime.device)
    library = {k: v for k, v in results.items() if k in ("bucketed", "continuous")}
    best = max(library, key=lambda k: library[k].tokens_per_s) if library else None
    figures: dict[str, Any] = {
        "config": args.config,
        "overrides": args.overrides,
        "model": cfg.model.name,
        "compute_dtype": str(runtime.compute_dtype),
        "machine": machine(),
        "transformers": transformers.__version__,
        "records": len(records),
        "batch_size": batch_size,
        "lookup_tokens": generation.LOOKUP_TOKENS,
        "budgets_sum": sum(budgets),
        "stop_ids": sorted(stops),
        "sampling_forced_off": sampling_was_on,
        "continuous": (unavailable or "ran") if "continuous" in paths else "not requested",
        "engine": {"tokens": engine.tokens, "seconds": engine.seconds, "tokens_per_s": engine.tokens_per_s,
                   "calls": engine.calls, "finished": sum(engine.finished),
                   "rewrite_records_wall_s": engine_wall, "prefill_seconds": engine.prefill_seconds,
                   "prompt_tokens": engine.prompt_tokens, "shared_prefix_tokens": engine.shared_prefix_tokens,
                   "prefill_passes": engine.prefill_passes, "decode_passes": engine.decode_passes,
                   "drafted": engine.drafted, "accepted": engine.accepted,
                   "prefill_positions": engine.prefill_positions, "decode_positions": engine.decode_positions},
        "matmul_floor": floor,
    }
    if profiled:
        figures["profile"] = profiled
    for name, r in results.items():
        same = [a == b for a, b in zip(r.texts, engine.texts, strict=True)]
        figures[name] = {"tokens": r.tokens, "seconds": r.seconds, "tokens_per_s": r.tokens_per_s,
                         "calls": r.calls, "finished": sum(r.finished),
                         "same_as_engine": sum(same) / len(same),
                         "engine_speedup": engine.tokens_per_s / r.tokens_per_s,
                         "different_ids": [rec.id for rec, s in zip(records, same, strict=True) if not s]}
        if r.prefill_seconds:
            figures[name]["prefill_seconds"] = r.prefill_seconds
            figures[name]["prefill_passes"] = r.prefill_passes
            figures[name]["decode_passes"] = r.decode_passes
        if r.record_seconds:
            slowest = max(range(len(r.record_seconds)), key=r.record_seconds.__getitem__)
            figures[name]["slowest_record"] = {"id": records[slowest].id, "seconds": r.record_seconds[slowest]}
    if best:
        figures["best_library"] = best
        figures["engine_over_best_library"] = figures[best]["engine_speedup"]
    if "loop" in results:
        figures["engine_over_loop"] = figures["loop"]["engine_speedup"]
        floor["engine_over_loop_at_rate"] = results["loop"].seconds / floor["seconds_at_rate"]
    figures["total_seconds"] = total_elapsed()

    table = Table(title=f"FedSD rewriting of {len(records)} records ({runtime.compute_dtype}, greedy)")
    for col in ("path", "new tokens", "seconds", "tokens/s", "calls", "finished (stop id)",
                "same as engine", "engine speedup"):
        table.add_column(col, justify="right")
    table.add_row(f"engine (batch {dcfg.batch_size})", str(engine.tokens), f"{engine.seconds:.1f}",
                  f"{engine.tokens_per_s:.1f}", str(engine.calls), str(sum(engine.finished)), "", "")
    table.add_row("  whole rewrite_records (+ filters)", "", f"{engine_wall:.1f}",
                  f"{engine.tokens / engine_wall:.1f}", "", "", "", "")
    labels = {"bucketed": f"model.generate, length-bucketed (batch {batch_size})",
              "continuous": "transformers continuous batching", "loop": "loop (batch 1)",
              "unshared": "engine, each prompt prefilled in full",
              "onepass": "engine, one padded prefill pass per batch",
              "nolookup": "engine, one token per decoding pass",
              "flinear": "engine, every linear as F.linear"}
    for name, r in results.items():
        f = figures[name]
        table.add_row(labels[name], str(r.tokens), f"{r.seconds:.1f}", f"{r.tokens_per_s:.1f}",
                      str(r.calls), str(sum(r.finished)), f"{100 * f['same_as_engine']:.0f}%",
                      f"{f['engine_speedup']:.2f}x")
    if unavailable:
        table.add_row(labels["continuous"], unavailable, "", "", "", "", "", "")
    out.print(table)
    verdict = lambda x, target: "[green]met[/]" if x >= target else "[red]not met[/]"  # noqa: E731
    if best:
        x = figures["engine_over_best_library"]
        out.print(f"[bold]engine / best library path ({best})[/]: {x:.2f}x "
                  f"({verdict(x, 1.3)}, target >= 1.3)")
    if "loop" in results:
        x = figures["engine_over_loop"]
        out.print(f"[bold]engine / one-record loop[/]: {x:.2f}x ({verdict(x, 8.0)}, target >= 8)")
        needed = engine.tokens / (8.0 * results["loop"].tokens_per_s)
        figures["seconds_for_8x_loop"] = needed
        out.print(f"  8x the loop's tokens/s means the engine's {engine.tokens} tokens in {needed:.1f} s; its "
                  f"prefill alone ({engine.prompt_tokens} prompt tokens, of which a shared prefix of "
                  f"{engine.shared_prefix_tokens} run once per call; {engine.calls} calls) took "
                  f"{engine.prefill_seconds:.1f} s of its {engine.seconds:.1f} s ({engine.prefill_passes} passes)")
        out.print(f"  at the machine's matmul rate ({floor['forward_gflops']:.0f} GFLOP/s forward at M = "
                  f"{floor['matmul_m']}) the engine's passes would take at least {floor['seconds_at_rate']:.1f} s (prefill "
                  f"{floor['prefill_seconds_at_rate']:.1f}, decoding {floor['decode_seconds_at_rate']:.1f}: "
                  f"{engine.prefill_positions} and {engine.decode_positions} positions): engine / loop "
                  f"{floor['engine_over_loop_at_rate']:.2f}x at most; its prefill ran at "
                  f"{floor['prefill_share_of_rate']:.2f} of that rate, its decoding at "
                  f"{floor['decode_share_of_rate']:.2f}")
        slowest = figures["loop"]["slowest_record"]
        out.print(f"  the loop's slowest record alone took {slowest['seconds']:.1f} s (a decoding step per token; the "
                  "engine's passes confirm drafted tokens, several per pass where a rewrite copies its reference)")
    out.print(f"  engine: {engine.decode_passes} decoding passes checked {engine.drafted} drafted tokens, "
              f"confirmed {engine.accepted}")
    if "nolookup" in results:
        r = results["nolookup"]
        out.print(f"  {labels['nolookup']}: {r.decode_passes} decoding passes, {r.seconds - r.prefill_seconds:.1f} s "
                  f"after prefill (engine {engine.seconds - engine.prefill_seconds:.1f} s)")
    for name in ("unshared", "onepass"):
        if name in results:
            r = results[name]
            out.print(f"  {labels[name]}: prefill {r.prefill_seconds:.1f} s in {r.prefill_passes} passes "
                      f"(engine {engine.prefill_seconds:.1f} s in {engine.prefill_passes})")
    if profiled:
        wall = profiled["wall_seconds"]
        shares = ", ".join(f"{g} {sec:.1f} s ({sec / wall:.0%})" for g, sec in profiled["groups"].items())
        out.print(f"  profiled engine run ({wall:.1f} s, slower than the timed one): {shares}")
        out.print("    top ops by own time: " + ", ".join(
            f"{row['op'].removeprefix('aten::')} {row['seconds']:.1f} s / {row['calls']}" for row in profiled["top_ops"][:8]))
    out.print(
        f"total {total_elapsed():.0f} s; threads {torch.get_num_threads()}, "
        f"load avg {machine()['load_avg_1m']:.2f}"
    )
    write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
