"""Qwen2.5-VL on Megatron-Core: config mapping, M-RoPE ids, vision tower, model, weights, tiny model.

The rest of the package reaches it only through `spec.py` (`SPEC`, registered in models/__init__.py as
`MODELS["qwen2_5_vl"]`); shared Megatron layers (packed attention, TE/local layer specs) live in
models/common/.

Heavy imports (megatron.core, transformers) happen in the submodules, not here:

    from megatron_vppo.models.qwen2_5_vl.model import Qwen25VLModel, build_model_chunks
    from megatron_vppo.models.qwen2_5_vl.weights import Qwen25VLWeights
    from megatron_vppo.models.qwen2_5_vl.rope_index import get_rope_index
"""
