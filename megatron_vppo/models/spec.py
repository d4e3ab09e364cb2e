"""What the rest of the package needs to know about one model, as one plain bundle.

`train/`, `checkpoint/`, `rollout/`, `data/` and the tools never import a model's folder: they look its
`ModelSpec` up in `megatron_vppo.models.MODELS` (by `model.arch`, or by an HF config.json's
`model_type`) and call these values. A model folder defines one `SPEC`; heavy libraries (Megatron,
transformers) are imported inside the callables, so reading a spec costs nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class ImageGeometry:
    """How the image processor cuts an image: `patch_size`² pixel patches, `temporal_patch_size`
    frames stacked per patch row, `merge_size`² patches merged into one LM token."""

    patch_size: int
    merge_size: int
    temporal_patch_size: int

    @classmethod
    def of_image_processor(cls, image_processor) -> "ImageGeometry":
        """The geometry a loaded HF image processor applies (what it really produces)."""
        return cls(int(image_processor.patch_size), int(image_processor.merge_size),
                   int(image_processor.temporal_patch_size))


@dataclass(frozen=True)
class ModelSpec:
    """One model's entry in `MODELS`. Every field is a value or a callable; see models/qwen2_5_vl/spec.py."""

    name: str  # the registry key, what `model.arch` says
    hf_model_types: tuple[str, ...]  # config.json `model_type` values this spec reads
    # HF config: path / directory / dict -> dict, and dict -> the text model's dimensions (an object
    # with vocab_size, num_attention_heads, num_key_value_heads, num_layers; the M-RoPE function takes it).
    load_hf_config: Callable[[Any], dict]
    text_arch: Callable[[dict], Any]
    # dict -> the keyword arguments `distributed.init_distributed` validates the layout against.
    layout_dims: Callable[[dict], dict]
    # (hf_config, ModelConfig, ParallelConfig, ParallelDims | None) -> this rank's Megatron chunks.
    build_chunks: Callable[..., list]
    # (hf_config, tp, vocab_pad_multiple) -> a models.weight_adapter.WeightAdapter.
    weight_adapter: Callable[[dict, int, int], Any]
    # The transformers class the in-process engine loads (imported on call), and the rule from an HF
    # checkpoint name (any spelling the adapter writes or reads) to that class's parameter name.
    engine_model_class: Callable[[], type]
    engine_param_name: Callable[[str], str]
    # The transformers image-processor class (imported on call) and its resize rule
    # (h, w, image_processor) -> (resized h, resized w), used to count image tokens without pixels.
    image_processor_class: Callable[[], type]
    resized_size: Callable[[int, int, Any], tuple[int, int]]
    # hf_config -> the geometry the model's vision tower expects (equal to its processor's).
    image_geometry: Callable[[dict], ImageGeometry]
    # (text_arch, input_ids [n], image_grid_thw [k, 3] | None) -> position ids [3, n] (train/rl_batch.py).
    trajectory_positions: Callable[..., Any]
    # (out_dir, seed=0, **kwargs) -> Path of a tiny random HF directory (demo, tests, benchmarks).
    make_tiny_model: Callable[..., Any]
