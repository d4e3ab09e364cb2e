"""Run-time faults a run stops on, reported by the CLI as one line (no traceback): the message names
what went wrong and the option that fixes it."""
from __future__ import annotations


class RunAbort(RuntimeError):
    """Raised identically on every rank (the decision is shared first), so no rank waits on another."""


class ExportError(RuntimeError):
    """A weight export (stream, HF directory, model checkpoint) could not be produced or written; the
    message names what and the fix. Here, below sync/ and checkpoint/, so both raise the same type."""
