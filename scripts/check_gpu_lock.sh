#!/usr/bin/env bash
# The GPU lock (requirements-gpu.txt) is requirements-gpu.in resolved by `uv pip compile` for
# Linux x86_64 / Python 3.11, as PyPI stood at LOCK_DATE (so the lock does not drift when unrelated
# packages publish new releases). Needs a package registry; not part of the test suite.
#   scripts/check_gpu_lock.sh            re-resolve into a temp file; fail if the committed lock differs
#   scripts/check_gpu_lock.sh --update   write requirements-gpu.txt (after editing the .in or LOCK_DATE)
set -euo pipefail
cd "$(dirname "$0")/.."

LOCK_DATE="2026-12-01T00:00:00Z"
IN=requirements-gpu.in
LOCK=requirements-gpu.txt

if ! command -v uv >/dev/null 2>&1; then
  echo "check_gpu_lock: uv not found; install it with 'pip install uv'" >&2
  exit 2
fi

compile() {  # $1: output path
  uv pip compile "$IN" --quiet --python-version 3.11 --python-platform x86_64-manylinux_2_34 \
    --exclude-newer "$LOCK_DATE" --custom-compile-command "scripts/check_gpu_lock.sh --update" -o "$1"
}

if [[ "${1:-}" == "--update" ]]; then
  compile "$LOCK"
  echo "check_gpu_lock: wrote $LOCK ($(grep -c '==' "$LOCK") pins)"
  exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
compile "$tmp/lock.txt"
if ! diff -u "$LOCK" "$tmp/lock.txt" > "$tmp/diff"; then
  cat "$tmp/diff"
  echo "check_gpu_lock: $LOCK is stale for $IN; run scripts/check_gpu_lock.sh --update and commit it" >&2
  exit 1
fi
echo "check_gpu_lock: $LOCK matches $IN ($(grep -c '==' "$LOCK") pins)"
