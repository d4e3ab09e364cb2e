"""How a run starts in its output directory, so that two runs never mix and no setting is silently
ignored:

* a run that starts from step 0 refuses an output directory holding another run's checkpoints or
  metrics (or, with `train.existing_output=move_aside`, moves them to `previous_runs/<time>/` first);
* a resumed run prints every setting that differs from its checkpoint's config snapshot; each either
  takes effect (the LR schedule and the optimizer's hyperparameters are this config's — the
  checkpoint supplies only state and step counts —, everything else is read from the config as the
  run goes) or is refused with the reason.

The checkpoint itself is chosen and verified by `checkpoint.dist_checkpoint.select_resume`.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_vppo.config import CONFIG_FILE, ConfigError, RunConfig, flatten_dotted, to_dict

log = logging.getLogger("megatron_vppo.train")

PREVIOUS_RUNS = "previous_runs"
RUN_FILES = ("checkpoints", "metrics.jsonl", "metrics.png", "tensorboard", CONFIG_FILE)  # what a run writes


def checkpoint_dir(cfg: RunConfig) -> Path:
    return Path(cfg.train.output_dir) / "checkpoints"


# ------------------------------------------------------------------------------ the output directory


def metrics_steps(path: Path) -> list[int]:
    """The steps of metrics.jsonl's readable lines (a torn or foreign line is skipped)."""
    steps = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return steps
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            steps.append(row["step"])
    return steps


def failed_start_files(out: Path) -> list[Path]:
    """What a run that never completed a step left in `out` (metrics of step 0 only, a plot, TensorBoard
    events; no checkpoint): not another run, so a retry may remove it. Empty when `out` holds a run that
    did complete a step (or nothing)."""
    ck = out / "checkpoints"
    if ck.is_dir() and any(p.name.startswith("step_") for p in ck.iterdir()):
        return []
    metrics = out / "metrics.jsonl"
    if metrics.is_file() and any(s >= 1 for s in metrics_steps(metrics)):
        return []
    return [out / name for name in RUN_FILES if name != "checkpoints" and (out / name).exists()]


def previous_run_files(out: Path) -> list[str]:
    """What in `out` an earlier run left: checkpoint directories (complete or not), metrics lines. The
    leftovers of a run that never completed a step (`failed_start_files`) do not count."""
    if failed_start_files(out):
        return []
    found = []
    ck = out / "checkpoints"
    if ck.is_dir():
        steps = sorted(p.name for p in ck.iterdir() if p.name.startswith("step_"))
        if steps:
            found.append(f"{len(steps)} checkpoint dir(s) in {ck}, newest {steps[-1]}")
    metrics = out / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append(f"{metrics} ({metrics.stat().st_size} bytes)")
    return found


@dataclass
class OutputPlan:
    """What rank 0 does to the output directory before the run starts (decided alike on every rank)."""
    move_aside: bool = False  # train.existing_output=move_aside: move another run to previous_runs/
    clear_failed_start: list[Path] = field(default_factory=list)  # leftovers of a run that never stepped
    branch_from: Path | None = None  # train.resume=<own checkpoint> with newer ones after it: a branch
    branch_newer: list[Path] = field(default_factory=list)  # the old line's newer checkpoints, moved aside


def _newer_checkpoints(ck: Path, step: int) -> list[Path]:
    """Every step_* entry (complete, partial or .tmp) of `ck` whose step is above `step`."""
    out = []
    for p in sorted(ck.iterdir()) if ck.is_dir() else []:
        m = re.match(r"^step_(\d+)", p.name)
        if m and int(m.group(1)) > step:
            out.append(p)
    return out


def check_output_dir(cfg: RunConfig) -> OutputPlan:
    """Read-only, on every rank, before any process group: refuse (ConfigError) a run that would start
    from step 0 — or resume another directory's checkpoint — in an output directory holding another
    run; otherwise say what rank 0 does first (`apply_output_plan`): move that run aside
    (`train.existing_output=move_aside`), clear a failed start's leftovers, or move aside the newer
    checkpoints of the line a branch (`train.resume=<an older checkpoint of this directory>`) leaves."""
    from megatron_vppo.checkpoint.dist_checkpoint import list_complete

    out = Path(cfg.train.output_dir)
    resume = cfg.train.resume
    ck = checkpoint_dir(cfg)
    plan = OutputPlan(clear_failed_start=failed_start_files(out))
    if resume == "auto" and list_complete(ck):
        return plan  # continues this directory's run (select_resume verifies the checkpoint)
    if resume not in ("auto", "never", "") and Path(resume).absolute().parent == ck.absolute():
        m = re.match(r"^step_(\d+)$", Path(resume).name)
        newer = _newer_checkpoints(ck, int(m.group(1))) if m else []
        if newer:
            plan.branch_from, plan.branch_newer = Path(resume), newer
        return plan  # an explicit checkpoint of this directory's own run
    found = previous_run_files(out)
    if not found:
        return plan
    if cfg.train.existing_output == "move_aside":
        plan.move_aside = True
        return plan
    if resume in ("never", ""):
        why, fixes = "train.resume=never starts a fresh run", "continue that run with train.resume=auto, "
    elif resume == "auto":
        why, fixes = "it has no complete checkpoint to continue, so this run would start fresh", ""
    else:
        why, fixes = f"train.resume={resume} is a checkpoint of another directory", ""
    raise ConfigError(
        f"train.output_dir={out} holds another run ({'; '.join(found)}) and {why}, which would overwrite "
        f"it. Fix: {fixes}choose a new train.output_dir, or set train.existing_output=move_aside to move "
        f"that run to {out / PREVIOUS_RUNS}/<time>/ first"
    )


def _previous_runs_dir(out: Path) -> Path:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dest = out / PREVIOUS_RUNS / stamp
    n = 1
    while dest.exists():
        n += 1
        dest = out / PREVIOUS_RUNS / f"{stamp}-{n}"
    dest.mkdir(parents=True)
    return dest


def move_previous_run(out: Path) -> Path:
    """Move an earlier run's files (RUN_FILES) to `out/previous_runs/<UTC time>/` — renames on the same
    filesystem, so it needs no free space. Returns the new directory."""
    dest = _previous_runs_dir(out)
    for name in RUN_FILES:
        if (out / name).exists():
            os.rename(out / name, dest / name)
    log.warning("train.existing_output=move_aside: moved the previous run in %s to %s", out, dest)
    return dest


def move_branch_aside(out: Path, branch_from: Path, newer: list[Path]) -> Path:
    """A branch from an older checkpoint: move the old line's newer checkpoints to
    `out/previous_runs/<UTC time>/checkpoints/` (with a copy of its metrics.jsonl), so that
    `train.resume=auto` afterwards follows the new line. Returns the new directory."""
    dest = _previous_runs_dir(out)
    (dest / "checkpoints").mkdir()
    for p in newer:
        os.rename(p, dest / "checkpoints" / p.name)
    if (out / "metrics.jsonl").is_file():
        shutil.copy2(out / "metrics.jsonl", dest / "metrics.jsonl")
    log.warning("branching from %s: moved the old line's %d newer checkpoint(s) (%s) to %s; "
                "train.resume=auto now follows the new line", branch_from.name, len(newer),
                ", ".join(p.name for p in newer), dest / "checkpoints")
    return dest


def apply_output_plan(out: Path, plan: OutputPlan) -> None:
    """Global rank 0, before the rendezvous the other ranks wait in: carry out `check_output_dir`'s plan."""
    if plan.clear_failed_start:
        for p in plan.clear_failed_start:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        log.info("train.output_dir=%s: removed the leftovers of a run that never completed a step (%s)", out,
                 ", ".join(p.name for p in plan.clear_failed_start))
    if plan.move_aside:
        move_previous_run(out)
    if plan.branch_newer:
        move_branch_aside(out, plan.branch_from, plan.branch_newer)


# ------------------------------------------------------------------------------ config changes on resume

NOT_COMPARED = {"train.resume", "train.existing_output"}

# Settings whose value is baked into the saved state: changing them on resume cannot take effect.
REFUSED = {
    "model.arch": "the saved weights are the checkpoint's model's parameters",
    "model.dtype": "the optimizer state (fp32 main params, Adam moments) was saved for the checkpoint's dtype",
    "model.vocab_pad_multiple": "the saved embedding and output layer are padded to the old multiple",
    "optim.use_distributed_optimizer": "the optimizer state's format (distributed or per-parameter) is "
                                       "fixed when it is saved",
    "train.seed": "the saved data position is an offset into the order the old seed shuffled",
    "data.shuffle": "the saved data position is an offset into the old data order",
}
SCHEDULE_KEYS = {"optim.lr", "optim.lr_schedule", "optim.warmup_steps", "optim.weight_decay",
                 "train.total_steps", "train.prompts_per_step", "train.mini_batch_prompts", "train.ppo_epochs"}
NOTES = {
    "optim.adam_beta1": "the optimizer keeps this config's hyperparameters, the checkpoint's state",
    "optim.adam_beta2": "the optimizer keeps this config's hyperparameters, the checkpoint's state",
    "model.path": "tokenizer, processor and architecture come from the new path, the weights from the checkpoint",
    "data.train": "the new file is read from the saved data position (its row count must match)",
}


@dataclass
class ConfigChange:
    key: str
    old: Any
    new: Any
    refused: str | None  # the reason it cannot take effect, or None
    note: str  # how it takes effect

    def line(self) -> str:
        how = f"REFUSED: {self.refused}" if self.refused else f"takes effect: {self.note}"
        return f"{self.key}: {self.old!r} -> {self.new!r} ({how})"


def _unread_algo_keys(cfg: RunConfig) -> set[str]:
    """`algo.*` keys the chosen algorithm does not read (its registry entry declares the ones it does):
    a change there takes no effect, so it is not reported as one."""
    from megatron_vppo.algo.registry import ALGORITHMS

    algo = ALGORITHMS.get(cfg.algo.name)
    if algo is None:
        return set()
    return {f"algo.{k}" for k in flatten_dotted(to_dict(cfg.algo)) if k != "name" and k.split(".")[0] not in algo.reads}


def config_changes(saved: dict | None, cfg: RunConfig) -> list[ConfigChange]:
    """Settings that differ between a checkpoint's config snapshot and this run's config (keys that
    only one side knows — another version's snapshot — are not compared)."""
    if not isinstance(saved, dict):
        return []
    old, new = flatten_dotted(saved), flatten_dotted(to_dict(cfg))
    changes = []
    ignored = _unread_algo_keys(cfg)
    for key in sorted(set(old) & set(new) - NOT_COMPARED - ignored):
        a, b = old[key], new[key]
        if a == b or (isinstance(a, list) and tuple(a) == b):
            continue
        if key in SCHEDULE_KEYS:
            note = "the LR schedule is rebuilt from the new values at the saved optimizer step"
        elif key.startswith("parallel."):
            note = "the weights reshard to the new layout"
        else:
            note = NOTES.get(key, "read from the config as the run goes")
        changes.append(ConfigChange(key, a, b, REFUSED.get(key), note))
    return changes


def check_resume_config(saved: dict | None, cfg: RunConfig, ckpt: Path, rank: int) -> list[ConfigChange]:
    """Print what differs from the checkpoint's config (rank 0); ConfigError when a change cannot take
    effect, naming the key, the reason and the fix."""
    changes = config_changes(saved, cfg)
    if changes and rank == 0:
        log.warning("resume from %s: %d setting(s) differ from the checkpoint's config:\n  %s", ckpt,
                    len(changes), "\n  ".join(c.line() for c in changes))
    refused = [c for c in changes if c.refused]
    if refused:
        keep = " ".join(f"{c.key}={c.old}" for c in refused)
        raise ConfigError(
            f"resume from {ckpt}: " + "; ".join(f"{c.key} changed {c.old!r} -> {c.new!r} but {c.refused}"
                                                for c in refused)
            + f". Fix: resume with {keep}, or start a new run from this checkpoint's weights: "
              f"tools/convert_checkpoint.py mcore-to-hf --ckpt {ckpt} --out HF_DIR, then model.path=HF_DIR "
              f"with a new train.output_dir"
        )
    return changes
