#!/usr/bin/env bash
# The GPU check of benchmarks/README.md ("GPU"): on a CUDA machine, with the configs as they are
# (model.device = "auto" picks CUDA, bf16 weights and compute), run
#   1. bench_round.py: one quickstart FedAvg round, bare vs federated, throughput, peak GPU memory;
#   2. the quickstart's FedSDR run (rewriting, two adapters, evaluation), timed.
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]   (default results/bench/gpu; PYTHON defaults to
# .venv/bin/python). Writes round.json, round.log, fedsdr.log, fedsdr-metrics.jsonl, fedsdr-summary.json.
set -uo pipefail
out=${1:-results/bench/gpu}
py=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$py" benchmarks/bench_round.py --baseline none --json "$out/round.json" 2>&1 | tee "$out/round.log"
start=$(date +%s)
"$py" -m fedsdr.cli run --config configs/quickstart-fedsdr.toml --out "$out/run-fedsdr" --force 2>&1 \
  | tee "$out/fedsdr.log"
echo "quickstart-fedsdr: exit ${PIPESTATUS[0]}, $(( $(date +%s) - start )) s wall" | tee -a "$out/fedsdr.log"
cp "$out/run-fedsdr/metrics.jsonl" "$out/fedsdr-metrics.jsonl" 2>/dev/null
cp "$out/run-fedsdr/summary.json" "$out/fedsdr-summary.json" 2>/dev/null
