"""The trainer end to end, continued (test_trainer_e2e.py holds the TP2 reference run and the tests
that compare with it; these two groups need no such run, and a file of their own lets pytest-xdist
run them beside it). Same assets, helpers and oracles:

* a bf16 TP2 run — TP2 + SP + DP2 in bf16 with the distributed optimizer (the paper configs'
  combination) sees its rollouts and matches its loss;
* π_old from the engine vs from the trainer (same weights and seeds, so the same rollouts and, to float
  tolerance, the same dependency, TGF mask and loss), and rollout-correction metrics in trainer mode.
"""
from __future__ import annotations

import json

import pytest

from test_trainer_e2e import assets, cli, complete_checkpoints, metrics, run, torchrun  # noqa: F401 (assets: a fixture)


def test_bf16_sequence_parallel_distributed_optimizer_dp2_matches_bf16_tp2(assets, monkeypatch):
    """The paper configs' combination — bf16 weights with fp32 main params sharded by the distributed
    optimizer over DP2, TP2 + SP — trains and checkpoints through the trainer. Oracle: a bf16 TP2 run
    (no SP, DP1): the engines get the same bf16 weights, so the rollouts are the same, and SP and DP
    only move reductions.

    oneDNN's AMX / AVX512-BF16 kernels (CPUs that have them) round bf16 GEMMs differently with the
    batch's shape: there DP1's 4-row micro-batch and DP2's 2-row ones differ by ~2% in the loss after
    one Adam step (fp32 agrees to 1e-8; bf16 SP at DP1 is bit-identical to no SP). The runs are held to
    AVX512_CORE kernels (an upper bound: a no-op on CPUs without them)."""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")
    rows = {}
    for name, nproc, extra in (("bf16_tp2", 2, []), ("bf16_tp2sp_dp2", 4, ["parallel.sp=true"])):
        out = assets["root"] / name
        run(torchrun(nproc) + cli("train", str(assets["config"]), f"train.output_dir={out}", "parallel.tp=2",
                                  "model.dtype=bf16", "train.total_steps=1", "train.val_every=0", *extra),
            assets["root"] / f"{name}.log", timeout=400)
        rows[name] = metrics(out)
        assert sorted(rows[name]) == [1] and "step_0000001" in complete_checkpoints(out)
        meta = json.loads((out / "checkpoints" / "step_0000001" / "meta.json").read_text())
        assert meta["optimizer"]["distributed"] is True and meta["config"]["model"]["dtype"] == "bf16"
        assert meta["layout"]["dp"] == nproc // 2
    ref, sp = rows["bf16_tp2"][1], rows["bf16_tp2sp_dp2"][1]
    print({k: (ref[k], sp[k]) for k in ("reward/mean", "actor/loss", "actor/pg_loss", "actor/grad_norm",
                                        "dependency/mean", "tgf/kept_token_frac", "rollout/logp_abs_diff_max")})
    assert 0.0 < ref["reward/mean"] < 1.0
    assert sp["reward/mean"] == ref["reward/mean"]
    assert sp["response/trajectories"] == ref["response/trajectories"]
    for k in ("actor/loss", "actor/pg_loss", "actor/grad_norm", "dependency/mean", "tgf/kept_token_frac"):
        assert sp[k] == pytest.approx(ref[k], abs=1e-5, rel=1e-3), k
    # bf16 trainer vs the bf16 HF engine on the same tokens: rounding-level, not a broken model (~1 nat)
    assert sp["rollout/logp_abs_diff_max"] < 0.1

# ------------------------------------------------------------------ π_old source and rollout correction


def _old_logp_worker(rank, world, config: str, runs: list[list[str]]) -> None:
    """Several trainer runs one after another in one process: one import of torch / Megatron /
    transformers instead of one per run (`megatron-vppo train` calls the same `train(cfg)`)."""
    import multiprocessing as mp

    from megatron_vppo.run_config import load_config
    from megatron_vppo.train.run import train

    mp.current_process()._config["daemon"] = False  # the last step's checkpoint save forks writers
    for overrides in runs:
        train(load_config(config, overrides))


@pytest.fixture(scope="module")
def old_logp_runs(assets):
    """Two steps at TP1 for each (old_logp_source, algorithm); trainer-mode VPPO with token-level TIS,
    engine-mode VPPO with the fidelity check every step. One process runs all four."""
    from dist_helpers import run_distributed

    cases = (("trainer", "vppo"), ("engine", "vppo"), ("trainer", "dapo"), ("engine", "dapo"))
    runs = []
    for source, algo in cases:
        d = assets["root"] / f"src_{source}_{algo}"
        extra = [f"train.old_logp_source={source}", f"algo.name={algo}", "train.total_steps=2",
                 "train.save_every=100", "train.val_every=0", f"train.output_dir={d}"]
        if source == "engine" and algo == "vppo":
            extra.append("train.check_old_logp_every=1")
        if source == "trainer" and algo == "vppo":
            extra += ["algo.rollout_correction.level=token", "algo.rollout_correction.mode=truncate",
                      "algo.rollout_correction.cap=2.0"]
        runs.append(extra)
    run_distributed(_old_logp_worker, 1, str(assets["config"]), runs, timeout=600)
    return {case: metrics(assets["root"] / f"src_{case[0]}_{case[1]}") for case in cases}


def test_old_logp_source_engine_matches_trainer(old_logp_runs):
    """Same weights and seeds -> the same rollouts; the engine's π_old (sampling log-probs + one prefill of
    the perturbed view) gives the trainer's dependency, TGF mask and loss to float tolerance (fp32 CPU)."""
    for algo in ("vppo", "dapo"):
        t, e = old_logp_runs["trainer", algo], old_logp_runs["engine", algo]
        for s in (1, 2):
            assert "actor/skipped" not in t[s] and "actor/skipped" not in e[s]
            assert t[s]["reward/mean"] == e[s]["reward/mean"]
            assert t[s]["response/trajectories"] == e[s]["response/trajectories"]
        for k in ("actor/loss", "actor/pg_loss") + (("dependency/mean", "tgf/kept_token_frac") if algo == "vppo" else ()):
            assert e[1][k] == pytest.approx(t[1][k], abs=1e-5, rel=1e-4), (algo, k)
    for source in ("trainer", "engine"):  # DAPO computes no dependency and keeps every token: none logged
        rows = old_logp_runs[source, "dapo"]
        assert not [k for k in rows[1] if k.startswith(("dependency/", "tgf/", "tas/"))], sorted(rows[1])
    chk = old_logp_runs["engine", "vppo"]
    for s in (1, 2):
        assert chk[s]["old_logp_check/dependency_corr"] >= 0.999
        assert chk[s]["old_logp_check/tgf_agreement"] >= 0.99
        assert chk[s]["old_logp_check/logp_abs_diff_max"] <= 1e-4
    assert "rollout_correction/k3_kl" not in chk[1]  # engine mode: π_old is the engine's, nothing to correct


def test_rollout_correction_metrics_through_the_trainer(old_logp_runs):
    rows = old_logp_runs["trainer", "vppo"]
    for s in (1, 2):
        r = rows[s]
        assert 0.0 <= r["rollout_correction/logp_abs_diff_mean"] <= r["rollout_correction/logp_abs_diff_max"] <= 1e-4
        assert r["rollout/logp_abs_diff_max"] == r["rollout_correction/logp_abs_diff_max"]
        assert 0.0 <= r["rollout_correction/k3_kl"] < 1e-8
        assert r["rollout_correction/token_frac_corrected"] == 0.0  # fp32: |Δ| ~1e-6, nowhere near cap 2
        assert r["rollout_correction/weight_mean"] == pytest.approx(1.0, abs=1e-4)
