"""The model's sharded state dict (global coordinates, so a checkpoint saved at one TP/PP/VPP layout
loads at any other) and the check that every shard has exactly one main replica."""
from __future__ import annotations

from typing import Sequence

import torch

from megatron_vppo.checkpoint.dist_checkpoint.format import CheckpointError
from megatron_vppo.checkpoint.dist_checkpoint.layout import gather_objects

def unwrap(chunk):
    from megatron.core.utils import unwrap_model

    return unwrap_model(chunk)

def model_sharded_state_dict(model_chunks: Sequence[torch.nn.Module]) -> dict:
    # Keys inside are global (layer offsets, TP shards), so the "model{i}" nesting does not have to
    # match between save and load layouts.
    return {f"model{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(model_chunks)}

def check_sharding(sharded: dict) -> None:
    """Collective: every tensor shard of a sharded state dict must have exactly one main replica
    across all ranks. Megatron checks this on rank 0 only, inside `dist_checkpointing.save`, where a
    failure leaves the other ranks blocked in a collective; checking first makes every rank raise the
    same clear error instead."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, is_main_replica

    mine = [(t.key, tuple(t.global_offset)) for t in nested_values(sharded)
            if isinstance(t, ShardedTensor) and is_main_replica(t.replica_id)]
    every = gather_objects(mine)
    count: dict = {}
    for part in every:
        for k in part:
            count[k] = count.get(k, 0) + 1
    dup = sorted(k for k, n in count.items() if n > 1)
    if dup:
        key, offset = dup[0]
        raise CheckpointError(
            f"{len(dup)} checkpoint shard(s) are claimed as the main replica by several ranks, e.g. {key!r} at "
            f"offset {offset} ({count[dup[0]]} ranks): the module's sharded_state_dict gives TP-replicated "
            "tensors the same replica_id on every TP rank; pass tp_group to sharded_state_dict_default there"
        )
