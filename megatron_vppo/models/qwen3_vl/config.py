"""Hugging Face Qwen3-VL `config.json` -> the text model's dimensions and its Megatron TransformerConfig.

Qwen3-VL's text model is Qwen3: per-head RMSNorm on queries and keys (QK-norm), no QKV bias, an
explicit `head_dim` (not hidden/heads), SwiGLU, GQA, and interleaved multimodal RoPE
(`rope_parameters.mrope_interleaved`, `mrope_section`). transformers 5.x nests the text fields under
`text_config`; the flat 4.x spelling is read too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from megatron_vppo.config import ModelConfig, ParallelConfig
from megatron_vppo.models.common import hf_config as _hf


def load_hf_config(path_or_dict) -> dict:
    """A config.json path, an HF directory, or an already-loaded dict -> dict."""
    return _hf.load_hf_config(path_or_dict, "Qwen3-VL")


@dataclass(frozen=True)
class Qwen3TextArch(_hf.TextArchBase):
    """The language-model hyper-parameters that decide parameter shapes and numerics."""

    arch_name: ClassVar[str] = "qwen3_vl"  # its MODELS entry
    head_dim: int
    num_deepstack: int  # vision features added after LM layers 0 .. num_deepstack-1


def text_arch(hf_cfg) -> Qwen3TextArch:
    cfg = load_hf_config(hf_cfg)
    text = _hf.text_section(cfg)
    rope = _hf.rope_section(text)
    mrope = rope.get("mrope_section")
    if mrope is None:
        raise ValueError("config has no rope_parameters.mrope_section; not a Qwen3-VL config")
    if not rope.get("mrope_interleaved", True):
        raise ValueError("rope_parameters.mrope_interleaved is false; Qwen3-VL's M-RoPE is interleaved")
    head_dim = int(text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"])
    _hf.check_text(text, head_dim, mrope)
    if text.get("attention_bias", False):
        raise ValueError("attention_bias=true: Qwen3-VL's attention has no biases; this config is not Qwen3-VL")
    return Qwen3TextArch(
        **_hf.shared_text_fields(cfg, text, mrope),
        head_dim=head_dim,
        rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 5000000.0))),
        max_position_embeddings=text.get("max_position_embeddings", 128000),
        num_deepstack=len((cfg.get("vision_config") or {}).get("deepstack_visual_indexes") or ()),
    )


def lm_transformer_config(hf_cfg, model: ModelConfig | None = None, parallel: ParallelConfig | None = None,
                          **overrides):
    """The language model's TransformerConfig (QK-norm on, no QKV bias). `overrides` win."""
    return _hf.lm_transformer_config(text_arch(hf_cfg), model, parallel, add_qkv_bias=False, qk_layernorm=True,
                                     **overrides)


# The vision MLP width is zero-padded to a multiple of this (and of TP) so that checkpoints at every
# TP size dividing it have the same global shapes and reshard freely (GELU(0)·0 = 0: exact).
VISION_FFN_MULTIPLE = 8


def vision_ffn_size(intermediate_size: int, tp: int) -> int:
    """The vision MLP width Megatron holds: `intermediate_size` rounded up to lcm(tp, 8)."""
    step = math.lcm(max(1, tp), VISION_FFN_MULTIPLE)
    return -(-intermediate_size // step) * step
