"""Hugging Face Qwen2.5-VL `config.json` -> Megatron-Core `TransformerConfig` for the language model.

Reads both config spellings: transformers 4.x (text fields at the top level, `rope_theta` +
`rope_scaling.mrope_section`) and 5.x (`text_config` + `rope_parameters`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from megatron_vppo.config import ModelConfig, ParallelConfig
from megatron_vppo.models.common import hf_config as _hf
from megatron_vppo.models.common.lm_config import (  # noqa: F401  (re-exported: model.py, tests)
    DTYPES,
    padded_vocab_size,
    resolve_transformer_impl,
    runtime_kwargs,
)


def load_hf_config(path_or_dict) -> dict:
    """A config.json path, an HF directory, or an already-loaded dict -> dict."""
    return _hf.load_hf_config(path_or_dict, "Qwen2.5-VL")


@dataclass(frozen=True)
class QwenTextArch(_hf.TextArchBase):
    """The language-model hyper-parameters that decide parameter shapes and numerics."""

    arch_name: ClassVar[str] = "qwen2_5_vl"  # its MODELS entry: code holding only the arch finds the spec
    tokens_per_second: float

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def text_arch(hf_cfg) -> QwenTextArch:
    cfg = load_hf_config(hf_cfg)
    text = _hf.text_section(cfg)
    rope = _hf.rope_section(text)
    mrope = rope.get("mrope_section") or text.get("mrope_section")
    if mrope is None:
        raise ValueError("config has no mrope_section (rope_parameters / rope_scaling); not a Qwen2.5-VL config")
    theta = rope.get("rope_theta", text.get("rope_theta", 1000000.0))
    heads = text["num_attention_heads"]
    if text["hidden_size"] % heads:
        raise ValueError(f"hidden_size {text['hidden_size']} not divisible by num_attention_heads {heads}")
    _hf.check_text(text, text["hidden_size"] // heads, mrope)
    return QwenTextArch(
        **_hf.shared_text_fields(cfg, text, mrope),
        rope_theta=float(theta),
        max_position_embeddings=text.get("max_position_embeddings", 32768),
        tokens_per_second=(cfg.get("vision_config") or {}).get("tokens_per_second", 2),
    )


def lm_transformer_config(
    hf_cfg,
    model: ModelConfig | None = None,
    parallel: ParallelConfig | None = None,
    **overrides,
):
    """The language model's TransformerConfig (QKV bias, no QK-norm). `overrides` win (e.g.
    `variable_seq_lengths=True`)."""
    return _hf.lm_transformer_config(text_arch(hf_cfg), model, parallel, add_qkv_bias=True, **overrides)
