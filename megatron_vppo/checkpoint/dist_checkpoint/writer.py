"""Megatron-Core's torch_dist writer, run synchronously.

It forks writer processes (so the calling process must be allowed children: torchrun ranks are;
daemonic multiprocessing workers are not); the `spawn` queue manager it would also start for its async
path is replaced by an in-process queue for the duration of our sync save, so scripts that save need no
`if __name__ == "__main__":` guard on its account; and rank-0-only writes that fail inside the save are
reported after its collective part instead of leaving the other ranks blocked in it.
"""
from __future__ import annotations

import contextlib
import queue

@contextlib.contextmanager
def rank0_writes_reported():
    """Let a rank-0-only write that fails inside `dist_checkpointing.save` (common.pt, metadata.json —
    e.g. on a full disk) be reported after the save instead of raised in the middle of it.

    Megatron-Core 0.16.1 writes those on rank 0 around its collective sharded save; raising there
    leaves every other rank blocked in that collective. Here the first such error is recorded in the
    yielded list, rank 0 goes on through the collective part (whose own write failures torch DCP
    reports on every rank), and the caller raises it afterwards, where failures are agreed on by all
    ranks. Scoped to the call; restored afterwards.
    """
    errors: list = []
    try:
        from megatron.core.dist_checkpointing import serialization as ser
    except ImportError:
        yield errors
        return

    def recorded(fn):
        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 — re-raised by the caller after the collective part
                errors.append(e)
        return call

    common = ser.get_default_save_common_strategy()
    patched = [(common, "save_common", common.save_common), (ser, "save_config", ser.save_config)]
    for obj, name, fn in patched:
        setattr(obj, name, recorded(fn))
    try:
        yield errors
    finally:
        for obj, name, fn in patched:
            if obj is common:
                delattr(obj, name)  # back to the class's method
            else:
                setattr(obj, name, fn)

@contextlib.contextmanager
def in_process_results_queue():
    """Let a synchronous torch_dist save collect its writers' results in a plain in-process queue.

    Megatron-Core 0.16.1 otherwise starts a `spawn` multiprocessing Manager for that queue (built for
    its async path): it re-imports the launching script — which then needs an
    `if __name__ == "__main__":` guard — and it outlives a rank that is killed. In a sync save the
    results are put and read by this same process (the forked writers report through their own
    queue), so a `queue.Queue` is enough. Scoped to the call; restored afterwards.
    """
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    except ImportError:
        yield
        return
    if not hasattr(fa, "_results_queue"):
        yield
        return
    previous = fa._results_queue
    fa._results_queue = queue.Queue()
    try:
        yield
    finally:
        fa._results_queue = previous
