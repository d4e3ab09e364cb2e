"""Finding complete checkpoints (no process group needed) and pruning old ones.

A save is written into `DIR/step_NNNNNNN.tmp-<nonce>/` and renamed only when complete, so the scan
ignores `.tmp-*` directories and anything without the COMPLETE marker or with an inconsistent meta.json
(each logged with the reason). Older checkpoints are pruned (keep last K) only after a new one is
complete, and only those older than it: it is the newest verified one, and it is never pruned.
"""
from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from megatron_vppo.checkpoint.dist_checkpoint.format import NAME_RE, CheckpointError, check_complete

logger = logging.getLogger(__name__)

def list_complete(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under ckpt_dir, oldest first; skipped ones are logged."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        if not p.name.startswith("step_"):
            continue
        if ".tmp" in p.name:
            logger.info("checkpoint scan: ignoring %s (partial save: temporary directory)", p)
            continue
        try:
            meta = check_complete(p)
        except CheckpointError as e:
            logger.warning("checkpoint scan: ignoring %s: %s", p, e)
            continue
        out.append((int(meta["step"]), p))
    return sorted(out)

def find_latest_complete(ckpt_dir: str | Path) -> Path | None:
    """Newest complete checkpoint under ckpt_dir, or None. Ignores `.tmp*` dirs, dirs without the
    COMPLETE marker and dirs with an unreadable / inconsistent meta.json (each logged with the reason)."""
    found = list_complete(ckpt_dir)
    return found[-1][1] if found else None

def prune_checkpoints(ckpt_dir: str | Path, keep_last: int, protect: Path | None = None) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints, and stale `.tmp-*` dirs of steps
    at or below the newest complete one (leftovers of crashed saves). Returns what was deleted.
    `keep_last <= 0` keeps everything.

    `protect`: the checkpoint just saved — verified, since its digests were computed from the files on
    disk. It is never deleted, and only checkpoints up to its step count toward `keep_last`: a newer
    one is a leftover of an earlier attempt (e.g. the corrupt checkpoint a resumed run skipped), which
    the run replaces when it reaches that step. Counting it could prune the last checkpoint that
    verifies."""
    root = Path(ckpt_dir)
    removed: list[Path] = []
    complete = list_complete(root)
    candidates = complete
    if protect is not None:
        m = NAME_RE.match(Path(protect).name)
        if m is not None:
            candidates = [(s, p) for s, p in complete if s <= int(m.group(1))]
    if keep_last > 0 and len(candidates) > keep_last:
        for _, p in candidates[:-keep_last]:
            if protect is not None and p.resolve() == Path(protect).resolve():
                continue
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    if complete:
        newest = complete[-1][0]
        for p in root.iterdir():
            m = re.match(r"^step_(\d+)\.tmp", p.name)
            if m and int(m.group(1)) <= newest and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    for p in removed:
        logger.info("checkpoint prune: removed %s", p)
    return removed
