"""The language-model half of a Qwen-VL `WeightAdapter`, shared by the model folders.

Megatron side: `language_model.*` names of a GPTModel with GLOBAL layer numbers (the loader's
`groups`, the converters' `mcore_to_hf`); HF side: `{hf_lm}embed_tokens`, `{hf_lm}layers.{g}.*`,
`{hf_lm}norm`, `lm_head` (a model folder sets `hf_lm` to its spelling). A subclass gives its extra
per-layer tensors (`extra_layer_names`: QKV biases, QK-norms) and its vision tower's whole-dict
conversions (`vision_hf_to_mcore`, `vision_mcore_to_hf`, keys relative to `hf_vision` / `vision_model.`).
Layouts: models/common/weight_layouts.py; embedding / output rows zero-padded to `padded_vocab_size`,
and a tied output layer comes from `embed_tokens`.
"""
from __future__ import annotations

import re
from abc import abstractmethod

import torch

from megatron_vppo.models.common import weight_layouts as L
from megatron_vppo.models.common.lm_config import padded_vocab_size
from megatron_vppo.models.weight_adapter import Group, WeightAdapter

LM = "language_model."
VISION = "vision_model."

# Transformer Engine fuses the pre-norms into the following linear; same tensor, other name.
_TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
LAYER_RE = re.compile(r"^language_model\.decoder\.layers\.(\d+)\.(.+)$")


class QwenLMWeights(WeightAdapter):
    """HF <-> Megatron for the LM of one model config and TP size (gate/up fusion and vocab padding
    depend on tp); the vision tower through the subclass's conversions."""

    hf_lm: str = "model."  # HF prefix of embed_tokens / layers / norm
    hf_vision: str = "visual."  # HF prefix of the vision tower

    def __init__(self, hf_cfg: dict, arch, tp: int = 1, vocab_pad_multiple: int = 128):
        self.hf_cfg = hf_cfg
        self.arch = a = arch
        self.vision_cfg = dict(hf_cfg.get("vision_config") or {})
        self.tp = tp
        self.vocab = a.vocab_size
        self.padded_vocab = padded_vocab_size(a.vocab_size, vocab_pad_multiple, tp)
        self.q_per_group = a.num_attention_heads // a.num_key_value_heads
        if a.intermediate_size % tp:
            raise ValueError(f"tp={tp} does not divide the LM intermediate_size={a.intermediate_size}")

    # ---- the model folder's part ----------------------------------------------------------------
    def extra_layer_names(self, h: str) -> dict[str, list[str]]:
        """Megatron suffix -> HF names of the layer tensors beyond the common ones (`h`: HF layer prefix)."""
        return {}

    @abstractmethod
    def vision_hf_to_mcore(self, hf_vision: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """HF vision tensors (keys without `hf_vision`) -> full Megatron tensors (keys without `vision_model.`)."""

    @abstractmethod
    def vision_mcore_to_hf(self, mc_vision: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The inverse (any subset the tower's conversion accepts; gradients too)."""

    def respell(self, out: dict[str, torch.Tensor], spelling: str) -> dict[str, torch.Tensor]:
        """`mcore_to_hf`'s result in the asked spelling ('v4' or 'v5')."""
        if spelling not in ("v4", "v5"):
            raise ValueError(f"spelling={spelling!r}: use 'v4' or 'v5'")
        return out

    # ---- names ----------------------------------------------------------------------------------
    def canonical_mcore_name(self, name: str) -> str:
        for te, local in _TE_ALIASES.items():
            if name.endswith(te):
                return name[: -len(te)] + local
        return name

    def layer_names(self, g: int) -> dict[str, list[str]]:
        """Megatron suffix -> HF names for global LM layer g."""
        h = f"{self.hf_lm}layers.{g}."
        names = {
            "input_layernorm.weight": [h + "input_layernorm.weight"],
            "self_attention.linear_qkv.weight": [h + f"self_attn.{x}_proj.weight" for x in "qkv"],
            "self_attention.linear_proj.weight": [h + "self_attn.o_proj.weight"],
            "pre_mlp_layernorm.weight": [h + "post_attention_layernorm.weight"],
            "mlp.linear_fc1.weight": [h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"],
            "mlp.linear_fc2.weight": [h + "mlp.down_proj.weight"],
        }
        names.update(self.extra_layer_names(h))
        return names

    # ---- LM layouts (full tensors) --------------------------------------------------------------
    def qkv_to_mcore(self, q, k, v):
        return L.gqa_qkv_to_mcore(q, k, v, self.arch.num_key_value_heads)

    def qkv_to_hf(self, qkv):
        return L.gqa_qkv_to_hf(qkv, self.arch.num_key_value_heads, self.q_per_group, self.arch.head_dim)

    def fc1_to_mcore(self, gate, up):
        return L.fc1_to_mcore(gate, up, self.tp)

    def fc1_to_hf(self, fc1):
        return L.fc1_to_hf(fc1, self.tp)

    def pad_vocab(self, w):
        if w.shape[0] != self.vocab:
            raise ValueError(f"vocab tensor has {w.shape[0]} rows, config vocab_size is {self.vocab}")
        return L.pad_rows(w, self.padded_vocab)

    # ---- the loader's interface -----------------------------------------------------------------
    def groups(self, mcore_names) -> list[Group]:
        """Conversions producing every name in `mcore_names` (canonical, global layer numbers)."""
        out: list[Group] = []
        layers: dict[int, list[str]] = {}
        vision = []
        embed, norm = self.hf_lm + "embed_tokens.weight", self.hf_lm + "norm.weight"
        for n in sorted(set(mcore_names)):
            m = LAYER_RE.match(n)
            if m:
                layers.setdefault(int(m.group(1)), []).append(n)
            elif n.startswith(VISION):
                vision.append(n)
            elif n == LM + "embedding.word_embeddings.weight":
                out.append(Group([embed], [n], lambda s, n=n: {n: self.pad_vocab(s[embed])}))
            elif n == LM + "output_layer.weight":
                src = embed if self.arch.tie_word_embeddings else "lm_head.weight"
                out.append(Group([src], [n], lambda s, n=n, src=src: {n: self.pad_vocab(s[src])}))
            elif n == LM + "decoder.final_layernorm.weight":
                out.append(Group([norm], [n], lambda s, n=n: {n: s[norm]}))
            else:
                raise KeyError(f"no HF source known for Megatron parameter {n!r}")
        for g, names in sorted(layers.items()):
            table = self.layer_names(g)
            suffixes = [LAYER_RE.match(n).group(2) for n in names]
            for s in suffixes:
                if s not in table:
                    raise KeyError(f"no HF source known for Megatron parameter {LM}decoder.layers.{g}.{s}")
            out.append(Group([h for s in suffixes for h in table[s]], names, self._layer_fn(g, suffixes)))
        if vision:
            if not self.vision_cfg:
                raise KeyError("model has a vision tower but config.json has no vision_config")
            out.append(Group([], vision, self._vision_fn(vision), hf_prefix=self.hf_vision))
        return out

    def _layer_fn(self, g, suffixes):
        table, p = self.layer_names(g), f"{LM}decoder.layers.{g}."

        def convert(s):
            res = {}
            for suf in suffixes:
                t = [s[h] for h in table[suf]]
                if suf.startswith("self_attention.linear_qkv."):
                    res[p + suf] = self.qkv_to_mcore(*t)
                elif suf == "mlp.linear_fc1.weight":
                    res[p + suf] = self.fc1_to_mcore(*t)
                else:
                    res[p + suf] = t[0]
            return res

        return convert

    def _vision_fn(self, names):
        def convert(s):
            n = len(self.hf_vision)
            mc = self.vision_hf_to_mcore({k[n:]: v for k, v in s.items() if k.startswith(self.hf_vision)})
            missing = [x for x in names if x[len(VISION):] not in mc]
            if missing:
                raise KeyError(f"HF vision tensors produce no Megatron tensor for {missing[:4]}")
            return {VISION + k: v.contiguous() for k, v in mc.items() if VISION + k in names}

        return convert

    # ---- whole-state conversions (full tensors) -------------------------------------------------
    def lm_mcore_names(self) -> list[str]:
        """Every language-model parameter of the whole model (all stages), global layer numbers."""
        names = [LM + "embedding.word_embeddings.weight", LM + "decoder.final_layernorm.weight"]
        if not self.arch.tie_word_embeddings:
            names.append(LM + "output_layer.weight")
        for g in range(self.arch.num_layers):
            names += [f"{LM}decoder.layers.{g}.{s}" for s in self.layer_names(g)]
        return names

    def hf_to_mcore(self, hf_state: dict[str, torch.Tensor], with_vision: bool = True) -> dict:
        """Full HF state (any spelling `canonical_hf_name` reads) -> full Megatron tensors."""
        state = {self.canonical_hf_name(k): v for k, v in hf_state.items()}
        out = {}
        for grp in self.groups(self.lm_mcore_names()):
            missing = [h for h in grp.hf_names if h not in state]
            if missing:
                raise KeyError(f"HF state lacks {missing[:4]} (needed for {grp.mcore_names[:2]})")
            out.update(grp.to_mcore({h: state[h] for h in grp.hf_names}))
        n = len(self.hf_vision)
        vision = {k[n:]: v for k, v in state.items() if k.startswith(self.hf_vision)}
        if with_vision and vision:
            out.update({VISION + k: v.contiguous() for k, v in self.vision_hf_to_mcore(vision).items()})
        return out

    def mcore_to_hf(self, mc_state: dict[str, torch.Tensor], spelling: str = "v4") -> dict[str, torch.Tensor]:
        """Full Megatron tensors -> HF tensors (vocab padding removed). Also right for gradients.

        Accepts any subset (e.g. one pipeline stage's names); `output_layer.weight` of a tied model
        is dropped (HF has no lm_head then). Views, not copies (QKV / gate-up splits are strided):
        consumers copy once into their own storage; the HF writer makes its tensors contiguous."""
        out: dict[str, torch.Tensor] = {}
        vision = {}
        for name, t in mc_state.items():
            name = self.canonical_mcore_name(name)
            m = LAYER_RE.match(name)
            if name.startswith(VISION):
                vision[name[len(VISION):]] = t
            elif m:
                g, suf = int(m.group(1)), m.group(2)
                h = self.layer_names(g).get(suf)
                if h is None:
                    raise KeyError(f"no HF name known for Megatron parameter {name!r}")
                if suf.startswith("self_attention.linear_qkv."):
                    out.update(zip(h, self.qkv_to_hf(t)))
                elif suf == "mlp.linear_fc1.weight":
                    out.update(zip(h, self.fc1_to_hf(t)))
                else:
                    out[h[0]] = t
            elif name == LM + "embedding.word_embeddings.weight":
                out[self.hf_lm + "embed_tokens.weight"] = t[: self.vocab]
            elif name == LM + "output_layer.weight":
                if not self.arch.tie_word_embeddings:
                    out["lm_head.weight"] = t[: self.vocab]
            elif name == LM + "decoder.final_layernorm.weight":
                out[self.hf_lm + "norm.weight"] = t
            else:
                raise KeyError(f"no HF name known for Megatron parameter {name!r}")
        if vision:
            out.update({self.hf_vision + k: v for k, v in self.vision_mcore_to_hf(vision).items()})
        return self.respell(out, spelling)
