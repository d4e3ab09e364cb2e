"""Tensor-parallel marks on weights built without Megatron's random initialisation.

Megatron-Core 0.16.1's local layers record which dimension a weight is sharded along
(`tensor_model_parallel`, `partition_dim`, `partition_stride`) inside `_initialize_affine_weight_cpu/gpu`,
which `perform_initialization=False` skips: the weights then look replicated to everything that reads
the marks (the HF loader's sharding, gradient-norm de-duplication, checkpoint gathering). Set them as
those functions would (column-parallel and vocabulary-parallel: dim 0; row-parallel: dim 1; stride 2 for
a gated MLP's fc1, as `transformer/mlp.py` builds it, else 1). TE layers mark their own weights.
"""
from __future__ import annotations


def mark_tensor_parallel_weights(chunks) -> int:
    """Mark the unmarked weights of Megatron's local parallel layers in `chunks`; returns how many."""
    from megatron.core.transformer.mlp import MLP
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        set_tensor_model_parallel_attributes,
    )

    marked = 0
    for chunk in chunks:
        # MLP: "For GLU/SwiGLU, use stride=2" on linear_fc1 (not with use_kitchen)
        strided = {id(m.linear_fc1) for m in chunk.modules() if isinstance(m, MLP)
                   and m.config.gated_linear_unit and not getattr(m.config, "use_kitchen", False)}
        for module in chunk.modules():
            if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
                dim = 0
            elif isinstance(module, RowParallelLinear):
                dim = 1
            else:
                continue
            weight = getattr(module, "weight", None)
            if weight is None or hasattr(weight, "partition_dim"):  # tied / not allocated, or already marked
                continue
            set_tensor_model_parallel_attributes(weight, True, dim, 2 if id(module) in strided else 1)
            marked += 1
    return marked
