"""The `MODELS` registry: model name (`model.arch`) -> `ModelSpec` (models/spec.py).

Adding a model is one folder (`models/<name>/`, with a `spec.py` defining `SPEC`) and one line below;
`train/` and `algo/` do not change. A name's module is imported when the name is looked up, so
`from megatron_vppo.models import MODELS` imports neither Megatron nor transformers.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from megatron_vppo.lazy_registry import LazyRegistry
from megatron_vppo.models.spec import ImageGeometry, ModelSpec


MODELS: Mapping = LazyRegistry("model arch", {
    "qwen2_5_vl": "megatron_vppo.models.qwen2_5_vl.spec:SPEC",
    "qwen3_vl": "megatron_vppo.models.qwen3_vl.spec:SPEC",
})


def spec_for_hf_config(hf_config) -> ModelSpec:
    """The spec whose `hf_model_types` holds an HF config's `model_type` (a dict, config.json or its
    directory): how tools that get only a directory pick the model."""
    cfg = hf_config
    if not isinstance(cfg, dict):
        p = Path(cfg)
        p = p / "config.json" if p.is_dir() else p
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no config.json; pass a Hugging Face model directory")
        cfg = json.loads(p.read_text())
    model_type = cfg.get("model_type")
    for name in MODELS:
        spec = MODELS[name]
        if model_type in spec.hf_model_types:
            return spec
    known = {n: list(MODELS[n].hf_model_types) for n in MODELS}
    raise KeyError(f"config.json model_type {model_type!r} has no model in megatron_vppo.models.MODELS "
                   f"(known model_types per arch: {known}); add the model's folder and registry line")


def check_hf_config(spec: ModelSpec, hf_config: dict, where: str = "model.path") -> None:
    """Refuse an HF config whose `model_type` belongs to another model than `spec` (`model.arch`)."""
    model_type = hf_config.get("model_type")
    if model_type is not None and model_type not in spec.hf_model_types:
        raise ValueError(f"model.arch={spec.name} reads config.json model_type {list(spec.hf_model_types)}, but "
                         f"{where} has model_type {model_type!r}; set model.arch to the model of that directory")


__all__ = ["MODELS", "ImageGeometry", "ModelSpec", "check_hf_config", "spec_for_hf_config"]
