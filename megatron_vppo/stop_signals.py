"""SIGINT / SIGTERM handling shared by the run loop (stop between steps) and the checkpoint save (hold
until the save is done): both install a handler on the main thread only, ignore the signal in processes
forked meanwhile (a checkpoint writer keeps writing), and restore the previous handlers on exit."""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Callable, Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def on_stop_signals(handler: Callable[[int], None]) -> Iterator[bool]:
    """Route SIGINT / SIGTERM to `handler(signum)` in this process while the block runs. Yields whether
    the handler is installed: Python only lets the main thread set handlers, so elsewhere nothing is."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    pid = os.getpid()

    def route(signum, frame):  # noqa: ARG001
        if os.getpid() == pid:  # a forked child inherits the handler: let it finish its work
            handler(signum)

    previous = {s: signal.signal(s, route) for s in STOP_SIGNALS}
    try:
        yield True
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
