"""One run per output directory: an exclusive lock on `train.output_dir` for the run's life.

Two runs in one directory mix their checkpoints and metrics (the second resumes from the first's newest
checkpoint, both append to metrics.jsonl, one's pruning deletes the other's half-written save). Global
rank 0 holds an exclusive lock on `<output_dir>/.run.lock` from before the model is built until the
run ends; the kernel drops it when the process dies, however it dies (SIGKILL included), so a lock is
never stale by itself. It is a POSIX record lock (`lockf`), not a `flock`: children forked by the run
(Megatron's checkpoint writers, mid-save when the run is killed) do not inherit it, so they cannot keep
a dead run's directory locked. The file also records who holds it (host, pid, start time): a second run is
refused at once naming them, and a run that finds the record of a holder that no longer holds the lock
(a killed run) takes it over with a warning.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
import sys
from pathlib import Path

from megatron_vppo.config import ConfigError

log = logging.getLogger("megatron_vppo.train")

LOCK_FILE = ".run.lock"
_HELD: dict[str, int] = {}  # resolved output dir -> the open, locked file descriptor


class OutputDirBusy(ConfigError):
    """Another live run holds the output directory."""


def _read(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 4096):
        raw += chunk
    try:
        rec = json.loads(raw.decode("utf-8") or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}
    return rec if isinstance(rec, dict) else {}


def _who(rec: dict) -> str:
    return f"host {rec.get('host', '?')}, pid {rec.get('pid', '?')}, started {rec.get('started', '?')}"


def acquire(output_dir: str | Path) -> Path:
    """Lock `output_dir` (created if missing) for this process; OutputDirBusy when another live run
    holds it. Idempotent within a process. Returns the lock file."""
    out = Path(output_dir)
    key = str(out.resolve())
    path = out / LOCK_FILE
    if key in _HELD:
        return path
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a POSIX record lock: see the module doc
    except OSError:
        holder = _read(fd)
        os.close(fd)
        raise OutputDirBusy(
            f"train.output_dir={out} is in use by another run ({_who(holder)}); two runs in one directory "
            f"would mix their checkpoints and metrics. Fix: wait for that run to finish (or stop it), or "
            f"choose another train.output_dir") from None
    previous = _read(fd)
    if previous:
        log.warning("train.output_dir=%s: taking over the lock of a run that is no longer running (%s; it was "
                    "killed or crashed without releasing it)", out, _who(previous))
    rec = {"host": socket.gethostname(), "pid": os.getpid(),
           "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "argv": sys.argv}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(rec) + "\n").encode(), 0)
        os.fsync(fd)
    except OSError as e:  # a full disk: the lock is held; the record only names its holder
        log.warning("train.output_dir=%s: locked, but the holder could not be recorded in %s (%s)", out, path,
                    e.strerror)
    _HELD[key] = fd
    return path


def release(output_dir: str | Path) -> None:
    """Drop this process's lock on `output_dir` (a no-op when it holds none). The record is cleared, so
    the next run starts without a take-over warning."""
    fd = _HELD.pop(str(Path(output_dir).resolve()), None)
    if fd is None:
        return
    try:
        os.ftruncate(fd, 0)
    except OSError:
        pass
    os.close(fd)  # closing the descriptor releases the lock


def held(output_dir: str | Path) -> bool:
    return str(Path(output_dir).resolve()) in _HELD
