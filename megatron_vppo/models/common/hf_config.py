"""What the Qwen-VL families' `config.json` readers share: loading, the text section (5.x nests it
under `text_config`, 4.x is flat), the text fields every family has, and the language model's
TransformerConfig. Each model's `config.py` adds its own fields, defaults and checks.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch.nn.functional as F

from megatron_vppo.config import ModelConfig, ParallelConfig
from megatron_vppo.models.common.lm_config import runtime_kwargs


@dataclass(frozen=True)
class TextArchBase:
    """The language-model hyper-parameters every family has (a family's TextArch adds its own fields
    and `head_dim`, and names its MODELS entry in the class variable `arch_name`)."""

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


def load_hf_config(path_or_dict, family: str = "Qwen-VL") -> dict:
    """A config.json path, an HF directory, or an already-loaded dict -> dict."""
    if isinstance(path_or_dict, dict):
        return path_or_dict
    p = Path(path_or_dict)
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        raise FileNotFoundError(f"{p}: no config.json; pass a Hugging Face {family} directory")
    return json.loads(p.read_text())


def text_section(cfg: dict) -> dict:
    """The text model's fields: 5.x nests them under `text_config`, 4.x is flat. Nested wins."""
    text = dict(cfg)
    text.update(cfg.get("text_config") or {})
    return text


def rope_section(text: dict) -> dict:
    return text.get("rope_parameters") or text.get("rope_scaling") or {}


def check_text(text: dict, head_dim: int, mrope) -> None:
    """The checks every family makes: M-RoPE covers the head, SwiGLU."""
    if sum(mrope) * 2 != head_dim:
        raise ValueError(f"mrope_section {mrope} must sum to head_dim/2 = {head_dim // 2}")
    if text.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {text.get('hidden_act')!r}: only silu (SwiGLU) is supported")


def shared_text_fields(cfg: dict, text: dict, mrope) -> dict:
    """The TextArch fields both families read the same way (token ids live at the top level in 5.x)."""
    heads = text["num_attention_heads"]
    vision = cfg.get("vision_config") or {}
    return dict(
        vocab_size=text["vocab_size"],
        hidden_size=text["hidden_size"],
        intermediate_size=text["intermediate_size"],
        num_layers=text["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=text.get("num_key_value_heads") or heads,
        rms_norm_eps=text.get("rms_norm_eps", 1e-6),
        mrope_section=tuple(mrope),
        # transformers reads the top-level flag for the output layer; 5.x mirrors it into text_config.
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        attention_dropout=text.get("attention_dropout", 0.0),
        initializer_range=text.get("initializer_range", 0.02),
        image_token_id=cfg.get("image_token_id", text.get("image_token_id", 151655)),
        video_token_id=cfg.get("video_token_id", text.get("video_token_id", 151656)),
        vision_start_token_id=cfg.get("vision_start_token_id", text.get("vision_start_token_id", 151652)),
        spatial_merge_size=vision.get("spatial_merge_size", 2),
    )


def lm_transformer_config(arch, model: ModelConfig | None, parallel: ParallelConfig | None, *,
                          add_qkv_bias: bool, qk_layernorm: bool = False, **overrides):
    """The GPT-style language model's TransformerConfig from a TextArch (RMSNorm, SwiGLU, GQA, M-RoPE
    frequencies from `mrope_section`). `add_qkv_bias` / `qk_layernorm` are the family's; `overrides` win."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_key_value_heads,
        kv_channels=arch.head_dim,
        add_qkv_bias=add_qkv_bias,
        add_bias_linear=False,
        qk_layernorm=qk_layernorm,
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
