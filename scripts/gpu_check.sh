#!/usr/bin/env bash
# The one prepared device check, for a single-GPU machine without a package registry (the project's
# check machine: Python 3.12, a CUDA torch, at most 64 MiB carried, 10 minutes a run).
#   1. on a CPU machine: scripts/gpu_check_prepare.sh   (downloads .gpu_wheels/, checks the size)
#   2. on the GPU machine, from the repo root with .gpu_wheels/ carried:  bash scripts/gpu_check.sh
# Installs the carried wheels into a venv on top of the machine's torch, then runs scripts/gpu_check.py
# (parity fp32/bf16 vs transformers, a 3-step RL run, the bench/ timings) and writes
# $OUT/gpu_check.json (OUT: the device tool's output folder, else outputs/gpu_check).
# SGLang and Transformer Engine are not run: their wheels are too large to carry.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-outputs/gpu_check}"
mkdir -p "$out"
if [[ ! -f .gpu_wheels/requirements.txt ]]; then
  echo "gpu_check: .gpu_wheels/ is missing; run scripts/gpu_check_prepare.sh on a CPU machine and carry .gpu_wheels" >&2
  exit 2
fi
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || echo "gpu_check: nvidia-smi failed (no GPU driver?)" | tee -a "$out/nvidia-smi.txt"

venv="${GPU_CHECK_VENV:-/tmp/gpu_check_venv}"
python3 -m venv --system-site-packages "$venv"  # the machine's CUDA torch (and numpy, pyarrow, pandas) stay visible
if ! "$venv/bin/pip" install --quiet --no-index --no-deps --find-links .gpu_wheels -r .gpu_wheels/requirements.txt \
    > "$out/install.log" 2>&1; then
  echo "gpu_check: installing the carried wheels failed; see $out/install.log" >&2
  tail -20 "$out/install.log" >&2
  exit 2
fi
# What the carried set assumes the machine has (not carried: too large).
"$venv/bin/python" - <<'PY' 2>&1 | tee "$out/preflight.txt"
import importlib
for name in ("torch", "numpy", "pyarrow", "pandas", "datasets", "transformers", "megatron.core", "PIL"):
    try:
        m = importlib.import_module(name)
        print(f"gpu_check: {name} {getattr(m, '__version__', '?')}")
    except Exception as e:  # the checks that need it will fail and say so; the others still run
        print(f"gpu_check: {name} NOT importable: {type(e).__name__}: {e}")
import torch
print(f"gpu_check: cuda available={torch.cuda.is_available()} devices={torch.cuda.device_count()}")
PY
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false NCCL_CUMEM_ENABLE=0
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout 570 "$venv/bin/python" scripts/gpu_check.py --out "$out" "$@"
rc=$?
[[ $rc == 124 ]] && echo "gpu_check: stopped at the 570 s limit; the finished checks are in $out/gpu_check.json (if any)" >&2
exit $rc
