"""Qwen2.5-VL on Megatron-Core: config mapping, M-RoPE ids, layer specs, vision tower, model, weights.

Heavy imports (megatron.core, transformers) happen in the submodules, not here:

    from megatron_vppo.models.qwen2_5_vl.model import Qwen25VLModel, build_model_chunks
    from megatron_vppo.models.qwen2_5_vl.weights import Qwen25VLWeights
    from megatron_vppo.models.qwen2_5_vl.rope_index import get_rope_index
"""
