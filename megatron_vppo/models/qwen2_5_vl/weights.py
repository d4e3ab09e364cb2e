"""Qwen2.5-VL's HF <-> Megatron weight adapter (names and layouts of FULL tensors).

Megatron side: names of `Qwen25VLModel` parameters with GLOBAL layer numbers
(`language_model.decoder.layers.{g}.…`, `vision_model.…`), each tensor in the layout whose chunk r
along the parameter's `partition_dim` is TP rank r's shard. HF side: transformers 4.x spelling
(`model.layers.*`, `model.embed_tokens`, `model.norm`, `lm_head`, `visual.*`); 5.x names
(`model.language_model.*`, `model.visual.*`) are accepted on input (`canonical_hf_name`).

Layouts:
* QKV: per query group [q heads of the group; k; v] — the same for every TP size (TP splits groups).
* gate/up: Megatron's fc1 on rank r is [gate_r; up_r], so the full tensor is [gate_0; up_0; gate_1; …].
* embedding / output layer: rows zero-padded up to `padded_vocab_size`; stripped on the way back.
* tied embeddings: the output layer (present on the last stage when PP > 1) comes from embed_tokens.
The conversion is a pure permutation plus zero padding, so HF -> Megatron -> HF is bit-exact.

The loader (`megatron_vppo.checkpoint.hf_load`) asks `groups(names)` for the conversions that
produce the Megatron tensors it needs, reads only their HF sources, and slices per TP rank.
"""
from __future__ import annotations

import functools

import torch

from megatron_vppo.models.common.lm_weights import QwenLMWeights
from megatron_vppo.models.qwen2_5_vl.config import load_hf_config, text_arch

HF_VISION = "visual."


def canonical_hf_name(name: str) -> str:
    """transformers 5.x names -> 4.x names (the spelling this adapter speaks)."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    if name.startswith("model.visual."):
        return HF_VISION + name[len("model.visual.") :]
    return name


def hf_name_v5(name: str) -> str:
    """4.x -> 5.x spelling (for writers that want the new layout)."""
    if name.startswith(HF_VISION):
        return "model.visual." + name[len(HF_VISION) :]
    if name.startswith("model."):
        return "model.language_model." + name[len("model.") :]
    return name


@functools.lru_cache(maxsize=65536)  # an engine sync looks every name up again
def engine_param_name(name: str) -> str:
    """An HF weight name in any spelling -> the parameter name in transformers 5.x's
    `Qwen2_5_VLForConditionalGeneration` (`model.language_model.*`, `model.visual.*`, `lm_head.*`)."""
    if name.startswith("language_model.model."):  # the nested spelling some exporters write
        name = "model." + name[len("language_model.model.") :]
    elif name.startswith("language_model.lm_head."):
        name = "lm_head." + name[len("language_model.lm_head.") :]
    return hf_name_v5(canonical_hf_name(name))


class Qwen25VLWeights(QwenLMWeights):
    """Adapter for one model config and TP size (gate/up fusion and vocab padding depend on tp)."""

    hf_lm = "model."
    hf_vision = HF_VISION

    def __init__(self, hf_cfg, tp: int = 1, vocab_pad_multiple: int = 128):
        cfg = load_hf_config(hf_cfg)
        super().__init__(cfg, text_arch(cfg), tp=tp, vocab_pad_multiple=vocab_pad_multiple)

    def canonical_hf_name(self, name: str) -> str:
        return canonical_hf_name(name)

    def extra_layer_names(self, h: str) -> dict[str, list[str]]:
        return {"self_attention.linear_qkv.bias": [h + f"self_attn.{x}_proj.bias" for x in "qkv"]}

    def vision_hf_to_mcore(self, hf_vision: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from megatron_vppo.models.qwen2_5_vl.vision_weights import vision_hf_to_mcore

        return vision_hf_to_mcore(hf_vision, self.vision_cfg, self.tp)

    def vision_mcore_to_hf(self, mc_vision: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from megatron_vppo.models.qwen2_5_vl.vision_weights import vision_mcore_to_hf

        return vision_mcore_to_hf(mc_vision, self.vision_cfg, self.tp)

    def respell(self, out: dict[str, torch.Tensor], spelling: str) -> dict[str, torch.Tensor]:
        if spelling == "v5":
            return {hf_name_v5(k): v for k, v in out.items()}
        if spelling != "v4":
            raise ValueError(f"spelling={spelling!r}: use 'v4' (model.layers.*) or 'v5' (model.language_model.*)")
        return out
