#!/usr/bin/env bash
# The GPU locks are their .in files resolved by `uv pip compile` for Linux x86_64 / Python 3.11, as
# PyPI stood at LOCK_DATE (so a lock does not drift when unrelated packages publish new releases):
# requirements-gpu.txt (SGLang) and requirements-gpu-vllm.txt (vLLM; the two engines cannot share one).
# Then scripts/lock_ranges.py checks every pin against the Requires-Dist each locked package declares,
# extras included (megatron-core's tested `dev` extra; documented exceptions in docs/gpu_stack.md).
# Needs a package registry; not part of the test suite (tests/test_gpu_stack.py tests the range logic offline).
#   scripts/check_gpu_lock.sh            re-resolve into temp files; fail if a committed lock differs
#                                        or a pin is outside a dependent's declared range
#   scripts/check_gpu_lock.sh --update   write the locks (after editing an .in or LOCK_DATE)
set -euo pipefail
cd "$(dirname "$0")/.."

LOCK_DATE="2026-12-01T00:00:00Z"
LOCKS=(requirements-gpu requirements-gpu-vllm)  # each NAME.in -> NAME.txt

if ! command -v uv >/dev/null 2>&1; then
  echo "check_gpu_lock: uv not found; install it with 'pip install uv'" >&2
  exit 2
fi

compile() {  # $1: .in path, $2: output path
  uv pip compile "$1" --quiet --python-version 3.11 --python-platform x86_64-manylinux_2_34 \
    --exclude-newer "$LOCK_DATE" --custom-compile-command "scripts/check_gpu_lock.sh --update" -o "$2"
}

if [[ "${1:-}" == "--update" ]]; then
  for name in "${LOCKS[@]}"; do
    compile "$name.in" "$name.txt"
    echo "check_gpu_lock: wrote $name.txt ($(grep -c '==' "$name.txt") pins)"
  done
fi

# lock_ranges.py needs `packaging`: the project's venv has it
PY="${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}"
ranges() {
  local bad=0
  for name in "${LOCKS[@]}"; do
    "$PY" scripts/lock_ranges.py "$name.in" "$name.txt" || bad=1
  done
  return $bad
}

if [[ "${1:-}" == "--update" ]]; then
  ranges
  exit $?
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
stale=0
for name in "${LOCKS[@]}"; do
  # Start from the committed lock, as --update does: uv keeps its pins where they still satisfy the .in,
  # so "stale" means the .in changed, not that the registry gained a release dated before LOCK_DATE.
  cp "$name.txt" "$tmp/$name.txt"
  compile "$name.in" "$tmp/$name.txt"
  if ! diff -u "$name.txt" "$tmp/$name.txt" > "$tmp/diff"; then
    cat "$tmp/diff"
    echo "check_gpu_lock: $name.txt is stale for $name.in; run scripts/check_gpu_lock.sh --update and commit it" >&2
    stale=1
  else
    echo "check_gpu_lock: $name.txt matches $name.in ($(grep -c '==' "$name.txt") pins)"
  fi
done
ranges || stale=1
exit $stale
