"""Which transformer-layer implementation the language model uses.

* `transformer_engine` (GPU): Megatron-Core's TE spec (fused LayerNorm+Linear, TE attention with
  packed-sequence support, FP8 when `config.fp8` is set — Megatron's TransformerBlock enters the
  FP8 autocast from the config's recipe, see `fp8_recipe`).
* `local` (CPU, or GPU without TE): Megatron-Core's local spec with RMSNorm, and our
  `PackedSeqAttention` as core attention (SDPA; understands `thd` packing and boolean masks).

Transformer Engine is imported only when its spec is asked for.
"""
from __future__ import annotations

import copy

from megatron_vppo.distributed import te_available as te_usable

FP8_FORMATS = ("hybrid", "e4m3")
FP8_RECIPES = ("delayed", "tensorwise")


def local_layer_spec():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_vppo.models.qwen2_5_vl.packed_attention import PackedSeqAttention

    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
    spec.submodules.self_attention.submodules.core_attention = PackedSeqAttention
    return spec


def te_layer_spec():
    if not te_usable():
        raise RuntimeError(
            "the Transformer Engine layer spec needs transformer-engine and a GPU"
            " (pip install -e .[gpu]); use transformer_impl=local on CPU"
        )
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec()


def lm_layer_spec(config):
    """The spec for `config.transformer_impl` ('transformer_engine' or 'local')."""
    impl = getattr(config, "transformer_impl", "local")
    if impl == "transformer_engine":
        validate_fp8(config)
        return te_layer_spec()
    if getattr(config, "fp8", None):
        raise ValueError("fp8 needs transformer_impl=transformer_engine (GPU)")
    return local_layer_spec()


def validate_fp8(config) -> None:
    fmt, recipe = getattr(config, "fp8", None), getattr(config, "fp8_recipe", None)
    if fmt is None:
        return
    if fmt not in FP8_FORMATS:
        raise ValueError(f"fp8={fmt!r}: use one of {FP8_FORMATS}")
    recipe = getattr(recipe, "value", recipe)
    if recipe not in FP8_RECIPES:
        raise ValueError(f"fp8_recipe={recipe!r}: use one of {FP8_RECIPES} (tensorwise = current scaling)")


def fp8_recipe(config):
    """The Transformer Engine recipe Megatron builds for this config (delayed or current scaling).

    Megatron's TransformerBlock already wraps each layer in this autocast when `config.fp8` is set;
    this accessor is for code that runs TE modules outside the block (e.g. the vision tower)."""
    validate_fp8(config)
    if not te_usable():
        raise RuntimeError("FP8 recipes need Transformer Engine and a GPU")
    from megatron.core.fp8_utils import get_fp8_recipe

    return get_fp8_recipe(config)
