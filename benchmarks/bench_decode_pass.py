"""One decoding pass of the base model by rows: what a pass costs beside its linears.

A decoding pass takes one token per row over each row's KV cache. This builds the engine's cache
(`fedsdr.generation.new_cache`) with `--columns` columns of random keys and values for R rows,
runs one pass to reserve the cache's room (as the engine does once per 64 steps), then times
`--repeats` passes (median; each appends a column) in the compute dtype, and sets beside each
the time its linears (decoder body and LM head, M = R) take in the isolated timing of
`_common.forward_rate` (best of 3, one shape's weights at a time, so hot in cache) and the time
the model's own linears take run one after the other at M = R, each weight once, as in a pass
(median of `--repeats`): the rest of a pass is attention, the cache, small ops and Python. Once,
it also times reading every weight from memory (a sum over each parameter, median of 5), what a
pass must read at least.

Each pass and each in-order timing runs twice, side by side: with every linear as `F.linear`
(x W^T) and as the engine runs it, `fedsdr.models.skinny_linear` ((W x^T)^T at <= `--skinny-rows` rows (64), fp32
on a CPU); the table prints the ratio. `--skinny-rows N` moves that limit (a what-if on
`skinny_linear.SKINNY_ROWS`, e.g. to see where the two forms cross over).

Usage:
    .venv/bin/python benchmarks/bench_decode_pass.py [--config configs/quickstart.toml]
        [--rows 8,16,32,45,48,64] [--columns 300] [--repeats 5] [--skinny-rows 64] [--json out.json]
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import console, forward_flops, forward_rate, load, machine, median, parser, write_json  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="8,16,32,45,48,64", help="comma-separated rows per pass")
    p.add_argument("--columns", type=int, default=300, help="cached columns per row")
    p.add_argument("--repeats", type=int, default=5, help="timed passes per row count")
    p.add_argument("--skinny-rows", type=int, default=None,
                   help="most rows a linear runs as (W x^T)^T (default: skinny_linear.SKINNY_ROWS)")
    args = p.parse_args(argv)
    rows_list = [int(x) for x in args.rows.split(",") if x.strip()]
    cfg = load(args)

    import torch
    from rich.table import Table

    from fedsdr.generation import new_cache
    from fedsdr.kv import with_cache
    from fedsdr.models.loading import load_base_model, resolve_model_source, resolve_runtime
    from fedsdr.models.skinny_linear import SKINNY_ROWS, skinny_linear, skinny_linears

    skinny_rows = SKINNY_ROWS if args.skinny_rows is None else args.skinny_rows
    runtime = resolve_runtime(cfg.model)
    model = load_base_model(resolve_model_source(cfg.model), runtime, cfg.model.attn_implementation).eval()
    config, device, columns = model.config, runtime.device, args.columns
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    generator = torch.Generator().manual_seed(cfg.seed)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]  # the decoder's and the LM head

    def linears_in_order(rows: int, skinny: bool) -> float:
        inputs = {n: torch.randn(rows, n, generator=generator).to(device) for n in {m.in_features for m in linears}}
        linear = functools.partial(skinny_linear, max_rows=skinny_rows) if skinny else torch.nn.functional.linear
        seconds = []
        for _ in range(args.repeats + 1):  # the first run meets the shapes: not timed
            start = time.perf_counter()
            for m in linears:
                linear(inputs[m.in_features], m.weight)
            seconds.append(time.perf_counter() - start)
        return median(seconds[1:])

    def weights_read() -> tuple[float, int]:
        params = list(model.parameters())
        seconds = []
        for _ in range(6):
            start = time.perf_counter()
            for param in params:
                param.sum()
            seconds.append(time.perf_counter() - start)
        return median(seconds[1:]), sum(p.numel() * p.element_size() for p in params)

    def passes(rows: int, skinny: bool) -> list[float]:
        cache = new_cache(model, device)
        for layer in range(config.num_hidden_layers):
            keys, values = (torch.randn(rows, kv_heads, columns, head_dim, generator=generator)
                            for _ in range(2))
            cache.update(keys.to(device), values.to(device), layer)
        seconds = []
        for step in range(args.repeats + 1):  # the first pass reserves the room: not timed
            ids = torch.randint(0, config.vocab_size, (rows, 1), generator=generator).to(device)
            mask = torch.ones(rows, columns + step + 1, dtype=torch.long, device=device)
            positions = torch.full((rows, 1), columns + step, device=device)
            start = time.perf_counter()
            with skinny_linears(model, skinny_rows) if skinny else contextlib.nullcontext():
                model(input_ids=ids, attention_mask=mask, position_ids=positions, **with_cache(model, cache),
                      use_cache=True, logits_to_keep=1)
            seconds.append(time.perf_counter() - start)
        return seconds[1:]

    figures = {}
    with torch.inference_mode(), runtime.autocast():
        for skinny in (False, True):
            passes(rows_list[0], skinny)  # warm-up: the allocator's first growth, lazy kernels
        read_seconds, weight_bytes = weights_read()
        for rows in rows_list:
            seconds = median(passes(rows, False))
            seconds_skinny = median(passes(rows, True))
            in_order = linears_in_order(rows, False)
            in_order_skinny = linears_in_order(rows, True)
            rate = forward_rate(model, runtime.compute_dtype, device, rows)
            isolated = forward_flops(rate, rows, rows) / rate["flops_per_s"]
            figures[str(rows)] = {"pass_seconds": seconds, "pass_seconds_skinny": seconds_skinny,
                                  "linears_seconds_at_rate": isolated,
                                  "linears_seconds_in_order": in_order,
                                  "linears_seconds_in_order_skinny": in_order_skinny,
                                  "linear_gflops_at_rate": rate["flops_per_s"] / 1e9}
    table = Table(title=f"one decoding pass of {cfg.model.name}: R rows x 1 token over {columns} cached columns "
                        f"({runtime.compute_dtype}, median of {args.repeats})")
    for col in ("rows", "ms / pass", "ms / row", "linears at the isolated rate, ms", "linears in order, ms",
                "rest beyond those, ms", "ms / pass, skinny", "linears in order, skinny, ms",
                "pass: F.linear / skinny"):
        table.add_column(col, justify="right")
    for rows in rows_list:
        f = figures[str(rows)]
        table.add_row(str(rows), f"{f['pass_seconds'] * 1e3:.1f}", f"{f['pass_seconds'] / rows * 1e3:.2f}",
                      f"{f['linears_seconds_at_rate'] * 1e3:.1f}", f"{f['linears_seconds_in_order'] * 1e3:.1f}",
                      f"{(f['pass_seconds'] - f['linears_seconds_in_order']) * 1e3:.1f}",
                      f"{f['pass_seconds_skinny'] * 1e3:.1f}", f"{f['linears_seconds_in_order_skinny'] * 1e3:.1f}",
                      f"{f['pass_seconds'] / f['pass_seconds_skinny']:.2f}x")
    out = console()
    out.print(table)
    out.print(f"reading every weight once ({weight_bytes / 2**20:.0f} MiB): {read_seconds * 1e3:.1f} ms, "
              f"{weight_bytes / read_seconds / 1e9:.1f} GB/s")
    out.print(f"threads {torch.get_num_threads()}, load avg {machine()['load_avg_1m']:.2f}")
    write_json(args.json, {"model": cfg.model.name, "compute_dtype": str(runtime.compute_dtype), "columns": columns,
                           "repeats": args.repeats, "skinny_rows": skinny_rows, "machine": machine(), "weight_bytes": weight_bytes,
                           "weights_read_seconds": read_seconds, "by_rows": figures})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
