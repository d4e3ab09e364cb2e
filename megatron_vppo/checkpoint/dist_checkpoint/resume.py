"""Which checkpoint a run resumes from: `train.resume` (auto / never / a path) -> a verified checkpoint.

`select_resume("auto", ...)` walks back to the newest checkpoint that verifies and logs every one it
skipped and why.
"""
from __future__ import annotations

import logging
from pathlib import Path

from megatron_vppo.checkpoint.dist_checkpoint.format import CheckpointError, check_complete
from megatron_vppo.checkpoint.dist_checkpoint.integrity import verify_checkpoint
from megatron_vppo.checkpoint.dist_checkpoint.listing import find_latest_complete, list_complete

logger = logging.getLogger(__name__)

def resolve_resume(resume: str, ckpt_dir: str | Path) -> Path | None:
    """TrainConfig.resume -> a checkpoint path or None: 'auto' (latest complete, None if none),
    'never' (None), or an explicit checkpoint directory (must be complete). Markers and meta.json
    only, no process group; the trainer uses `select_resume`, which also verifies the files."""
    if resume in ("never", "", None):
        return None
    if resume == "auto":
        latest = find_latest_complete(ckpt_dir)
        if latest is None:
            logger.info("resume=auto: no complete checkpoint under %s; starting fresh", ckpt_dir)
        return latest
    p = Path(resume)
    try:
        check_complete(p)
    except CheckpointError as e:
        raise CheckpointError(
            f"train.resume={resume!r}: {e}. Fix: point resume at a complete step_NNNNNNN directory, "
            f"or use resume=auto to pick the newest complete one under {ckpt_dir}"
        ) from None
    return p

def select_resume(resume: str, ckpt_dir: str | Path) -> Path | None:
    """TrainConfig.resume -> the checkpoint to load (collective: verification hashes files on every
    rank). 'never' -> None; 'auto' -> the newest complete checkpoint under ckpt_dir that verifies,
    walking back past those that do not (each logged with the reason), None when there is no complete
    one at all; PATH -> that checkpoint, which must verify."""
    if resume in ("never", "", None):
        return None
    if resume != "auto":
        try:
            verify_checkpoint(resume)
        except CheckpointError as e:
            raise CheckpointError(
                f"train.resume={resume!r}: {e}. Fix: point train.resume at a step_NNNNNNN directory that "
                f"verifies, or use train.resume=auto to pick the newest one under {ckpt_dir} that does"
            ) from None
        return Path(resume)
    found = list_complete(ckpt_dir)
    if not found:
        logger.info("resume=auto: no complete checkpoint under %s; starting fresh", ckpt_dir)
        return None
    skipped = []
    for _, p in reversed(found):
        try:
            verify_checkpoint(p)
        except CheckpointError as e:
            logger.warning("resume=auto: skipping %s: %s", p.name, e)
            skipped.append(f"{p.name} ({e})")
            continue
        if skipped:
            logger.warning("resume=auto: resuming from %s, the newest checkpoint that verifies (skipped %d "
                           "newer: %s)", p, len(skipped), ", ".join(s.split(" ")[0] for s in skipped))
        return p
    raise CheckpointError(
        f"resume=auto: no checkpoint under {ckpt_dir} verifies: {'; '.join(skipped)}. Fix: set train.resume "
        f"to a checkpoint directory that verifies, or start fresh with a new train.output_dir (or "
        f"train.resume=never train.existing_output=move_aside to move these aside)"
    )
