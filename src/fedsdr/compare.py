"""One table over several runs (same clients, same seed): FedAvg vs +FedSD vs FedSDR..."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from fedsdr.io import write_json_atomic, write_text_atomic


def _label(summary: dict[str, Any]) -> str:
    algo = summary["algorithm"]
    if algo == "fedsdr":
        return "FedSDR"
    names = {"fedavg": "FedAvg", "fedprox": "FedProx", "fedavgm": "FedAvgM", "fedadam": "FedAdam",
             "fedyogi": "FedYogi", "fedadagrad": "FedAdagrad"}
    return names.get(algo, algo) + ("+FedSD" if summary.get("fedsd") else "")


def comparison_rows(summaries: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    domains = sorted({d for s in summaries for d in ((s.get("final") or {}).get("domains") or {})})

    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    header = ["method", *[f"acc {d}" for d in domains], "acc all", "halluc.", "rougeL", "gen len",
              "loss", "pers. acc", "bytes up/client/round"]
    rows = []
    for s in summaries:
        final = s.get("final") or {}
        doms = final.get("domains") or {}
        pers = (s.get("clients_final") or {}).get("personalized") or {}
        rows.append([
            _label(s), *[fmt((doms.get(d) or {}).get("accuracy", (doms.get(d) or {}).get("rougeL"))) for d in domains],
            fmt(final.get("accuracy")), fmt(final.get("hallucination")), fmt(final.get("rougeL")),
            fmt(final.get("gen_len")), fmt(final.get("loss")), fmt(pers.get("accuracy")),
            fmt(int(s["bytes_up_per_client_round"]) if s.get("bytes_up_per_client_round") else None),
        ])
    return header, rows


def comparison_table(summaries: list[dict[str, Any]]) -> Table:
    header, rows = comparison_rows(summaries)
    table = Table(title="Global model on the global held-out set, last round "
                        "(open-ended domains show ROUGE-L in their column)")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


def write_comparison(root: Path, summaries: list[dict[str, Any]]) -> None:
    header, rows = comparison_rows(summaries)
    md = "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
    md += "".join("| " + " | ".join(r) + " |\n" for r in rows)
    write_text_atomic(Path(root) / "comparison.md", md)
    write_json_atomic(Path(root) / "comparison.json", summaries)
