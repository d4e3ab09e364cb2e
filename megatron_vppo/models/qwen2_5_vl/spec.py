"""Qwen2.5-VL's entry in the MODELS registry: the modules of this folder behind the `ModelSpec` protocol."""
from __future__ import annotations

from dataclasses import dataclass

from megatron_vppo.models.common.qwen_vl_spec import QwenVLSpecBase
from megatron_vppo.models.qwen2_5_vl import config as _config
from megatron_vppo.models.qwen2_5_vl import rope_index as _rope_index
from megatron_vppo.models.qwen2_5_vl.weights import Qwen25VLWeights
from megatron_vppo.models.qwen2_5_vl.weights import engine_param_name as _engine_param_name


@dataclass(frozen=True)
class Qwen25VLSpec(QwenVLSpecBase):
    """`ModelSpec` of Qwen2.5-VL (models/spec.py documents every method)."""

    name: str = "qwen2_5_vl"
    default_patch_size = 14  # not a field: the patch side when vision_config does not say
    hf_model_types: tuple[str, ...] = ("qwen2_5_vl",)

    def load_hf_config(self, source) -> dict:
        return _config.load_hf_config(source)

    def text_arch(self, hf_config):
        return _config.text_arch(hf_config)

    def build_chunks(self, hf_config, model_cfg, parallel, dims, *, init_weights: bool = True) -> list:
        """`init_weights=False` when every parameter is loaded right after (HF directory, checkpoint)."""
        from megatron_vppo.models.qwen2_5_vl.model import build_model_chunks

        return build_model_chunks(hf_config, model_cfg, parallel, dims=dims, init_weights=init_weights)

    def weight_adapter(self, hf_config, tp: int = 1, vocab_pad_multiple: int = 128) -> Qwen25VLWeights:
        return Qwen25VLWeights(hf_config, tp=tp, vocab_pad_multiple=vocab_pad_multiple)

    def engine_model_class(self) -> type:
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration

    def make_tiny_model(self, out_dir, seed: int = 0, **kwargs):
        from megatron_vppo.models.qwen2_5_vl.tiny import make_tiny_model as make

        return make(out_dir, seed=seed, **kwargs)

    def tuner_fields(self, hf_config) -> dict:
        """Qwen2.5-VL's window attention and its full-attention blocks."""
        v = _config.load_hf_config(hf_config).get("vision_config") or {}
        fields = {}
        if v.get("window_size") is not None:
            fields["window_size"] = int(v["window_size"])
        if v.get("fullatt_block_indexes") is not None:
            fields["vision_full_attn_blocks"] = len(v["fullatt_block_indexes"])
        return fields

    def trajectory_positions(self, arch, input_ids, image_grid_thw=None):
        return _rope_index.trajectory_positions(arch, input_ids, image_grid_thw)

    def engine_param_name(self, name: str) -> str:
        return _engine_param_name(name)


SPEC = Qwen25VLSpec()
