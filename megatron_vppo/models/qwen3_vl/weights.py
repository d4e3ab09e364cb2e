"""Qwen3-VL's HF <-> Megatron weight adapter (names and layouts of FULL tensors).

HF side: the one spelling Qwen3-VL checkpoints have (`model.language_model.*`, `model.visual.*`,
`lm_head.*`); `mcore_to_hf` writes it whatever `spelling` asks. Megatron side: `Qwen3VLModel` parameter
names with GLOBAL layer numbers, each tensor in the layout whose chunk r along its `partition_dim` is
TP rank r's shard.

Layouts (a pure permutation plus zero padding, so HF -> Megatron -> HF is bit-exact):
* LM QKV: per query group [q heads of the group; k; v] (no biases); QK-norm weights [head_dim] as is;
* LM gate/up: fc1 on rank r is [gate_r; up_r], so the full tensor is [gate_0; up_0; gate_1; …];
* embedding / output layer: rows zero-padded to `padded_vocab_size`; tied output comes from embed_tokens;
* vision QKV: HF [Q; K; V] over all heads -> per head [q_h; k_h; v_h]; vision MLP (not gated) rows of
  fc1 / columns of fc2 zero-padded to `vision_ffn_size` (the same at every TP dividing 8); patch
  embed, position table, LayerNorms and the (DeepStack) mergers keep HF's layout.
"""
from __future__ import annotations

import functools
import re

import torch

from megatron_vppo.models.common import weight_layouts as L
from megatron_vppo.models.common.lm_weights import VISION, QwenLMWeights
from megatron_vppo.models.qwen3_vl.config import load_hf_config, text_arch, vision_ffn_size

HF_LM = "model.language_model."
HF_VISION = "model.visual."
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")

# Vision renames that keep the layout: HF suffix (under model.visual.) -> Megatron suffix (vision_model.).
_BLOCK_SAME = {
    "norm1.weight": "input_layernorm.weight", "norm1.bias": "input_layernorm.bias",
    "norm2.weight": "pre_mlp_layernorm.weight", "norm2.bias": "pre_mlp_layernorm.bias",
    "attn.proj.weight": "self_attention.linear_proj.weight", "attn.proj.bias": "self_attention.linear_proj.bias",
    "mlp.linear_fc2.bias": "mlp.linear_fc2.bias",
}


def canonical_hf_name(name: str) -> str:
    """Other spellings (flat 4.x-style `model.layers.*` / `visual.*`, nested exporters) -> ours."""
    if name.startswith(("model.language_model.", "model.visual.", "lm_head.")):
        return name
    if name.startswith("language_model.model."):
        return HF_LM + name[len("language_model.model."):]
    if name.startswith("language_model.lm_head."):
        return "lm_head." + name[len("language_model.lm_head."):]
    if name.startswith("visual."):
        return HF_VISION + name[len("visual."):]
    if name.startswith("model."):
        return HF_LM + name[len("model."):]
    return name


@functools.lru_cache(maxsize=65536)
def engine_param_name(name: str) -> str:
    """An HF weight name in any spelling -> the parameter name in `Qwen3VLForConditionalGeneration`."""
    return canonical_hf_name(name)


class Qwen3VLWeights(QwenLMWeights):
    """Adapter for one model config and TP size (gate/up fusion, MLP and vocab padding depend on tp)."""

    hf_lm = HF_LM
    hf_vision = HF_VISION

    def __init__(self, hf_cfg, tp: int = 1, vocab_pad_multiple: int = 128):
        cfg = load_hf_config(hf_cfg)
        super().__init__(cfg, text_arch(cfg), tp=tp, vocab_pad_multiple=vocab_pad_multiple)
        if self.vision_cfg:
            v = self.vision_cfg
            self.v_heads = int(v["num_heads"])
            self.v_hd = int(v["hidden_size"]) // self.v_heads
            self.v_inter = int(v["intermediate_size"])
            self.v_ffn = vision_ffn_size(self.v_inter, tp)
            if self.v_heads % tp:
                raise ValueError(f"tp={tp} must divide the vision num_heads={self.v_heads}")

    def canonical_hf_name(self, name: str) -> str:
        return canonical_hf_name(name)

    def extra_layer_names(self, h: str) -> dict[str, list[str]]:
        """QK-norm weights [head_dim], as they are."""
        return {"self_attention.q_layernorm.weight": [h + "self_attn.q_norm.weight"],
                "self_attention.k_layernorm.weight": [h + "self_attn.k_norm.weight"]}

    # ---- vision layouts -------------------------------------------------------------------------
    def vision_to_mcore(self, hf_suffix: str, t: torch.Tensor) -> tuple[str, torch.Tensor]:
        """One HF vision tensor (name under model.visual.) -> (Megatron name under vision_model., tensor)."""
        m = _BLOCK_RE.match(hf_suffix)
        if m is None:
            if hf_suffix.startswith("deepstack_merger_list."):
                return "deepstack_mergers." + hf_suffix[len("deepstack_merger_list."):], t
            return hf_suffix, t  # patch_embed, pos_embed, merger.* keep their names
        p, s = f"blocks.{m.group(1)}.", m.group(2)
        if s in _BLOCK_SAME:
            return p + _BLOCK_SAME[s], t
        if s.startswith("attn.qkv."):
            return p + "self_attention.linear_qkv." + s.rsplit(".", 1)[1], L.heads_qkv_to_mcore(t, self.v_heads,
                                                                                                  self.v_hd)
        if s.startswith("mlp.linear_fc1."):
            return p + s, L.pad_rows(t, self.v_ffn)
        if s == "mlp.linear_fc2.weight":
            return p + s, L.pad_rows(t.t(), self.v_ffn).t()
        raise KeyError(f"no Megatron name known for HF vision tensor {HF_VISION + hf_suffix!r}")

    def vision_to_hf(self, mc_suffix: str, t: torch.Tensor) -> tuple[str, torch.Tensor]:
        m = _BLOCK_RE.match(mc_suffix)
        if m is None:
            if mc_suffix.startswith("deepstack_mergers."):
                return "deepstack_merger_list." + mc_suffix[len("deepstack_mergers."):], t
            return mc_suffix, t
        p, s = f"blocks.{m.group(1)}.", m.group(2)
        inverse = {v: k for k, v in _BLOCK_SAME.items()}
        if s in inverse:
            return p + inverse[s], t
        if s.startswith("self_attention.linear_qkv."):
            return p + "attn.qkv." + s.rsplit(".", 1)[1], L.heads_qkv_to_hf(t, self.v_heads, self.v_hd)
        if s.startswith("mlp.linear_fc1."):
            return p + s, t[: self.v_inter]
        if s == "mlp.linear_fc2.weight":
            return p + s, t[:, : self.v_inter]
        raise KeyError(f"no HF name known for Megatron parameter {VISION + mc_suffix!r}")

    def vision_hf_to_mcore(self, hf_vision: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(self.vision_to_mcore(k, v) for k, v in hf_vision.items())

    def vision_mcore_to_hf(self, mc_vision: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(self.vision_to_hf(k, v) for k, v in mc_vision.items())
