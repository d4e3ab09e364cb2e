"""Spec §8: every golden vector through the CLI subprocess, tolerance 1e-5 abs/rel."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VECTORS = REPO / ".." / "shared" / "spec" / "vectors"
FILES = sorted(VECTORS.glob("*.json")) if VECTORS.is_dir() else []
TOL = 1e-5


def _compare(expected, got, where):
    if isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), f"{where}: length/shape differs"
        for i, (e, g) in enumerate(zip(expected, got)):
            _compare(e, g, f"{where}[{i}]")
    else:
        assert math.isclose(float(got), float(expected), rel_tol=TOL, abs_tol=TOL), \
            f"{where}: expected {expected}, got {got}"


@pytest.mark.skipif(not VECTORS.is_dir(), reason=f"golden vectors directory {VECTORS} is absent")
def test_vectors_present():
    assert FILES, f"{VECTORS} holds no *.json vectors"


@pytest.mark.skipif(not VECTORS.is_dir(), reason=f"golden vectors directory {VECTORS} is absent")
@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_golden_vector_cli(path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "megatron_vppo.algo.golden", str(path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    expected = json.loads(path.read_text())["expected"]
    assert set(expected) <= set(got), f"CLI output lacks {set(expected) - set(got)}"
    for key, value in expected.items():
        _compare(value, got[key], key)
