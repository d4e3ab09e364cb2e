"""The trainer's weight sync into its rollout engine: refuse non-finite weights, then push them where
the engine class says it reads them (`RolloutEngine.weights_on_every_tp_rank`)."""
from __future__ import annotations

from megatron_vppo.distributed import ParallelDims
from megatron_vppo.sync.engine_push import push_to_engine
from megatron_vppo.train.nonfinite import check_finite


def sync_engine_weights(model_chunks, adapter, engine, *, engine_cls: type, bucket_bytes: int | None,
                        dims: ParallelDims, step: int) -> None:
    """Stream HF-layout weights from the sharded trainer into each replica's engine (collective).

    `engine_cls`: `ENGINES[rollout.engine]` (the same on every rank, unlike `engine`, None where a rank
    holds none); `step`: named by the non-finite check, which refuses on every rank before anything moves."""
    check_finite(model_chunks, what="engine weight update", step=step)
    # An engine that reads one payload per TP rank (colocated SGLang packs each on that rank's own GPU)
    # needs the full tensors on every rank, not only on the replica's first.
    dst = "all" if engine_cls.weights_on_every_tp_rank and dims.tp > 1 else "replica"
    push_to_engine(model_chunks, adapter, engine, bucket_bytes=bucket_bytes, dst=dst, dims=dims)
