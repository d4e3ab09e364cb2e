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

from megatron_vppo.models.common.lm_config import padded_vocab_size
from megatron_vppo.models.qwen3_vl.config import load_hf_config, text_arch, vision_ffn_size
from megatron_vppo.models.weight_adapter import Group, WeightAdapter

LM = "language_model."
VISION = "vision_model."
HF_LM = "model.language_model."
HF_VISION = "model.visual."

_TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
_LAYER_RE = re.compile(r"^language_model\.decoder\.layers\.(\d+)\.(.+)$")
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


class Qwen3VLWeights(WeightAdapter):
    """Adapter for one model config and TP size (gate/up fusion, MLP and vocab padding depend on tp)."""

    def __init__(self, hf_cfg, tp: int = 1, vocab_pad_multiple: int = 128):
        self.hf_cfg = load_hf_config(hf_cfg)
        self.arch = a = text_arch(self.hf_cfg)
        self.vision_cfg = dict(self.hf_cfg.get("vision_config") or {})
        self.tp = tp
        self.vocab = a.vocab_size
        self.padded_vocab = padded_vocab_size(a.vocab_size, vocab_pad_multiple, tp)
        self.q_per_group = a.num_attention_heads // a.num_key_value_heads
        if a.intermediate_size % tp:
            raise ValueError(f"tp={tp} does not divide the LM intermediate_size={a.intermediate_size}")
        if self.vision_cfg:
            v = self.vision_cfg
            self.v_heads = int(v["num_heads"])
            self.v_hd = int(v["hidden_size"]) // self.v_heads
            self.v_inter = int(v["intermediate_size"])
            self.v_ffn = vision_ffn_size(self.v_inter, tp)
            if self.v_heads % tp:
                raise ValueError(f"tp={tp} must divide the vision num_heads={self.v_heads}")

    # ---- names ----------------------------------------------------------------------------------
    def canonical_hf_name(self, name: str) -> str:
        return canonical_hf_name(name)

    def canonical_mcore_name(self, name: str) -> str:
        for te, local in _TE_ALIASES.items():
            if name.endswith(te):
                return name[: -len(te)] + local
        return name

    def layer_names(self, g: int) -> dict[str, list[str]]:
        """Megatron suffix -> HF names for global LM layer g."""
        h = f"{HF_LM}layers.{g}."
        return {
            "input_layernorm.weight": [h + "input_layernorm.weight"],
            "self_attention.linear_qkv.weight": [h + f"self_attn.{x}_proj.weight" for x in "qkv"],
            "self_attention.q_layernorm.weight": [h + "self_attn.q_norm.weight"],
            "self_attention.k_layernorm.weight": [h + "self_attn.k_norm.weight"],
            "self_attention.linear_proj.weight": [h + "self_attn.o_proj.weight"],
            "pre_mlp_layernorm.weight": [h + "post_attention_layernorm.weight"],
            "mlp.linear_fc1.weight": [h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"],
            "mlp.linear_fc2.weight": [h + "mlp.down_proj.weight"],
        }

    # ---- LM layouts -----------------------------------------------------------------------------
    def qkv_to_mcore(self, q, k, v):
        ng = self.arch.num_key_value_heads
        return torch.cat([q.reshape(ng, -1, q.shape[1]), k.reshape(ng, -1, k.shape[1]),
                          v.reshape(ng, -1, v.shape[1])], dim=1).reshape(-1, q.shape[1])

    def qkv_to_hf(self, qkv):
        ng, d = self.arch.num_key_value_heads, self.arch.head_dim
        x = qkv.reshape(ng, (self.q_per_group + 2) * d, qkv.shape[1])
        q, k, v = x.split([self.q_per_group * d, d, d], dim=1)
        return q.reshape(-1, qkv.shape[1]), k.reshape(-1, qkv.shape[1]), v.reshape(-1, qkv.shape[1])

    def fc1_to_mcore(self, gate, up):
        g, u = gate.chunk(self.tp), up.chunk(self.tp)
        return torch.cat([x for r in range(self.tp) for x in (g[r], u[r])])

    def fc1_to_hf(self, fc1, width=None):
        f = fc1.shape[0] // 2
        per = fc1.reshape(self.tp, 2, f // self.tp, *fc1.shape[1:])
        return per[:, 0].reshape(f, *fc1.shape[1:]), per[:, 1].reshape(f, *fc1.shape[1:])

    def pad_vocab(self, w):
        if w.shape[0] != self.vocab:
            raise ValueError(f"vocab tensor has {w.shape[0]} rows, config vocab_size is {self.vocab}")
        return w if self.padded_vocab == self.vocab else torch.cat([w, w.new_zeros(self.padded_vocab - self.vocab,
                                                                                   *w.shape[1:])])

    # ---- vision layouts -------------------------------------------------------------------------
    @staticmethod
    def _pad_rows(t, n):
        return t if t.size(0) == n else torch.cat([t, t.new_zeros(n - t.size(0), *t.shape[1:])])

    def vision_to_mcore(self, hf_suffix: str, t: torch.Tensor) -> tuple[str, torch.Tensor]:
        """One HF vision tensor (name under model.visual.) -> (Megatron name under vision_model., tensor)."""
        m = _BLOCK_RE.match(hf_suffix)
        if m is None:
            if hf_suffix.startswith("deepstack_merger_list."):
                return "deepstack_mergers." + hf_suffix[len("deepstack_merger_list."):], t
            return hf_suffix, t  # patch_embed, pos_embed, merger.* keep their names
        b, s = m.group(1), m.group(2)
        p = f"blocks.{b}."
        if s in _BLOCK_SAME:
            return p + _BLOCK_SAME[s], t
        if s.startswith("attn.qkv."):
            qkv = t.reshape(3, self.v_heads, self.v_hd, *t.shape[1:])
            return p + "self_attention.linear_qkv." + s.rsplit(".", 1)[1], qkv.transpose(0, 1).reshape(t.shape)
        if s.startswith("mlp.linear_fc1."):
            return p + s, self._pad_rows(t, self.v_ffn)
        if s == "mlp.linear_fc2.weight":
            return p + s, self._pad_rows(t.t(), self.v_ffn).t()
        raise KeyError(f"no Megatron name known for HF vision tensor {HF_VISION + hf_suffix!r}")

    def vision_to_hf(self, mc_suffix: str, t: torch.Tensor) -> tuple[str, torch.Tensor]:
        m = _BLOCK_RE.match(mc_suffix)
        if m is None:
            if mc_suffix.startswith("deepstack_mergers."):
                return "deepstack_merger_list." + mc_suffix[len("deepstack_mergers."):], t
            return mc_suffix, t
        b, s = m.group(1), m.group(2)
        p = f"blocks.{b}."
        inverse = {v: k for k, v in _BLOCK_SAME.items()}
        if s in inverse:
            return p + inverse[s], t
        if s.startswith("self_attention.linear_qkv."):
            per_head = t.reshape(self.v_heads, 3, self.v_hd, *t.shape[1:])
            return p + "attn.qkv." + s.rsplit(".", 1)[1], per_head.transpose(0, 1).reshape(t.shape)
        if s.startswith("mlp.linear_fc1."):
            return p + s, t[: self.v_inter]
        if s == "mlp.linear_fc2.weight":
            return p + s, t[:, : self.v_inter]
        raise KeyError(f"no HF name known for Megatron parameter {VISION + mc_suffix!r}")

    # ---- the loader's interface -----------------------------------------------------------------
    def groups(self, mcore_names) -> list[Group]:
        out: list[Group] = []
        layers: dict[int, list[str]] = {}
        vision = []
        for n in sorted(set(mcore_names)):
            m = _LAYER_RE.match(n)
            if m:
                layers.setdefault(int(m.group(1)), []).append(n)
            elif n.startswith(VISION):
                vision.append(n)
            elif n == LM + "embedding.word_embeddings.weight":
                src = HF_LM + "embed_tokens.weight"
                out.append(Group([src], [n], lambda s, n=n, src=src: {n: self.pad_vocab(s[src])}))
            elif n == LM + "output_layer.weight":
                src = HF_LM + "embed_tokens.weight" if self.arch.tie_word_embeddings else "lm_head.weight"
                out.append(Group([src], [n], lambda s, n=n, src=src: {n: self.pad_vocab(s[src])}))
            elif n == LM + "decoder.final_layernorm.weight":
                src = HF_LM + "norm.weight"
                out.append(Group([src], [n], lambda s, n=n, src=src: {n: s[src]}))
            else:
                raise KeyError(f"no HF source known for Megatron parameter {n!r}")
        for g, names in sorted(layers.items()):
            table = self.layer_names(g)
            sufs = [_LAYER_RE.match(n).group(2) for n in names]
            for s in sufs:
                if s not in table:
                    raise KeyError(f"no HF source known for Megatron parameter {LM}decoder.layers.{g}.{s}")
            out.append(Group([h for s in sufs for h in table[s]], names, self._layer_fn(g, sufs)))
        if vision:
            if not self.vision_cfg:
                raise KeyError("model has a vision tower but config.json has no vision_config")
            out.append(Group([], vision, self._vision_fn(vision), hf_prefix=HF_VISION))
        return out

    def _layer_fn(self, g, sufs):
        table, p = self.layer_names(g), f"{LM}decoder.layers.{g}."

        def convert(s):
            res = {}
            for suf in sufs:
                t = [s[h] for h in table[suf]]
                if suf == "self_attention.linear_qkv.weight":
                    res[p + suf] = self.qkv_to_mcore(*t)
                elif suf == "mlp.linear_fc1.weight":
                    res[p + suf] = self.fc1_to_mcore(*t)
                else:
                    res[p + suf] = t[0]
            return res

        return convert

    def _vision_fn(self, names):
        def convert(s):
            mc = dict(self.vision_to_mcore(k[len(HF_VISION):], v) for k, v in s.items() if k.startswith(HF_VISION))
            missing = [n for n in names if n[len(VISION):] not in mc]
            if missing:
                raise KeyError(f"HF vision tensors produce no Megatron tensor for {missing[:4]}")
            return {VISION + k: v.contiguous() for k, v in mc.items() if VISION + k in names}

        return convert

    def mcore_to_hf(self, mc_state: dict[str, torch.Tensor], spelling: str = "v4") -> dict[str, torch.Tensor]:
        """Full Megatron tensors (any subset; gradients too) -> HF tensors in Qwen3-VL's one spelling."""
        if spelling not in ("v4", "v5"):
            raise ValueError(f"spelling={spelling!r}: use 'v4' or 'v5' (Qwen3-VL has one spelling; both give it)")
        out: dict[str, torch.Tensor] = {}
        for name, t in mc_state.items():
            name = self.canonical_mcore_name(name)
            m = _LAYER_RE.match(name)
            if name.startswith(VISION):
                k, v = self.vision_to_hf(name[len(VISION):], t)
                out[HF_VISION + k] = v
            elif m:
                g, suf = int(m.group(1)), m.group(2)
                h = self.layer_names(g).get(suf)
                if h is None:
                    raise KeyError(f"no HF name known for Megatron parameter {name!r}")
                if suf == "self_attention.linear_qkv.weight":
                    out.update(zip(h, self.qkv_to_hf(t)))
                elif suf == "mlp.linear_fc1.weight":
                    out.update(zip(h, self.fc1_to_hf(t)))
                else:
                    out[h[0]] = t
            elif name == LM + "embedding.word_embeddings.weight":
                out[HF_LM + "embed_tokens.weight"] = t[: self.vocab]
            elif name == LM + "output_layer.weight":
                if not self.arch.tie_word_embeddings:
                    out["lm_head.weight"] = t[: self.vocab]
            elif name == LM + "decoder.final_layernorm.weight":
                out[HF_LM + "norm.weight"] = t
            else:
                raise KeyError(f"no HF name known for Megatron parameter {name!r}")
        return out
