"""Signals during a save. SIGINT / SIGTERM that arrive during `save_checkpoint` are held until the
save has finished; then the ranks agree and every rank raises `SaveInterrupted` (a KeyboardInterrupt)
naming the checkpoint, so the run exits non-zero with a complete checkpoint behind it. Writer processes
forked meanwhile inherit the holding handler, so a Ctrl-C sent to the whole process group does not kill
them half-way."""
from __future__ import annotations

import contextlib
import os
import signal

from megatron_vppo.errors import SignalStop
from megatron_vppo.stop_signals import on_stop_signals

class SaveInterrupted(SignalStop):
    """SIGINT / SIGTERM arrived during a save; raised once the save finished (or was cleaned up)."""

@contextlib.contextmanager
def signals_held():
    """Hold SIGINT / SIGTERM while a save runs (main thread only): the first one is recorded in the
    yielded box and acted on by the caller once the save is done. Writer processes forked meanwhile
    inherit the handler and so keep writing instead of dying half-way."""
    box: dict = {"signum": None}

    def hold(signum):
        if box["signum"] is None:
            box["signum"] = signum
            os.write(2, f"{signal.Signals(signum).name} received during a checkpoint save: finishing the save, "
                        f"then stopping\n".encode())

    with on_stop_signals(hold):
        yield box
