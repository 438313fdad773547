"""The generation engine's KV cache against transformers' plain cache.

    .venv/bin/python benchmarks/bench_kv_cache.py [--records 48] [--budget 256]

transformers' `DynamicCache` appends each step's keys and values with `torch.cat`, a copy of
the whole cache of every layer on every step; and under CPU bf16 autocast RoPE turns the cached
keys into fp32, which attention (bf16 under autocast) casts back on every step.
`fedsdr.generation.new_cache` appends in place into room reserved ahead and stores keys and
values in the compute dtype once. Both caches generate the quickstart's evaluation answers
(every k-th of the generated subset, each domain's budget capped at --budget, loop stop 0.8,
batch 32), one after the other in one process after a warm-up: plain, engine, plain, engine.
Prints tokens/s of each run, the ratio of the best runs, and whether the texts are the same
(they should be: the same numbers, without the copies).
"""

from __future__ import annotations

import argparse

from transformers import DynamicCache

import fedsdr.generation as generation
from fedsdr.algorithms import get_algorithm
from fedsdr.config import load_config
from fedsdr.data.federated import build_federated_data
from fedsdr.evaluate import domain_budgets, generated_subset
from fedsdr.models.loading import shared_model
from fedsdr.train import chat_messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.toml")
    parser.add_argument("--records", type=int, default=48)
    parser.add_argument("--budget", type=int, default=256)
    args = parser.parse_args()
    cfg = load_config(args.config, [])
    model, tok, runtime, _ = shared_model(cfg.model, cfg.lora, get_algorithm(cfg).adapters(cfg), cfg.seed)
    data = build_federated_data(cfg.data, cfg.partition, cfg.seed)
    subset = [data.global_test[i] for i in generated_subset(cfg.eval, data.global_test)]
    records = subset[:: max(1, len(subset) // args.records)][: args.records]
    per_domain = domain_budgets(cfg.eval, tok, records)
    budgets = [min(args.budget, per_domain[r.domain]) for r in records]
    prompts = [chat_messages(r, cfg.data.system_prompt) for r in records]
    caches = {"plain": lambda model, device: DynamicCache(config=model.config), "engine": generation.new_cache}

    def run(name: str) -> tuple[float, list[str], int]:
        generation.new_cache = caches[name]
        stats = generation.GenerationStats()
        with runtime.autocast():
            out = generation.generate_detailed(model, tok, prompts, max_new_tokens=budgets, batch_size=32,
                                               stats=stats, repeat_stop=0.8)
        return stats.tokens_per_second, [o.text for o in out], stats.new_tokens

    run("plain")  # warm-up
    runs: dict[str, list[tuple[float, list[str], int]]] = {"plain": [], "engine": []}
    for name in ("plain", "engine", "plain", "engine"):
        runs[name].append(run(name))
        speed, _, tokens = runs[name][-1]
        print(f"{name}: {tokens} tokens, {speed:.1f} tokens/s", flush=True)
    generation.new_cache = caches["engine"]
    same = sum(a == b for a, b in zip(runs["plain"][0][1], runs["engine"][0][1], strict=True))
    best = {name: max(r[0] for r in rs) for name, rs in runs.items()}
    print(f"{len(records)} records; same texts {same}/{len(records)}; engine / plain (best runs) "
          f"{best['engine'] / best['plain']:.3f}")


if __name__ == "__main__":
    main()
