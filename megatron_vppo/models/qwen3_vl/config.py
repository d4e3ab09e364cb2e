"""Hugging Face Qwen3-VL `config.json` -> the text model's dimensions and its Megatron TransformerConfig.

Qwen3-VL's text model is Qwen3: per-head RMSNorm on queries and keys (QK-norm), no QKV bias, an
explicit `head_dim` (not hidden/heads), SwiGLU, GQA, and interleaved multimodal RoPE
(`rope_parameters.mrope_interleaved`, `mrope_section`). transformers 5.x nests the text fields under
`text_config`; the flat 4.x spelling is read too.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch.nn.functional as F

from megatron_vppo.config import ModelConfig, ParallelConfig
from megatron_vppo.models.common.lm_config import runtime_kwargs


def load_hf_config(path_or_dict) -> dict:
    """A config.json path, an HF directory, or an already-loaded dict -> dict."""
    if isinstance(path_or_dict, dict):
        return path_or_dict
    p = Path(path_or_dict)
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        raise FileNotFoundError(f"{p}: no config.json; pass a Hugging Face Qwen3-VL directory")
    return json.loads(p.read_text())


@dataclass(frozen=True)
class Qwen3TextArch:
    """The language-model hyper-parameters that decide parameter shapes and numerics."""

    arch_name: ClassVar[str] = "qwen3_vl"  # its MODELS entry
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
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
    num_deepstack: int  # vision features added after LM layers 0 .. num_deepstack-1


def _text(cfg: dict) -> dict:
    text = dict(cfg)
    text.update(cfg.get("text_config") or {})  # 5.x nests; 4.x is flat. Nested wins.
    return text


def text_arch(hf_cfg) -> Qwen3TextArch:
    cfg = load_hf_config(hf_cfg)
    text = _text(cfg)
    vision = cfg.get("vision_config") or {}
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    mrope = rope.get("mrope_section")
    if mrope is None:
        raise ValueError("config has no rope_parameters.mrope_section; not a Qwen3-VL config")
    if not rope.get("mrope_interleaved", True):
        raise ValueError("rope_parameters.mrope_interleaved is false; Qwen3-VL's M-RoPE is interleaved")
    heads = text["num_attention_heads"]
    head_dim = int(text.get("head_dim") or text["hidden_size"] // heads)
    if sum(mrope) * 2 != head_dim:
        raise ValueError(f"mrope_section {mrope} must sum to head_dim/2 = {head_dim // 2}")
    if text.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {text.get('hidden_act')!r}: only silu (SwiGLU) is supported")
    if text.get("attention_bias", False):
        raise ValueError("attention_bias=true: Qwen3-VL's attention has no biases; this config is not Qwen3-VL")
    tie = cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    return Qwen3TextArch(
        vocab_size=text["vocab_size"],
        hidden_size=text["hidden_size"],
        intermediate_size=text["intermediate_size"],
        num_layers=text["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=text.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rms_norm_eps=text.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 5000000.0))),
        mrope_section=tuple(mrope),
        tie_word_embeddings=bool(tie),
        max_position_embeddings=text.get("max_position_embeddings", 128000),
        attention_dropout=text.get("attention_dropout", 0.0),
        initializer_range=text.get("initializer_range", 0.02),
        image_token_id=cfg.get("image_token_id", text.get("image_token_id", 151655)),
        video_token_id=cfg.get("video_token_id", text.get("video_token_id", 151656)),
        vision_start_token_id=cfg.get("vision_start_token_id", text.get("vision_start_token_id", 151652)),
        spatial_merge_size=vision.get("spatial_merge_size", 2),
        num_deepstack=len(vision.get("deepstack_visual_indexes") or ()),
    )


def lm_transformer_config(hf_cfg, model: ModelConfig | None = None, parallel: ParallelConfig | None = None,
                          **overrides):
    """The language model's TransformerConfig (QK-norm on, no QKV bias). `overrides` win."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    arch = text_arch(hf_cfg)
    kwargs = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_key_value_heads,
        kv_channels=arch.head_dim,
        add_qkv_bias=False,
        add_bias_linear=False,
        qk_layernorm=True,
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


# The vision MLP width is zero-padded to a multiple of this (and of TP) so that checkpoints at every
# TP size dividing it have the same global shapes and reshard freely (GELU(0)·0 = 0: exact).
VISION_FFN_MULTIPLE = 8


def vision_ffn_size(intermediate_size: int, tp: int) -> int:
    """The vision MLP width Megatron holds: `intermediate_size` rounded up to lcm(tp, 8)."""
    step = math.lcm(max(1, tp), VISION_FFN_MULTIPLE)
    return -(-intermediate_size // step) * step
