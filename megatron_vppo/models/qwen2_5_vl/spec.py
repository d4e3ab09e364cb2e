"""Qwen2.5-VL's entry in the MODELS registry: the modules of this folder behind the `ModelSpec` protocol."""
from __future__ import annotations

from dataclasses import dataclass

from megatron_vppo.models.qwen2_5_vl import config as _config
from megatron_vppo.models.qwen2_5_vl import rope_index as _rope_index
from megatron_vppo.models.qwen2_5_vl.weights import Qwen25VLWeights
from megatron_vppo.models.qwen2_5_vl.weights import engine_param_name as _engine_param_name
from megatron_vppo.models.spec import ImageGeometry


@dataclass(frozen=True)
class Qwen25VLSpec:
    """`ModelSpec` of Qwen2.5-VL (models/spec.py documents every method)."""

    name: str = "qwen2_5_vl"
    hf_model_types: tuple[str, ...] = ("qwen2_5_vl",)

    def load_hf_config(self, source) -> dict:
        return _config.load_hf_config(source)

    def text_arch(self, hf_config):
        return _config.text_arch(hf_config)

    def layout_dims(self, hf_config) -> dict:
        """What `init_distributed` checks the layout against (heads and layers TP/PP must divide)."""
        cfg = _config.load_hf_config(hf_config)
        a = _config.text_arch(cfg)
        return dict(num_attention_heads=a.num_attention_heads, num_query_groups=a.num_key_value_heads,
                    num_layers=a.num_layers, vision_num_heads=(cfg.get("vision_config") or {}).get("num_heads"))

    def build_chunks(self, hf_config, model_cfg, parallel, dims, *, init_weights: bool = True) -> list:
        """`init_weights=False` when every parameter is loaded right after (HF directory, checkpoint)."""
        from megatron_vppo.models.qwen2_5_vl.model import build_model_chunks

        return build_model_chunks(hf_config, model_cfg, parallel, dims=dims, init_weights=init_weights)

    def weight_adapter(self, hf_config, tp: int = 1, vocab_pad_multiple: int = 128) -> Qwen25VLWeights:
        return Qwen25VLWeights(hf_config, tp=tp, vocab_pad_multiple=vocab_pad_multiple)

    def engine_model_class(self) -> type:
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration

    def image_processor_class(self) -> type:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil

    def resized_size(self, height: int, width: int, image_processor) -> tuple[int, int]:
        """The image processor's own `smart_resize`: sides multiples of patch*merge, area within its bounds."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        ip = image_processor
        return smart_resize(height, width, factor=ip.patch_size * ip.merge_size, min_pixels=ip.size["shortest_edge"],
                            max_pixels=ip.size["longest_edge"])

    def image_geometry(self, hf_config) -> ImageGeometry:
        v = _config.load_hf_config(hf_config).get("vision_config") or {}
        return ImageGeometry(patch_size=int(v.get("patch_size", 14)), merge_size=int(v.get("spatial_merge_size", 2)),
                             temporal_patch_size=int(v.get("temporal_patch_size", 2)))

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

    def engine_prompt_positions(self, hf_model, input_ids, attention_mask, image_grid_thw):
        """transformers' own `get_rope_index` on the prompt: 3-row M-RoPE ids and rope deltas [B]."""
        mm_types = (input_ids == hf_model.config.image_token_id).long() * attention_mask
        pos, deltas = hf_model.model.get_rope_index(input_ids, mm_token_type_ids=mm_types,
                                                    image_grid_thw=image_grid_thw, attention_mask=attention_mask)
        return pos, deltas.reshape(-1)

    def engine_decode_positions(self, next_pos):
        """After the prompt every M-RoPE row is the text position: [3, B, 1]."""
        return next_pos.view(1, -1, 1).expand(3, -1, 1)

    def engine_vision_dtype(self, hf_model):
        return next(hf_model.model.visual.parameters()).dtype


SPEC = Qwen25VLSpec()
