"""Qwen3-VL's entry in the MODELS registry: the modules of this folder behind the `ModelSpec` protocol."""
from __future__ import annotations

from dataclasses import dataclass

from megatron_vppo.models.common.qwen_vl_spec import QwenVLSpecBase
from megatron_vppo.models.qwen3_vl import config as _config
from megatron_vppo.models.qwen3_vl import rope as _rope
from megatron_vppo.models.qwen3_vl.weights import Qwen3VLWeights
from megatron_vppo.models.qwen3_vl.weights import engine_param_name as _engine_param_name


@dataclass(frozen=True)
class Qwen3VLSpec(QwenVLSpecBase):
    """`ModelSpec` of Qwen3-VL dense (models/spec.py documents every method)."""

    name: str = "qwen3_vl"
    default_patch_size = 16  # not a field: the patch side when vision_config does not say
    hf_model_types: tuple[str, ...] = ("qwen3_vl",)

    def load_hf_config(self, source) -> dict:
        return _config.load_hf_config(source)

    def text_arch(self, hf_config):
        return _config.text_arch(hf_config)

    def tuner_fields(self, hf_config) -> dict:
        """Full attention in every vision block, QK-norm without QKV bias, a plain GELU vision MLP with
        LayerNorms, the learned position table and the DeepStack mergers."""
        v = _config.load_hf_config(hf_config).get("vision_config") or {}
        return dict(qkv_bias=False, qk_norm=True, vision_gated_mlp=False, vision_norm_bias=True, patch_embed_bias=True,
                    vision_pos_embed=int(v.get("num_position_embeddings", 0)),
                    deepstack=len(v.get("deepstack_visual_indexes") or ()),
                    vision_full_attn_blocks=int(v.get("depth", 0)))

    def build_chunks(self, hf_config, model_cfg, parallel, dims, *, init_weights: bool = True) -> list:
        """`init_weights=False` when every parameter is loaded right after (HF directory, checkpoint)."""
        from megatron_vppo.models.qwen3_vl.model import build_model_chunks

        return build_model_chunks(hf_config, model_cfg, parallel, dims=dims, init_weights=init_weights)

    def weight_adapter(self, hf_config, tp: int = 1, vocab_pad_multiple: int = 128) -> Qwen3VLWeights:
        return Qwen3VLWeights(hf_config, tp=tp, vocab_pad_multiple=vocab_pad_multiple)

    def trajectory_positions(self, arch, input_ids, image_grid_thw=None):
        return _rope.trajectory_positions(arch, input_ids, image_grid_thw)

    def engine_model_class(self) -> type:
        from transformers import Qwen3VLForConditionalGeneration

        return Qwen3VLForConditionalGeneration

    def engine_param_name(self, name: str) -> str:
        return _engine_param_name(name)

    def make_tiny_model(self, out_dir, seed: int = 0, **kwargs):
        from megatron_vppo.models.qwen3_vl.tiny import make_tiny_model as make

        return make(out_dir, seed=seed, **kwargs)


SPEC = Qwen3VLSpec()
