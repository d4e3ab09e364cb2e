"""Stream a TP/PP-sharded Megatron model's weights out in Hugging Face names and layout.

Design decision 5: weights move as a stream of `(hf_name, tensor)` pairs. One stream feeds the rollout
engines (`update_weights`, optionally packed into byte-bounded `rollout.buckets.Bucket`s) and the HF
checkpoint writer (`save_hf_checkpoint`). How it is produced, per data-parallel replica:

1. metadata pre-pass: every pipeline stage all-gathers, over the pipeline group, the global names,
   full (TP-gathered) shapes and dtypes of its parameters, so every rank knows the global order, the
   owning stage and the bytes of every tensor before any tensor moves;
2. parameters are grouped for conversion (`export_group_key`): a language-model parameter converts
   alone, any other top-level module (the vision tower) converts as one group, because its adapter
   needs all of its tensors at once. A group whose conversion yields nothing (a tied output layer)
   is never sent. Every rank runs the adapter on "meta" tensors first, so a name the adapter does not
   know fails on every rank at once, before any communication;
3. per parameter, the owning stage gathers the TP shards along `partition_dim` (the FULL Megatron
   layout, whose chunk r is TP rank r's shard) and sends it over the pipeline group to the
   destination rank(s); there the model's adapter (`mcore_to_hf`) turns each group into HF tensors
   (QKV un-interleave, gate/up split, vocab padding removed, no lm_head when embeddings are tied).

Before the first tensor moves, every rank completes the distributed optimizer's deferred parameter
all-gather (`train.optimizer.force_param_sync`; with overlap_param_gather the shards of other DP ranks
would otherwise be the previous step's).

Destinations (`dst`): "rank0" (global rank 0 only), "replica" (the first rank — TP 0, PP 0 — of every
data-parallel replica; each replica streams independently), "all" (every rank). Other ranks yield
nothing but MUST still iterate the stream to its end: it is a collective. The order is deterministic:
model-chunk order (virtual stage v of pipeline stage p for v, then p), parameter registration order
inside a chunk, and the adapter's order inside a group.

At TP1 on the destination stage the yielded tensors may alias the live parameters (no copy is made);
clone a tensor you keep past the next optimizer step. The pre-pass result (`export_plan`) is cached
while the parameters are unchanged, and its manifest lets a consumer validate a whole update before
the first tensor moves. `push_to_engine` feeds an in-process engine the plain stream with reused
receive buffers (it copies each tensor into its parameter as it arrives: in-place mode) and other
engines byte-bounded buckets.

Also here: the HF checkpoint writer (`save_hf_checkpoint`, `export_hf_checkpoint`) and the atomic
directory publishing it shares with `model_checkpoint.save_model_checkpoint`.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

from megatron_vppo.checkpoint.dist_checkpoint import _fsync_dir, all_ranks_ok
from megatron_vppo.checkpoint.hf_load import global_param_names
from megatron_vppo.megatron_cpu import without_device_redirect
from megatron_vppo.rollout.buckets import DEFAULT_BUCKET_BYTES, Bucket, iter_buckets, iter_named_tensors

DESTINATIONS = ("rank0", "replica", "all")

# Files that make an HF directory usable besides its weights (tokenizer, processor, chat template).
HF_SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "qwen.tiktoken",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
)


class ExportError(RuntimeError):
    """The export could not be produced or written; the message names what and the fix."""


# ----------------------------------------------------------------------------- metadata


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


def _chunks(model_chunks) -> list[torch.nn.Module]:
    return list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]


def _parallel():
    """(tp_group, tp, tp_rank, pp_group, pp, pp_rank) — trivial values without Megatron groups."""
    from megatron.core import parallel_state as ps

    if not (dist.is_initialized() and ps.model_parallel_is_initialized()):
        return None, 1, 0, None, 1, 0
    return (
        ps.get_tensor_model_parallel_group(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_tensor_model_parallel_rank(),
        ps.get_pipeline_model_parallel_group(),
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_rank(),
    )


def _local_params(model_chunks, adapter) -> list[list[tuple[str, torch.nn.Parameter]]]:
    return [[(adapter.canonical_mcore_name(n), p) for n, p in global_param_names(c).items()] for c in _chunks(model_chunks)]


def _local_metadata(local, tp) -> list[tuple]:
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


def _gather_metadata(local_meta: list[tuple], pp_group, pp) -> list[ParamMeta]:
    per_stage = [local_meta]
    if pp > 1:
        per_stage = [None] * pp
        dist.all_gather_object(per_stage, local_meta, group=pp_group)
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


def gather_param_metadata(model_chunks, adapter) -> list[ParamMeta]:
    """Every parameter of the whole model (all stages) in the global stream order (collective over
    the pipeline group)."""
    _, tp, _, pp_group, pp, _ = _parallel()
    return _gather_metadata(_local_metadata(_local_params(model_chunks, adapter), tp), pp_group, pp)


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


# A few recent plans, reused while the model's parameters (names, shapes, dtypes, TP sharding) and the
# adapter are the same: the pre-pass pickles metadata across the pipeline and converts every group on
# meta tensors, which at a weight sync per step costs as much as copying a small model's bytes.
_PLAN_CACHE: list[tuple[object, object, tuple, ExportPlan]] = []
_PLAN_CACHE_SIZE = 4


def export_plan(model_chunks, adapter, group_key: Callable[[str], str] | None = None) -> ExportPlan:
    """Metadata pre-pass + conversion plan (collective over the pipeline group), cached per model.

    A cached plan is used only when every pipeline stage has one for its unchanged parameters (one
    integer all-reduce decides), so stages never disagree about running the pre-pass."""
    return _plan(_local_params(model_chunks, adapter), adapter, group_key)


def _plan(local_params, adapter, group_key) -> ExportPlan:
    _, tp, _, pp_group, pp, _ = _parallel()
    local = _local_metadata(local_params, tp)
    sig = tuple(local)
    hit = next((plan for a, k, s, plan in _PLAN_CACHE if a is adapter and k is group_key and s == sig), None)
    if pp > 1:
        flag = torch.tensor([0 if hit is None else 1], dtype=torch.int32, device=_comm_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=pp_group)
        if not flag.item():
            hit = None
    if hit is not None:
        return hit
    metas = _gather_metadata(local, pp_group, pp)
    plan = ExportPlan(tuple(metas), tuple(plan_export(metas, adapter, group_key)))
    _PLAN_CACHE.insert(0, (adapter, group_key, sig, plan))
    del _PLAN_CACHE[_PLAN_CACHE_SIZE:]
    return plan


# ----------------------------------------------------------------------------- the stream


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


def _comm_device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _replica_ranks():
    """(dp_rank, cp_rank) of this rank (0, 0 without Megatron groups)."""
    from megatron.core import parallel_state as ps

    if not (dist.is_initialized() and ps.model_parallel_is_initialized()):
        return 0, 0
    return ps.get_data_parallel_rank(), ps.get_context_parallel_rank()


def export_hf_weights(
    model_chunks,
    adapter,
    *,
    dst: str = "rank0",
    dtype: torch.dtype | None = None,
    group_key: Callable[[str], str] | None = None,
    plan: ExportPlan | None = None,
    reuse_buffers: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(hf_name, tensor)` for the whole model on the destination rank(s); see the module doc.

    Collective: every rank of the model must iterate it to the end (non-destinations yield nothing).
    `dtype` casts the yielded tensors (e.g. to the engine's dtype); None keeps the parameters' dtype.
    `plan`: an `export_plan` already computed on every rank (skips the pre-pass). `reuse_buffers`:
    received tensors live in buffers reused later in the stream, so a yielded tensor is valid only
    until the next item is requested — for consumers that copy each tensor as it arrives.
    """
    if dst not in DESTINATIONS:
        raise ValueError(f"dst={dst!r}: use one of {DESTINATIONS}")
    return _stream(model_chunks, adapter, None, plan, dst, dtype, group_key, reuse_buffers)


def _stream(model_chunks, adapter, local, plan, dst, dtype, group_key, reuse_buffers):
    from megatron_vppo.train.optimizer import force_param_sync

    # Every rank, before any rank returns: after a distributed-optimizer step with overlapped param
    # gathers, each DP rank holds only its own updated shard until this all-gather completes.
    force_param_sync(model_chunks)
    tp_group, tp, tp_rank, pp_group, pp, pp_rank = _parallel()
    dp_rank, cp_rank = _replica_ranks()
    if cp_rank != 0 or (dst == "rank0" and dp_rank != 0):
        return  # identical replicas; another rank streams this model
    local = local or _local_params(model_chunks, adapter)
    groups = (plan or _plan(local, adapter, group_key)).groups
    params = {n: p for chunk in local for n, p in chunk}
    everywhere = dst == "all"
    is_dst = everywhere or (tp_rank == 0 and pp_rank == 0)
    dev = _comm_device()
    tp_root = dist.get_global_rank(tp_group, 0) if tp > 1 else None
    pp_first = dist.get_global_rank(pp_group, 0) if pp > 1 else None
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
                    t = _gather_tp(t, m.tp_dim, tp_group, tp, tp_rank, tp_root, everywhere, bufs)
            if pp > 1 and (everywhere or (m.stage != 0 and tp_rank == 0)):
                t = _move_stage(t, m, pp_group, pp_rank, pp_first, everywhere, dev, bufs)
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


def _gather_tp(t, dim, group, tp, tp_rank, tp_root, everywhere, bufs: _Buffers):
    """Full tensor on TP rank 0 (or on every TP rank when `everywhere`); None elsewhere."""
    t = t.contiguous()  # parameters are: no copy
    receiving = everywhere or tp_rank == 0
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
        if tp_rank != 0:
            return None
    if full is None:
        full = torch.cat(parts, dim=dim, out=bufs.empty(full_shape, t.dtype, t.device))
    return full


def _move_stage(t, m: ParamMeta, group, pp_rank, pp_first, everywhere, dev, bufs: _Buffers):
    """Bring the owning stage's full tensor to pipeline stage 0 (or to every stage)."""
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
    """`export_hf_weights` packed into byte-bounded buckets (`rollout.buckets.iter_buckets`;
    None or <= 0: one bucket). Same collective contract."""
    return iter_buckets(export_hf_weights(model_chunks, adapter, **kwargs), bucket_bytes)


def export_manifest(model_chunks, adapter, group_key=None) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(hf_name, shape, dtype) of every tensor the stream will yield, in stream order — known before any
    tensor moves, so a consumer can validate a whole update up front (collective over the pipeline)."""
    return export_plan(model_chunks, adapter, group_key).manifest()


def export_nbytes(model_chunks, adapter, group_key=None) -> int:
    """Total HF bytes the stream will carry (collective over the pipeline group)."""
    return export_plan(model_chunks, adapter, group_key).nbytes


def drain(stream: Iterable) -> int:
    """Run a stream to its end (what non-destination ranks do); returns the number of items."""
    n = 0
    for _ in stream:
        n += 1
    return n


UPDATE_MODES = ("in_place", "staged")


def push_to_engine(model_chunks, adapter, engine, *, bucket_bytes: int | None = DEFAULT_BUCKET_BYTES,
                   bucketed: bool | None = None, mode: str | None = None, dst: str = "rank0",
                   dtype: torch.dtype | None = None) -> None:
    """Export into `engine.update_weights` on the destination rank(s) (collective over all ranks).

    `engine` may be None on ranks that hold none. An in-process engine (`engine.in_process`, e.g.
    `HFRolloutEngine`) copies each tensor into its parameters as it arrives: it gets the plain stream
    (in reused receive buffers), the stream's manifest (`expected=`, validated before the first copy)
    and `mode` — "in_place" by default (one copy per tensor; a stream that breaks marks the engine
    unusable until a complete update), or "staged" (all or nothing, one extra copy of the model).
    Other engines (SGLang) get byte-bounded buckets of `bucket_bytes`. `bucketed` forces either form.
    If the engine raises, the stream is still run to its end (so no rank hangs in a collective) and
    every rank raises."""
    in_process = bool(getattr(engine, "in_process", False))
    if mode is not None and mode not in UPDATE_MODES:
        raise ValueError(f"mode={mode!r}: use one of {UPDATE_MODES}")
    if mode is not None and engine is not None and not in_process:
        raise ValueError(f"mode={mode!r} applies to in-process engines only; {type(engine).__name__} "
                         "updates from buckets (leave mode unset)")
    if dst not in DESTINATIONS:
        raise ValueError(f"dst={dst!r}: use one of {DESTINATIONS}")
    local = _local_params(model_chunks, adapter)
    plan = _plan(local, adapter, None)  # collective: every rank, whatever its engine
    if bucketed is None:
        bucketed = not in_process
    # reused receive buffers only for a consumer that copies each tensor before asking for the next
    stream = _stream(model_chunks, adapter, local, plan, dst, dtype, None, in_process and not bucketed)
    if bucketed:
        stream = iter_buckets(stream, bucket_bytes)
    err = None
    with without_device_redirect():  # our own copy loop: the CPU adapter's per-call redirect is overhead
        if engine is None:
            drain(stream)
        else:
            try:
                if in_process:
                    engine.update_weights(stream, mode=mode or "in_place", expected=plan.manifest(dtype))
                else:
                    engine.update_weights(stream)
            except Exception as e:  # noqa: BLE001 — finish the collective first
                err = e
                drain(stream)
            else:
                drain(stream)  # an engine that stopped early still owes the other ranks their collectives
    if not all_ranks_ok(err is None):
        if err is not None:
            raise err
        raise ExportError("weight update failed on another rank (see its log); this rank's engine, if any, "
                          "was updated but the update is not consistent across ranks")


# ----------------------------------------------------------------------------- HF checkpoint writer


def _tmp_sibling(out: Path) -> Path:
    return out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"


def copy_side_files(src_dir, dst_dir) -> list[str]:
    """Copy tokenizer / processor / chat-template / generation files (those present) from src_dir."""
    src, dst = Path(src_dir), Path(dst_dir)
    copied = []
    for f in sorted(set(HF_SIDE_FILES) | {p.name for p in src.glob("*.jinja")}):
        if (src / f).is_file():
            shutil.copy2(src / f, dst / f)
            copied.append(f)
    return copied


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename a finished temporary directory to `out` (replacing an old one only if allowed).

    Its files are flushed to disk first: a rename that reaches the disk before the data would leave a
    complete-looking directory of empty files after a power loss."""
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(tmp)
    old = None
    if out.exists():
        if not overwrite:
            raise ExportError(f"{out} already exists; choose another --out or pass overwrite=True")
        old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:  # put the user's previous directory back rather than leave it hidden
            os.rename(old, out)
        raise
    _fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _owned(t: torch.Tensor) -> torch.Tensor:
    """safetensors refuses tensors that share storage (views into one bucket buffer)."""
    t = t.detach().to("cpu").contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def save_hf_checkpoint(
    stream: Iterable,
    out_dir,
    hf_config,
    source_dir=None,
    *,
    max_shard_bytes: int = 2 * 1024**3,
    overwrite: bool = False,
) -> Path:
    """Write a Hugging Face directory from a weight stream ((name, tensor) pairs and/or Buckets).

    Produces safetensors shards (`model.safetensors`, or `model-0000i-of-0000n.safetensors` + the
    index), `config.json` (from `hf_config`: a dict, a config.json path or an HF directory) and the
    tokenizer / processor / chat-template files found in `source_dir`. Written into a temporary sibling
    directory and renamed into place at the end, so `out_dir` is either complete or untouched.
    At most one shard (`max_shard_bytes`) is held in memory besides the stream's own tensors."""
    from safetensors.torch import save_file

    from megatron_vppo.models.qwen2_5_vl.config import load_hf_config

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; choose another output directory or pass overwrite=True")
    config = load_hf_config(hf_config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(out)
    tmp.mkdir()
    try:
        shards: list[tuple[str, list[str], int]] = []
        pending: dict[str, torch.Tensor] = {}
        size, total, seen = 0, 0, set()

        def flush():
            nonlocal pending, size
            fname = f"part-{len(shards):05d}.safetensors"
            save_file(pending, str(tmp / fname), metadata={"format": "pt"})
            shards.append((fname, list(pending), size))
            pending, size = {}, 0

        for name, t in iter_named_tensors(stream):
            if name in seen:
                raise ExportError(f"weight stream holds {name!r} twice")
            seen.add(name)
            n = t.numel() * t.element_size()
            if pending and size + n > max_shard_bytes:
                flush()
            pending[name] = _owned(t)
            size += n
            total += n
        if pending or not shards:
            if not pending:
                raise ExportError("the weight stream was empty; was it consumed on a non-destination rank?")
            flush()
        weight_map = {}
        if len(shards) == 1:
            os.rename(tmp / shards[0][0], tmp / "model.safetensors")
        else:
            for i, (fname, names, _) in enumerate(shards):
                final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                os.rename(tmp / fname, tmp / final)
                weight_map.update({n: final for n in names})
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        if source_dir is not None:
            copy_side_files(source_dir, tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _publish(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_hf_checkpoint(
    model_chunks,
    adapter,
    out_dir,
    hf_config,
    source_dir=None,
    *,
    bucket_bytes: int | None = DEFAULT_BUCKET_BYTES,
    overwrite: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Collective: global rank 0 writes the HF directory from the export stream, the others feed it.
    Every rank raises if the write failed."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    exists = rank == 0 and Path(out_dir).exists() and not overwrite
    if not all_ranks_ok(not exists):
        raise ExportError(f"{out_dir} already exists; choose another output directory or pass overwrite=True")
    stream = export_hf_buckets(model_chunks, adapter, bucket_bytes, dst="rank0")
    err = None
    if rank == 0:
        try:
            save_hf_checkpoint(stream, out_dir, hf_config, source_dir,
                               max_shard_bytes=max_shard_bytes, overwrite=overwrite)
        except Exception as e:  # noqa: BLE001 — finish the collective first
            err = e
        drain(stream)
    else:
        drain(stream)
    if not all_ranks_ok(err is None):
        if err is not None:
            raise err
        raise ExportError(f"writing {out_dir} failed on rank 0 (see its log)")
    return Path(out_dir)
