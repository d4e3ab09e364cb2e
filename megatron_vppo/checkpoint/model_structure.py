"""The shape of a model as a checkpoint records it, and the comparison made before loading one.

A trainer checkpoint holds tensors, not the model they belong to: loading it into a model of another
vocabulary (rows >= the old size stay zeros, token ids mean other tokens), with tied instead of untied
embeddings (the trained output layer is dropped) or with fewer layers (a shape error whose advice cannot
work) must be refused before anything loads. `model_structure(model_dir)` reads config.json and the
tokenizer files (no model is built); save records it in meta.json ("model"); `structure_differences`
names every field that differs.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from megatron_vppo.config import flatten_dotted

_TEXT_KEYS = ("vocab_size", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
              "num_key_value_heads")
_VISION_KEYS = ("depth", "hidden_size", "out_hidden_size", "intermediate_size", "num_heads", "patch_size",
                "spatial_merge_size", "temporal_patch_size")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                    "special_tokens_map.json")


def tokenizer_digest(model_dir: str | Path) -> str | None:
    """sha256 over the tokenizer files present (None when there are none): same digest, same token ids."""
    h, found = hashlib.sha256(), False
    for name in _TOKENIZER_FILES:
        f = Path(model_dir) / name
        if f.is_file():
            found = True
            h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest() if found else None


def structure_of_config(hf: dict) -> dict:
    """The structural fields of an HF config.json (4.x flat or 5.x `text_config`; nested wins)."""
    text = dict(hf)
    text.update(hf.get("text_config") or {})
    vision = hf.get("vision_config") or {}
    out = {"model_type": hf.get("model_type")}
    out.update({k: text.get(k) for k in _TEXT_KEYS})
    out["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    out["vision"] = {k: vision.get(k) for k in _VISION_KEYS if k in vision} or None
    return out


def model_structure(model_dir: str | Path) -> dict:
    """`structure_of_config` of `model_dir/config.json` plus the tokenizer's digest."""
    hf = json.loads((Path(model_dir) / "config.json").read_text())
    return {**structure_of_config(hf), "tokenizer_sha256": tokenizer_digest(model_dir)}


def structure_differences(saved: dict | None, now: dict) -> list[str]:
    """'field: saved -> now' for every structural field that differs (a field only one side records is
    or leaves empty is not compared; no record at all, from an older checkpoint, compares nothing)."""
    if not isinstance(saved, dict):
        return []
    a, b = flatten_dotted(saved), flatten_dotted(now)
    out = []
    for key in sorted(set(a) & set(b)):
        if a[key] is not None and b[key] is not None and a[key] != b[key]:
            if key == "tokenizer_sha256":
                out.append("tokenizer (another vocabulary or token ids: tokenizer files differ)")
            else:
                out.append(f"{key}: {a[key]!r} -> {b[key]!r}")
    return out
