#!/usr/bin/env bash
# Creates .venv at the repository root and installs fedsdr with the tested versions.
# torch goes in first and explicitly: a bare requirement would pull a multi-GB CUDA build
# on a CPU-only machine. GPU users: TORCH_INDEX_URL=<your CUDA wheel index> bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "${PIP[@]}" install "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"
  else
    "${PIP[@]}" install "torch==$TORCH_VERSION"
  fi
fi
# The constraints file pins every package we tested with; torch is already in place.
grep -v '^torch==' requirements/constraints.txt > .venv/constraints.txt
"${PIP[@]}" install -c .venv/constraints.txt -e ".[dev]"
