"""Faults around checkpoints and output directories (issue "Reliability", items 1, 2, 5, 6, 8, 9), each
reproduced with real files, real processes and real signals — nothing here mocks the checkpointer or
the trainer.

* 5, 6 — bytes zeroed inside / a truncated shard of the newest checkpoint of a real 2-rank save: the
  load names the file, `resume=auto` falls back to the newest one that verifies (logging what it
  skipped and why), pruning keeps the last verified one. Oracle: the logits saved with each step.
* 9 — a real full disk (a small tmpfs mounted by the test; skipped when mounting is not permitted):
  the save says "no space left on <dir>" on every rank and removes its partial directory; a resume
  on the still-full disk loads; the trainer resumed after space is freed logs the same step as the run
  that hit the full disk.
* 1, 2, 8 — the trainer CLI as a user runs it (`python -m megatron_vppo.cli train ...`, one process,
  the tiny random Qwen2.5-VL): a fresh run refuses another run's directory or moves it aside; a resume
  with a new optim.lr prints the change and uses it (oracle: AdamW's decoupled decay, w <- w(1 - lr wd),
  is the whole update while every reward is 0, so the step's weight ratio is 1 - lr wd exactly); a
  SIGINT delivered during a real save lets the save finish, then the run exits with 130.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import launch_env
from dist_helpers import run_distributed
from megatron_vppo.config import OptimConfig
from test_optimizer import build_tiny_gpt, init_parallel, make_batch, train_steps

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ helpers


def _logits(model):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    tokens, _ = make_batch(99)
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        return gather_from_tensor_model_parallel_region(model(tokens, pos, None)).detach().clone()


def _fresh(tp: int, seed: int):
    import multiprocessing as mp

    from megatron_vppo.train.optimizer import build_optimizer

    mp.current_process()._config["daemon"] = False  # Megatron's writer forks (see test_dist_checkpoint)
    dims = init_parallel(tp=tp)
    cfg = OptimConfig(lr=3e-3, weight_decay=0.1, use_distributed_optimizer=False)
    return (*build_optimizer([build_tiny_gpt(seed=seed)], cfg, "fp32", total_steps=8), dims)  # dims: from init_distributed


class _Records:
    """Collect this process's checkpoint log lines (warnings included) as text."""

    def __init__(self):
        import logging

        self.lines: list[str] = []
        self.handler = logging.Handler()
        self.handler.emit = lambda rec: self.lines.append(rec.getMessage())
        logging.getLogger("megatron_vppo").addHandler(self.handler)
        logging.getLogger("megatron_vppo").setLevel(logging.INFO)

    def text(self) -> str:
        return "\n".join(self.lines)


def _zero_block(path: Path) -> None:
    """Zero the first 4 KiB block from the middle of a file on that holds a non-zero byte; the size
    stays the same (silent corruption)."""
    data = bytearray(path.read_bytes())
    start = next(i for i in range(len(data) // 2, len(data), 4096) if any(data[i:i + 4096]))
    data[start:start + 4096] = bytes(len(data[start:start + 4096]))
    path.write_bytes(bytes(data))


def _tree_digest(root: Path) -> dict:
    """Every file of a run by content; the directory's lock file (train/output_lock.py: it belongs to the
    directory, not to a run, and every start takes it) is left out."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".run.lock"}


# ------------------------------------------------------------------ 5, 6: checksums, fallback, prune


def _corrupt_and_fall_back(rank, world, ckpt_dir):
    from megatron_vppo.checkpoint import dist_checkpoint as dc

    rec = _Records()
    root = Path(ckpt_dir)
    ddp, opt, sched, dims = _fresh(2, seed=0)
    saved = {}
    for step in (1, 2, 3):
        train_steps(ddp, opt, sched, 1, first_step=step - 1)
        dc.save_checkpoint(root, step, ddp, opt, sched, keep_last=0, dims=dims)
        saved[step] = _logits(ddp[0])
    out = {"saved": saved, "meta": dc.read_meta(root / "step_0000003")}

    # 5: zero a block inside step 3's largest tensor file (its size stays the same).
    if rank == 0:
        victim = max((root / "step_0000003" / "dist").glob("*.distcp"), key=lambda p: p.stat().st_size)
        _zero_block(victim)
        out["zeroed"] = victim.name
    torch.distributed.barrier()
    ddp2, opt2, sched2, dims = _fresh(2, seed=7)
    try:
        dc.load_checkpoint(root / "step_0000003", ddp2, opt2, sched2, dims=dims)
        out["load_err"] = None
    except dc.CheckpointError as e:
        out["load_err"] = str(e)

    # 6: resume=auto walks back to the newest checkpoint that verifies.
    picked = dc.select_resume("auto", root)
    dc.load_checkpoint(picked, ddp2, opt2, sched2, verify=False, dims=dims)
    out["picked_after_zero"] = picked.name
    out["logits_after_zero"] = _logits(ddp2[0])

    # 6: a truncated shard in step 2 as well: back to step 1.
    if rank == 0:
        shard = max((root / "step_0000002" / "dist").glob("*.distcp"), key=lambda p: p.stat().st_size)
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    torch.distributed.barrier()
    picked = dc.select_resume("auto", root)
    loaded = dc.load_checkpoint(picked, ddp2, opt2, sched2, verify=False, dims=dims)
    out["picked_after_truncate"] = picked.name
    out["logits_after_truncate"] = _logits(ddp2[0])

    # The run goes on from step 1 and saves step 2 again with keep_last=2: the checkpoints up to it
    # are [1, 2]; the corrupt step 3 must not count as one of the two kept (it would prune step 1).
    train_steps(ddp2, opt2, sched2, 1, first_step=loaded.step)
    dc.save_checkpoint(root, 2, ddp2, opt2, sched2, keep_last=2, dims=dims)
    out["after_prune"] = sorted(p.name for p in root.iterdir())
    out["verifies"] = {}
    for name in out["after_prune"]:
        try:
            dc.verify_checkpoint(root / name)
            out["verifies"][name] = True
        except dc.CheckpointError:
            out["verifies"][name] = False
    try:
        dc.select_resume(str(root / "step_0000003"), root)
        out["explicit_err"] = None
    except dc.CheckpointError as e:
        out["explicit_err"] = str(e)
    out["log"] = rec.text()
    return out


def test_checksums_fallback_and_prune(tmp_path):
    root = tmp_path / "ck"
    res = run_distributed(_corrupt_and_fall_back, 2, str(root), timeout=300)
    r0 = res[0]
    meta = r0["meta"]
    # Every file of the checkpoint but meta.json / COMPLETE has its size and sha256 recorded.
    on_disk = sorted(p.relative_to(root / "step_0000003").as_posix()
                     for p in (root / "step_0000003").rglob("*") if p.is_file())
    assert sorted(meta["files"]) == [f for f in on_disk if f not in ("meta.json", "COMPLETE")]
    assert any(f.startswith("rng/rank_00001") for f in meta["files"]) and meta["version"] == 2
    for r in res:
        # 5: the zeroed file is named on every rank (each hashed a share of the files).
        assert r["load_err"] is not None and "does not verify" in r["load_err"]
        assert f"dist/{r0['zeroed']}: sha256 differs" in r["load_err"] and "step_0000003" in r["load_err"]
        # 6: fallback to step 2, then (truncated shard) to step 1; weights are the saved ones.
        assert r["picked_after_zero"] == "step_0000002" and r["picked_after_truncate"] == "step_0000001"
        assert torch.equal(r["logits_after_zero"], r0["saved"][2])
        assert torch.equal(r["logits_after_truncate"], r0["saved"][1])
        assert r["explicit_err"] is not None and "train.resume=" in r["explicit_err"]
    log = r0["log"]
    assert "resume=auto: skipping step_0000003" in log and "sha256 differs" in log
    assert "resume=auto: skipping step_0000002" in log and "truncated or overwritten" in log
    assert "resuming from" in log and "step_0000001, the newest checkpoint that verifies" in log
    # Pruning after the re-save of step 2 kept step 1 (the corrupt step 3 did not count).
    assert r0["after_prune"] == ["step_0000001", "step_0000002", "step_0000003"]
    assert r0["verifies"] == {"step_0000001": True, "step_0000002": True, "step_0000003": False}


def test_format_v1_checkpoint_without_digests_is_checked_for_truncation(tmp_path):
    """Checkpoints written before digests existed: a truncated shard is still caught (DCP's index)."""
    from megatron_vppo.checkpoint import dist_checkpoint as dc

    root = tmp_path / "ck"
    run_distributed(_save_two, 1, str(root))
    for step in (1, 2):  # strip the digests: what format version 1 wrote
        mp = root / f"step_{step:07d}" / "meta.json"
        meta = json.loads(mp.read_text())
        meta.pop("files")
        meta["version"] = 1
        mp.write_text(json.dumps(meta))
    assert dc.select_resume("auto", root).name == "step_0000002"
    shard = max((root / "step_0000002" / "dist").glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(dc.CheckpointError, match=r"step_0000002 does not verify: dist/.*is truncated"):
        dc.verify_checkpoint(root / "step_0000002")
    assert dc.select_resume("auto", root).name == "step_0000001"
    shard = max((root / "step_0000001" / "dist").glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(b"")
    with pytest.raises(dc.CheckpointError) as err:  # none verifies: say so, never start fresh over them
        dc.select_resume("auto", root)
    msg = str(err.value)
    assert msg.startswith(f"resume=auto: no checkpoint under {root} verifies: step_0000002 (")
    assert "step_0000001 (" in msg and "train.resume" in msg and "train.existing_output=move_aside" in msg


def _save_two(rank, world, ckpt_dir):
    from megatron_vppo.checkpoint import dist_checkpoint as dc

    ddp, opt, sched, dims = _fresh(1, seed=0)
    for step in (1, 2):
        train_steps(ddp, opt, sched, 1, first_step=step - 1)
        dc.save_checkpoint(ckpt_dir, step, ddp, opt, sched, dims=dims)


# ------------------------------------------------------------------------ 8: a signal to one rank


def _sigterm_rank0_during_save(rank, world, ckpt_dir):
    """Rank 0 gets a real SIGTERM while the save is in progress (tensor files written); rank 1 gets
    none. Both must finish the save and then stop together."""
    import threading

    from megatron_vppo.checkpoint import dist_checkpoint as dc

    os.environ["MEGATRON_VPPO_TEST_SAVE_DELAY_S"] = "3"
    root = Path(ckpt_dir)
    ddp, opt, sched, dims = _fresh(2, seed=0)
    train_steps(ddp, opt, sched, 1)

    def send_when_writing():
        deadline = time.monotonic() + 120
        while not list(root.glob("step_0000001.tmp-*/rng/rank_00001.pt")) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    if rank == 0:
        threading.Thread(target=send_when_writing, daemon=True).start()
    try:
        dc.save_checkpoint(root, 1, ddp, opt, sched, dims=dims)
        return {"interrupted": None}
    except dc.SaveInterrupted as e:
        return {"interrupted": str(e), "signum": e.signum, "handler_restored":
                signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None)}


def test_signal_to_one_rank_during_a_save_stops_every_rank_after_it(tmp_path):
    root = tmp_path / "ck"
    res = run_distributed(_sigterm_rank0_during_save, 2, str(root), timeout=180)
    for r in res:
        assert r["interrupted"] is not None and r["interrupted"].startswith("SIGTERM during the checkpoint save")
        assert r["signum"] == signal.SIGTERM and r["handler_restored"]
    from megatron_vppo.checkpoint.dist_checkpoint import verify_checkpoint

    assert sorted(p.name for p in root.iterdir()) == ["step_0000001"]
    verify_checkpoint(root / "step_0000001")


# ------------------------------------------------------------------------------ 9: a full disk


def _fill(disk: Path) -> Path:
    """Write zeros until the filesystem refuses (ENOSPC)."""
    filler = disk / "filler.bin"
    with open(filler, "wb", buffering=0) as f:  # unbuffered: nothing left to flush (and fail) on close
        try:
            while True:
                f.write(bytes(64 * 1024))
        except OSError:
            pass
    return filler


def _save_on_full_disk(rank, world, ckpt_dir):
    from megatron_vppo.checkpoint import dist_checkpoint as dc

    root = Path(ckpt_dir)
    ddp, opt, sched, dims = _fresh(2, seed=0)
    train_steps(ddp, opt, sched, 1)
    dc.save_checkpoint(root, 1, ddp, opt, sched, dims=dims)
    saved = _logits(ddp[0])
    if rank == 0:
        _fill(root.parent)
    torch.distributed.barrier()
    train_steps(ddp, opt, sched, 1, first_step=1)
    try:
        dc.save_checkpoint(root, 2, ddp, opt, sched, dims=dims)
        err = None
    except dc.CheckpointError as e:
        err = str(e)
    left = sorted(p.name for p in root.iterdir())
    if rank == 0:  # removing the partial save freed space: fill it again
        _fill(root.parent)
    torch.distributed.barrier()
    # Resume on the full disk: selecting, verifying and loading need no space.
    ddp2, opt2, sched2, dims = _fresh(2, seed=9)
    picked = dc.select_resume("auto", root)
    dc.load_checkpoint(picked, ddp2, opt2, sched2, verify=False, dims=dims)
    return dict(err=err, left=left, picked=picked.name, same=torch.equal(_logits(ddp2[0]), saved),
                free=dc.free_bytes(root))


def test_full_disk_save_says_so_removes_partial_and_resume_needs_no_space(tmpfs):
    disk = tmpfs("disk", "size=4096k")
    res = run_distributed(_save_on_full_disk, 2, str(disk / "ck"), timeout=180)
    for r in res:
        assert r["err"] is not None and r["err"].startswith(f"no space left on {disk / 'ck'}"), r["err"]
        assert "the partial save was removed" in r["err"] and "train.resume=auto" in r["err"]
        assert "step_0000001" in r["err"]  # the newest complete checkpoint, named
        assert r["left"] == ["step_0000001"]  # no .tmp-* directory left behind
        assert r["picked"] == "step_0000001" and r["same"]


def test_metrics_truncate_in_place_on_a_full_disk(tmpfs):
    """A resumed run drops the metrics lines after its checkpoint without needing any free space."""
    from megatron_vppo.train.metrics_log import MetricsLogger, read_metrics

    disk = tmpfs("disk", "size=512k")
    with MetricsLogger(disk, rank=0, tensorboard=False) as log:
        for s in range(1, 5):
            log.log(s, {"reward/mean": 0.1 * s, "pad": "x" * 3000})
    filler = _fill(disk)
    with pytest.raises(OSError) as full:  # the disk really is full ...
        with open(filler, "ab") as f:
            f.write(bytes(4096))
            f.flush()
    assert full.value.errno == errno.ENOSPC
    with MetricsLogger(disk, rank=0, resume_step=2, tensorboard=False) as log:  # ... and the resume works
        assert [r["step"] for r in read_metrics(disk / "metrics.jsonl")] == [1, 2]
        _fill(disk)
        with pytest.raises(OSError, match=f"no space left on {disk}: writing metrics.jsonl"):
            log.log(3, {"pad": "x" * 8000})  # a write that needs space says so, naming the place


# ------------------------------------------------------------------------ the trainer, as a user runs it

CONFIG = """\
parallel: {{tp: 1, pp: 1}}
model: {{path: {model}, dtype: fp32, transformer_impl: local}}
algo: {{name: grpo}}
rollout: {{engine: hf, group_size: 2, top_p: 1.0, max_prompt_length: 512, max_response_length: 4}}
data: {{train: {train}, min_pixels: 3136, max_pixels: 12544, shuffle: false}}
optim: {{lr: 1.0e-3, weight_decay: 0.1, use_distributed_optimizer: false}}
train: {{seed: 1, prompts_per_step: 2, mini_batch_prompts: 2, micro_batch_size: 4, total_steps: 1,
        val_every: 0, save_every: 1, keep_last: 1, resume: auto}}
"""


def _train_cmd(config: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "megatron_vppo.cli", "train", str(config), *overrides]


def _run(cmd, log: Path, expect_rc: int, timeout: float = 300, **env) -> str:
    with open(log, "w") as f:
        p = subprocess.run(cmd, cwd=REPO, env=launch_env(**env), stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    text = log.read_text()
    assert p.returncode == expect_rc, f"exit code {p.returncode} != {expect_rc}\n{text[-5000:]}"
    return text


def _metrics(out: Path) -> dict:
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def _weights(step_dir: Path) -> dict:
    """The model tensors of a trainer checkpoint, read with torch's own DCP reader (no Megatron)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = step_dir.parent / f"{step_dir.name}.pt"
    dcp_to_torch_save(str(step_dir / "dist"), str(out))
    sd = torch.load(out, weights_only=False)
    out.unlink()
    return {k: v for k, v in sd.items() if torch.is_tensor(v) and v.is_floating_point() and "optimizer" not in k}


@pytest.fixture(scope="module")
def base_run(tiny_model_dir, tmp_path_factory):
    """One finished 1-step run (checkpoint step 1) that the tests below copy."""
    from megatron_vppo.data.synthetic_task import write_synthetic_dataset

    root = tmp_path_factory.mktemp("faults_ckpt")
    train, _ = write_synthetic_dataset(root / "data", 16, 2, seed=0, tasks=("count",))
    config = root / "run.yaml"
    config.write_text(CONFIG.format(model=tiny_model_dir, train=train))
    out = root / "base"
    _run(_train_cmd(config, f"train.output_dir={out}"), root / "base.log", 0)
    return {"root": root, "config": config, "out": out}


def _copy_run(base_run, name: str) -> Path:
    dst = base_run["root"] / name
    shutil.copytree(base_run["out"], dst)
    return dst


def test_fresh_run_refuses_another_runs_dir_or_moves_it_aside(base_run):
    out = _copy_run(base_run, "item1")
    before = _tree_digest(out)
    text = _run(_train_cmd(base_run["config"], f"train.output_dir={out}", "train.resume=never"),
                base_run["root"] / "item1_refused.log", 2)
    err = [ln for ln in text.splitlines() if ln.startswith("megatron-vppo train:")]
    assert len(err) == 1 and f"train.output_dir={out} holds another run" in err[0]
    for option in ("train.resume=auto", "a new train.output_dir", "train.existing_output=move_aside"):
        assert option in err[0], option
    assert _tree_digest(out) == before  # nothing of the old run was touched

    _run(_train_cmd(base_run["config"], f"train.output_dir={out}", "train.resume=never",
                    "train.existing_output=move_aside"), base_run["root"] / "item1_moved.log", 0)
    (moved,) = (out / "previous_runs").iterdir()
    assert _tree_digest(moved) == before  # the old run, byte for byte, under previous_runs/<time>/
    assert sorted(_metrics(out)) == [1] and (out / "checkpoints" / "step_0000001" / "COMPLETE").is_file()


def test_resume_prints_config_changes_and_a_new_lr_takes_effect(base_run):
    from megatron_vppo.checkpoint.dist_checkpoint import verify_checkpoint

    out = _copy_run(base_run, "item2")
    new_lr, wd = 1.0e-2, 0.1
    text = _run(_train_cmd(base_run["config"], f"train.output_dir={out}", "train.total_steps=2",
                           f"optim.lr={new_lr}"), base_run["root"] / "item2.log", 0)
    assert "setting(s) differ from the checkpoint's config" in text
    assert "optim.lr: 0.001 -> 0.01 (takes effect" in text and "train.total_steps: 1 -> 2 (takes effect" in text
    rows = _metrics(out)
    assert rows[2]["actor/lr"] == pytest.approx(new_lr, rel=1e-12) and "lr 0.01" in text  # metrics, step line
    assert rows[1]["actor/lr"] == pytest.approx(1e-3, rel=1e-12)
    # Every reward is 0 (random tiny model): zero advantages, zero gradients, so AdamW's decoupled
    # decay is the whole update: decayed tensors scale by exactly 1 - lr*wd, the others stay.
    assert rows[2]["reward/mean"] == 0.0 and rows[2]["actor/grad_norm"] == 0.0
    verify_checkpoint(out / "checkpoints" / "step_0000002")
    w1 = _weights(base_run["out"] / "checkpoints" / "step_0000001")
    w2 = _weights(out / "checkpoints" / "step_0000002")
    decayed = 0
    for name, a in w1.items():
        b = w2[name]
        if torch.equal(a, b):
            continue
        decayed += 1
        torch.testing.assert_close(b, a * (1 - new_lr * wd), rtol=2e-7, atol=1e-12, msg=name)
    assert decayed >= 4  # embedding, projections, MLPs: the new lr did the decaying


def test_resume_refuses_a_change_that_cannot_take_effect(base_run):
    """model.dtype: the saved optimizer state belongs to the old dtype — refused with reason and fix."""
    from megatron_vppo.checkpoint.dist_checkpoint import read_meta
    from megatron_vppo.config import ConfigError
    from megatron_vppo.run_config import load_config
    from megatron_vppo.train.resume import check_resume_config

    ck = base_run["out"] / "checkpoints" / "step_0000001"
    saved = read_meta(ck)["config"]
    same = load_config(base_run["config"], [f"train.output_dir={base_run['out']}"])
    assert check_resume_config(saved, same, ck, rank=0) == []
    changed = load_config(base_run["config"], [f"train.output_dir={base_run['out']}", "model.dtype=bf16",
                                               "rollout.group_size=4"])
    with pytest.raises(ConfigError) as err:
        check_resume_config(saved, changed, ck, rank=0)
    msg = str(err.value)
    assert "model.dtype changed 'fp32' -> 'bf16' but the optimizer state" in msg
    assert "resume with model.dtype=fp32" in msg and "tools/convert_checkpoint.py mcore-to-hf" in msg
    assert "group_size" not in msg  # that one takes effect


def test_sigint_during_a_save_finishes_it_then_exits_nonzero(base_run):
    """A real SIGINT while the step-1 save is in progress (its tensor files written, not yet
    published): the save completes and verifies, the run stops there (no step 2) with exit code 130."""
    from megatron_vppo.checkpoint.dist_checkpoint import verify_checkpoint

    out = base_run["root"] / "item8"
    ck = out / "checkpoints"
    log = base_run["root"] / "item8.log"
    with open(log, "w") as f:
        p = subprocess.Popen(_train_cmd(base_run["config"], f"train.output_dir={out}", "train.total_steps=2"),
                             cwd=REPO, env=launch_env(MEGATRON_VPPO_TEST_SAVE_DELAY_S="6"), stdout=f,
                             stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not list(ck.glob("step_0000001.tmp-*/rng/rank_00000.pt")):  # inside the save
            assert p.poll() is None and time.monotonic() < deadline, log.read_text()[-5000:]
            time.sleep(0.02)
        p.send_signal(signal.SIGINT)
        rc = p.wait(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    text = log.read_text()
    assert rc == 130, text[-5000:]
    assert "SIGINT received during a checkpoint save: finishing the save" in text
    assert "interrupted: SIGINT during the checkpoint save of step 1" in text
    assert sorted(p.name for p in ck.iterdir()) == ["step_0000001"]  # complete, nothing partial
    verify_checkpoint(ck / "step_0000001")
    assert sorted(_metrics(out)) == [1]  # the run did not go on to step 2


def test_trainer_on_a_full_disk(base_run, tmpfs):
    """The step-2 save hits a full disk: one line, partial save gone, exit 1. Resuming on the still-full
    disk starts (loads, verifies, cuts metrics.jsonl in place, TensorBoard turns itself off). With space
    freed, the resumed run logs step 2 exactly as the run that hit the full disk did, and saves it."""
    from megatron_vppo.checkpoint.dist_checkpoint import verify_checkpoint

    size = sum(p.stat().st_size for p in (base_run["out"] / "checkpoints" / "step_0000001").rglob("*")
               if p.is_file())
    disk = tmpfs("disk", f"size={int(1.5 * size) // 1024 + 256}k")  # one checkpoint fits, two do not
    out = disk / "run"
    cmd = _train_cmd(base_run["config"], f"train.output_dir={out}", "train.total_steps=2")
    text = _run(cmd, base_run["root"] / "item9_full.log", 1)
    err = [ln for ln in text.splitlines() if ln.startswith("megatron-vppo train:")]
    assert len(err) == 1 and f"no space left on {out / 'checkpoints'}" in err[0], text[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000001"]
    verify_checkpoint(out / "checkpoints" / "step_0000001")
    step2 = _metrics(out)[2]  # logged before the save failed

    filler = _fill(disk)
    text = _run(_train_cmd(base_run["config"], f"train.output_dir={out}", "train.total_steps=1"),
                base_run["root"] / "item9_resume_full.log", 0)
    assert "resumed from" in text and "step_0000001 at step 1" in text
    assert sorted(_metrics(out)) == [1]  # the step-2 line went without needing space

    filler.unlink()  # free space: the filler goes and the disk grows to hold two checkpoints
    subprocess.run(["mount", "-o", f"remount,size={3 * size // 1024 + 256}k", str(disk)], check=True)
    _run(cmd, base_run["root"] / "item9_resumed.log", 0)
    rows = _metrics(out)
    assert sorted(rows) == [1, 2]
    for k, v in step2.items():
        if not k.startswith("time/"):
            assert rows[2][k] == pytest.approx(v, abs=1e-9), k
    verify_checkpoint(out / "checkpoints" / "step_0000002")
