"""The `ModelSpec` methods the Qwen-VL families share (models/spec.py documents each): layout dims,
transformers' own M-RoPE prompt / decode positions for the in-process engine, the Qwen2-VL image
processor and its `smart_resize`, the image geometry. A family's spec subclasses this and gives
`load_hf_config`, `text_arch` and `default_patch_size`.
"""
from __future__ import annotations

from megatron_vppo.models.spec import ImageGeometry


class QwenVLSpecBase:
    """Mix-in for a frozen dataclass spec (the subclass holds `name` and `hf_model_types`)."""

    default_patch_size: int = 14  # when vision_config does not say

    def layout_dims(self, hf_config) -> dict:
        """What `init_distributed` checks the layout against (heads and layers TP/PP must divide)."""
        cfg = self.load_hf_config(hf_config)
        a = self.text_arch(cfg)
        return dict(num_attention_heads=a.num_attention_heads, num_query_groups=a.num_key_value_heads,
                    num_layers=a.num_layers, vision_num_heads=(cfg.get("vision_config") or {}).get("num_heads"))

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
        v = self.load_hf_config(hf_config).get("vision_config") or {}
        return ImageGeometry(patch_size=int(v.get("patch_size", self.default_patch_size)),
                             merge_size=int(v.get("spatial_merge_size", 2)),
                             temporal_patch_size=int(v.get("temporal_patch_size", 2)))
