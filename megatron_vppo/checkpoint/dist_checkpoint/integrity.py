"""Integrity: per-file sizes and sha256 digests in meta.json, and the check before a load.

After the ranks wrote their files, the files are hashed (sha256, split over the ranks) and the sizes and
digests go into meta.json; `verify_checkpoint` re-hashes them and names the first file that differs, so
a zeroed block or a truncated shard fails loudly instead of loading. Checkpoints of format version 1 (no
digests) are checked for truncated shards only (file sizes against torch DCP's storage index).
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
from pathlib import Path

from megatron_vppo.checkpoint.dist_checkpoint.format import (
    COMPLETE_MARKER, DIST_SUBDIR, META_FILE, CheckpointError, check_complete, first_line)
from megatron_vppo.checkpoint.dist_checkpoint.layout import dist_rank_world, gather_objects

logger = logging.getLogger(__name__)

_HASH_CHUNK = 8 << 20

def file_digest(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(_HASH_CHUNK)
            if not block:
                break
            h.update(block)  # releases the GIL: the thread pool below hashes files in parallel
            n += len(block)
    return n, h.hexdigest()

def payload_files(ckpt: Path) -> list[str]:
    """Relative paths of every file the digests cover: all but meta.json (which holds them) and the
    COMPLETE marker."""
    out = []
    for p in sorted(ckpt.rglob("*")):
        rel = p.relative_to(ckpt).as_posix()
        if p.is_file() and rel not in (META_FILE, COMPLETE_MARKER):
            out.append(rel)
    return out

def hash_files(root: Path, rels: list[str]) -> dict:
    if not rels:
        return {}
    workers = max(1, min(8, os.cpu_count() or 1, len(rels)))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda r: file_digest(root / r), rels))
    return {r: {"bytes": n, "sha256": d} for r, (n, d) in zip(rels, results)}

def dcp_size_problem(path: Path) -> str | None:
    """Format version 1 (no digests): a tensor file shorter than torch DCP's index says is truncated."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        md = FileSystemReader(str(path / DIST_SUBDIR)).read_metadata()
    except Exception as e:  # noqa: BLE001
        return f"{DIST_SUBDIR}/.metadata is unreadable ({first_line(e)})"
    need: dict = {}
    for info in (getattr(md, "storage_data", None) or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for rel, n in sorted(need.items()):
        f = path / DIST_SUBDIR / rel
        if not f.is_file():
            return f"{DIST_SUBDIR}/{rel} is missing"
        if f.stat().st_size < n:
            return f"{DIST_SUBDIR}/{rel} is truncated ({f.stat().st_size} bytes; the index needs {n})"
    return None

def file_problem(path: Path, files: dict, rels: list[str]) -> str | None:
    """The first of `rels` whose size or sha256 differs from meta.json, as a reason; else None."""
    for rel in rels:
        f = path / rel
        want = files[rel]
        try:
            size = f.stat().st_size
        except FileNotFoundError:
            return f"{rel} is missing"
        if size != want.get("bytes"):
            return f"{rel} has {size} bytes, meta.json records {want.get('bytes')} (truncated or overwritten)"
    for rel in rels:
        if file_digest(path / rel)[1] != files[rel].get("sha256"):
            return f"{rel}: sha256 differs from the one recorded at save (the file changed on disk)"
    return None

def verify_checkpoint(path: str | Path) -> dict:
    """Check a checkpoint before loading it (collective when a process group exists: each rank hashes
    a share of the files): complete (marker, meta.json, names), and every file's size and sha256 as
    recorded in meta.json at save. Returns the meta; CheckpointError names the first bad file."""
    p = Path(path)
    rank, world = dist_rank_world()
    err, meta = None, None
    try:
        meta = check_complete(p)
        files = meta.get("files")
        if files is None:  # format version 1: no digests, sizes against DCP's index only
            err = dcp_size_problem(p) if rank == 0 else None
            if rank == 0:
                logger.warning("%s has no checksums (saved by format version %s): checked for truncated "
                               "shards only", p, meta.get("version"))
        else:
            err = file_problem(p, files, sorted(files)[rank::world])
    except CheckpointError as e:
        err = str(e)
    except OSError as e:
        err = f"unreadable ({e})"
    errs = [e for e in gather_objects(err) if e]
    if errs:
        raise CheckpointError(f"{p} does not verify: {errs[0]}")
    return meta
