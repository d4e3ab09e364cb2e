"""Distributed checkpoint save / resume (megatron_vppo.checkpoint.dist_checkpoint).

Oracles: the uninterrupted run (resumed steps must give the same losses), the saving layout's own
logits (a checkpoint loaded at another layout must reproduce them), and the saved RNG streams.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dist_helpers import run_distributed
from megatron_vppo.config import OptimConfig
from test_optimizer import GPT, build_tiny_gpt, init_parallel, make_batch, train_steps

OPT = dict(lr=3e-3, lr_schedule="cosine", warmup_steps=1, weight_decay=0.1, grad_clip=1.0)
TOTAL = 8


def _full_logits(model):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    tokens, _ = make_batch(99)
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        logits = model(tokens, pos, None)
    return gather_from_tensor_model_parallel_region(logits).detach().clone()


def _allow_children():
    """Megatron's torch_dist writer starts helper processes; the test helper's ranks are daemonic
    (so they die with pytest), and daemonic processes may not have children. torchrun ranks are not
    daemonic, so only tests need this."""
    import multiprocessing as mp

    mp.current_process()._config["daemon"] = False


def _fresh(tp, dist_opt, seed, dtype="fp32"):
    """A model + optimizer whose weights differ from the checkpoint's (another seed)."""
    from megatron_vppo.train.optimizer import build_optimizer

    _allow_children()
    dims = init_parallel(tp=tp)
    model = build_tiny_gpt(seed=seed, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    cfg = OptimConfig(**OPT, use_distributed_optimizer=dist_opt)
    return (*build_optimizer([model], cfg, dtype, total_steps=TOTAL), dims)  # dims: from init_distributed


def _dp(tp):
    from megatron.core import parallel_state as ps

    return dict(dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size())


def _save_then_resume(rank, world, ckpt_dir, tp, dist_opt, dtype="fp32"):
    """Train 2 steps, save (steps 1 and 2, keep_last=1), train 2 more; then rebuild from another seed,
    resume from the latest checkpoint and train the same 2 steps."""
    from megatron_vppo.checkpoint.dist_checkpoint import (
        find_latest_complete, load_checkpoint, save_checkpoint,
    )
    from megatron_vppo.config import RunConfig

    ddp, opt, sched, dims = _fresh(tp, dist_opt, seed=0, dtype=dtype)
    dp = _dp(tp)
    train_steps(ddp, opt, sched, 1, **dp, first_step=0)
    save_checkpoint(ckpt_dir, 1, ddp, opt, sched, train_state={"data": {"index": 4}}, keep_last=1, dims=dims)
    train_steps(ddp, opt, sched, 1, **dp, first_step=1)
    save_checkpoint(ckpt_dir, 2, ddp, opt, sched, train_state={"data": {"index": 8}},
                    config=RunConfig(), keep_last=1, dims=dims)
    saved_logits = _full_logits(ddp[0])
    rand_after_save = torch.rand(4)
    uninterrupted = train_steps(ddp, opt, sched, 2, **dp, first_step=2)

    ddp2, opt2, sched2, dims = _fresh(tp, dist_opt, seed=123, dtype=dtype)
    torch.manual_seed(777)  # the resumed run must not depend on the RNG it started with
    differs_before = not torch.allclose(_full_logits(ddp2[0]), saved_logits)
    latest = find_latest_complete(ckpt_dir)
    loaded = load_checkpoint(latest, ddp2, opt2, sched2, dims=dims)
    rand_after_load = torch.rand(4)
    sched_steps = sched2.num_steps
    resumed_logits = _full_logits(ddp2[0])
    resumed = train_steps(ddp2, opt2, sched2, 2, **dp, first_step=loaded.step)
    return dict(
        latest=str(latest), step=loaded.step, train_state=loaded.train_state,
        optimizer_loaded=loaded.optimizer_loaded, rng_restored=loaded.rng_restored,
        sched_steps=sched_steps, differs_before=differs_before,
        saved_logits=saved_logits, resumed_logits=resumed_logits,
        rand_after_save=rand_after_save, rand_after_load=rand_after_load,
        uninterrupted=uninterrupted, resumed=resumed,
    )


def _check_resume(res):
    for r in res:
        assert Path(r["latest"]).name == "step_0000002"
        assert r["step"] == 2 and r["train_state"] == {"data": {"index": 8}, "step": 2}
        assert r["optimizer_loaded"] and r["rng_restored"] and r["sched_steps"] == 2
        assert r["differs_before"]
        assert torch.equal(r["resumed_logits"], r["saved_logits"])
        assert torch.equal(r["rand_after_load"], r["rand_after_save"])
        assert r["resumed"] == pytest.approx(r["uninterrupted"], abs=1e-6, rel=0)


def _tp1_load(rank, world, tp2_dir, dp2_dir):
    """One process (TP1 DP1): load the TP2 checkpoint (model + per-parameter optimizer state) and the
    DP2 distributed-optimizer checkpoint (dp_reshardable -> DP1)."""
    from megatron_vppo.checkpoint.dist_checkpoint import find_latest_complete, load_checkpoint

    out = {}
    for name, d, dist_opt in (("tp2", tp2_dir, False), ("dp2", dp2_dir, True)):
        ddp, opt, sched, dims = _fresh(1, dist_opt, seed=5)
        loaded = load_checkpoint(find_latest_complete(d), ddp, opt, sched, dims=dims)
        out[name] = dict(
            logits=_full_logits(ddp[0]),
            losses=train_steps(ddp, opt, sched, 2, first_step=loaded.step),
            optimizer_loaded=loaded.optimizer_loaded,
            rng_restored=loaded.rng_restored,
        )
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Real checkpoints shared by the tests below (2-process runs are the slow part)."""
    base = tmp_path_factory.mktemp("ckpt")
    tp2_dir, dp2_dir = base / "tp2", base / "dp2"
    tp2 = run_distributed(_save_then_resume, 2, str(tp2_dir), 2, False)
    dp2 = run_distributed(_save_then_resume, 2, str(dp2_dir), 1, True)
    return dict(tp2_dir=tp2_dir, dp2_dir=dp2_dir, tp2=tp2, dp2=dp2)


def test_tp2_resume_matches_uninterrupted(runs):
    _check_resume(runs["tp2"])
    # keep_last=1: step 1 was pruned once step 2 was complete.
    assert sorted(p.name for p in runs["tp2_dir"].iterdir()) == ["step_0000002"]
    ck = runs["tp2_dir"] / "step_0000002"
    meta = json.loads((ck / "meta.json").read_text())
    assert meta["complete"] and meta["step"] == 2 and (ck / "COMPLETE").is_file()
    assert meta["layout"]["tp"] == 2 and meta["layout"]["world_size"] == 2
    assert meta["optimizer"] == {"distributed": False, "sharding_type": "per_parameter", "state": "saved"}
    assert meta["config"]["optim"]["lr"] == OptimConfig().lr  # RunConfig snapshot


def test_dp2_distributed_optimizer_resume_matches_uninterrupted(runs):
    _check_resume(runs["dp2"])
    meta = json.loads((runs["dp2_dir"] / "step_0000002" / "meta.json").read_text())
    assert meta["optimizer"] == {"distributed": True, "sharding_type": "dp_reshardable", "state": "saved"}


def test_bf16_dp2_distributed_optimizer_resume(tmp_path):
    """bf16 weights, fp32 main params inside the distributed optimizer: those must come back too."""
    _check_resume(run_distributed(_save_then_resume, 2, str(tmp_path / "bf16"), 1, True, "bf16"))


def test_load_at_other_layout(runs):
    (out,) = run_distributed(_tp1_load, 1, str(runs["tp2_dir"]), str(runs["dp2_dir"]))
    tp2, dp2 = runs["tp2"][0], runs["dp2"][0]
    # Model: TP2 -> TP1 gives the same logits (float32 matmul split differs only in rounding).
    assert torch.allclose(out["tp2"]["logits"], tp2["saved_logits"], atol=1e-5, rtol=0)
    # Per-parameter optimizer state reshards TP2 -> TP1: the next steps follow the TP2 run.
    assert out["tp2"]["optimizer_loaded"] and not out["tp2"]["rng_restored"]
    assert out["tp2"]["losses"] == pytest.approx(tp2["uninterrupted"], abs=1e-5, rel=0)
    # dp_reshardable distributed-optimizer state reshards DP2 -> DP1.
    assert torch.allclose(out["dp2"]["logits"], dp2["saved_logits"], atol=1e-6, rtol=0)
    assert out["dp2"]["optimizer_loaded"]
    assert out["dp2"]["losses"] == pytest.approx(dp2["uninterrupted"], abs=1e-6, rel=0)


def _dist_opt_tp_change(rank, world, dp2_dir):
    """Load the DP2 (TP1) distributed-optimizer checkpoint at TP2: optimizer refused with the fix,
    weights-only load works."""
    from megatron_vppo.checkpoint.dist_checkpoint import (
        CheckpointError, find_latest_complete, load_checkpoint,
    )

    ddp, opt, sched, dims = _fresh(2, True, seed=5)
    path = find_latest_complete(dp2_dir)
    try:
        load_checkpoint(path, ddp, opt, sched, dims=dims)
        err = None
    except CheckpointError as e:
        err = str(e)
    loaded = load_checkpoint(path, ddp, opt, sched, load_optimizer=False, dims=dims)
    return dict(err=err, logits=_full_logits(ddp[0]), optimizer_loaded=loaded.optimizer_loaded,
                losses=train_steps(ddp, opt, sched, 1, first_step=2))


def test_distributed_optimizer_tp_change_is_refused_with_fix(runs):
    res = run_distributed(_dist_opt_tp_change, 2, str(runs["dp2_dir"]))
    err = res[0]["err"]
    assert err is not None and "step_0000002" in err and "train.load_optimizer=false" in err and "tp=1" in err
    assert not res[0]["optimizer_loaded"]
    assert torch.allclose(res[0]["logits"], runs["dp2"][0]["saved_logits"], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- partial / corrupt dirs


def _copy_as(src: Path, dst: Path, step: int) -> Path:
    shutil.copytree(src, dst)
    meta_p = dst / "meta.json"
    meta = json.loads(meta_p.read_text())
    meta["step"] = step
    meta_p.write_text(json.dumps(meta))
    return dst


def test_find_latest_complete_ignores_partial_dirs(runs, tmp_path, caplog):
    from megatron_vppo.checkpoint.dist_checkpoint import find_latest_complete, resolve_resume

    real = runs["tp2_dir"] / "step_0000002"
    root = tmp_path / "ckpts"
    root.mkdir()
    assert find_latest_complete(root) is None and resolve_resume("auto", root) is None
    _copy_as(real, root / "step_0000003", 3)  # the newest good one
    _copy_as(real, root / "step_0000004.tmp-1a2b3c4d", 4)  # crash before rename
    (_copy_as(real, root / "step_0000005", 5) / "COMPLETE").unlink()  # no marker
    (_copy_as(real, root / "step_0000006", 6) / "meta.json").write_text('{"step": 6, "comp')  # torn meta
    _copy_as(real, root / "step_0000007", 8)  # meta disagrees with the name
    with caplog.at_level("INFO"):
        assert find_latest_complete(root) == root / "step_0000003"
    log = caplog.text
    assert "step_0000004.tmp" in log and "COMPLETE" in log and "unreadable" in log and "says step 8" in log
    assert resolve_resume("auto", root) == root / "step_0000003"
    assert resolve_resume("never", root) is None


def test_keep_last_k_prunes_oldest_complete_and_stale_tmp(runs, tmp_path):
    from megatron_vppo.checkpoint.dist_checkpoint import prune_checkpoints

    real = runs["tp2_dir"] / "step_0000002"
    root = tmp_path / "ckpts"
    root.mkdir()
    for s in (1, 2, 3, 4, 5):
        _copy_as(real, root / f"step_{s:07d}", s)
    _copy_as(real, root / "step_0000003.tmp-deadbeef", 3)  # stale leftover of a crashed save
    _copy_as(real, root / "step_0000009.tmp-cafef00d", 9)  # newer than any complete one: kept
    (root / "step_0000002" / "COMPLETE").unlink()  # incomplete: not counted, not deleted
    prune_checkpoints(root, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == [
        "step_0000002", "step_0000004", "step_0000005", "step_0000009.tmp-cafef00d"
    ]


def _load_corrupt(rank, world, paths):
    from megatron_vppo.checkpoint.dist_checkpoint import CheckpointError, load_checkpoint, resolve_resume

    ddp, opt, sched, dims = _fresh(2, False, seed=5)
    errs = []
    for p in paths:
        try:
            load_checkpoint(p, ddp, opt, sched, dims=dims)
            errs.append(None)
        except CheckpointError as e:
            errs.append(str(e))
    try:
        resolve_resume(paths[0], Path(paths[0]).parent)
        errs.append(None)
    except CheckpointError as e:
        errs.append(str(e))
    return errs


def test_corrupt_checkpoint_error_names_dir_and_fix(runs, tmp_path):
    real = runs["tp2_dir"] / "step_0000002"
    bad_meta = _copy_as(real, tmp_path / "a" / "step_0000002", 2)
    (bad_meta / "meta.json").write_text("{not json")
    bad_data = _copy_as(real, tmp_path / "b" / "step_0000002", 2)
    for f in (bad_data / "dist").glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:20])  # truncated tensor files
    errs = run_distributed(_load_corrupt, 2, [str(bad_meta), str(bad_data)])[0]
    assert errs[0] is not None and str(bad_meta) in errs[0] and "meta.json" in errs[0] and "Fix" in errs[0]
    assert errs[1] is not None and str(bad_data) in errs[1] and "Fix" in errs[1]
    assert errs[2] is not None and "train.resume" in errs[2] and "resume=auto" in errs[2]


def _load_one_rank_rng_missing(rank, world, path):
    from megatron_vppo.checkpoint.dist_checkpoint import CheckpointError, load_checkpoint

    ddp, opt, sched, dims = _fresh(2, False, seed=5)
    errs = []
    for verify in (False, True):
        try:
            load_checkpoint(path, ddp, opt, sched, verify=verify, dims=dims)
            errs.append(None)
        except CheckpointError as e:
            errs.append(str(e))
    return errs


def test_rank_local_load_error_fails_every_rank_without_hanging(runs, tmp_path):
    """Only rank 1's RNG file is gone. Unverified: rank 1 names it, rank 0 must raise too instead of
    waiting for rank 1 in the final barrier. Verified (the default): every rank names it up front."""
    ck = _copy_as(runs["tp2_dir"] / "step_0000002", tmp_path / "c" / "step_0000002", 2)
    (ck / "rng" / "rank_00001.pt").unlink()
    errs = run_distributed(_load_one_rank_rng_missing, 2, str(ck), timeout=180)
    assert errs[1][0] is not None and "rank_00001.pt is missing" in errs[1][0] and "Fix" in errs[1][0]
    assert errs[0][0] is not None and "another rank" in errs[0][0] and str(ck) in errs[0][0]
    for r in (0, 1):
        assert "does not verify: rng/rank_00001.pt is missing" in errs[r][1] and str(ck) in errs[r][1]


def _crash_during_save(rank, world, ckpt_dir):
    """Rank 1 fails while writing step 2: every rank gets CheckpointError (no hang), step 1 stays latest."""
    import megatron_vppo.checkpoint.dist_checkpoint as dc

    ddp, opt, sched, dims = _fresh(2, False, seed=0)
    dc.save_checkpoint(ckpt_dir, 1, ddp, opt, sched, dims=dims)
    real_save = torch.save

    def boom(*a, **k):
        raise OSError("disk full (simulated)")

    if rank == 1:
        torch.save = boom
    try:
        dc.save_checkpoint(ckpt_dir, 2, ddp, opt, sched, dims=dims)
        err = None
    except dc.CheckpointError as e:
        err = str(e)
    finally:
        torch.save = real_save
    return dict(err=err, latest=str(dc.find_latest_complete(ckpt_dir)))


def test_crash_during_save_leaves_previous_checkpoint_latest(tmp_path):
    d = tmp_path / "ck"
    res = run_distributed(_crash_during_save, 2, str(d))
    for r in res:
        assert r["err"] is not None and "step_0000002" in r["err"] and "disk full (simulated)" in r["err"]
        assert "no space left" not in r["err"]  # the disk is not full: no such claim
        assert Path(r["latest"]).name == "step_0000001"
    # The failed save removed its partial directory.
    assert sorted(p.name for p in d.iterdir()) == ["step_0000001"]


# --------------------------------------------------------------------------- pipeline layout change


def _pp2_save(rank, world, ckpt_dir):
    """PP2 (one layer per stage): save the model only; return its weights under global layer names."""
    from megatron.core import parallel_state as ps

    from megatron_vppo.checkpoint.dist_checkpoint import save_checkpoint

    _allow_children()
    dims = init_parallel(pp=2)
    model = build_tiny_gpt(seed=3 + rank)
    save_checkpoint(ckpt_dir, 0, [model], dims=dims)
    offset = ps.get_pipeline_model_parallel_rank() * (GPT["num_layers"] // 2)
    out = {}
    for n, p in model.named_parameters():
        if n.startswith("decoder.layers."):
            parts = n.split(".")
            parts[2] = str(int(parts[2]) + offset)
            n = ".".join(parts)
        out[n] = p.detach().clone()
    return out


def _tp1_weights(rank, world, ckpt_dir):
    from megatron_vppo.checkpoint.dist_checkpoint import find_latest_complete, load_checkpoint

    dims = init_parallel()
    model = build_tiny_gpt(seed=11)
    loaded = load_checkpoint(find_latest_complete(ckpt_dir), [model], dims=dims)
    return dict(params={n: p.detach().clone() for n, p in model.named_parameters()},
                rng_restored=loaded.rng_restored)


def test_pp2_checkpoint_loads_at_tp1(tmp_path):
    d = tmp_path / "pp2"
    stages = run_distributed(_pp2_save, 2, str(d))
    saved = {**stages[0], **stages[1]}
    (res,) = run_distributed(_tp1_weights, 1, str(d))
    assert set(res["params"]) == set(saved)
    for n, p in res["params"].items():
        assert torch.equal(p, saved[n]), n
    assert not res["rng_restored"]


# --------------------------------------------------------------------------- optimizer never stepped


def _save_unstepped_then_train(rank, world, ckpt_dir, dist_opt):
    """DP2 optimizer saved before its first step (all groups so far filtered out by dynamic sampling),
    then two training steps."""
    from megatron_vppo.checkpoint.dist_checkpoint import save_checkpoint

    model, opt, sched, dims = _fresh(1, dist_opt, seed=5)
    save_checkpoint(ckpt_dir, 0, model, opt, sched, dims=dims)
    return train_steps(model, opt, sched, 2, **_dp(1))


def _resume_unstepped_then_train(rank, world, ckpt_dir, dist_opt):
    from megatron_vppo.checkpoint.dist_checkpoint import find_latest_complete, load_checkpoint

    model, opt, sched, dims = _fresh(1, dist_opt, seed=77)
    loaded = load_checkpoint(find_latest_complete(ckpt_dir), model, opt, sched, dims=dims)
    return loaded.optimizer_loaded, train_steps(model, opt, sched, 2, **_dp(1))


@pytest.mark.parametrize("dist_opt", [True, False], ids=["distributed", "per_parameter"])
def test_unstepped_optimizer_saves_and_resumes(tmp_path, dist_opt):
    d = str(tmp_path / "ck")
    straight = run_distributed(_save_unstepped_then_train, 2, d, dist_opt)
    resumed = run_distributed(_resume_unstepped_then_train, 2, d, dist_opt)
    assert resumed[0][0]
    assert straight[0] == pytest.approx(resumed[0][1], abs=1e-6)


# --------------------------------------------------------------------------- a module with bad sharding


def _save_bad_sharding(rank, world, ckpt_dir):
    """A module whose sharded_state_dict forgets its TP group: every TP rank claims the main replica of
    the same replicated tensor. Every rank must raise (Megatron alone checks on rank 0 and hangs the rest)."""
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.utils import sharded_state_dict_default

    from megatron_vppo.checkpoint.dist_checkpoint import CheckpointError, save_checkpoint

    _allow_children()
    dims = init_parallel(tp=2)
    gpt = build_tiny_gpt(seed=1)

    class Bad(MegatronModule):
        def __init__(self):
            super().__init__(config=gpt.config)
            self.proj = torch.nn.Linear(4, 4)

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            return sharded_state_dict_default(self.proj, f"{prefix}proj.", sharded_offsets, metadata)

    try:
        save_checkpoint(ckpt_dir, 1, [Bad()], dims=dims)
    except CheckpointError as e:
        return str(e)
    return None


def test_bad_sharding_fails_every_rank_without_hanging(tmp_path):
    errors = run_distributed(_save_bad_sharding, 2, str(tmp_path / "ck"), timeout=120)
    assert all(e is not None and "main replica" in e and "tp_group" in e for e in errors), errors


# --------------------------------------------------------------------------- re-saving a step


def _resave_with_failing_rename(rank, world, ckpt_dir):
    """Save step 1, then save step 1 again with the final rename failing: the first save must still
    be there under its own name (not hidden under a .tmp name the next prune deletes)."""
    import os

    import megatron_vppo.checkpoint.dist_checkpoint as dc

    ddp, opt, sched, dims = _fresh(1, False, seed=0)
    first = dc.save_checkpoint(ckpt_dir, 1, ddp, opt, sched, dims=dims)
    marker = (first / "COMPLETE").read_text()
    real_rename = os.rename

    def rename(src, dst):
        if ".tmp-" in Path(src).name and ".tmp-replaced-" not in Path(src).name:
            raise OSError("rename failed (simulated)")
        return real_rename(src, dst)

    os.rename = rename
    try:
        dc.save_checkpoint(ckpt_dir, 1, ddp, opt, sched, dims=dims)
        err = None
    except dc.CheckpointError as e:
        err = str(e)
    finally:
        os.rename = real_rename
    latest = dc.find_latest_complete(ckpt_dir)
    return dict(err=err, latest=str(latest), marker_kept=latest is not None
                and (latest / "COMPLETE").read_text() == marker)


def test_failed_resave_keeps_the_previous_checkpoint(tmp_path):
    d = tmp_path / "ck"
    (res,) = run_distributed(_resave_with_failing_rename, 1, str(d), timeout=180)
    assert res["err"] is not None and "rename failed" in res["err"]
    assert Path(res["latest"]).name == "step_0000001" and res["marker_kept"]
