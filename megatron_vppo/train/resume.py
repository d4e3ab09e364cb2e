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
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_vppo.config import CONFIG_FILE, ConfigError, RunConfig, to_dict

log = logging.getLogger("megatron_vppo.train")

PREVIOUS_RUNS = "previous_runs"
# what a run writes (config.yaml: its resolved config, config.save_config; it alone is not "another run")
RUN_FILES = ("checkpoints", "metrics.jsonl", "metrics.png", "tensorboard", CONFIG_FILE)


def checkpoint_dir(cfg: RunConfig) -> Path:
    return Path(cfg.train.output_dir) / "checkpoints"


# ------------------------------------------------------------------------------ the output directory


def previous_run_files(out: Path) -> list[str]:
    """What in `out` an earlier run left: checkpoint directories (complete or not), metrics lines."""
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


def check_output_dir(cfg: RunConfig) -> bool:
    """Read-only, on every rank, before any process group: refuse (ConfigError) a run that would start
    from step 0 — or resume another directory's checkpoint — in an output directory holding another
    run. Returns True when that run is to be moved aside first (`train.existing_output=move_aside`;
    global rank 0 calls `move_previous_run`)."""
    from megatron_vppo.checkpoint.dist_checkpoint import list_complete

    out = Path(cfg.train.output_dir)
    resume = cfg.train.resume
    ck = checkpoint_dir(cfg)
    if resume == "auto" and list_complete(ck):
        return False  # continues this directory's run (select_resume verifies the checkpoint)
    if resume not in ("auto", "never", "") and Path(resume).absolute().parent == ck.absolute():
        return False  # an explicit checkpoint of this directory's own run
    found = previous_run_files(out)
    if not found:
        return False
    if cfg.train.existing_output == "move_aside":
        return True
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


def move_previous_run(out: Path) -> Path:
    """Move an earlier run's files (RUN_FILES) to `out/previous_runs/<UTC time>/` — renames on the same
    filesystem, so it needs no free space. Returns the new directory."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dest = out / PREVIOUS_RUNS / stamp
    n = 1
    while dest.exists():
        n += 1
        dest = out / PREVIOUS_RUNS / f"{stamp}-{n}"
    dest.mkdir(parents=True)
    for name in RUN_FILES:
        if (out / name).exists():
            os.rename(out / name, dest / name)
    log.warning("train.existing_output=move_aside: moved the previous run in %s to %s", out, dest)
    return dest


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


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: dict | None, cfg: RunConfig) -> list[ConfigChange]:
    """Settings that differ between a checkpoint's config snapshot and this run's config (keys that
    only one side knows — another version's snapshot — are not compared)."""
    if not isinstance(saved, dict):
        return []
    old, new = _flatten(saved), _flatten(to_dict(cfg))
    changes = []
    for key in sorted(set(old) & set(new) - NOT_COMPARED):
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
