#!/usr/bin/env bash
# Unpack the SGLang source files the CPU contract tests run (tests/sglang_source.py ALL_FILES) from the pinned
# wheel: `import sglang` needs its CUDA stack, so the wheel is downloaded (no dependencies, nothing
# installed) and only those pure-Python files are kept.
#   scripts/fetch_sglang_source.sh PYTHON sglang==X.Y.Z OUT_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:?python}; PIN=${2:?sglang==version}; OUT=${3:?output dir}
wheels="$(mktemp -d)"
trap 'rm -rf "$wheels"' EXIT
"$PY" -m pip download --quiet --no-deps --only-binary=:all: "$PIN" -d "$wheels"
"$PY" - "$wheels" "$OUT" <<'PY'
import sys, zipfile
from pathlib import Path
sys.path.insert(0, "tests")
from sglang_source import ALL_FILES as FILES
wheel = next(Path(sys.argv[1]).glob("sglang-*.whl"))
out = Path(sys.argv[2])
with zipfile.ZipFile(wheel) as z:
    for f in FILES:
        (out / f).parent.mkdir(parents=True, exist_ok=True)
        (out / f).write_bytes(z.read(f))
(out / ".complete").write_text(wheel.name + "\n")
PY
