#!/usr/bin/env bash
# Create/refresh .venv with the pinned CPU stack. Idempotent: a stamp keyed by the hash of
# requirements-cpu.txt and setup.py makes a second run a no-op (well under a second).
#   PYTHON=python3.11 scripts/bootstrap.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
VENV=.venv
TORCH_PIN="torch==2.13.0"
STAMP="$VENV/.bootstrap-stamp"
want="$(cat requirements-cpu.txt setup.py | sha256sum | cut -c1-16) $TORCH_PIN"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" && -x "$VENV/bin/python" ]]; then
  exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[bootstrap] creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet)

constraint="$(mktemp)"
trap 'rm -f "$constraint"' EXIT
echo "$TORCH_PIN" > "$constraint"

echo "[bootstrap] $TORCH_PIN (CPU) first, so nothing later pulls a CUDA build"
"${PIP[@]}" "$TORCH_PIN"
echo "[bootstrap] requirements-cpu.txt"
"${PIP[@]}" -r requirements-cpu.txt -c "$constraint"
echo "[bootstrap] megatron_vppo (editable)"
"${PIP[@]}" -e . --no-deps --no-build-isolation -c "$constraint"

"$VENV/bin/python" -c "import torch, megatron_vppo; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "$want" > "$STAMP"
echo "[bootstrap] done"
