"""The forward matmul rate of the model's own linear shapes by the number of rows M.

A decoding pass computes a few positions per row (tens in all), a prefill or training pass
hundreds; this prints how fast the model's linears run at each M on this machine, in the
compute dtype (`_common.forward_rate`: best-of-3 timings per shape, weighted by how many layers
have it, the LM head counted at M rows too), and each rate as a share of the largest M's.

Usage:
    .venv/bin/python benchmarks/bench_matmul_rows.py [--config configs/quickstart.toml]
        [--rows 1,8,16,32,45,64,96,128,256] [--json out.json]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import console, forward_rate, load, machine, parser, write_json  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,8,16,32,45,64,96,128,256", help="comma-separated M values")
    args = p.parse_args(argv)
    rows = [int(x) for x in args.rows.split(",") if x.strip()]
    cfg = load(args)

    import torch
    from rich.table import Table

    from fedsdr.algorithms import get_algorithm
    from fedsdr.models.loading import shared_model

    model, _, runtime, _ = shared_model(cfg.model, cfg.lora, get_algorithm(cfg).adapters(cfg), cfg.seed)
    rates = {m: forward_rate(model, runtime.compute_dtype, runtime.device, m)["flops_per_s"] for m in rows}
    top = rates[max(rows)]
    table = Table(title=f"forward matmul rate of {cfg.model.name}'s linear shapes ({runtime.compute_dtype})")
    for col in ("M (rows)", "GFLOP/s", f"share of M = {max(rows)}"):
        table.add_column(col, justify="right")
    for m in rows:
        table.add_row(str(m), f"{rates[m] / 1e9:.1f}", f"{rates[m] / top:.2f}")
    out = console()
    out.print(table)
    out.print(f"threads {torch.get_num_threads()}, load avg {machine()['load_avg_1m']:.2f}")
    write_json(args.json, {"model": cfg.model.name, "compute_dtype": str(runtime.compute_dtype), "machine": machine(),
                           "gflops_by_rows": {str(m): rates[m] / 1e9 for m in rows}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
