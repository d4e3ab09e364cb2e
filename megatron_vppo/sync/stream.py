"""Stream a TP/PP-sharded Megatron model's weights out in Hugging Face names and layout.

One stream feeds the rollout engines (sync/engine_push.py, optionally packed into byte-bounded
`sync.buckets.Bucket`s) and the HF checkpoint writer (sync/hf_writer.py). Per data-parallel replica,
after the plan (sync/plan.py): per parameter, the owning stage gathers the TP shards along
`partition_dim` (the FULL Megatron layout, whose chunk r is TP rank r's shard) and sends it over the
pipeline group to the destination rank(s); there the model's adapter (`mcore_to_hf`) turns each group
into HF tensors (QKV un-interleave, gate/up split, vocab padding removed, no lm_head when embeddings
are tied).

Before the first tensor moves, every rank completes the distributed optimizer's deferred parameter
all-gather (`distributed.force_param_sync`; with overlap_param_gather the shards of other DP ranks
would otherwise be the previous step's).

Destinations (`dst`): "rank0" (global rank 0 only), "replica" (the first rank — TP 0, PP 0 — of every
data-parallel replica; each replica streams independently), "all" (every rank: each (DP, CP) replica
streams independently, every rank of it receiving every full tensor — engines on every rank). Other ranks yield
nothing but MUST still iterate the stream to its end: it is a collective (`drain`).

At TP1 on the destination stage the yielded tensors may alias the live parameters (no copy is made);
clone a tensor you keep past the next optimizer step.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from megatron_vppo import distributed
from megatron_vppo.distributed import ParallelDims
from megatron_vppo.sync.buckets import DEFAULT_BUCKET_BYTES, Bucket, iter_buckets
from megatron_vppo.sync.plan import (DESTINATIONS, ExportError, ExportPlan, LocalParams, ParamMeta, comm_device,
                                     local_params, plan_for)


class _Buffers:
    """Receive buffers for one stream. With `reuse` a buffer returns to a free list (per shape, dtype,
    device) once the group it served has been consumed, so the repeated shapes of a layer stack are
    allocated once per stream instead of once per tensor (fresh CPU buffers cost page faults)."""

    def __init__(self, reuse: bool):
        self.reuse = reuse
        self.free: dict[tuple, list[torch.Tensor]] = {}
        self.used: list[tuple[tuple, torch.Tensor]] = []

    def empty(self, shape, dtype, device) -> torch.Tensor:
        if not self.reuse:
            return torch.empty(shape, dtype=dtype, device=device)
        key = (tuple(shape), dtype, torch.device(device))
        free = self.free.get(key)
        buf = free.pop() if free else torch.empty(shape, dtype=dtype, device=device)
        self.used.append((key, buf))
        return buf

    def release(self) -> None:
        for key, buf in self.used:
            self.free.setdefault(key, []).append(buf)
        self.used.clear()


def export_hf_weights(
    model_chunks,
    adapter,
    *,
    dst: str = "rank0",
    dtype: torch.dtype | None = None,
    group_key: Callable[[str], str] | None = None,
    plan: ExportPlan | None = None,
    reuse_buffers: bool = False,
    dims: ParallelDims,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(hf_name, tensor)` for the whole model on the destination rank(s); see the module doc.

    Collective: every rank of the model must iterate it to the end (non-destinations yield nothing).
    `dtype` casts the yielded tensors (e.g. to the engine's dtype); None keeps the parameters' dtype.
    `plan`: an `export_plan` already computed on every rank (skips the pre-pass). `reuse_buffers`:
    received tensors live in buffers reused later in the stream, so a yielded tensor is valid only
    until the next item is requested — for consumers that copy each tensor as it arrives. `dims`:
    this rank's layout (`init_distributed`'s result).
    """
    if dst not in DESTINATIONS:
        raise ValueError(f"dst={dst!r}: use one of {DESTINATIONS}")
    return hf_stream(model_chunks, adapter, dims, dst=dst, dtype=dtype,
                     group_key=group_key, plan=plan, reuse_buffers=reuse_buffers)


def hf_stream(model_chunks, adapter, dims: ParallelDims, *, dst: str, dtype: torch.dtype | None = None,
              group_key: Callable[[str], str] | None = None, plan: ExportPlan | None = None,
              local: LocalParams | None = None, reuse_buffers: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """The generator behind `export_hf_weights` (arguments checked by the caller; `local`: this rank's
    `plan.local_params`, when the caller has it already)."""
    # Every rank, before any rank returns: after a distributed-optimizer step with overlapped param
    # gathers, each DP rank holds only its own updated shard until this all-gather completes.
    distributed.force_param_sync(model_chunks)
    if (dims.cp_rank != 0 and dst != "all") or (dst == "rank0" and dims.dp_rank != 0):
        return  # identical replicas; another rank streams this model (with "all", every CP rank streams its own)
    local = local or local_params(model_chunks, adapter)
    groups = (plan or plan_for(local, adapter, group_key, dims=dims)).groups
    params = {n: p for chunk in local for n, p in chunk}
    everywhere = dst == "all"
    tp, pp, tp_rank, pp_rank = dims.tp, dims.pp, dims.tp_rank, dims.pp_rank
    is_dst = everywhere or (tp_rank == 0 and pp_rank == 0)
    dev = comm_device()
    tp_root = dist.get_global_rank(dims.tp_group, 0) if tp > 1 else None
    pp_first = dist.get_global_rank(dims.pp_group, 0) if pp > 1 else None
    bufs = _Buffers(reuse_buffers)
    # A conversion that fails on this rank (out of memory in a cast, an adapter bug the meta-tensor
    # plan missed) must not end the generator early: the other ranks are still in this stream's
    # gathers / sends and would block forever. Stop yielding, keep moving tensors, raise at the end.
    failed: BaseException | None = None

    for grp in groups:
        full: dict[str, torch.Tensor] = {}
        for m in grp.params:
            t = None
            if m.stage == pp_rank:
                t = params[m.name].detach()
                if m.tp_dim is not None:
                    t = _gather_tp(t, m.tp_dim, dims, tp_root, everywhere, bufs)
            if pp > 1 and (everywhere or (m.stage != 0 and tp_rank == 0)):
                t = _move_stage(t, m, dims, pp_first, everywhere, dev, bufs)
            if is_dst:
                full[m.name] = t
        if is_dst and failed is None:
            try:
                hf = adapter.mcore_to_hf(full)
            except Exception as e:  # noqa: BLE001 — raised after the collectives, below
                failed, hf = e, None
            del full
            for name, _, _ in grp.hf if hf is not None else ():
                try:
                    t = hf.pop(name)
                    t = t if dtype is None else t.to(dtype)
                except Exception as e:  # noqa: BLE001
                    failed = e
                    break
                yield name, t
        bufs.release()
    if failed is not None:
        raise ExportError(
            f"converting the weight stream to HF layout failed on this rank ({type(failed).__name__}: "
            f"{failed}); the stream was run to its end so the other ranks are not left waiting"
        ) from failed


def _gather_tp(t, dim, dims: ParallelDims, tp_root, everywhere, bufs: _Buffers):
    """Full tensor on TP rank 0 (or on every TP rank when `everywhere`); None elsewhere."""
    tp, group = dims.tp, dims.tp_group
    t = t.contiguous()  # parameters are: no copy
    receiving = everywhere or dims.tp_rank == 0
    full = parts = None
    full_shape = (*t.shape[:dim], t.shape[dim] * tp, *t.shape[dim + 1 :])
    if receiving:
        if dim == 0:  # shards are contiguous slices of the full tensor: receive in place, no concat
            full = bufs.empty(full_shape, t.dtype, t.device)
            parts = list(full.chunk(tp, dim=0))
        else:
            parts = [bufs.empty(t.shape, t.dtype, t.device) for _ in range(tp)]
    if everywhere:
        dist.all_gather(parts, t, group=group)
    else:
        dist.gather(t, parts, dst=tp_root, group=group)
        if dims.tp_rank != 0:
            return None
    if full is None:
        full = torch.cat(parts, dim=dim, out=bufs.empty(full_shape, t.dtype, t.device))
    return full


def _move_stage(t, m: ParamMeta, dims: ParallelDims, pp_first, everywhere, dev, bufs: _Buffers):
    """Bring the owning stage's full tensor to pipeline stage 0 (or to every stage)."""
    group, pp_rank = dims.pp_group, dims.pp_rank
    if everywhere:
        buf = t.contiguous() if pp_rank == m.stage else bufs.empty(m.shape, m.dtype, dev)
        dist.broadcast(buf, src=dist.get_global_rank(group, m.stage), group=group)
        return buf
    if pp_rank == m.stage:
        dist.send(t.contiguous(), dst=pp_first, group=group)
        return None
    if pp_rank == 0:
        buf = bufs.empty(m.shape, m.dtype, dev)
        dist.recv(buf, src=dist.get_global_rank(group, m.stage), group=group)
        return buf
    return None


def export_hf_buckets(
    model_chunks, adapter, bucket_bytes: int | None = DEFAULT_BUCKET_BYTES, **kwargs
) -> Iterator[Bucket]:
    """`export_hf_weights` packed into byte-bounded buckets (`sync.buckets.iter_buckets`;
    None or <= 0: one bucket). Same collective contract."""
    return iter_buckets(export_hf_weights(model_chunks, adapter, **kwargs), bucket_bytes)


def drain(stream: Iterable) -> int:
    """Run a stream to its end (what non-destination ranks do); returns the number of items."""
    n = 0
    for _ in stream:
        n += 1
    return n
