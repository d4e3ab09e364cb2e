"""Hugging Face Qwen2.5-VL `config.json` -> Megatron-Core `TransformerConfig` for the language model.

Reads both config spellings: transformers 4.x (text fields at the top level, `rope_theta` +
`rope_scaling.mrope_section`) and 5.x (`text_config` + `rope_parameters`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch.nn.functional as F

from megatron_vppo.config import ModelConfig, ParallelConfig
from megatron_vppo.models.common.lm_config import (  # noqa: F401  (re-exported: model.py, tests)
    DTYPES,
    padded_vocab_size,
    resolve_transformer_impl,
    runtime_kwargs,
)


def load_hf_config(path_or_dict) -> dict:
    """A config.json path, an HF directory, or an already-loaded dict -> dict."""
    if isinstance(path_or_dict, dict):
        return path_or_dict
    p = Path(path_or_dict)
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        raise FileNotFoundError(f"{p}: no config.json; pass a Hugging Face Qwen2.5-VL directory")
    return json.loads(p.read_text())


@dataclass(frozen=True)
class QwenTextArch:
    """The language-model hyper-parameters that decide parameter shapes and numerics."""

    arch_name: ClassVar[str] = "qwen2_5_vl"  # its MODELS entry: code holding only the arch finds the spec
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, ...]
    tie_word_embeddings: bool
    max_position_embeddings: int
    attention_dropout: float
    initializer_range: float
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    spatial_merge_size: int
    tokens_per_second: float

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def text_arch(hf_cfg) -> QwenTextArch:
    cfg = load_hf_config(hf_cfg)
    text = dict(cfg)
    text.update(cfg.get("text_config") or {})  # 5.x nests; 4.x is flat. Nested wins.
    vision = cfg.get("vision_config") or {}
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    mrope = rope.get("mrope_section") or text.get("mrope_section")
    if mrope is None:
        raise ValueError("config has no mrope_section (rope_parameters / rope_scaling); not a Qwen2.5-VL config")
    theta = rope.get("rope_theta", text.get("rope_theta", 1000000.0))
    heads = text["num_attention_heads"]
    if text["hidden_size"] % heads:
        raise ValueError(f"hidden_size {text['hidden_size']} not divisible by num_attention_heads {heads}")
    head_dim = text["hidden_size"] // heads
    if sum(mrope) * 2 != head_dim:
        raise ValueError(f"mrope_section {mrope} must sum to head_dim/2 = {head_dim // 2}")
    if text.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {text.get('hidden_act')!r}: only silu (SwiGLU) is supported")
    # transformers reads the top-level flag for the output layer; 5.x mirrors it into text_config.
    tie = cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    return QwenTextArch(
        vocab_size=text["vocab_size"],
        hidden_size=text["hidden_size"],
        intermediate_size=text["intermediate_size"],
        num_layers=text["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=text.get("num_key_value_heads", heads),
        rms_norm_eps=text.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        mrope_section=tuple(mrope),
        tie_word_embeddings=bool(tie),
        max_position_embeddings=text.get("max_position_embeddings", 32768),
        attention_dropout=text.get("attention_dropout", 0.0),
        initializer_range=text.get("initializer_range", 0.02),
        image_token_id=cfg.get("image_token_id", text.get("image_token_id", 151655)),
        video_token_id=cfg.get("video_token_id", text.get("video_token_id", 151656)),
        vision_start_token_id=cfg.get("vision_start_token_id", text.get("vision_start_token_id", 151652)),
        spatial_merge_size=vision.get("spatial_merge_size", 2),
        tokens_per_second=vision.get("tokens_per_second", 2),
    )


def lm_transformer_config(
    hf_cfg,
    model: ModelConfig | None = None,
    parallel: ParallelConfig | None = None,
    **overrides,
):
    """The language model's TransformerConfig. `overrides` win (e.g. `variable_seq_lengths=True`)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    arch = text_arch(hf_cfg)
    kwargs = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_key_value_heads,
        kv_channels=arch.head_dim,
        add_qkv_bias=True,
        add_bias_linear=False,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        attention_dropout=arch.attention_dropout,
        init_method_std=arch.initializer_range,
        mrope_section=list(arch.mrope_section),
        rotary_interleaved=False,
        **runtime_kwargs(model, parallel),
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)
