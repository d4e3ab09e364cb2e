"""scripts/gpu_check.py (the prepared device check) runs its checks on CPU as it will on the GPU.

Only the CPU-side half can be verified here: the script's logic, its subprocess plumbing and the
summary it writes, on the same code paths (tools/score.py vs transformers; the trainer through
`megatron-vppo demo`). The GPU numbers come from running scripts/gpu_check.sh on a device machine.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_on_cpu(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "scripts/gpu_check.py", "--out", str(tmp_path), "--quick",
                        "--only", "parity,rl"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert json.loads(p.stdout.strip().splitlines()[-1]) == summary  # the last line is the summary
    par = summary["checks"]["parity"]
    assert par["megatron_fp32_vs_hf_fp32"] <= 1e-4
    # bf16 really is lower precision (the bound is not vacuous) and the trainer's bf16 is within it
    assert 1e-4 < par["hf_bf16_vs_hf_fp32"] < 0.2 and par["bf16_ok"]
    rl = summary["checks"]["rl"]
    assert rl["synced_steps"] == [1, 2, 3] and rl["finite"], rl
    assert rl["engines"] == [1, 1, 1] and rl["ok"], rl  # engines on every rank of a 1-process run: one
    assert all(d is not None and d <= 1e-4 for d in rl["trainer_vs_engine_logp_abs_diff_max"]), rl
    assert "sglang" in summary["not_run"]


def test_gpu_check_sh_needs_the_carried_wheels(tmp_path):
    """Without .gpu_wheels/ the device script stops at once and names the preparation step."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "gpu_check.sh", repo / "scripts")
    p = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=repo, env=dict(os.environ, OUT=str(tmp_path / "o")),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "scripts/gpu_check_prepare.sh" in p.stderr
