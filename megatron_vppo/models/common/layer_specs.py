"""Which transformer-layer implementation a GPT-style language model uses (shared by the model folders).

* `transformer_engine` (GPU): Megatron-Core's TE spec (fused LayerNorm+Linear, FP8 when `config.fp8`
  is set — Megatron's TransformerBlock enters the FP8 autocast from the config's recipe itself;
  `RunConfig` validates the format and recipe). Packed micro-batches take TE's thd attention: Megatron's
  TEDotProductAttention passes `cu_seqlens_q/kv` and `max_seqlen_q/kv` from PackedSeqParams and turns
  the causal mask into `padding_causal`, which TE's thd kernels require. RoPE stays unfused
  (`apply_rope_fusion=False`): TE's fused thd RoPE restarts positions at 0 per segment, which is wrong
  for M-RoPE, while Megatron's unfused thd path maps our per-token M-RoPE frequencies by offset.
* `local` (CPU, or GPU without TE): Megatron-Core's local spec with RMSNorm, and our
  `PackedSeqAttention` as core attention (SDPA; `thd` packing as a block-diagonal causal mask per
  segment, boolean masks otherwise).

Per-model choices come from the model's TransformerConfig, not from the model's name: `qk_layernorm`
(Qwen3's per-head RMSNorm on queries and keys) switches the spec's q/k norms on, for both variants.

Transformer Engine is imported only when its spec is asked for.
"""
from __future__ import annotations

import copy

from megatron_vppo.distributed import te_available


def local_layer_spec(qk_layernorm: bool = False):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_vppo.models.common.packed_attention import PackedSeqAttention

    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=qk_layernorm))
    spec.submodules.self_attention.submodules.core_attention = PackedSeqAttention
    return spec


def te_layer_spec(qk_layernorm: bool = False):
    if not te_available():
        raise RuntimeError(
            "the Transformer Engine layer spec needs transformer-engine and a GPU"
            " (pip install -e .[gpu]); use transformer_impl=local on CPU"
        )
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)


def lm_layer_spec(config, layer_class=None):
    """The spec for `config.transformer_impl` ('transformer_engine' or 'local'), with q/k norms when
    `config.qk_layernorm`. `layer_class` (a TransformerLayer subclass) replaces the layer module, for a
    model that adds something between layers (e.g. vision features added after early layers); submodules keep
    their names, so weights and checkpoints do not change."""
    qk = bool(getattr(config, "qk_layernorm", False))
    if getattr(config, "transformer_impl", "local") == "transformer_engine":
        spec = te_layer_spec(qk)
    else:
        if getattr(config, "fp8", None):
            raise ValueError("fp8 needs transformer_impl=transformer_engine (GPU)")
        spec = local_layer_spec(qk)
    if layer_class is not None:
        spec = copy.copy(spec)
        spec.module = layer_class
    return spec
