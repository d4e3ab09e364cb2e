"""Which transformer-layer implementation the language model uses.

* `transformer_engine` (GPU): Megatron-Core's TE spec (fused LayerNorm+Linear, TE attention with
  packed-sequence support, FP8 when `config.fp8` is set — Megatron's TransformerBlock enters the
  FP8 autocast from the config's recipe itself; `RunConfig` validates the format and recipe).
* `local` (CPU, or GPU without TE): Megatron-Core's local spec with RMSNorm, and our
  `PackedSeqAttention` as core attention (SDPA; understands `thd` packing and boolean masks).

Transformer Engine is imported only when its spec is asked for.
"""
from __future__ import annotations

import copy

from megatron_vppo.distributed import te_available


def local_layer_spec():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_vppo.models.qwen2_5_vl.packed_attention import PackedSeqAttention

    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
    spec.submodules.self_attention.submodules.core_attention = PackedSeqAttention
    return spec


def te_layer_spec():
    if not te_available():
        raise RuntimeError(
            "the Transformer Engine layer spec needs transformer-engine and a GPU"
            " (pip install -e .[gpu]); use transformer_impl=local on CPU"
        )
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec()


def lm_layer_spec(config):
    """The spec for `config.transformer_impl` ('transformer_engine' or 'local')."""
    if getattr(config, "transformer_impl", "local") == "transformer_engine":
        return te_layer_spec()
    if getattr(config, "fp8", None):
        raise ValueError("fp8 needs transformer_impl=transformer_engine (GPU)")
    return local_layer_spec()
