"""The export plan: what the weight stream will carry, known on every rank before any tensor moves.

Design decision 5: weights move as a stream of `(hf_name, tensor)` pairs (sync/stream.py). Before it
runs, per data-parallel replica:

1. metadata pre-pass: every pipeline stage all-gathers, over the pipeline group, the global names,
   full (TP-gathered) shapes and dtypes of its parameters, so every rank knows the global order, the
   owning stage and the bytes of every tensor;
2. parameters are grouped for conversion (`adapter.export_group_key`): a language-model parameter
   converts alone, any other top-level module (the vision tower) converts as one group, because its
   adapter needs all of its tensors at once. A group whose conversion yields nothing (a tied output
   layer) is never sent. Every rank runs the adapter on "meta" tensors, so a name the adapter does not
   know fails on every rank at once, before any communication.

The order is deterministic: model-chunk order (virtual stage v of pipeline stage p for v, then p),
parameter registration order inside a chunk, and the adapter's order inside a group. The plan is
cached while the parameters are unchanged; its manifest lets a consumer validate a whole update before
the first tensor moves.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from megatron_vppo.checkpoint.hf_load import chunk_list, global_param_names
from megatron_vppo.errors import ExportError
from megatron_vppo.distributed import ParallelDims

DESTINATIONS = ("rank0", "replica", "all")


@dataclass(frozen=True)
class ParamMeta:
    """One Megatron parameter as every rank sees it after the pre-pass."""

    name: str  # global, canonical Megatron name
    shape: tuple[int, ...]  # FULL shape (TP shards concatenated along tp_dim)
    dtype: torch.dtype
    stage: int  # pipeline rank that owns it
    chunk: int  # virtual pipeline chunk on that stage
    tp_dim: int | None  # partition_dim when TP-sharded, else None

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


@dataclass(frozen=True)
class ExportGroup:
    """Megatron parameters converted together, and the HF tensors (name, shape, dtype) they give."""

    params: tuple[ParamMeta, ...]
    hf: tuple[tuple[str, tuple[int, ...], torch.dtype], ...]

    @property
    def stage(self) -> int:
        return self.params[0].stage

    @property
    def hf_nbytes(self) -> int:
        total = 0
        for _, shape, dtype in self.hf:
            n = 1
            for s in shape:
                n *= s
            total += n * dtype.itemsize
        return total


@dataclass(frozen=True)
class ExportPlan:
    """The whole stream, known on every rank before any tensor moves: parameters and conversion groups."""

    metas: tuple[ParamMeta, ...]
    groups: tuple[ExportGroup, ...]

    def manifest(self, dtype: torch.dtype | None = None) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """(hf_name, shape, dtype) of every tensor the stream yields, in stream order (`dtype`: the
        stream's cast, if any)."""
        return [(n, s, dtype or d) for g in self.groups for n, s, d in g.hf]

    @property
    def nbytes(self) -> int:
        return sum(g.hf_nbytes for g in self.groups)


def comm_device() -> torch.device:
    """Where tensors for a collective live: the current GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


LocalParams = list[list[tuple[str, torch.nn.Parameter]]]


def local_params(model_chunks, adapter) -> LocalParams:
    """Per chunk, (canonical Megatron name, parameter) of this rank's parameters."""
    return [[(adapter.canonical_mcore_name(n), p) for n, p in global_param_names(c).items()]
            for c in chunk_list(model_chunks)]


def _local_metadata(local: LocalParams, tp: int) -> list[tuple]:
    """(name, full shape, dtype name, chunk, tp_dim) of this stage's parameters."""
    out = []
    for v, params in enumerate(local):
        for name, p in params:
            sharded = bool(getattr(p, "tensor_model_parallel", False)) and tp > 1
            shape = list(p.shape)
            dim = int(p.partition_dim) if sharded else None
            if sharded:
                shape[dim] *= tp
            out.append((name, tuple(shape), str(p.dtype).removeprefix("torch."), v, dim))
    return out


def _gather_metadata(local_meta: list[tuple], dims: ParallelDims) -> list[ParamMeta]:
    per_stage = [local_meta]
    if dims.pp > 1:
        per_stage = [None] * dims.pp
        dist.all_gather_object(per_stage, local_meta, group=dims.pp_group)
    num_chunks = max(v for stage in per_stage for *_, v, _ in stage) + 1 if any(per_stage) else 0
    out: list[ParamMeta] = []
    seen: set[str] = set()
    for v in range(num_chunks):
        for s, stage in enumerate(per_stage):
            for name, shape, dtype, chunk, dim in stage:
                if chunk != v:
                    continue
                if name in seen:
                    raise ExportError(f"parameter {name!r} is held by two pipeline stages; the model's "
                                      "global layer numbering is broken")
                seen.add(name)
                out.append(ParamMeta(name, shape, getattr(torch, dtype), s, v, dim))
    return out


def plan_export(
    metas: Sequence[ParamMeta], adapter, group_key: Callable[[str], str] | None = None
) -> list[ExportGroup]:
    """Group parameters for conversion and learn each group's HF outputs by converting meta tensors.

    Runs identically on every rank, so an unknown name raises everywhere before any tensor moves."""
    key = group_key or adapter.export_group_key
    buckets: dict[tuple[int, str], list[ParamMeta]] = {}
    for m in metas:  # dicts keep first-appearance order: the stream order of groups
        buckets.setdefault((m.stage, key(m.name)), []).append(m)
    groups, produced = [], {}
    for params in buckets.values():
        fake = {m.name: torch.empty(m.shape, dtype=m.dtype, device="meta") for m in params}
        try:
            hf = adapter.mcore_to_hf(fake)
        except Exception as e:  # noqa: BLE001 — re-raised with the group named
            raise ExportError(
                f"the weight adapter cannot convert {[m.name for m in params][:4]} to HF layout "
                f"({type(e).__name__}: {e}); the model and its adapter disagree"
            ) from e
        for name in hf:
            if name in produced:
                raise ExportError(f"HF tensor {name!r} is produced by both {produced[name]!r} and "
                                  f"{params[0].name!r}")
            produced[name] = params[0].name
        if hf:
            groups.append(ExportGroup(tuple(params), tuple((n, tuple(t.shape), t.dtype) for n, t in hf.items())))
    return groups


# A few recent plans, reused while the model's parameters (names, shapes, dtypes, TP sharding) and the
# adapter are the same: the pre-pass pickles metadata across the pipeline and converts every group on
# meta tensors, which at a weight sync per step costs as much as copying a small model's bytes.
_PLAN_CACHE: list[tuple[object, object, tuple, ExportPlan]] = []
_PLAN_CACHE_SIZE = 4


def export_plan(model_chunks, adapter, group_key: Callable[[str], str] | None = None, *,
                dims: ParallelDims) -> ExportPlan:
    """Metadata pre-pass + conversion plan (collective over the pipeline group), cached per model."""
    return plan_for(local_params(model_chunks, adapter), adapter, group_key, dims=dims)


def plan_for(local: LocalParams, adapter, group_key: Callable[[str], str] | None = None, *,
             dims: ParallelDims) -> ExportPlan:
    """`export_plan` from `local_params`' result (collective over the pipeline group).

    A cached plan is used only when every pipeline stage has one for its unchanged parameters (one
    integer all-reduce decides), so stages never disagree about running the pre-pass."""
    meta = _local_metadata(local, dims.tp)
    sig = tuple(meta)
    hit = next((plan for a, k, s, plan in _PLAN_CACHE if a is adapter and k is group_key and s == sig), None)
    if dims.pp > 1:
        flag = torch.tensor([0 if hit is None else 1], dtype=torch.int32, device=comm_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=dims.pp_group)
        if not flag.item():
            hit = None
    if hit is not None:
        return hit
    metas = _gather_metadata(meta, dims)
    plan = ExportPlan(tuple(metas), tuple(plan_export(metas, adapter, group_key)))
    _PLAN_CACHE.insert(0, (adapter, group_key, sig, plan))
    del _PLAN_CACHE[_PLAN_CACHE_SIZE:]
    return plan


def export_manifest(model_chunks, adapter, group_key=None, *, dims: ParallelDims
                    ) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(hf_name, shape, dtype) of every tensor the stream will yield, in stream order — known before any
    tensor moves, so a consumer can validate a whole update up front (collective over the pipeline)."""
    return export_plan(model_chunks, adapter, group_key, dims=dims).manifest()
