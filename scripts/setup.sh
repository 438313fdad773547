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
# pip byte-compiles what it installs on one core (~2 min for these packages on a 2-core CPU);
# compileall below does it on every core in half that. The .pyc files matter: where
# PYTHONDONTWRITEBYTECODE is set, no process writes them, and every import of torch,
# transformers and peft then compiles them again (~25 s a process instead of ~11).
INSTALL=(install --no-compile)
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "${PIP[@]}" "${INSTALL[@]}" "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"
  else
    "${PIP[@]}" "${INSTALL[@]}" "torch==$TORCH_VERSION"
  fi
fi
# The constraints file pins every package we tested with; torch is already in place.
grep -v '^torch==' requirements/constraints.txt > .venv/constraints.txt
"${PIP[@]}" "${INSTALL[@]}" -c .venv/constraints.txt -e ".[dev]"
# Files already compiled are skipped. A few packages ship files that are not Python 3 (templates,
# old examples): compileall reports them and exits 1, as pip would have skipped them.
.venv/bin/python -m compileall -q -j 0 "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" src >/dev/null || true
