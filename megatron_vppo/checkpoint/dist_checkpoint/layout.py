"""The layout a checkpoint records and compares, and the rank/world helpers every job here uses."""
from __future__ import annotations

from typing import Any

import torch

from megatron_vppo.distributed import ParallelDims, all_gather_world

def dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1

def gather_objects(obj: Any) -> list:
    """Every rank's `obj` in rank order (collective); [obj] without a process group."""
    return all_gather_world([obj])

def current_layout(num_chunks: int, *, dims: ParallelDims) -> dict:
    """The layout recorded in meta.json (`dims`: this rank's layout, the ParallelDims from init_distributed)."""
    _, world = dist_rank_world()
    return {
        "tp": dims.tp,
        "pp": dims.pp,
        "vpp": dims.vpp,
        "cp": dims.cp,
        "dp": dims.dp,
        "world_size": world,
        "num_chunks": num_chunks,
    }

def same_model_parallel(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in ("tp", "pp", "vpp", "cp", "num_chunks"))
