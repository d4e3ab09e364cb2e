"""Qwen2.5-VL's entry in the MODELS registry: the existing modules of this folder, bundled."""
from __future__ import annotations

from megatron_vppo.models.qwen2_5_vl.config import load_hf_config, text_arch
from megatron_vppo.models.qwen2_5_vl.rope_index import trajectory_positions
from megatron_vppo.models.qwen2_5_vl.weights import Qwen25VLWeights, engine_param_name
from megatron_vppo.models.spec import ImageGeometry, ModelSpec


def layout_dims(hf_config) -> dict:
    """What `init_distributed` checks the layout against (heads and layers TP/PP must divide)."""
    cfg = load_hf_config(hf_config)
    a = text_arch(cfg)
    return dict(num_attention_heads=a.num_attention_heads, num_query_groups=a.num_key_value_heads,
                num_layers=a.num_layers, vision_num_heads=(cfg.get("vision_config") or {}).get("num_heads"))


def build_chunks(hf_config, model_cfg, parallel, dims, *, init_weights: bool = True) -> list:
    """`init_weights=False` when every parameter is loaded right after (HF directory, checkpoint)."""
    from megatron_vppo.models.qwen2_5_vl.model import build_model_chunks

    return build_model_chunks(hf_config, model_cfg, parallel, dims=dims, init_weights=init_weights)


def weight_adapter(hf_config, tp: int = 1, vocab_pad_multiple: int = 128) -> Qwen25VLWeights:
    return Qwen25VLWeights(hf_config, tp=tp, vocab_pad_multiple=vocab_pad_multiple)


def engine_model_class() -> type:
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration


def image_processor_class() -> type:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil


def resized_size(height: int, width: int, image_processor) -> tuple[int, int]:
    """The image processor's own `smart_resize`: sides multiples of patch*merge, area within its bounds."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    ip = image_processor
    return smart_resize(height, width, factor=ip.patch_size * ip.merge_size, min_pixels=ip.size["shortest_edge"],
                        max_pixels=ip.size["longest_edge"])


def image_geometry(hf_config) -> ImageGeometry:
    v = load_hf_config(hf_config).get("vision_config") or {}
    return ImageGeometry(patch_size=int(v.get("patch_size", 14)), merge_size=int(v.get("spatial_merge_size", 2)),
                         temporal_patch_size=int(v.get("temporal_patch_size", 2)))


def make_tiny_model(out_dir, seed: int = 0, **kwargs):
    from megatron_vppo.models.qwen2_5_vl.tiny import make_tiny_model as make

    return make(out_dir, seed=seed, **kwargs)


SPEC = ModelSpec(
    name="qwen2_5_vl",
    hf_model_types=("qwen2_5_vl",),
    load_hf_config=load_hf_config,
    text_arch=text_arch,
    layout_dims=layout_dims,
    build_chunks=build_chunks,
    weight_adapter=weight_adapter,
    engine_model_class=engine_model_class,
    engine_param_name=engine_param_name,
    image_processor_class=image_processor_class,
    resized_size=resized_size,
    image_geometry=image_geometry,
    trajectory_positions=trajectory_positions,
    make_tiny_model=make_tiny_model,
)
