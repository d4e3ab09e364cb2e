"""Rollout engines (see engine.py for the contract) and bucketed weight sync.

`hf_engine` (transformers, CPU / GPU fallback) and `sglang_engine` (GPU) are imported on demand;
SGLang itself is imported only when an SGLang engine is constructed.
"""
from megatron_vppo.rollout.buckets import DEFAULT_BUCKET_BYTES, Bucket, iter_buckets, pack_bucket, unpack_bucket
from megatron_vppo.rollout.engine import RolloutEngine, RolloutOutput, RolloutRequest, SamplingParams

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "Bucket",
    "RolloutEngine",
    "RolloutOutput",
    "RolloutRequest",
    "SamplingParams",
    "iter_buckets",
    "pack_bucket",
    "unpack_bucket",
]
