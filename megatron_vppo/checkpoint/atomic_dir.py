"""Publish a directory atomically: write it under a temporary sibling name, flush it to disk, rename it
into place. A reader (or a crash) sees either the complete directory or the previous state, never a
half-written one.

Used by every writer of a directory the package hands out: the HF checkpoint writer
(sync/hf_writer.py), the Megatron model checkpoint (checkpoint/model_checkpoint.py) and the trainer
checkpoints (checkpoint/dist_checkpoint/save.py, where rank 0 publishes after every rank wrote its part).
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator


def temp_sibling(out: Path, nonce: str | None = None, *, hidden: bool = True) -> Path:
    """The temporary name a directory is written under before `publish`: `.NAME.tmp-NONCE` (hidden) or
    `NAME.tmp-NONCE` (the trainer's checkpoint scan recognises and skips that form)."""
    out = Path(out)
    return out.parent / f"{'.' if hidden else ''}{out.name}.tmp-{nonce or secrets.token_hex(4)}"


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (new names, renames) to disk; a filesystem that cannot is skipped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file under `root`, then its directories: a rename that reaches the disk before the
    data would leave a complete-looking directory of empty files after a power loss."""
    for f in Path(root).rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        elif f.is_dir():
            fsync_dir(f)
    fsync_dir(Path(root))


def publish(tmp: Path, out: Path, *, overwrite: bool, fsync_files: bool = True) -> None:
    """Rename the finished directory `tmp` to `out`.

    An existing `out` is FileExistsError unless `overwrite`; then it is moved aside first and deleted
    only after the new one took its place — if the rename fails, the old one is put back under its own
    name. `fsync_files=False` when the caller flushed the files itself."""
    tmp, out = Path(tmp), Path(out)
    if fsync_files:
        fsync_tree(tmp)
    else:
        fsync_dir(tmp)
    old = None
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} already exists; choose another output directory or allow overwriting it")
        old = out.parent / f"{out.name}.tmp-replaced-{secrets.token_hex(4)}"
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:  # put the previous directory back rather than leave it under a temporary name
            os.rename(old, out)
        raise
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(out, *, overwrite: bool = False, hidden: bool = True) -> Iterator[Path]:
    """Yield an empty temporary sibling of `out` to write into; on a normal exit it is published as
    `out` (`publish`), on an exception removed, `out` untouched. One process writes it."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another output directory or allow overwriting it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out, hidden=hidden)
    tmp.mkdir()
    try:
        yield tmp
        publish(tmp, out, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
