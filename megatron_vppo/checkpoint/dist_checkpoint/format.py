"""What a checkpoint directory is: its name, files, meta.json and the markers that make it complete.

One checkpoint is a directory `DIR/step_0000010/`:

    dist/                 Megatron dist checkpoint: model (sharded_state_dict of every chunk) and
                          optimizer (distributed optimizer: `dp_reshardable`), plus common.pt holding
                          the LR scheduler and the trainer state (step, data-loader position, ...)
    rng/rank_00003.pt     per-rank RNG states: python, numpy, torch CPU, CUDA, Megatron's RNG tracker
    meta.json             step, layout, optimizer format, config snapshot, versions, "complete": true,
                          and "files": {relative path: {"bytes", "sha256"}} of every other file
    COMPLETE              written last, after every rank finished writing
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

FORMAT = "megatron_vppo.dist_checkpoint"

FORMAT_VERSION = 2  # 2: per-file sha256 digests in meta.json

META_FILE = "meta.json"

COMPLETE_MARKER = "COMPLETE"

DIST_SUBDIR = "dist"

RNG_SUBDIR = "rng"

OPTIMIZER_SHARDING_TYPE = "dp_reshardable"

NAME_RE = re.compile(r"^step_(\d{7,})$")

class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the directory and the fix."""

@dataclass
class LoadedCheckpoint:
    path: Path
    step: int
    meta: dict
    train_state: dict = field(default_factory=dict)
    optimizer_loaded: bool = False
    scheduler_loaded: bool = False
    rng_restored: bool = False

def checkpoint_name(step: int) -> str:
    return f"step_{int(step):07d}"

def write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())

def read_meta(path: str | Path) -> dict:
    """meta.json of a checkpoint directory; CheckpointError when missing or unreadable."""
    p = Path(path) / META_FILE
    try:
        meta = json.loads(p.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{p} is missing") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{p} is unreadable ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{p} is not a JSON object")
    return meta

def check_complete(path: str | Path) -> dict:
    """Return the meta of a complete checkpoint, else raise CheckpointError saying what is wrong."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p} is not a directory")
    m = NAME_RE.match(p.name)
    if m is None:
        raise CheckpointError(f"{p.name} is not a checkpoint name (step_NNNNNNN; .tmp-* is a partial save)")
    if not (p / COMPLETE_MARKER).is_file():
        raise CheckpointError(f"{p} has no {COMPLETE_MARKER} marker (save did not finish)")
    meta = read_meta(p)
    if meta.get("format") != FORMAT or not meta.get("complete"):
        raise CheckpointError(f"{p / META_FILE} does not describe a complete {FORMAT} checkpoint")
    if meta.get("step") != int(m.group(1)):
        raise CheckpointError(
            f"{p / META_FILE} says step {meta.get('step')!r} but the directory is step {int(m.group(1))}"
        )
    if not (p / DIST_SUBDIR / "metadata.json").is_file():
        raise CheckpointError(f"{p / DIST_SUBDIR} lacks Megatron's metadata.json (model/optimizer not saved)")
    return meta

def first_line(e: BaseException) -> str:
    """Short reason: the innermost error line of torch DCP's multi-rank report, else str(e)."""
    text = str(e).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errs = [ln for ln in lines if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", ln)]
    return f"{type(e).__name__}: {(errs[-1] if errs else (lines[0] if lines else ''))[:500]}"

def corrupt(path: Path, what: str) -> CheckpointError:
    parent = path.parent
    return CheckpointError(
        f"checkpoint {path} cannot be loaded: {what}. Fix: train.resume=auto skips it and resumes from the "
        f"newest checkpoint under {parent} that verifies; or set train.resume to another step_NNNNNNN "
        f"directory"
    )
