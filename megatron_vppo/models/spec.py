"""What the rest of the package needs to know about one model: the typed `ModelSpec` protocol.

`train/`, `checkpoint/`, `rollout/`, `data/` and the tools never import a model's folder: they look its
`ModelSpec` up in `megatron_vppo.models.MODELS` (by `model.arch`, or by an HF config.json's
`model_type`) and call these methods. A model folder defines one `SPEC` (any object that satisfies the
protocol; the shipped ones are frozen dataclasses, so `dataclasses.replace(SPEC, name=...)` registers a
renamed copy). Heavy libraries (Megatron, transformers) are imported inside the methods, so reading a
spec costs nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # type names only; none of these is imported at run time
    import torch

    from megatron_vppo.config import ModelConfig, ParallelConfig
    from megatron_vppo.distributed import ParallelDims
    from megatron_vppo.models.weight_adapter import WeightAdapter


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


@runtime_checkable
class TextArch(Protocol):
    """The language model's dimensions as the rest of the package reads them (`ModelSpec.text_arch`)."""

    arch_name: str  # its MODELS entry: code holding only the arch finds the spec
    vocab_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_layers: int
    image_token_id: int


@runtime_checkable
class ModelChunk(Protocol):
    """What Megatron's schedules and `train/passes.py` call on one built model chunk (`build_chunks`)."""

    arch: TextArch
    vision_model: Any  # the vision tower on the chunk that holds the first stage, else None

    def set_input_tensor(self, input_tensor) -> None: ...

    def pipeline_seq_length(self, seq_length: int) -> int:
        """Rows of the tensor one pipeline stage sends the next for a micro-batch of `seq_length`
        tokens (the schedule's p2p shape): `seq_length` unless the model carries side features."""


@runtime_checkable
class ModelSpec(Protocol):
    """One model's entry in `MODELS`; see models/qwen2_5_vl/spec.py for an implementation."""

    name: str  # the registry key, what `model.arch` says
    hf_model_types: tuple[str, ...]  # config.json `model_type` values this spec reads

    # ---- configuration -------------------------------------------------------------------------
    def load_hf_config(self, source: Any) -> dict:
        """config.json path / HF directory / dict -> dict."""

    def text_arch(self, hf_config: dict) -> TextArch:
        """The language model's dimensions (the M-RoPE function takes them)."""

    def layout_dims(self, hf_config: dict) -> dict:
        """Keyword arguments `distributed.init_distributed` validates the layout against."""

    def tuner_fields(self, hf_config: dict) -> dict:
        """The tuner's `ModelShape` fields this family derives from its own config keys (window
        attention, QK-norm, DeepStack, ...; tuning/model_spec.py reads the shared ones itself)."""

    # ---- Megatron side -------------------------------------------------------------------------
    def build_chunks(self, hf_config: dict, model_cfg: "ModelConfig", parallel: "ParallelConfig",
                     dims: "ParallelDims", *, init_weights: bool = True) -> list:
        """This rank's Megatron model chunks (`ModelChunk`s), after `init_distributed` (its `dims`);
        `init_weights=False` may skip the random init when every parameter is loaded right after."""

    def weight_adapter(self, hf_config: dict, tp: int = 1, vocab_pad_multiple: int = 128) -> "WeightAdapter":
        """HF <-> Megatron names and layouts at this TP size."""

    def trajectory_positions(self, arch: TextArch, input_ids: "torch.Tensor",
                             image_grid_thw: "torch.Tensor | None" = None) -> "torch.Tensor":
        """One sequence's RoPE position ids [rows, n] (train/rl_batch.py)."""

    # ---- transformers side (the in-process engine, the processor) ------------------------------
    def engine_model_class(self) -> type:
        """The transformers class the in-process engine loads."""

    def engine_param_name(self, name: str) -> str:
        """An HF checkpoint name (any spelling the adapter writes or reads) -> that class's parameter name."""

    def engine_prompt_positions(self, hf_model, input_ids: "torch.Tensor", attention_mask: "torch.Tensor",
                                image_grid_thw: "torch.Tensor | None") -> "tuple[torch.Tensor, torch.Tensor]":
        """A left-padded prompt batch -> (position ids the transformers model takes, per-row deltas [B]):
        decoding position of a row = its real token count + delta."""

    def engine_decode_positions(self, next_pos: "torch.Tensor") -> "torch.Tensor":
        """Decoding positions [B] -> the position ids one decoding step passes the transformers model."""

    def engine_vision_dtype(self, hf_model) -> "torch.dtype":
        """The dtype pixel values must have for the transformers model's vision tower."""

    def image_processor_class(self) -> type:
        """The transformers image-processor class."""

    def resized_size(self, height: int, width: int, image_processor) -> tuple[int, int]:
        """The processor's resize rule: (h, w) -> (resized h, resized w), to count tokens without pixels."""

    def image_geometry(self, hf_config: dict) -> ImageGeometry:
        """The geometry the vision tower expects (equal to its processor's)."""

    def make_tiny_model(self, out_dir, seed: int = 0, **kwargs):
        """Write a tiny random HF directory (demo, tests, benchmarks); returns its Path."""
