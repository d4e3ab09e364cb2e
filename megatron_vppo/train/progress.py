"""tqdm progress bars for rollout, passes and update — shown by one rank only.

The shown rank is the last global rank by default: in Megatron's rank order it sits on the last
pipeline stage, the one that holds the loss (Megatron's `print_rank_last` makes the same choice).
Bars are off when stderr is not a terminal (logs and CI stay clean) or when the config says so;
a disabled bar is still a real tqdm object (`disable=True`), so callers never branch.
"""
from __future__ import annotations

import os
import sys
from typing import Iterable

from tqdm import tqdm

_ENABLED: bool | None = None  # None = decide from the terminal


def set_progress_enabled(enabled: bool | None) -> None:
    """Force bars on/off for this process (config `progress: false`); None = auto (TTY only)."""
    global _ENABLED
    _ENABLED = enabled


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def progress_rank(prefer: str = "last") -> int:
    """The global rank that shows bars: 'last' (holds the loss) or 'first' (rank 0)."""
    if prefer not in ("last", "first"):
        raise ValueError(f"prefer={prefer!r}: use 'last' or 'first'")
    _, world = _rank_and_world()
    return world - 1 if prefer == "last" else 0


def bars_enabled(prefer: str = "last") -> bool:
    rank, _ = _rank_and_world()
    if rank != progress_rank(prefer):
        return False
    if _ENABLED is not None:
        return _ENABLED
    return sys.stderr.isatty()


def progress(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    leave: bool = False,
    prefer: str = "last",
) -> tqdm:
    """A tqdm bar on the progress rank, a disabled (silent) one elsewhere."""
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        leave=leave,
        dynamic_ncols=True,
        disable=not bars_enabled(prefer),
    )
