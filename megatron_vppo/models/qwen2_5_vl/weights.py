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
import re

import torch

from megatron_vppo.models.qwen2_5_vl.config import load_hf_config, padded_vocab_size, text_arch
from megatron_vppo.models.weight_adapter import Group, WeightAdapter

LM = "language_model."
VISION = "vision_model."
HF_VISION = "visual."

# Transformer Engine fuses the pre-norms into the following linear; same tensor, other name.
_TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
_LAYER_RE = re.compile(r"^language_model\.decoder\.layers\.(\d+)\.(.+)$")


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


class Qwen25VLWeights(WeightAdapter):
    """Adapter for one model config and TP size (gate/up fusion and vocab padding depend on tp)."""

    def __init__(self, hf_cfg, tp: int = 1, vocab_pad_multiple: int = 128):
        self.hf_cfg = load_hf_config(hf_cfg)
        self.arch = text_arch(self.hf_cfg)
        self.vision_cfg = dict(self.hf_cfg.get("vision_config") or {})
        self.tp = tp
        self.vocab = self.arch.vocab_size
        self.padded_vocab = padded_vocab_size(self.vocab, vocab_pad_multiple, tp)
        a = self.arch
        self.q_per_group = a.num_attention_heads // a.num_key_value_heads
        if a.intermediate_size % tp:
            raise ValueError(f"tp={tp} does not divide the LM intermediate_size={a.intermediate_size}")

    # ---- names ----------------------------------------------------------------------------------

    def canonical_hf_name(self, name: str) -> str:
        return canonical_hf_name(name)

    def canonical_mcore_name(self, name: str) -> str:
        for te, local in _TE_ALIASES.items():
            if name.endswith(te):
                return name[: -len(te)] + local
        return name

    def layer_names(self, g: int) -> dict[str, list[str]]:
        """Megatron suffix -> HF names for global layer g."""
        h = f"model.layers.{g}."
        return {
            "input_layernorm.weight": [h + "input_layernorm.weight"],
            "self_attention.linear_qkv.weight": [h + f"self_attn.{x}_proj.weight" for x in "qkv"],
            "self_attention.linear_qkv.bias": [h + f"self_attn.{x}_proj.bias" for x in "qkv"],
            "self_attention.linear_proj.weight": [h + "self_attn.o_proj.weight"],
            "pre_mlp_layernorm.weight": [h + "post_attention_layernorm.weight"],
            "mlp.linear_fc1.weight": [h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"],
            "mlp.linear_fc2.weight": [h + "mlp.down_proj.weight"],
        }

    # ---- layouts (full tensors) -----------------------------------------------------------------

    def qkv_to_mcore(self, q, k, v):
        ng = self.arch.num_key_value_heads
        rest = q.shape[1:]
        parts = [q.reshape(ng, -1, *rest), k.reshape(ng, -1, *rest), v.reshape(ng, -1, *rest)]
        return torch.cat(parts, dim=1).reshape(-1, *rest)

    def qkv_to_hf(self, qkv):
        ng, d = self.arch.num_key_value_heads, self.arch.head_dim
        rest = qkv.shape[1:]
        x = qkv.reshape(ng, (self.q_per_group + 2) * d, *rest)
        q, k, v = x.split([self.q_per_group * d, d, d], dim=1)
        return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)

    def fc1_to_mcore(self, gate, up):
        g, u = gate.chunk(self.tp), up.chunk(self.tp)
        return torch.cat([x for r in range(self.tp) for x in (g[r], u[r])])

    def fc1_to_hf(self, fc1):
        f = fc1.shape[0] // 2
        per = fc1.reshape(self.tp, 2, f // self.tp, *fc1.shape[1:])
        return per[:, 0].reshape(f, *fc1.shape[1:]), per[:, 1].reshape(f, *fc1.shape[1:])

    def pad_vocab(self, w):
        if w.shape[0] != self.vocab:
            raise ValueError(f"vocab tensor has {w.shape[0]} rows, config vocab_size is {self.vocab}")
        if self.padded_vocab == self.vocab:
            return w
        return torch.cat([w, w.new_zeros(self.padded_vocab - self.vocab, *w.shape[1:])])

    # ---- the loader's interface -----------------------------------------------------------------

    def groups(self, mcore_names) -> list[Group]:
        """Conversions producing every name in `mcore_names` (canonical, global layer numbers)."""
        wanted = set(mcore_names)
        out: list[Group] = []
        layers: dict[int, list[str]] = {}
        vision = sorted(n for n in wanted if n.startswith(VISION))
        for n in sorted(wanted):
            m = _LAYER_RE.match(n)
            if m:
                layers.setdefault(int(m.group(1)), []).append(n)
            elif n == LM + "embedding.word_embeddings.weight":
                out.append(Group(["model.embed_tokens.weight"], [n], self._embed_fn(n)))
            elif n == LM + "output_layer.weight":
                src = "model.embed_tokens.weight" if self.arch.tie_word_embeddings else "lm_head.weight"
                out.append(Group([src], [n], self._embed_fn(n, src)))
            elif n == LM + "decoder.final_layernorm.weight":
                out.append(Group(["model.norm.weight"], [n], lambda s, n=n: {n: s["model.norm.weight"]}))
            elif not n.startswith(VISION):
                raise KeyError(f"no HF source known for Megatron parameter {n!r}")
        for g, names in sorted(layers.items()):
            table = self.layer_names(g)
            suffixes = [_LAYER_RE.match(n).group(2) for n in names]
            for s in suffixes:
                if s not in table:
                    raise KeyError(f"no HF source known for Megatron parameter language_model.decoder.layers.{g}.{s}")
            srcs = [h for s in suffixes for h in table[s]]
            out.append(Group(srcs, names, self._layer_fn(g, suffixes)))
        if vision:
            if not self.vision_cfg:
                raise KeyError("model has a vision tower but config.json has no vision_config")
            out.append(Group([], vision, self._vision_fn(vision), hf_prefix=HF_VISION))
        return out

    def _embed_fn(self, name, src="model.embed_tokens.weight"):
        return lambda s: {name: self.pad_vocab(s[src])}

    def _layer_fn(self, g, suffixes):
        table = self.layer_names(g)
        p = f"{LM}decoder.layers.{g}."

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
            from megatron_vppo.models.qwen2_5_vl.vision_weights import vision_hf_to_mcore

            rel = {k[len(HF_VISION) :]: v for k, v in s.items() if k.startswith(HF_VISION)}
            mc = vision_hf_to_mcore(rel, self.vision_cfg, self.tp)
            missing = [n for n in names if n[len(VISION) :] not in mc]
            if missing:
                raise KeyError(f"vision adapter produced no tensor for {missing[:4]}")
            return {VISION + k: v for k, v in mc.items() if VISION + k in names}

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
        """Full HF state (either spelling) -> full Megatron tensors for every parameter."""
        from megatron_vppo.models.qwen2_5_vl.vision_weights import vision_hf_to_mcore

        state = {canonical_hf_name(k): v for k, v in hf_state.items()}
        out = {}
        for grp in self.groups(self.lm_mcore_names()):
            missing = [h for h in grp.hf_names if h not in state]
            if missing:
                raise KeyError(f"HF state lacks {missing[:4]} (needed for {grp.mcore_names[:2]})")
            out.update(grp.to_mcore({h: state[h] for h in grp.hf_names}))
        vision = {k[len(HF_VISION) :]: v for k, v in state.items() if k.startswith(HF_VISION)}
        if with_vision and vision:
            out.update({VISION + k: v for k, v in vision_hf_to_mcore(vision, self.vision_cfg, self.tp).items()})
        return out

    def mcore_to_hf(self, mc_state: dict[str, torch.Tensor], spelling: str = "v4") -> dict:
        """Full Megatron tensors -> HF tensors (vocab padding removed). Also right for gradients.

        Accepts any subset (e.g. one pipeline stage's names); `output_layer.weight` of a tied model
        is dropped (HF has no lm_head then)."""
        out: dict[str, torch.Tensor] = {}
        vision = {}
        for name, t in mc_state.items():
            name = self.canonical_mcore_name(name)
            m = _LAYER_RE.match(name)
            if name.startswith(VISION):
                vision[name[len(VISION) :]] = t
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
                out["model.embed_tokens.weight"] = t[: self.vocab]
            elif name == LM + "output_layer.weight":
                if not self.arch.tie_word_embeddings:
                    out["lm_head.weight"] = t[: self.vocab]
            elif name == LM + "decoder.final_layernorm.weight":
                out["model.norm.weight"] = t
            else:
                raise KeyError(f"no HF name known for Megatron parameter {name!r}")
        if vision:
            from megatron_vppo.models.qwen2_5_vl.vision_weights import vision_mcore_to_hf

            for k, v in vision_mcore_to_hf(vision, self.vision_cfg, self.tp).items():
                out[HF_VISION + k] = v
        # Views, not copies (QKV / gate-up splits are strided): consumers copy once into their own
        # storage (engine parameters, bucket buffers); the HF writer makes its tensors contiguous.
        if spelling == "v5":
            out = {hf_name_v5(k): v for k, v in out.items()}
        elif spelling != "v4":
            raise ValueError(f"spelling={spelling!r}: use 'v4' (model.layers.*) or 'v5' (model.language_model.*)")
        return out
