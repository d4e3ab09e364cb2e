"""A failed save, a full disk in particular: every rank agrees, the partial save is removed, and the
error says "no space left on <dir>" with the fix."""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from megatron_vppo.checkpoint.dist_checkpoint.format import CheckpointError, first_line
from megatron_vppo.checkpoint.dist_checkpoint.layout import dist_rank_world, gather_objects
from megatron_vppo.checkpoint.dist_checkpoint.listing import find_latest_complete
from megatron_vppo.distributed import barrier

def reason(e: BaseException) -> str:
    """first_line, marked when an OSError in the chain is ENOSPC (DCP's writers report a full disk
    as a C++ enforce message that does not say so)."""
    text = first_line(e)
    seen, cur = set(), e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno == errno.ENOSPC:
            return f"{text} [ENOSPC]"
        cur = cur.__cause__ or cur.__context__
    return text

DISK_FULL_BYTES = 1 << 20  # less free space than this after a failed write: the disk is full

def free_bytes(path: str | Path) -> int:
    """Free bytes on the filesystem holding `path` (its nearest existing parent), as this user sees it."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    st = os.statvfs(p)
    blocks = st.f_bfree if os.geteuid() == 0 else st.f_bavail  # root may use the reserved blocks
    return blocks * st.f_frsize

def looks_like_enospc(text: str) -> bool:
    return any(k in text for k in ("[ENOSPC]", "No space left on device", "[Errno 28]"))

def agree_or_clean_up(ok: bool, err: str, root: Path, final: Path, tmp: Path) -> None:
    """Collective: when any rank failed, remove the partial save and raise the same CheckpointError on
    every rank — "no space left on <dir>" when the disk is full."""
    errs = [e for e in gather_objects(None if ok else (err or "failed")) if e]
    if not errs:
        return
    rank, _ = dist_rank_world()
    free = free_bytes(root)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    if free < DISK_FULL_BYTES or any(looks_like_enospc(e) for e in errs):
        latest = find_latest_complete(root)
        raise CheckpointError(
            f"no space left on {root} ({free} bytes free): saving {final.name} failed ({errs[0]}); the partial "
            f"save was removed. Fix: free space there (or set train.output_dir to a disk with room), then "
            f"continue with train.resume=auto" + (f" (newest complete checkpoint: {latest.name})" if latest else "")
        )
    raise CheckpointError(f"saving {final} failed ({errs[0]}); the partial save {tmp.name} was removed")
