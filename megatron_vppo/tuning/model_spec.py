"""`ModelShape`: the handful of shape numbers the tuner needs, read from an HF `config.json`.

`spec_from_dict` reads the fields every Qwen-VL-style config has (text fields in `text_config` or at
the top level, `vision_config`); what differs between model families (window attention, QK-norm,
gated or plain vision MLP, DeepStack mergers, ...) is passed by the model's own spec
(`models.MODELS[arch].tuner_fields`, which `load_model_spec` asks). Parameter counts are derived here
from those fields, so memory and FLOP estimates share one source; the defaults describe Qwen2.5-VL.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class ModelSpecError(ValueError):
    """A model config the tuner cannot use; the message names the missing or bad fields."""


# (spec attribute, HF key) — text fields are looked up in `text_config` first, then the top level.
_TEXT_FIELDS = (
    ("hidden", "hidden_size"),
    ("layers", "num_hidden_layers"),
    ("heads", "num_attention_heads"),
    ("kv_heads", "num_key_value_heads"),
    ("intermediate", "intermediate_size"),
    ("vocab", "vocab_size"),
)
_VISION_FIELDS = (
    ("vision_depth", "depth"),
    ("vision_hidden", "hidden_size"),
    ("vision_heads", "num_heads"),
    ("vision_intermediate", "intermediate_size"),
    ("vision_out_hidden", "out_hidden_size"),
    ("patch", "patch_size"),
    ("merge", "spatial_merge_size"),
)


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tie: bool
    vision_depth: int
    vision_hidden: int
    vision_heads: int
    vision_intermediate: int
    vision_out_hidden: int
    patch: int
    merge: int
    temporal_patch: int = 2  # Qwen2.5-VL fixes it at 2; optional in the config
    in_channels: int = 3
    head_dim: int | None = None  # hidden // heads unless the config says otherwise
    window_size: int = 112  # pixels; window attention spans window_size // patch patches per side
    vision_full_attn_blocks: int = 4  # blocks with full (not window) attention
    qkv_bias: bool = True  # LM attention has QKV biases
    qk_norm: bool = False  # LM per-head RMSNorm on q and k
    vision_gated_mlp: bool = True  # vision MLP gate/up/down (SwiGLU) or fc1/fc2
    vision_norm_bias: bool = False  # vision norms are LayerNorms (with bias) rather than RMSNorms
    patch_embed_bias: bool = False
    vision_pos_embed: int = 0  # rows of a learned vision position table
    deepstack: int = 0  # DeepStack mergers (each feeds one early LM layer; carried between PP stages)

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def q_width(self) -> int:
        return self.heads * self.hd

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.hd

    # ---- parameter counts, split into tensor-parallel-sharded and replicated parts ----
    def lm_layer_params(self) -> tuple[int, int]:
        """(sharded over TP, replicated) parameters of one decoder layer."""
        h, q, kv, f = self.hidden, self.q_width, self.kv_width, self.intermediate
        attn = h * (q + 2 * kv) + (q + 2 * kv) * self.qkv_bias + q * h  # QKV (column-parallel), out proj
        mlp = 3 * h * f  # gate, up (column-parallel), down (row-parallel)
        return attn + mlp, 2 * h + 2 * self.hd * self.qk_norm  # two RMSNorms (+ q/k norms)

    def vision_block_params(self) -> tuple[int, int]:
        vh, vi = self.vision_hidden, self.vision_intermediate
        mats, col_biases = (3, 2) if self.vision_gated_mlp else (2, 1)  # gate/up/down or fc1/fc2
        sharded = vh * 3 * vh + 3 * vh + vh * vh + mats * vh * vi + col_biases * vi  # qkv(+b), proj, MLP
        replicated = vh + vh + 2 * vh * (1 + self.vision_norm_bias)  # proj bias, last MLP bias, two norms
        return sharded, replicated

    def vision_params(self) -> tuple[int, int]:
        """(sharded, replicated) parameters of the whole vision tower incl. patch embed and merger."""
        vh, m2, out = self.vision_hidden, self.merge**2, self.vision_out_hidden
        patch_embed = self.in_channels * self.temporal_patch * self.patch**2 * vh + vh * self.patch_embed_bias
        bs, br = self.vision_block_params()
        merger_sharded = (m2 * vh) ** 2 + m2 * vh + m2 * vh * out  # norm -> Linear(4vh,4vh) -> Linear(4vh,out)
        norm = 1 + self.vision_norm_bias
        merger_repl = vh * norm + out  # its norm (over vh), last bias
        deepstack_repl = self.deepstack * (m2 * vh * norm + out)  # DeepStack mergers norm over 4vh
        sharded = self.vision_depth * bs + (1 + self.deepstack) * merger_sharded
        replicated = self.vision_depth * br + merger_repl + deepstack_repl + patch_embed + self.vision_pos_embed * vh
        return sharded, replicated

    def total_params(self) -> int:
        ls, lr = self.lm_layer_params()
        vs, vr = self.vision_params()
        emb = self.vocab * self.hidden
        return self.layers * (ls + lr) + emb * (1 if self.tie else 2) + self.hidden + vs + vr

    def patches_per_image(self, max_pixels: int) -> int:
        """Patches of the largest image the processor emits (before the 2x2 merge): the processor
        resizes to <= max_pixels in multiples of patch*merge, one temporal patch per still image."""
        unit = (self.patch * self.merge) ** 2
        return (max_pixels // unit) * self.merge**2


def _as_int(v, key: str, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ModelSpecError(f"{where}: field '{key}' must be a positive integer, got {v!r}")
    return v


def spec_from_dict(cfg: dict, name: str = "model", where: str | None = None, **family) -> ModelShape:
    """Build a ModelShape from a parsed HF config dict; every missing field is named at once.
    `where` (e.g. the file path) prefixes error messages; defaults to `name`. `family`: the
    ModelShape fields a model's spec derives from its own config keys (`tuner_fields`)."""
    src = where or name
    if not isinstance(cfg, dict):
        raise ModelSpecError(f"{src}: config must be a JSON object, got {type(cfg).__name__}")
    text = cfg.get("text_config") or {}
    vision = cfg.get("vision_config")
    missing: list[str] = []
    vals: dict = {}
    for attr, key in _TEXT_FIELDS:
        v = text.get(key, cfg.get(key))
        if v is None:
            missing.append(f"{key} (text_config or top level)")
        else:
            vals[attr] = v
    if not isinstance(vision, dict):
        missing.append("vision_config (the whole section)")
        vision = {}
    for attr, key in _VISION_FIELDS:
        v = vision.get(key)
        if v is None and vision:
            missing.append(f"vision_config.{key}")
        elif v is not None:
            vals[attr] = v
    if missing:
        raise ModelSpecError(
            f"{src}: config.json is missing {', '.join(missing)}; the tuner needs a vision-language "
            "model's config (see examples/model_configs/qwen2_5_vl_7b.json for the expected fields)"
        )
    for attr, key in _TEXT_FIELDS + _VISION_FIELDS:
        vals[attr] = _as_int(vals[attr], key, src)
    tie = text.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))
    extra = {}
    if vision.get("temporal_patch_size") is not None:
        extra["temporal_patch"] = _as_int(vision["temporal_patch_size"], "temporal_patch_size", src)
    in_ch = vision.get("in_channels", vision.get("in_chans"))
    if in_ch is not None:
        extra["in_channels"] = _as_int(in_ch, "in_channels", src)
    hd = text.get("head_dim", cfg.get("head_dim"))
    if hd is not None:
        extra["head_dim"] = _as_int(hd, "head_dim", src)
    spec = ModelShape(name=name, tie=bool(tie), **vals, **extra, **family)
    if spec.head_dim is None and spec.hidden % spec.heads:
        raise ModelSpecError(f"{src}: hidden_size {spec.hidden} is not divisible by num_attention_heads {spec.heads}")
    if spec.heads % spec.kv_heads:
        raise ModelSpecError(
            f"{src}: num_attention_heads {spec.heads} is not a multiple of num_key_value_heads {spec.kv_heads}"
        )
    return spec


def load_model_spec(path: str | Path) -> ModelShape:
    """Read `path` (a config.json, or an HF model directory holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise ModelSpecError(
            f"{path}: no such config; pass an HF model directory holding config.json, or a config .json file"
            " (examples/model_configs/ has Qwen2.5-VL-7B and -32B)"
        )
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ModelSpecError(f"{p}: not valid JSON ({e})") from None
    name = p.parent.name if p.name == "config.json" else p.stem
    if not isinstance(cfg, dict):
        raise ModelSpecError(f"{p}: config must be a JSON object, got {type(cfg).__name__}")
    return spec_from_dict(cfg, name=name, where=str(p), **_model_spec_of(cfg, str(p)).tuner_fields(cfg))


def _model_spec_of(cfg: dict, where: str):
    """The MODELS entry for the config's `model_type` (the default `model.arch`'s when it has none)."""
    from megatron_vppo.config import ModelConfig
    from megatron_vppo.models import MODELS, spec_for_hf_config

    if cfg.get("model_type") is None:
        return MODELS[ModelConfig().arch]
    try:
        return spec_for_hf_config(cfg)
    except KeyError as e:
        raise ModelSpecError(f"{where}: {e.args[0]}") from None
