"""How long the base model's answers run when the budget does not stop them.

    .venv/bin/python scripts/probe_base_budgets.py [BUDGET] [--config configs/quickstart.toml]

Generates the config's evaluation answers (eval.generate_per_domain per domain of the global
held-out set) with every domain's budget set to BUDGET (without it: the config's own budgets,
which is how the demo's round 0 runs) and the loop stop as configured, then prints per domain:
truncated and looped shares, percentiles of the lengths of the answers that ended on their own,
the tokens generated, and the seconds it took. Run alone.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

from fedsdr.algorithms import get_algorithm
from fedsdr.config import load_config
from fedsdr.data.federated import build_federated_data
from fedsdr.evaluate import domain_budgets, evaluate_with_predictions, generated_subset
from fedsdr.models.loading import shared_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("budget", type=int, nargs="?")
    parser.add_argument("--config", default="configs/quickstart.toml")
    parser.add_argument("--domain", action="append", help="only this domain's answers (repeatable)")
    parser.add_argument("--show", action="store_true", help="print the answers that hit the budget")
    args = parser.parse_args()
    same = [] if args.budget is None else [f"eval.max_new_tokens={args.budget}", f"eval.max_new_tokens_limit={args.budget}",
                                           "eval.max_new_tokens_per_domain={}"]
    cfg = load_config(args.config, same)
    model, tok, runtime, _ = shared_model(cfg.model, cfg.lora, get_algorithm(cfg).adapters(cfg), cfg.seed)
    data = build_federated_data(cfg.data, cfg.partition, cfg.seed)
    records = [data.global_test[i] for i in generated_subset(cfg.eval, data.global_test)
               if not args.domain or data.global_test[i].domain in args.domain]
    start = time.perf_counter()
    _, predictions = evaluate_with_predictions(model, tok, records, cfg.eval, autocast=runtime.autocast,
                                               system_prompt=cfg.data.system_prompt, seed=cfg.seed)
    budgets = domain_budgets(cfg.eval, tok, records)
    print(f"{len(records)} answers, budgets {budgets}, {time.perf_counter() - start:.1f} s")
    by_domain = defaultdict(list)
    for row in predictions:
        by_domain[row["domain"]].append(row)
    for row in predictions if args.show else []:
        if row["truncated"]:
            print(f"--- {row['domain']} {row['id']}, {row['new_tokens']} tokens:\n{row['response']}\n")
    for domain, rows in sorted(by_domain.items()):
        ended = sorted(r["new_tokens"] for r in rows if not r["truncated"] and not r["looped"])

        def pct(q: float, ended: list[int] = ended) -> int | None:
            return ended[min(len(ended) - 1, int(q * (len(ended) - 1)))] if ended else None

        print(f"{domain}: n {len(rows)}, truncated {sum(r['truncated'] for r in rows) / len(rows):.2f}, "
              f"looped {sum(r['looped'] for r in rows) / len(rows):.2f}, ended on their own: p50 {pct(0.5)}, "
              f"p95 {pct(0.95)}, max {pct(1.0)}; tokens {sum(r['new_tokens'] for r in rows)}")


if __name__ == "__main__":
    main()
