"""Run-time faults a run stops on, reported by the CLI as one line (no traceback): the message names
what went wrong and the option that fixes it."""
from __future__ import annotations


class RunAbort(RuntimeError):
    """Raised identically on every rank (the decision is shared first), so no rank waits on another."""


class ExportError(RuntimeError):
    """A weight export (stream, HF directory, model checkpoint) could not be produced or written; the
    message names what and the fix. Here, below sync/ and checkpoint/, so both raise the same type."""


class SignalStop(KeyboardInterrupt):
    """SIGINT / SIGTERM stopped the run where it was safe to (after a save, between steps); `message`
    says what was kept, `signum` gives the CLI its exit code (128 + signum)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.message = message

    def __str__(self) -> str:
        return self.message
