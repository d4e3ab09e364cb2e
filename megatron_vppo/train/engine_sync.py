"""The trainer's weight sync into its rollout engines: refuse non-finite weights, push them to every
rank (engines sit on every rank: `ParallelDims.engine_tp` consecutive ranks per engine), then check that
every engine holds the same weight version."""
from __future__ import annotations

from megatron_vppo.distributed import ParallelDims
from megatron_vppo.sync.engine_push import check_engine_versions, push_to_engine
from megatron_vppo.train.nonfinite import check_finite


def sync_engine_weights(model_chunks, adapter, engine, *, engine_cls: type, bucket_bytes: int | None,
                        dims: ParallelDims, step: int) -> None:
    """Stream HF-layout weights from the sharded trainer into every engine (collective).

    `engine_cls`: `ENGINES[rollout.engine]` (the same on every rank, unlike `engine`, None where a rank
    holds none); `step`: named by the non-finite check, which refuses on every rank before anything moves.
    Every rank hosts an engine or an engine TP rank (a colocated SGLang TP rank packs its payload on its
    own GPU), so every rank receives the full tensors, one conversion group at a time (dst "all"; a
    1-rank world is the same stream); afterwards every engine's `weight_version` must agree."""
    check_finite(model_chunks, what="engine weight update", step=step)
    push_to_engine(model_chunks, adapter, engine, bucket_bytes=bucket_bytes, dst="all", dims=dims)
    check_engine_versions(engine, getattr(engine_cls, "__name__", str(engine_cls)))
