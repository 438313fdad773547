#!/usr/bin/env bash
# The GPU check of benchmarks/README.md ("GPU"): on a CUDA machine, with the configs as they are
# (model.device = "auto" picks CUDA, bf16 weights and compute), run any of
#   round:      bench_round.py, one quickstart FedAvg round, bare vs federated, throughput, peak GPU memory;
#   step:       bench_step.py, a training step as one pass (what pass_tokens = "auto" picks on a GPU)
#               vs passes of 512 tokens (what it picks on a CPU), side by side;
#   quickstart: the quickstart's FedSDR run (rewriting, two adapters, evaluation), timed, on the
#               engine ENGINE names (ray: Flower's simulation engine, a share of the GPU per client);
#   gated_mlp:  cuda_gated_mlp.py, the gated MLP recomputing its activation against autograd, bitwise, on CUDA (seconds).
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]   (default results/bench/gpu)
# Env: PYTHON (default .venv/bin/python); PARTS (default "round step quickstart", run in that order);
#      ENGINE (inprocess or ray; default inprocess); RESUME=1 continues the quickstart run in OUT_DIR.
# Writes round.{json,log}, step.{json,log}, gated_mlp.log, fedsdr.log, fedsdr-metrics.jsonl, fedsdr-summary.json.
set -uo pipefail
out=${1:-results/bench/gpu}
py=${PYTHON:-.venv/bin/python}
engine=${ENGINE:-inprocess}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
for part in ${PARTS:-round step quickstart}; do
  case $part in
    round)
      "$py" benchmarks/bench_round.py --baseline none --json "$out/round.json" 2>&1 | tee "$out/round.log" ;;
    step)
      "$py" benchmarks/bench_step.py --passes 0,512 --steps 4 --json "$out/step.json" 2>&1 | tee "$out/step.log" ;;
    quickstart)
      start=$(date +%s)
      if [ "${RESUME:-0}" = 1 ]; then how=--resume; else how=--force; : > "$out/fedsdr.log"; fi  # a resumed run's log goes on
      "$py" -m fedsdr.cli run --config configs/quickstart-fedsdr.toml --set "federation.engine=$engine" \
        --out "$out/run-fedsdr" $how 2>&1 | tee -a "$out/fedsdr.log"
      echo "quickstart-fedsdr ($engine engine): exit ${PIPESTATUS[0]}, $(( $(date +%s) - start )) s wall" \
        | tee -a "$out/fedsdr.log"
      cp "$out/run-fedsdr/metrics.jsonl" "$out/fedsdr-metrics.jsonl" 2>/dev/null
      cp "$out/run-fedsdr/summary.json" "$out/fedsdr-summary.json" 2>/dev/null ;;
    gated_mlp)
      "$py" benchmarks/cuda_gated_mlp.py 2>&1 | tee "$out/gated_mlp.log" ;;
    *) echo "gpu_check.sh: unknown part '$part' (round, step, quickstart, gated_mlp)" >&2; exit 2 ;;
  esac
done
