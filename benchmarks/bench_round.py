"""One FedAvg round: framework overhead and training throughput.

What it measures (all in one process, so the figures are ratios taken side by side):

(a) Framework overhead. The wall time of one real federated round -- `Server.train_round`
    through the in-process engine's `InProcessGrid` and the real ClientApp: the adapter
    serialised to an ArrayRecord, one Flower message per sampled client, the client's
    session lookup, local training, the reply, FedAvg aggregation; no evaluation -- divided
    by the wall time of the same local training run bare: for each sampled client, the same
    initial adapter weights (a numpy dict, no ArrayRecord), the same examples, the same batch
    and dropout seeds, `fedsdr.train.make_stream` + `sft_steps` called directly. A warm-up
    (one client, one step, both paths) runs first so lazy initialisation and data building
    are not counted; then bare, federated, bare, federated; medians are reported.
    Both paths must do the same work: the per-client train losses are printed side by side
    and must agree to ~1e-4 (they are normally identical; on CUDA to 2e-3, since its attention
    backward and cuBLAS are not deterministic: an H200 run differed by 8.4e-4 on one client), and
    the mean of the bare clients' adapters must equal the server's aggregate.
    Read it as: ratio 1.00 = Flower costs nothing; 1.05 = the federated round takes 5% longer
    than its training. "outside sft_steps" splits each wall time into the training loop and
    everything else.

(b) Training throughput. Useful work of LoRA on a frozen base is ~4 x N FLOPs per non-pad
    token (N = parameters of the base model's linear layers, lm_head included): forward 2N,
    backward to the activations 2N; the frozen weights get no weight gradient (LoRA's own
    matmuls and attention scores are left out). Achieved = 4 N x tokens / bare wall time.
    Peak = the matmul FLOP/s torch reaches here, same process, same thread count, in the
    runtime's compute dtype (bf16 on a CPU with native bf16, used through autocast), at the
    model's own linear shapes (M = the mean padded tokens of a forward/backward pass; forward x W^T
    and backward g W, weighted by how often each shape occurs in the model). fp32 is shown for
    reference, and "autocast" = fp32 tensors under bf16 autocast, i.e. with the casts the model
    pays on every call. Read achieved / peak as the fraction of the machine's matmul speed the
    training loop turns into useful work (padding, attention, LoRA, optimizer, casts, Python
    and memory-bound ops make up the rest).

(c) Against the loop users write today. The same sampled clients, records, batches, steps and
    batch size, trained by (1) fedsdr: one real federated round as in (a), and (2) TRL:
    `SFTTrainer` per client per round on a `peft` LoRA model (r/alpha/dropout from `[lora]`,
    target modules q_proj and v_proj, or with `--trl-targets config` fedsdr's own
    `lora.target_modules`), fp32, gradient checkpointing, completion-only loss on
    TRL's conversational prompt-completion format, a sequential sampler over the very batches
    fedsdr draws (so both train the same examples in the same batches), a new trainer per
    client per round (as the popular federated-LLM toolkits do) and a FedAvg of the adapters.
    Each loop runs in its own child process, so each peak RSS (`VmHWM`) is its own: model
    load, one warm-up round (one client, one step) and the measured round. Tokens counted for
    both: completion (response) tokens actually trained, i.e. labels != -100 of the batches
    (TRL's counted inside its collator; fedsdr's from the replayed batches). Prints tokens/s
    of the round (wall time, trainer construction included) and of the training calls alone,
    peak RSS, and the ratios fedsdr / TRL (targets: tokens/s >= 2.0, peak RSS <= 0.5), with
    the CPU's native-bf16 support and each loop's compute dtype. Needs the `bench` extra
    (`pip install -c requirements/constraints.txt -e .[bench]`); skipped with a note without it.

Flags:
    --config PATH          run config (default configs/quickstart.toml)
    --set KEY=VALUE        config override, repeatable
    --records SET          quickstart (the config's data, default) or short: the terse domains
                           arithmetic and word_sorting (median response < 20 tokens), iid over
                           the config's clients
    --repeats N            bare/federated pairs in (a) (default 2)
    --baseline WHICH       trl (default): run (c); none: skip it
    --trl-targets WHICH    the TRL loop's LoRA target modules: q_proj,v_proj (default, the loop
                           users write today) or config (fedsdr's `lora.target_modules`, all seven
                           linears by default): both loops then train the same adapter. With
                           `--set 'lora.target_modules=["q_proj","v_proj"]'` instead, fedsdr
                           trains the TRL loop's adapter
    --json PATH            also write every figure as JSON

Usage:
    .venv/bin/python benchmarks/bench_round.py [--config configs/quickstart.toml]
        [--records quickstart|short] [--set train.local_steps=1] [--repeats 2]
        [--baseline trl|none] [--json out.json]
The machine is shared and noisy: compare the figures within one run, not across runs.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    accelerator,
    allocator_as_fedsdr,
    console,
    cpu_bf16,
    describe_bf16,
    linear_shapes,
    load,
    machine,
    matmul_seconds,
    median,
    parser,
    stopwatch,
    synchronize,
    system_allocator_env,
    write_json,
)

# `--records short`: the bundled benchmark's terse domains (median response < 20 tokens).
SHORT_RECORDS = ['data.domains=["arithmetic", "word_sorting"]', 'partition.method="iid"']


def bare_round(ctx: dict[str, Any], clients: list[int], steps: int) -> dict[str, Any]:
    """The local training of one round without Flower: per client, load the initial adapter,
    build the stream with the round's seeds, run `sft_steps`. Returns timings and losses."""
    import torch

    from fedsdr.algorithms import derive_seed
    from fedsdr.models.adapters import (
        activate,
        adapter_parameters,
        get_adapter_state,
        set_adapter_state,
    )
    from fedsdr.train import make_stream, sft_steps

    cfg, model, adapter = ctx["cfg"], ctx["model"], ctx["adapter"]
    server_round = 1
    out: dict[str, Any] = {"clients": {}, "wall": 0.0}
    states = {}
    for cid in clients:
        examples = ctx["examples"][cid]
        with stopwatch() as elapsed:
            set_adapter_state(model, adapter, ctx["initial_state"])
            activate(model, [adapter], trainable=[adapter])
            stream = make_stream(
                examples,
                adapter_parameters(model, adapter),
                cfg.train,
                seed=derive_seed(cfg.seed, "batches", server_round, cid),
            )
            torch.manual_seed(derive_seed(cfg.seed, "dropout", server_round, cid))
            stats = sft_steps(
                model,
                stream,
                cfg.train,
                steps=steps,
                first_step=(server_round - 1) * steps,
                total_steps=cfg.federation.rounds * steps,
                pad_id=ctx["tokenizer"].pad_token_id,
                autocast=ctx["runtime"].autocast,
            )
            synchronize(ctx["runtime"].device)
        out["wall"] += elapsed()
        states[cid] = (get_adapter_state(model, adapter), len(examples))  # outside the timer
        out["clients"][cid] = {
            "losses": list(stats.losses),
            "mean_loss": stats.mean_loss,
            "tokens": stats.tokens,
            "sft_seconds": stats.seconds,
            "num_examples": len(examples),
        }
    out["tokens"] = sum(c["tokens"] for c in out["clients"].values())
    out["sft_seconds"] = sum(c["sft_seconds"] for c in out["clients"].values())
    out["states"] = states
    return out


def fed_round(ctx: dict[str, Any], server: Any) -> dict[str, Any]:
    """One real federated training round (no evaluation, no checkpoint)."""
    grid, arrays = ctx["grid"], ctx["arrays"]
    calls_before = len(ctx["session_log"])
    with stopwatch() as elapsed:
        new_arrays, rows = server.train_round(grid, 1, arrays)
    clients = {
        int(r["scope"].split("-")[1]): {
            "mean_loss": float(r["train_loss"]),
            "tokens": int(r["tokens"]),
            "sft_seconds": float(r["seconds"]),
            "num_examples": int(r["num_examples"]),
        }
        for r in rows
        if r["scope"] != "global"
    }
    log = ctx["session_log"][calls_before:]
    return {
        "wall": elapsed(),
        "clients": clients,
        "arrays": new_arrays,
        "tokens": sum(c["tokens"] for c in clients.values()),
        "sft_seconds": sum(c["sft_seconds"] for c in clients.values()),
        "session_seconds": sum(s for _, _, s in log),
        "sessions_rebuilt": sum(1 for _, rebuilt, _ in log if rebuilt),
        "messages": len(log),
    }


def instrument_sessions(ctx: dict[str, Any]) -> None:
    """Record, per ClientApp call, whether the client's session object was rebuilt and how long
    the lookup took (a thin wrapper around `fedsdr.federation.client.client_session`)."""
    import fedsdr.federation.client as client_module

    original = client_module.client_session
    last: dict[tuple[str, int], Any] = {}  # strong references: `is` is then reliable
    log: list[tuple[int, bool, float]] = []

    def wrapped(msg: Any, context: Any) -> Any:
        with stopwatch() as elapsed:
            session, algorithm = original(msg, context)
        key = (str(msg.content["config"]["fedsdr-config"]), session.client_id)
        rebuilt = key in last and last[key] is not session
        last[key] = session
        log.append((session.client_id, rebuilt, elapsed()))
        return session, algorithm

    client_module.client_session = wrapped
    ctx["session_log"] = log
    ctx["client_session"] = wrapped


def round_messages(server: Any, grid: Any, arrays: Any) -> list[Any]:
    """The train messages of round 1, sampled with the same seeding as `train_round`."""
    from fedsdr.algorithms import derive_seed

    random.seed(derive_seed(server.cfg.seed, "sample-train", 1))
    return list(server.strategy.configure_train(1, arrays, server.base_config(), grid))


def partition_of(grid: Any, msg: Any) -> int:
    return int(grid.contexts[msg.metadata.dst_node_id].node_config["partition-id"])


def padded_tokens(ctx: dict[str, Any], clients: list[int], steps: int) -> tuple[int, int]:
    """(padded tokens, forward/backward passes) of the round's batches, replayed from the same
    seeds and split into passes as training splits them (`train.pass_tokens`)."""
    from fedsdr.algorithms import derive_seed
    from fedsdr.train import batches, pass_budget, passes

    cfg = ctx["cfg"]
    budget = pass_budget(cfg.train, ctx["runtime"].device, ctx["runtime"].compute_dtype)
    total = count = 0
    for cid in clients:
        stream = batches(
            ctx["examples"][cid],
            cfg.train.batch_size,
            derive_seed(cfg.seed, "batches", 1, cid),
            cfg.train.length_grouping,
        )
        for _ in range(steps * cfg.train.grad_accum):
            for part in passes(next(stream), budget):
                total += len(part) * max(len(e.input_ids) for e in part)
                count += 1
    return total, count


def measure_peak(model: Any, m: int, compute: Any, device: Any = "cpu") -> dict[str, Any]:
    """Matmul GFLOP/s at the model's linear shapes, per shape and model-weighted (fwd+bwd)."""
    import torch

    shapes, names = linear_shapes(model)
    modes = ["compute", "fp32"] + (["autocast"] if compute != torch.float32 else [])
    per_shape = []
    totals = {mode: [0.0, 0.0] for mode in modes}  # flops, seconds (weighted by count)
    for (k, n), count in sorted(shapes.items()):
        flops = 2.0 * m * k * n
        row: dict[str, Any] = {"layers": names[(k, n)], "in": k, "out": n, "count": count}
        for mode in modes:
            secs = [matmul_seconds(m, k, n, mode, compute, d, device) for d in ("fwd", "bwd")]
            row[f"{mode}_gflops"] = 2 * flops / sum(secs) / 1e9
            totals[mode][0] += count * 2 * flops
            totals[mode][1] += count * sum(secs)
        per_shape.append(row)
    weighted = {mode: f / s / 1e9 for mode, (f, s) in totals.items()}
    n_linear = sum(k * n * c for (k, n), c in shapes.items())
    return {"m": m, "per_shape": per_shape, "weighted_gflops": weighted, "linear_params": n_linear}


def max_state_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


# (c) against the loop users write today: each loop in its own child process ----------------


def peak_rss_bytes() -> int:
    """This process's resident high-water mark: `VmHWM` of its own address space. Not
    `ru_maxrss`, which a child inherits from the parent it was forked from (across exec)."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def replay(cfg: Any, examples: list[Any], cid: int, steps: int) -> list[list[Any]]:
    """The micro-batches client `cid` trains on in round 1 (same seeds as `train_round`)."""
    from fedsdr.algorithms import derive_seed
    from fedsdr.train import batches

    stream = batches(
        examples, cfg.train.batch_size, derive_seed(cfg.seed, "batches", 1, cid),
        cfg.train.length_grouping,
    )
    return [next(stream) for _ in range(steps * cfg.train.grad_accum)]


def client_batches(cfg: Any, tokenizer: Any, clients: list[int], steps: int) -> dict[int, Any]:
    """Per client: its round-1 micro-batches as (record, Example) pairs, in training order."""
    from fedsdr.data.federated import build_federated_data
    from fedsdr.train import encode

    data = build_federated_data(cfg.data, cfg.partition, cfg.seed)
    out = {}
    for cid in clients:
        # what `encode_all` keeps, with each example's record alongside
        pairs = [(r, encode(tokenizer, r, cfg.data.system_prompt)) for r in data.clients[cid].train]
        pairs = [(r, e) for r, e in pairs if len(e.input_ids) <= cfg.model.max_seq_len]
        record_of = {id(e): r for r, e in pairs}
        micro = replay(cfg, [e for _, e in pairs], cid, steps)
        out[cid] = {
            "pairs": [(record_of[id(e)], e) for batch in micro for e in batch],
            "num_examples": len(pairs),
        }
    return out


def count_tokens(pairs: list[tuple[Any, Any]]) -> tuple[int, int]:
    """(completion tokens, non-pad tokens) of (record, Example) pairs."""
    return sum(e.num_target_tokens for _, e in pairs), sum(len(e.input_ids) for _, e in pairs)


def warm_config(cfg: Any) -> Any:
    """One client, one step: the warm-up round of each loop."""
    warm = cfg.model_copy(deep=True)
    warm.train.local_steps = 1
    warm.federation.fraction_train = 1.0 / cfg.partition.num_clients
    warm.federation.min_train_clients = 1
    return warm


def child_fedsdr(cfg: Any, clients: list[int]) -> dict[str, Any]:
    """fedsdr's loop: model load, a warm-up round, then one real federated round."""
    import torch

    from fedsdr.federation.client import client_app, client_session
    from fedsdr.federation.engine import InProcessGrid
    from fedsdr.federation.server import Server
    from fedsdr.runs import RunDir

    steps = cfg.train.local_steps
    with tempfile.TemporaryDirectory(prefix="bench-round-fedsdr-") as tmp:
        run = RunDir(Path(tmp) / "run")
        server = Server(cfg, run)
        grid = InProcessGrid(client_app, cfg.partition.num_clients)
        arrays = server.initial_arrays()
        Server(warm_config(cfg), run).train_round(grid, 1, arrays)
        # each client's session and data, as a long-lived client holds them after its first round
        for msg in round_messages(server, grid, arrays):
            session, _ = client_session(msg, grid.contexts[msg.metadata.dst_node_id])
            session.raw_examples()
        with stopwatch() as elapsed:
            _, rows = server.train_round(grid, 1, arrays)
        wall = elapsed()
        peak = peak_rss_bytes()
        rows = [r for r in rows if r["scope"] != "global"]
        ran = sorted(int(r["scope"].split("-")[1]) for r in rows)
        if ran != sorted(clients):
            raise SystemExit(f"fedsdr child trained clients {ran}, expected {clients}")
        reported_nonpad = sum(int(r["tokens"]) for r in rows)
        train_seconds = sum(float(r["seconds"]) for r in rows)
        compute = str(server.runtime.compute_dtype)
        per_client = client_batches(cfg, server.tokenizer, clients, steps)
    target, nonpad = map(sum, zip(*(count_tokens(c["pairs"]) for c in per_client.values()),
                                  strict=True))
    if nonpad != reported_nonpad:
        raise SystemExit(f"replayed batches hold {nonpad} tokens, the round reported {reported_nonpad}")
    return {"loop": "fedsdr", "wall_s": wall, "train_s": train_seconds, "target_tokens": target,
            "nonpad_tokens": nonpad, "peak_rss": peak, "compute_dtype": compute,
            "threads": torch.get_num_threads()}


def child_trl(cfg: Any, clients: list[int], targets: list[str]) -> dict[str, Any]:
    """The loop users write today: TRL `SFTTrainer` per client per round, LoRA on `targets` (q/v
    unless `--trl-targets` says otherwise), fp32, gradient checkpointing, completion-only loss;
    FedAvg of the adapters."""
    import datasets
    import torch
    import transformers
    from peft import (
        LoraConfig,
        get_peft_model,
        get_peft_model_state_dict,
        set_peft_model_state_dict,
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from fedsdr.models.adapters import peft_targets
    from fedsdr.models.resolve import resolve_model_path
    from fedsdr.train import chat_messages

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    steps = cfg.train.local_steps
    path = resolve_model_path(cfg.model.name, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(cfg.seed)
    model = get_peft_model(model, LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules=peft_targets(targets), task_type="CAUSAL_LM",
    ))
    initial = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    per_client = client_batches(cfg, tokenizer, clients, steps)

    def train_client(cid: int, client_steps: int, tmp: str) -> dict[str, Any]:
        pairs = per_client[cid]["pairs"]
        pairs = pairs[: client_steps * cfg.train.grad_accum * cfg.train.batch_size]
        rows = [
            {"prompt": chat_messages(r, cfg.data.system_prompt),
             "completion": [{"role": "assistant", "content": r.output}]}
            for r, _ in pairs
        ]
        set_peft_model_state_dict(model, initial)  # the round's global adapter
        args = SFTConfig(
            output_dir=tmp, max_steps=client_steps, per_device_train_batch_size=cfg.train.batch_size,
            gradient_accumulation_steps=cfg.train.grad_accum, learning_rate=cfg.train.lr,
            weight_decay=cfg.train.weight_decay, max_grad_norm=cfg.train.max_grad_norm,
            gradient_checkpointing=True, bf16=False, fp16=False, completion_only_loss=True,
            max_length=cfg.model.max_seq_len, train_sampling_strategy="sequential",
            report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
            dataloader_num_workers=0, dataloader_pin_memory=False, seed=cfg.seed,
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tokenizer)
        trainer.remove_callback(PrinterCallback)  # no metrics dict printed per client
        counted = {"target": 0, "nonpad": 0}
        collate = trainer.data_collator

        def counting(features: list[Any]) -> Any:
            batch = collate(features)
            counted["target"] += int((batch["labels"] != -100).sum())
            counted["nonpad"] += int(batch["attention_mask"].sum())
            return batch

        trainer.data_collator = counting
        with stopwatch() as elapsed:
            trainer.train()
        state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
        return {"state": state, "train_s": elapsed(), **counted}

    def round_of(round_clients: list[int], client_steps: int) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="bench-round-trl-") as tmp, stopwatch() as elapsed:
            results = {cid: train_client(cid, client_steps, tmp) for cid in round_clients}
            weights = {cid: per_client[cid]["num_examples"] for cid in round_clients}
            total = sum(weights.values())
            aggregate = {k: sum(weights[c] * results[c]["state"][k] for c in round_clients) / total
                         for k in initial}
        del aggregate
        return {"wall_s": elapsed(), "train_s": sum(r["train_s"] for r in results.values()),
                "target_tokens": sum(r["target"] for r in results.values()),
                "nonpad_tokens": sum(r["nonpad"] for r in results.values())}

    round_of(clients[:1], 1)  # warm-up, as fedsdr's
    measured = round_of(clients, steps)
    return {"loop": "trl", **measured, "peak_rss": peak_rss_bytes(), "compute_dtype": "torch.float32",
            "threads": torch.get_num_threads()}


def run_child(args: Any, loop: str, clients: list[int], threads: int) -> dict[str, Any]:
    """Run one loop in a fresh child process (same config, records and threads)."""
    with tempfile.TemporaryDirectory(prefix="bench-round-child-") as tmp:
        out = Path(tmp) / "figures.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--config", args.config,
               "--records", args.records, "--child", loop, "--child-clients",
               ",".join(map(str, clients)), "--child-threads", str(threads), "--child-out", str(out),
               "--trl-targets", args.trl_targets]
        for item in args.user_overrides:
            cmd += ["--set", item]
        # fedsdr's child inherits the allocator `fedsdr` would pick; the loop users write today
        # runs on the system's malloc
        subprocess.run(cmd, check=True, env=None if loop == "fedsdr" else system_allocator_env())
        return json.loads(out.read_text(encoding="utf-8"))


def trl_targets(args: Any, cfg: Any) -> list[str]:
    """The TRL loop's LoRA target modules (`--trl-targets`)."""
    return list(cfg.lora.target_modules) if args.trl_targets == "config" else args.trl_targets.split(",")


def child_main(args: Any, cfg: Any) -> int:
    import torch

    torch.set_num_threads(args.child_threads)
    clients = [int(x) for x in args.child_clients.split(",")]
    from fedsdr.memory import allocator

    if args.child == "fedsdr":
        figures = {**child_fedsdr(cfg, clients), "lora_targets": list(cfg.lora.target_modules)}
    else:
        targets = trl_targets(args, cfg)
        figures = {**child_trl(cfg, clients, targets), "lora_targets": targets}
    figures["allocator"] = allocator()
    Path(args.child_out).write_text(json.dumps(figures), encoding="utf-8")
    return 0


def compare_loops(args: Any, clients: list[int], threads: int, out: Any) -> dict[str, Any] | None:
    """(c): both loops, each in its own child; prints the table and returns the figures."""
    import importlib.util

    from rich.table import Table

    if args.baseline == "none":
        return None
    if importlib.util.find_spec("trl") is None:
        out.print("[yellow](c) skipped: TRL is not installed "
                  "(pip install -c requirements/constraints.txt -e .[bench])[/]")
        return None
    runs = {}
    for loop in ("fedsdr", "trl"):
        out.print(f"  (c) {loop} loop in a child process ...")
        runs[loop] = run_child(args, loop, clients, threads)
    for r in runs.values():
        r["tokens_per_s"] = r["target_tokens"] / r["wall_s"]
        r["train_tokens_per_s"] = r["target_tokens"] / r["train_s"]
    fed, trl = runs["fedsdr"], runs["trl"]
    figures = {
        "loops": runs,
        "cpu_native_bf16": cpu_bf16(),
        "tokens_per_s_ratio": fed["tokens_per_s"] / trl["tokens_per_s"],
        "train_tokens_per_s_ratio": fed["train_tokens_per_s"] / trl["train_tokens_per_s"],
        "peak_rss_ratio": fed["peak_rss"] / trl["peak_rss"],
        "same_target_tokens": fed["target_tokens"] == trl["target_tokens"],
        "same_lora_targets": sorted(fed["lora_targets"]) == sorted(trl["lora_targets"]),
    }
    table = Table(title=f"(c) fedsdr vs TRL SFTTrainer per client per round, clients {clients}")
    for col in ("loop", "compute", "round wall (s)", "training calls (s)", "completion tokens",
                "non-pad tokens", "tokens/s", "tokens/s (training)", "peak RSS (GB)"):
        table.add_column(col, justify="right")
    for name, r in runs.items():
        table.add_row(name, r["compute_dtype"].replace("torch.", ""), f"{r['wall_s']:.2f}",
                      f"{r['train_s']:.2f}", str(r["target_tokens"]), str(r["nonpad_tokens"]),
                      f"{r['tokens_per_s']:.1f}", f"{r['train_tokens_per_s']:.1f}",
                      f"{r['peak_rss'] / 1e9:.2f}")
    ok = lambda good: "[green]met[/]" if good else "[red]not met[/]"  # noqa: E731
    table.add_row("[bold]fedsdr / TRL[/]", "", "", "", "", "",
                  f"[bold]{figures['tokens_per_s_ratio']:.2f}x[/] ({ok(figures['tokens_per_s_ratio'] >= 2.0)}, target >= 2.0)",
                  f"{figures['train_tokens_per_s_ratio']:.2f}x",
                  f"[bold]{figures['peak_rss_ratio']:.2f}[/] ({ok(figures['peak_rss_ratio'] <= 0.5)}, target <= 0.5)")
    out.print(table)
    flags = figures["cpu_native_bf16"]
    out.print(
        f"{describe_bf16(flags)}; compute dtype fedsdr {fed['compute_dtype']}, TRL {trl['compute_dtype']}; "
        f"allocator fedsdr {fed.get('allocator')}, TRL {trl.get('allocator')}; "
        f"same completion tokens in both: {'yes' if figures['same_target_tokens'] else 'NO'}; LoRA on "
        f"{','.join(fed['lora_targets'])} (fedsdr), {','.join(trl['lora_targets'])} (TRL)"
    )
    return figures


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=2, help="bare/federated pairs (default 2)")
    p.add_argument("--records", choices=["quickstart", "short"], default="quickstart",
                   help="quickstart: the config's data (default); short: arithmetic and "
                   "word_sorting, iid (median response < 20 tokens)")
    p.add_argument("--baseline", choices=["trl", "none"], default="trl",
                   help="trl: also run TRL's SFTTrainer loop, each loop in its own child (default)")
    p.add_argument("--trl-targets", default="q_proj,v_proj",
                   help="the TRL loop's LoRA targets: q_proj,v_proj (default) or config (fedsdr's lora.target_modules)")
    for hidden in ("--child", "--child-clients", "--child-out"):  # internal: the (c) children
        p.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-threads", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    allocator_as_fedsdr(args)
    args.user_overrides = list(args.overrides)  # what the children get with `--records`
    if args.records == "short":
        args.overrides = SHORT_RECORDS + args.overrides  # the user's own overrides win
    cfg = load(args)
    if args.child:
        return child_main(args, cfg)
    if cfg.federation.algorithm != "fedavg" or cfg.distill.enabled:
        raise SystemExit(
            "bench_round measures plain FedAvg: use federation.algorithm=fedavg, "
            "distill.enabled=false"
        )

    import torch
    from rich.table import Table

    from fedsdr.data.federated import build_federated_data
    from fedsdr.federation.client import client_app
    from fedsdr.federation.engine import InProcessGrid
    from fedsdr.federation.server import Server
    from fedsdr.models.adapters import from_arrayrecord
    from fedsdr.runs import RunDir
    from fedsdr.train import encode_all

    out = console()
    with stopwatch() as total_elapsed:
        tmp = tempfile.TemporaryDirectory(prefix="bench-round-")
        run = RunDir(Path(tmp.name) / "run")
        with stopwatch() as setup_elapsed:
            server = Server(cfg, run)
            grid = InProcessGrid(client_app, cfg.partition.num_clients)
            arrays = server.initial_arrays()
        ctx: dict[str, Any] = {
            "cfg": cfg,
            "model": server.model,
            "tokenizer": server.tokenizer,
            "runtime": server.runtime,
            "adapter": server.spec.name,
            "grid": grid,
            "arrays": arrays,
            "initial_state": {k: v.copy() for k, v in from_arrayrecord(arrays).items()},
        }
        instrument_sessions(ctx)
        messages = round_messages(server, grid, arrays)
        clients = [partition_of(grid, msg) for msg in messages]
        data = build_federated_data(cfg.data, cfg.partition, cfg.seed)
        encode_seconds = {}
        ctx["examples"] = {}
        for cid in clients:  # what the client does (once, lazily) in `session.raw_examples()`
            with stopwatch() as elapsed:
                ctx["examples"][cid], _ = encode_all(
                    server.tokenizer,
                    data.clients[cid].train,
                    cfg.model.max_seq_len,
                    cfg.data.system_prompt,
                )
            encode_seconds[cid] = elapsed()
        steps = cfg.train.local_steps
        response_tokens = median(
            [e.num_target_tokens for cid in clients for e in ctx["examples"][cid]]
        )
        out.print(
            f"[bold]bench_round[/]: {cfg.name}, records {args.records} (median response "
            f"{response_tokens:.0f} tokens), model {cfg.model.name}, clients {clients}, "
            f"{steps} local steps x batch {cfg.train.batch_size}, "
            f"compute {server.runtime.compute_dtype}, threads {torch.get_num_threads()}, "
            f"setup {setup_elapsed():.1f} s"
        )

        # warm-up: one client, one step, both paths; then each client's session and data,
        # as a long-lived client holds them after its first round ---------------------------
        with stopwatch() as warm_elapsed:
            bare_round(ctx, clients[:1], steps=1)
            warm_cfg = cfg.model_copy(deep=True)
            warm_cfg.train.local_steps = 1
            warm_cfg.federation.fraction_train = 1.0 / cfg.partition.num_clients
            warm_cfg.federation.min_train_clients = 1
            fed_round(ctx, Server(warm_cfg, run))
            for msg in messages:
                session, _ = ctx["client_session"](msg, grid.contexts[msg.metadata.dst_node_id])
                session.raw_examples()
        out.print(f"warm-up {warm_elapsed():.1f} s")

        # measure: bare, fed, bare, fed ---------------------------------------------------
        bare_runs, fed_runs = [], []
        for rep in range(args.repeats):
            bare_runs.append(bare_round(ctx, clients, steps))
            out.print(f"  bare #{rep + 1}: {bare_runs[-1]['wall']:.2f} s")
            fed_runs.append(fed_round(ctx, server))
            out.print(f"  federated #{rep + 1}: {fed_runs[-1]['wall']:.2f} s")

        # same work? ----------------------------------------------------------------------
        loss_rows, max_loss_diff = [], 0.0
        for cid in clients:
            bare_c = bare_runs[0]["clients"][cid]
            fed_c = fed_runs[0]["clients"][cid]
            diff = max(
                abs(r["clients"][cid]["mean_loss"] - fed_c["mean_loss"])
                for r in bare_runs + fed_runs
            )
            max_loss_diff = max(max_loss_diff, diff)
            loss_rows.append(
                {
                    "client": cid,
                    "bare_step_losses": bare_c["losses"],
                    "bare_mean_loss": bare_c["mean_loss"],
                    "fed_mean_loss": fed_c["mean_loss"],
                    "max_abs_diff": diff,
                    "tokens_bare": bare_c["tokens"],
                    "tokens_fed": fed_c["tokens"],
                }
            )
        weights = np.array([bare_runs[0]["states"][c][1] for c in clients], dtype=np.float64)
        bare_mean = {
            k: sum(
                w * bare_runs[0]["states"][c][0][k] for w, c in zip(weights, clients, strict=True)
            )
            / weights.sum()
            for k in ctx["initial_state"]
        }
        aggregate_diff = max_state_diff(bare_mean, from_arrayrecord(fed_runs[0]["arrays"]))
        tokens_match = all(r["tokens_bare"] == r["tokens_fed"] for r in loss_rows)
        loss_tolerance = 2e-3 if server.runtime.device.type == "cuda" else 1e-4  # see the docstring
        same_work = max_loss_diff <= loss_tolerance and tokens_match

        # throughput ----------------------------------------------------------------------
        bare_wall = median([r["wall"] for r in bare_runs])
        fed_wall = median([r["wall"] for r in fed_runs])
        tokens = bare_runs[0]["tokens"]
        padded, micro = padded_tokens(ctx, clients, steps)
        m = max(1, round(padded / micro))
        with stopwatch() as peak_elapsed:
            peak = measure_peak(server.model, m, server.runtime.compute_dtype, server.runtime.device)
        n_linear = peak["linear_params"]
        achieved = 4.0 * n_linear * tokens / bare_wall / 1e9
        peak_compute = peak["weighted_gflops"]["compute"]
        peak_fp32 = peak["weighted_gflops"]["fp32"]
        peak_autocast = peak["weighted_gflops"].get("autocast")

    figures: dict[str, Any] = {
        "config": args.config,
        "overrides": args.overrides,
        "records": args.records,
        "median_response_tokens": response_tokens,
        "model": cfg.model.name,
        "compute_dtype": str(server.runtime.compute_dtype),
        "machine": machine(),
        "cpu_native_bf16": cpu_bf16(),
        "device": str(server.runtime.device),
        **accelerator(server.runtime.device),
        "clients": clients,
        "local_steps": steps,
        "batch_size": cfg.train.batch_size,
        "bare_wall_s": [r["wall"] for r in bare_runs],
        "fed_wall_s": [r["wall"] for r in fed_runs],
        "bare_wall_median_s": bare_wall,
        "fed_wall_median_s": fed_wall,
        "overhead_ratio": fed_wall / bare_wall,
        "overhead_ratio_fastest": min(r["wall"] for r in fed_runs)
        / min(r["wall"] for r in bare_runs),
        "federation_cost_s": median([r["wall"] - r["sft_seconds"] for r in fed_runs])
        - median([r["wall"] - r["sft_seconds"] for r in bare_runs]),
        "achieved_gflops_fastest_bare": 4.0
        * n_linear
        * tokens
        / min(r["wall"] for r in bare_runs)
        / 1e9,
        "overhead_s": fed_wall - bare_wall,
        "bare_outside_sft_s": median([r["wall"] - r["sft_seconds"] for r in bare_runs]),
        "fed_outside_sft_s": median([r["wall"] - r["sft_seconds"] for r in fed_runs]),
        "fed_client_session_s": median([r["session_seconds"] for r in fed_runs]),
        "fed_sessions_rebuilt_per_round": [r["sessions_rebuilt"] for r in fed_runs],
        "encode_seconds_per_client": encode_seconds,
        "same_work": same_work,
        "max_loss_diff": max_loss_diff,
        "tokens_match": tokens_match,
        "aggregate_max_abs_diff": aggregate_diff,
        "losses": loss_rows,
        "nonpad_tokens": tokens,
        "padded_tokens": padded,
        "pad_fraction": 1 - tokens / padded,
        "matmul_m": m,
        "linear_params": n_linear,
        "achieved_gflops": achieved,
        "peak_gflops": peak_compute,
        "peak_fp32_gflops": peak_fp32,
        "peak_autocast_gflops": peak_autocast,
        "achieved_over_peak": achieved / peak_compute,
        "achieved_over_fp32_peak": achieved / peak_fp32,
        "peak_per_shape": peak["per_shape"],
        "peak_seconds": peak_elapsed(),
        "total_seconds": total_elapsed(),
    }

    table = Table(title="(a) one FedAvg round: federated vs bare local training")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("bare wall, runs (s)", ", ".join(f"{x:.2f}" for x in figures["bare_wall_s"]))
    table.add_row("federated wall, runs (s)", ", ".join(f"{x:.2f}" for x in figures["fed_wall_s"]))
    table.add_row("bare wall, median (s)", f"{bare_wall:.2f}")
    table.add_row("federated wall, median (s)", f"{fed_wall:.2f}")
    table.add_row("[bold]overhead ratio fed / bare[/]", f"[bold]{fed_wall / bare_wall:.3f}[/]")
    table.add_row("overhead (s)", f"{fed_wall - bare_wall:+.2f}")
    table.add_row("ratio of the fastest runs", f"{figures['overhead_ratio_fastest']:.3f}")
    table.add_row(
        "[bold]federation cost: fed - bare outside sft_steps (s)[/]",
        f"[bold]{figures['federation_cost_s']:+.3f}[/]",
    )
    table.add_row("bare: outside sft_steps (s)", f"{figures['bare_outside_sft_s']:.3f}")
    table.add_row("federated: outside sft_steps (s)", f"{figures['fed_outside_sft_s']:.3f}")
    table.add_row("federated: client_session lookups (s)", f"{figures['fed_client_session_s']:.3f}")
    table.add_row(
        "federated: sessions rebuilt per round",
        ", ".join(str(x) for x in figures["fed_sessions_rebuilt_per_round"]),
    )
    table.add_row(
        "encode_all per client (s)", ", ".join(f"{encode_seconds[c]:.3f}" for c in clients)
    )
    table.add_row(
        f"same work (losses <= {loss_tolerance:g}, tokens equal)",
        ("[green]yes[/]" if same_work else "[red]NO[/]") + f" (max diff {max_loss_diff:.2e})",
    )
    table.add_row("mean of bare adapters vs aggregate (max abs)", f"{aggregate_diff:.2e}")
    out.print(table)

    losses = Table(title="per-client train losses (bare run 1 vs federated run 1)")
    for col in ("client", "bare step losses", "bare mean", "fed mean", "max |diff|", "tokens"):
        losses.add_column(col, justify="right")
    for r in loss_rows:
        losses.add_row(
            str(r["client"]),
            " ".join(f"{x:.4f}" for x in r["bare_step_losses"]),
            f"{r['bare_mean_loss']:.6f}",
            f"{r['fed_mean_loss']:.6f}",
            f"{r['max_abs_diff']:.1e}",
            f"{r['tokens_bare']}/{r['tokens_fed']}",
        )
    out.print(losses)

    thr = Table(
        title=f"(b) training throughput (useful work 4 x {n_linear / 1e6:.1f} M linear params "
        "x non-pad tokens)"
    )
    thr.add_column("figure")
    thr.add_column("value", justify="right")
    thr.add_row(
        "non-pad tokens / padded tokens",
        f"{tokens} / {padded} (padding {100 * (1 - tokens / padded):.1f}%)",
    )
    thr.add_row("matmul M (mean padded tokens per pass)", str(m))
    thr.add_row("achieved (GFLOP/s, median bare wall)", f"{achieved:.1f}")
    thr.add_row("  at the fastest bare run", f"{figures['achieved_gflops_fastest_bare']:.1f}")
    thr.add_row(f"peak {server.runtime.compute_dtype} matmul (GFLOP/s)", f"{peak_compute:.1f}")
    if peak_autocast is not None:
        thr.add_row("  same under autocast from fp32, casts included", f"{peak_autocast:.1f}")
    thr.add_row("peak fp32 matmul (GFLOP/s, reference)", f"{peak_fp32:.1f}")
    thr.add_row(
        "[bold]achieved / peak[/] (target >= 0.5)", f"[bold]{achieved / peak_compute:.3f}[/]"
    )
    thr.add_row("non-pad tokens/s (median bare wall)", f"{tokens / bare_wall:.1f}")
    thr.add_row("achieved / fp32 peak", f"{achieved / peak_fp32:.3f}")
    out.print(thr)

    shapes = Table(title=f"matmul GFLOP/s at the model's linear shapes (M={m}, fwd+bwd, best of 3)")
    for col in ("layers", "in->out", "count", *(k for k in peak["weighted_gflops"])):
        shapes.add_column(col, justify="right")
    for r in peak["per_shape"]:
        shapes.add_row(
            r["layers"],
            f"{r['in']}->{r['out']}",
            str(r["count"]),
            *(f"{r[f'{k}_gflops']:.1f}" for k in peak["weighted_gflops"]),
        )
    shapes.add_row("weighted", "", "", *(f"{v:.1f}" for v in peak["weighted_gflops"].values()))
    out.print(shapes)
    flags = cpu_bf16()
    out.print(
        f"{describe_bf16(flags)}; compute dtype "
        f"{server.runtime.compute_dtype}; achieved / peak {achieved / peak_compute:.3f}"
    )
    if "gpu" in figures:  # the process's high-water mark, peak measurement included
        out.print(f"device {server.runtime.device} ({figures['gpu']}): peak GPU memory "
                  f"{figures['device_peak_mb']:.0f} MB")
    with stopwatch() as loops_elapsed:
        figures["vs_trl"] = compare_loops(args, clients, torch.get_num_threads(), out)
    figures["loops_seconds"] = loops_elapsed()
    out.print(
        f"total {total_elapsed() + loops_elapsed():.0f} s (peak measurement {peak_elapsed():.0f} s, "
        f"(c) {loops_elapsed():.0f} s); "
        f"threads {torch.get_num_threads()}, load avg {machine()['load_avg_1m']:.2f}"
    )

    write_json(args.json, figures)
    tmp.cleanup()
    return 0 if same_work else 1


if __name__ == "__main__":
    raise SystemExit(main())
