"""Rollout on every rank (issue 18 item 1): an HF engine on every rank of PP2xDP2, TP2xDP2 and TP2xPP2
runs (four engines each, prompts split over them, weights synced into all of them) logs the same
metrics as one engine in one process at TP1 (<= 1e-5): rewards, trajectories, loss, gradient norm,
dependency, TGF, validation accuracy before and after the updates.

Two launches in all: the 1-process reference and one 4-process torchrun that runs the three layouts one
after the other (tests/placement_worker.py). TP2xDP2 takes π_old from the engines (their sampling
log-probs and the perturbed-view prefills, split over the four engines); it is held to the reference on
every metric both modes log (engine- and trainer-mode π_old agree to float rounding in fp32).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import launch_env

REPO = Path(__file__).resolve().parents[1]
WORKER = str(REPO / "tests" / "placement_worker.py")
STEPS = 2
CONFIG = """\
model: {{path: {model}, dtype: fp32, transformer_impl: local}}
algo: {{name: vppo, entropy_coef: 0.06}}
rollout: {{engine: hf, group_size: 4, top_p: 1.0, max_prompt_length: 512, max_response_length: 6,
          max_dynamic_sampling_retries: 1}}
data: {{train: {train}, val: {val}, min_pixels: 3136, max_pixels: 12544, shuffle: false}}
optim: {{lr: 2.0e-4, weight_decay: 0.0}}
train: {{seed: 1, prompts_per_step: 4, mini_batch_prompts: 2, micro_batch_size: 4, val_k: 2}}
"""
# name -> (processes, overrides); the 4-process layouts each have four engines (engine_tp 1).
REFERENCE = {"tp1": []}
LAYOUTS = {"pp2dp2": ["parallel.pp=2"], "tp2dp2_engine": ["parallel.tp=2", "train.old_logp_source=engine"],
           "tp2pp2": ["parallel.tp=2", "parallel.pp=2"]}


def _launch(prefix: list[str], config: Path, out: Path, layouts: dict, log: Path) -> None:
    args = [f"{name}={','.join(o)}" for name, o in layouts.items()]
    with open(log, "w") as f:
        p = subprocess.run([*prefix, WORKER, str(config), str(out), str(STEPS), *args], cwd=REPO, env=launch_env(),
                           stdout=f, stderr=subprocess.STDOUT, timeout=900)
    assert p.returncode == 0, log.read_text()[-6000:]


def _metrics(path: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    from megatron_vppo.data.synthetic_task import write_synthetic_dataset
    from megatron_vppo.train.demo import warm_start

    root = tmp_path_factory.mktemp("placement")
    train, val = write_synthetic_dataset(root / "data", 64, 16, seed=0, tasks=("count",))
    for path in (train, val):  # answers 1 and 2 only: the warm start gets some, not all, right
        rows = [r for r in map(json.loads, path.read_text().splitlines()) if r["answer"] in ("1", "2")]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # warm-started so rewards vary inside groups (dynamic sampling keeps them; the loss is not zero)
    model = warm_start(Path(tiny_model_dir), train, root / "model_sft", steps=40, batch_size=8, lr=2e-3, seed=0)
    config = root / "run.yaml"
    config.write_text(CONFIG.format(model=model, train=train, val=val))
    _launch([sys.executable], config, root, REFERENCE, root / "reference.log")
    _launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4"], config, root,
            LAYOUTS, root / "layouts.log")
    return {name: _metrics(root / name) for name in [*REFERENCE, *LAYOUTS]}


def _same(a: dict, b: dict, what: str, common: bool = False) -> None:
    for s in range(STEPS + 1):
        keys = {k for k in a[s] if not k.startswith("time/") and k != "rollout/engines"}
        other = {k for k in b[s] if not k.startswith("time/") and k != "rollout/engines"}
        if common:  # engine mode logs no trainer-vs-engine mismatch: compare what both log
            assert {"actor/loss", "actor/grad_norm", "dependency/mean", "reward/mean"} <= keys & other or s == 0
            keys = other = keys & other
        assert keys == other, (what, s)
        for k in sorted(keys):
            if isinstance(a[s][k], float) or isinstance(b[s][k], float):
                assert a[s][k] == pytest.approx(b[s][k], abs=1e-5, rel=1e-5), (what, s, k)
            else:
                assert a[s][k] == b[s][k], (what, s, k)


def test_layouts_with_an_engine_on_every_rank_match_one_engine(runs):
    ref = runs["tp1"]
    for s in (1, 2):  # a real step: rewards vary, the policy moves
        assert 0.0 < ref[s]["reward/mean"] < 1.0 and "actor/skipped" not in ref[s]
        assert ref[s]["actor/grad_norm"] > 0 and "dependency/mean" in ref[s]
    assert "val/accuracy" in ref[0] and "val/accuracy" in ref[STEPS]
    assert ref[1]["rollout/engines"] == 1
    assert all(runs[name][s]["rollout/engines"] == 4 for name in LAYOUTS for s in (1, 2))  # one on every rank
    # step 2's rollouts come from synced weights: an engine left stale would change its rewards
    _same(runs["pp2dp2"], ref, "pp2dp2")
    _same(runs["tp2pp2"], ref, "tp2pp2")
    _same(runs["tp2dp2_engine"], ref, "tp2dp2_engine", common=True)
