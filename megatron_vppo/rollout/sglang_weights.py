"""Colocated SGLang weight updates: one serialized payload per engine TP rank, each from its own GPU.

SGLang 0.5.23's `Engine.update_weights_from_tensor(named_tensors=[p_0, ..., p_{tp-1}],
load_format="flattened_bucket")` hands the list to every scheduler rank, and rank i deserializes only
p_i (`TpModelWorker.deserialize_own_rank`): a CUDA IPC handle it opens on its own GPU. So the trainer
rank that shares GPU i with engine rank i packs the bucket there (every rank receives the full
HF-layout stream, bucket by bucket: `sync.engine_push` streams to all ranks), serializes it, and the engine's
first rank gathers the payloads (gloo) and makes the one call — the order SGLang's own
`weight_sync.utils.update_weights` helper uses (gather_object to the engine's first rank).

A payload is SGLang's flattened-bucket dict: {"flattened_tensor": 1-D uint8 buffer, "metadata":
[FlattenedTensorMetadata(name, shape, dtype, start_idx, end_idx, numel)]} with byte offsets; SGLang
rebuilds each tensor as `flat[start_idx:end_idx].view(dtype).reshape(shape)`.

Lock-step rounds keep every participant in the same collective: each round, every rank contributes
("payload", bytes), ("error", message) or ("done", None); the engine rank decides — apply the
payloads, stop when all are done, or fail — and broadcasts the decision. A rank whose stream breaks
or ends early can never leave another waiting in a gather.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from megatron_vppo.distributed import GLOO_TIMEOUT, ParallelDims
from megatron_vppo.sync.buckets import Bucket, WeightStream, iter_buckets, tensor_nbytes

DONE = ("done", None)
NEXT, STOP = "next", "stop"


def bucket_payloads(bucket: Bucket, metadata_cls: Callable = dict) -> list[dict]:
    """SGLang flattened-bucket payloads for one bucket, one per dtype buffer (no copy: the uint8
    buffer is a view of the bucket's). `metadata_cls` is SGLang's `FlattenedTensorMetadata` when the
    payload is sent; dict for inspection."""
    out = []
    for dtype, buf in bucket.buffers.items():
        size = torch.empty((), dtype=dtype).element_size()
        metas = [
            metadata_cls(
                name=m.name,
                shape=torch.Size(m.shape),
                dtype=m.dtype,
                start_idx=m.offset * size,
                end_idx=(m.offset + m.numel) * size,
                numel=m.numel * size,  # bytes, as SGLang's own FlattenedTensorBucket records it
            )
            for m in bucket.metas
            if m.dtype == dtype
        ]
        out.append({"flattened_tensor": buf.view(torch.uint8), "metadata": metas})
    return out


def as_buckets(stream: WeightStream, bucket_bytes: int | None) -> Iterator[Bucket]:
    """Buckets as they come; loose (name, tensor) pairs are packed to `bucket_bytes`."""
    loose: list = []
    loose_bytes = 0
    for item in stream:
        if isinstance(item, Bucket):
            if loose:
                yield from iter_buckets(loose, bucket_bytes)
                loose, loose_bytes = [], 0
            yield item
        else:
            loose.append(item)
            loose_bytes += tensor_nbytes(item[1])  # a running total: re-summing is quadratic in tensors
            if bucket_bytes and loose_bytes >= bucket_bytes:
                yield from iter_buckets(loose, bucket_bytes)
                loose, loose_bytes = [], 0
    if loose:
        yield from iter_buckets(loose, bucket_bytes)


def contributions(stream: WeightStream, bucket_bytes: int | None, serialize: Callable[[dict], bytes]) -> Iterator[tuple]:
    """This rank's round contributions: a payload per (bucket, dtype), then "done" for ever. The
    bucket stays referenced until the round that carries it is over (SGLang reads it through IPC);
    a failure becomes one ("error", message) and ends the payloads."""
    try:
        for bucket in as_buckets(stream, bucket_bytes):
            for payload in bucket_payloads(bucket, dict):
                yield ("payload", serialize(payload))
            del bucket, payload  # before the next bucket is packed: one bucket alive at a time
    except Exception as e:  # noqa: BLE001 — reported in the round, raised by every rank
        yield ("error", f"{type(e).__name__}: {e}")
        return
    while True:
        yield DONE


def decide(gathered: Sequence[tuple], apply: Callable[[list[bytes]], None]) -> object:
    """The engine rank's verdict on one round (pure apart from `apply`)."""
    kinds = [k for k, _ in gathered]
    if all(k == "done" for k in kinds):
        return STOP
    errors = [f"engine TP rank {i}: {msg}" for i, (k, msg) in enumerate(gathered) if k == "error"]
    if errors:
        return ("failed", "; ".join(errors))
    if "done" in kinds:
        return ("failed", f"the weight stream ended early on engine TP ranks "
                          f"{[i for i, k in enumerate(kinds) if k == 'done']} (streams disagree)")
    try:
        apply([p for _, p in gathered])
    except Exception as e:  # noqa: BLE001 — broadcast, then raised on every rank
        return ("failed", f"{type(e).__name__}: {e}")
    return NEXT


def run_rounds(contribs: Iterator[tuple], group, src: int, is_src: bool,
               apply: Callable[[list[bytes]], None] | None) -> int:
    """Lock-step rounds until every participant is done; returns the number of applied rounds.
    `group` None: a single participant (engine TP 1). Raises on every rank if a round failed."""
    applied = 0
    while True:
        mine = next(contribs)
        if group is None:
            gathered = [mine]
        else:
            gathered = [None] * dist.get_world_size(group) if is_src else None
            dist.gather_object(mine, gathered, dst=src, group=group)
        verdict = [decide(gathered, apply) if is_src else None]
        if group is not None:
            dist.broadcast_object_list(verdict, src=src, group=group)
        if verdict[0] == STOP:
            return applied
        if verdict[0] != NEXT:
            raise RuntimeError(f"SGLang weight update failed: {verdict[0][1]}")
        applied += 1


def engine_groups(dims: ParallelDims):
    """(this rank's gloo group over its engine's ranks, the engine's first global rank). An engine spans
    `dims.engine_tp` consecutive ranks (`ParallelDims.engine_ranks`): consecutive local ranks, so
    consecutive GPUs of one node, which is where SGLang puts engine TP rank i (base_gpu_id + i).
    Collective over all ranks (every rank makes every group, in the same order). With engine_tp == 1
    there is nothing to gather: (None, this rank)."""
    if dims.engine_tp == 1:
        return None, dist.get_rank()
    groups = [dist.new_group(list(range(first, first + dims.engine_tp)), backend="gloo", timeout=GLOO_TIMEOUT)
              for first in range(0, dims.world_size, dims.engine_tp)]
    return groups[dims.engine_index], dims.engine_ranks[0]


def min_free_bytes(group) -> int:
    """The least free accelerator memory over the engine's GPUs (after the trainer's cache is emptied):
    SGLang sizes every rank from the smallest (its `get_available_gpu_memory(distributed=True)`)."""
    torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info()[0]
    if group is None:
        return int(free)
    got = [None] * dist.get_world_size(group)
    dist.all_gather_object(got, int(free), group=group)
    return int(min(got))


def mem_fraction_static(gpu_share: float, total_bytes: int, free_bytes: int) -> float:
    """SGLang's `mem_fraction_static` for an engine that may use `gpu_share` of the GPU's total memory.

    SGLang 0.5.23 measures the memory free when its model runner starts (after our model and optimizer)
    and budgets weights + KV cache as mem_fraction_static x that free memory
    (`KVCacheConfigurator._profile_available_bytes`), so the fraction is share x total / free."""
    if not 0.0 < gpu_share < 1.0:
        raise ValueError(f"rollout.engine_gpu_share={gpu_share} must be in (0, 1)")
    want, free = gpu_share * total_bytes, free_bytes
    frac = want / free if free > 0 else float("inf")
    if frac > 0.95:
        gib = 2**30
        raise ValueError(
            f"the rollout engine may use {want / gib:.1f} GiB (rollout.engine_gpu_share={gpu_share} of "
            f"{total_bytes / gib:.1f} GiB) but only {free / gib:.1f} GiB are free after the trainer's model and "
            f"optimizer; lower rollout.engine_gpu_share or pick a layout with less static memory "
            f"(tools/tune_parallelism.py --rollout-share {gpu_share})")
    return round(frac, 4)
