"""HF <-> Megatron names and layouts for the Qwen2.5-VL vision tower (`vision.Qwen25VisionModel`).

Both sides hold FULL tensors. HF keys are relative to the vision module (`blocks.0.attn.qkv.weight`,
`merger.mlp.0.weight`; the caller strips `model.visual.` / `visual.`). Megatron keys are the module's
parameter names, in the layout whose chunk r along the parameter's `partition_dim` is TP rank r's shard:

* QKV: HF stacks [Q; K; V] over all heads; Megatron keeps per-head [q_h; k_h; v_h] (num_query_groups =
  num_heads), which is the same for every TP size.
* gate/up: Megatron's fused fc1 on rank r is [gate_r; up_r], so the full tensor is
  [gate_0; up_0; gate_1; up_1; ...] and depends on tp. The MLP width is zero-padded to a multiple of tp
  (`vision.padded_ffn_size`); padding rows of fc1 and columns of fc2 are dropped on the way back.
* everything else (norms, proj, down, merger, patch embed) keeps HF's layout.
The functions are bit-exact inverses on the HF side (a pure permutation plus zero padding).
"""
from __future__ import annotations

import torch

from megatron_vppo.models.common.vision import in_channels
from megatron_vppo.models.common.weight_layouts import fc1_to_hf, fc1_to_mcore, heads_qkv_to_hf, heads_qkv_to_mcore, \
    pad_rows
from megatron_vppo.models.qwen2_5_vl.vision import padded_ffn_size


def _dims(cfg: dict, tp: int) -> dict:
    try:
        d = int(cfg["hidden_size"])
        heads = int(cfg["num_heads"])
        inter = int(cfg["intermediate_size"])
        depth = int(cfg["depth"])
        out = int(cfg["out_hidden_size"])
    except KeyError as e:
        raise KeyError(f"vision config lacks {e.args[0]!r}; pass config.json's `vision_config` dict") from None
    if tp < 1 or heads % tp:
        raise ValueError(f"tp={tp} must be >= 1 and divide the vision num_heads={heads}")
    m = int(cfg.get("spatial_merge_size", 2))
    k = (int(cfg.get("temporal_patch_size", 2)), int(cfg.get("patch_size", 14)), int(cfg.get("patch_size", 14)))
    return dict(
        d=d, heads=heads, hd=d // heads, inter=inter, ffn=padded_ffn_size(inter, tp), depth=depth, out=out,
        merged=d * m * m, patch=(d, in_channels(cfg), *k),
    )


def _hf_shapes(g: dict) -> dict[str, tuple]:
    d, i = g["d"], g["inter"]
    shapes = {
        "patch_embed.proj.weight": g["patch"],
        "merger.ln_q.weight": (d,),
        "merger.mlp.0.weight": (g["merged"], g["merged"]),
        "merger.mlp.0.bias": (g["merged"],),
        "merger.mlp.2.weight": (g["out"], g["merged"]),
        "merger.mlp.2.bias": (g["out"],),
    }
    for b in range(g["depth"]):
        p = f"blocks.{b}."
        shapes.update({
            p + "norm1.weight": (d,), p + "norm2.weight": (d,),
            p + "attn.qkv.weight": (3 * d, d), p + "attn.qkv.bias": (3 * d,),
            p + "attn.proj.weight": (d, d), p + "attn.proj.bias": (d,),
            p + "mlp.gate_proj.weight": (i, d), p + "mlp.gate_proj.bias": (i,),
            p + "mlp.up_proj.weight": (i, d), p + "mlp.up_proj.bias": (i,),
            p + "mlp.down_proj.weight": (d, i), p + "mlp.down_proj.bias": (d,),
        })
    return shapes


def _mc_shapes(g: dict) -> dict[str, tuple]:
    d, f = g["d"], g["ffn"]
    shapes = {
        "patch_embed.proj.weight": g["patch"],
        "merger.ln_q.weight": (d,),
        "merger.linear_fc1.weight": (g["merged"], g["merged"]),
        "merger.linear_fc1.bias": (g["merged"],),
        "merger.linear_fc2.weight": (g["out"], g["merged"]),
        "merger.linear_fc2.bias": (g["out"],),
    }
    for b in range(g["depth"]):
        p = f"blocks.{b}."
        shapes.update({
            p + "input_layernorm.weight": (d,), p + "pre_mlp_layernorm.weight": (d,),
            p + "self_attention.linear_qkv.weight": (3 * d, d), p + "self_attention.linear_qkv.bias": (3 * d,),
            p + "self_attention.linear_proj.weight": (d, d), p + "self_attention.linear_proj.bias": (d,),
            p + "mlp.linear_fc1.weight": (2 * f, d), p + "mlp.linear_fc1.bias": (2 * f,),
            p + "mlp.linear_fc2.weight": (d, f), p + "mlp.linear_fc2.bias": (d,),
        })
    return shapes


def _check(state: dict, shapes: dict[str, tuple], side: str) -> None:
    missing = [k for k in shapes if k not in state]
    if missing:
        raise KeyError(f"{side} vision state lacks {len(missing)} tensor(s), e.g. {missing[:4]}")
    extra = sorted(set(state) - set(shapes))
    if extra:
        raise KeyError(f"{side} vision state has unexpected tensor(s) {extra[:4]}; keys must be relative to "
                       "the vision module (strip `model.visual.` / `visual.`)")
    for k, shape in shapes.items():
        if tuple(state[k].shape) != tuple(shape):
            raise ValueError(f"{side} tensor {k!r} has shape {tuple(state[k].shape)}, expected {tuple(shape)}")


def vision_mcore_shapes(hf_vision_cfg: dict, tp: int) -> dict[str, tuple]:
    """Every Megatron vision parameter name -> its FULL shape at this tp (MLP width padded)."""
    return _mc_shapes(_dims(hf_vision_cfg, tp))


# Renames that keep the layout (HF suffix -> Megatron suffix).
_SAME_GLOBAL = {
    "patch_embed.proj.weight": "patch_embed.proj.weight",
    "merger.ln_q.weight": "merger.ln_q.weight",
    "merger.mlp.0.weight": "merger.linear_fc1.weight",
    "merger.mlp.0.bias": "merger.linear_fc1.bias",
    "merger.mlp.2.weight": "merger.linear_fc2.weight",
    "merger.mlp.2.bias": "merger.linear_fc2.bias",
}
_SAME_BLOCK = {
    "norm1.weight": "input_layernorm.weight",
    "norm2.weight": "pre_mlp_layernorm.weight",
    "attn.proj.weight": "self_attention.linear_proj.weight",
    "attn.proj.bias": "self_attention.linear_proj.bias",
    "mlp.down_proj.bias": "mlp.linear_fc2.bias",
}


def vision_hf_to_mcore(hf_state: dict, hf_vision_cfg: dict, tp: int) -> dict[str, torch.Tensor]:
    """HF vision tensors -> full Megatron tensors laid out for `tp` (see module docstring)."""
    g = _dims(hf_vision_cfg, tp)
    _check(hf_state, _hf_shapes(g), "HF")
    h, hd, f = g["heads"], g["hd"], g["ffn"]
    out = {mc: hf_state[hf] for hf, mc in _SAME_GLOBAL.items()}
    for b in range(g["depth"]):
        s, p = f"blocks.{b}.", f"blocks.{b}."
        for hf, mc in _SAME_BLOCK.items():
            out[p + mc] = hf_state[s + hf]
        w, bias = hf_state[s + "attn.qkv.weight"], hf_state[s + "attn.qkv.bias"]
        out[p + "self_attention.linear_qkv.weight"] = heads_qkv_to_mcore(w, h, hd)
        out[p + "self_attention.linear_qkv.bias"] = heads_qkv_to_mcore(bias, h, hd)
        for suffix in ("weight", "bias"):
            gate, up = (pad_rows(hf_state[s + f"mlp.{x}_proj.{suffix}"], f) for x in ("gate", "up"))
            out[p + f"mlp.linear_fc1.{suffix}"] = fc1_to_mcore(gate, up, tp)
        out[p + "mlp.linear_fc2.weight"] = pad_rows(hf_state[s + "mlp.down_proj.weight"].t(), f).t()
    return {k: v.contiguous() for k, v in out.items()}


def vision_mcore_to_hf(mc_state: dict, hf_vision_cfg: dict, tp: int) -> dict[str, torch.Tensor]:
    """Inverse of `vision_hf_to_mcore` (drops the MLP padding). Works on gradients too."""
    g = _dims(hf_vision_cfg, tp)
    _check(mc_state, _mc_shapes(g), "Megatron")
    h, hd, f, i = g["heads"], g["hd"], g["ffn"], g["inter"]
    out = {hf: mc_state[mc] for hf, mc in _SAME_GLOBAL.items()}
    for b in range(g["depth"]):
        s, p = f"blocks.{b}.", f"blocks.{b}."
        for hf, mc in _SAME_BLOCK.items():
            out[s + hf] = mc_state[p + mc]
        w, bias = mc_state[p + "self_attention.linear_qkv.weight"], mc_state[p + "self_attention.linear_qkv.bias"]
        out[s + "attn.qkv.weight"] = heads_qkv_to_hf(w, h, hd)
        out[s + "attn.qkv.bias"] = heads_qkv_to_hf(bias, h, hd)
        for suffix in ("weight", "bias"):
            gate, up = fc1_to_hf(mc_state[p + f"mlp.linear_fc1.{suffix}"], tp)
            out[s + f"mlp.gate_proj.{suffix}"], out[s + f"mlp.up_proj.{suffix}"] = gate[:i], up[:i]
        out[s + "mlp.down_proj.weight"] = mc_state[p + "mlp.linear_fc2.weight"][:, :i]
    return {k: v.contiguous() for k, v in out.items()}
