"""Process groups for one run: torch.distributed (gloo on CPU, NCCL on GPU) + Megatron parallel_state,
the `ParallelDims` object that says where this rank sits, and every collective the package uses.

The layout is validated before any process-group work, so an impossible size fails fast with a
message naming the rule, on every rank, without a hang. `init_distributed` returns the dims once;
callers pass them down (torchtitan's ParallelDims is the model) instead of reading Megatron's globals.
Megatron's own modules still read parallel_state; this package reads it only here.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from megatron_vppo.config import ParallelConfig
from megatron_vppo.parallel_layout import Layout, LayoutError, validate_layout


# Waits of ranks with no work (an engine generating for minutes) happen in gloo with this timeout.
GLOO_TIMEOUT = timedelta(hours=6)


@dataclass(frozen=True)
class ParallelDims:
    """Where this rank sits in the tp × cp × pp × dp layout, and its process groups.

    Built once by `init_distributed` (or `ParallelDims.single()` for one process without groups) and
    passed down. Groups are None when their size is 1 or no process group exists."""
    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    vpp: int | None = None
    sp: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    cp_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tp_group: Any = field(default=None, repr=False, compare=False)
    pp_group: Any = field(default=None, repr=False, compare=False)
    dp_group: Any = field(default=None, repr=False, compare=False)
    pp_last_rank: int = 0  # global rank of this pipeline's last stage
    # Rollout placement, independent of the training layout: one engine per `engine_tp` consecutive
    # ranks (on one node), so world_size / engine_tp engines generate (`with_engines`).
    engine_tp: int = 1

    @classmethod
    def single(cls, device: torch.device | None = None) -> "ParallelDims":
        return cls(device=device or torch.device("cpu"))

    @classmethod
    def from_megatron(cls, device: torch.device | None = None, sp: bool = False) -> "ParallelDims":
        """Read Megatron's parallel_state once (single-process dims when it is not initialised)."""
        from megatron.core import parallel_state as ps

        if not (dist.is_initialized() and ps.model_parallel_is_initialized()):
            return cls.single(device)
        vpp = ps.get_virtual_pipeline_model_parallel_world_size()
        return cls(
            tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
            dp=ps.get_data_parallel_world_size(), cp=ps.get_context_parallel_world_size(),
            vpp=vpp if vpp not in (None, 1) else None, sp=sp,
            rank=dist.get_rank(), world_size=dist.get_world_size(),
            local_rank=_env_int("LOCAL_RANK", _env_int("RANK", 0)),
            tp_rank=ps.get_tensor_model_parallel_rank(), pp_rank=ps.get_pipeline_model_parallel_rank(),
            dp_rank=ps.get_data_parallel_rank(), cp_rank=ps.get_context_parallel_rank(),
            device=device or (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                              else torch.device("cpu")),
            tp_group=ps.get_tensor_model_parallel_group(), pp_group=ps.get_pipeline_model_parallel_group(),
            dp_group=ps.get_data_parallel_group(), pp_last_rank=ps.get_pipeline_model_parallel_last_rank(),
        )

    @property
    def layout(self) -> Layout:
        return Layout(tp=self.tp, pp=self.pp, vpp=self.vpp, cp=self.cp, dp=self.dp, sp=self.sp)

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def num_engines(self) -> int:
        """Rollout engines over the whole run: one per `engine_tp` consecutive ranks."""
        return self.world_size // self.engine_tp

    @property
    def engine_index(self) -> int:
        """Which engine this rank belongs to (its share of the prompts: `shard(..., engine_index, num_engines)`)."""
        return self.rank // self.engine_tp

    @property
    def engine_tp_rank(self) -> int:
        """This rank's tensor-parallel rank inside its engine."""
        return self.rank % self.engine_tp

    @property
    def engine_rank(self) -> bool:
        """This rank hosts its engine's entry point (engine TP rank 0): it generates and scores for the
        engine's share of the prompts; the engine's other ranks only feed it weights."""
        return self.engine_tp_rank == 0

    @property
    def engine_ranks(self) -> list[int]:
        """The global ranks of this rank's engine, in engine TP order."""
        first = self.engine_index * self.engine_tp
        return list(range(first, first + self.engine_tp))


def with_engines(dims: ParallelDims, engine_tp: int, local_world_size: int | None = None) -> ParallelDims:
    """`dims` with the rollout placement: an engine on every `engine_tp` consecutive ranks.

    An engine's TP ranks must share a node (colocated engines put TP rank i on the node's GPU of the
    trainer rank i), so `engine_tp` must divide the ranks per node (LOCAL_WORLD_SIZE under torchrun)."""
    local = local_world_size if local_world_size is not None else _env_int("LOCAL_WORLD_SIZE", dims.world_size)
    if engine_tp < 1 or dims.world_size % engine_tp or local % engine_tp:
        raise LayoutError(f"rollout.engine_tp={engine_tp} must divide the world size {dims.world_size} and the "
                          f"{local} ranks per node (an engine's TP ranks share a node); pick a divisor of {local}")
    return replace(dims, engine_tp=engine_tp)


# ------------------------------------------------------------------------------------ collectives


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


_CPU_GROUP: list = []


def cpu_world_group():
    """A gloo group over every rank (None when the default group is gloo already). Ranks with no
    engine wait here while the engine ranks generate — for minutes — in a socket wait, not in an
    NCCL collective that spins on the GPU and runs into NCCL's timeout. Created collectively on first
    use: call it once on every rank at start-up (train/build.py does)."""
    if not _CPU_GROUP or _CPU_GROUP[0][0] is not dist.group.WORLD:
        group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=GLOO_TIMEOUT)
        _CPU_GROUP[:] = [(dist.group.WORLD, group)]
    return _CPU_GROUP[0][1]


def all_gather_world(items: list) -> list:
    """Every rank's list, concatenated in rank order (ranks with nothing contribute []); over gloo."""
    if not _initialized() or dist.get_world_size() == 1:
        return items
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items, group=cpu_world_group())
    return [x for p in parts for x in p]


def all_ranks_ok(ok: bool) -> bool:
    """True iff `ok` on every rank (so one rank's failure stops all of them without a hang)."""
    if not _initialized():
        return ok
    t = torch.tensor([1 if ok else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def any_rank(flag: bool) -> bool:
    """True when `flag` is true on any rank (one all-reduce of one number)."""
    return not all_ranks_ok(not flag)


def min_max_world(n: int | None) -> tuple[int, int] | None:
    """(smallest, largest) `n` over the ranks that have one (None: this rank has none; None back when
    no rank has one): one all-reduce of two numbers."""
    if not _initialized():
        return None if n is None else (n, n)
    none = -(2**62)
    t = torch.tensor([none, none] if n is None else [n, -n], dtype=torch.long)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    high, low = int(t[0].item()), int(-t[1].item())
    return None if high == none else (low, high)


def broadcast_object(obj, src: int = 0, group=None):
    """`src`'s python object on every rank of `group` (the world by default)."""
    if not _initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def barrier() -> None:
    if _initialized():
        dist.barrier()


def gather_data_parallel(dims: ParallelDims, items: list) -> list:
    """Concatenate every data-parallel rank's list in rank order (the order `shard` split them in)."""
    if dims.dp == 1:
        return items
    out = [None] * dims.dp
    dist.all_gather_object(out, items, group=dims.dp_group)
    return [x for part in out for x in part]


def from_last_stage(dims: ParallelDims, obj):
    """The last pipeline stage's python object, on every stage of this pipeline."""
    if dims.pp == 1:
        return obj
    return broadcast_object(obj, src=dims.pp_last_rank, group=dims.pp_group)


def sum_over_data_parallel(dims: ParallelDims, sums: dict) -> dict:
    """{name: float} summed over the data-parallel group (float64, same key order on every rank)."""
    if dims.dp == 1 or not sums:
        return sums
    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t, group=dims.dp_group)
    return dict(zip(keys, t.tolist()))


def max_over_data_parallel(dims: ParallelDims, n: int) -> int:
    """The largest `n` over the data-parallel group."""
    if dims.dp == 1:
        return n
    t = torch.tensor([n], dtype=torch.long, device=dims.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=dims.dp_group)
    return int(t.item())


def te_available() -> bool:
    """Transformer Engine's PyTorch layers importable and a GPU present (TE layers, FP8 and the
    attention context parallel needs). The one check every caller shares."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401  (availability probe)
    except Exception:
        return False
    return True


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return default if v is None or v == "" else int(v)


def layout_from_config(parallel: ParallelConfig, world_size: int) -> Layout:
    """Derive dp from the world size when unset; leave checking to validate_layout."""
    mp = parallel.tp * parallel.pp * parallel.cp
    dp = parallel.dp
    if dp is None:
        if mp < 1 or world_size % mp:
            raise LayoutError(
                f"world size {world_size} is not divisible by tp*pp*cp = {parallel.tp}*{parallel.pp}"
                f"*{parallel.cp} = {mp}; launch a multiple of {mp} processes or change the sizes"
            )
        dp = world_size // mp
    vpp = parallel.vpp if parallel.vpp not in (None, 1) else None
    return Layout(tp=parallel.tp, pp=parallel.pp, vpp=vpp, cp=parallel.cp, dp=dp, sp=parallel.sp)


def init_distributed(
    parallel: ParallelConfig,
    *,
    num_attention_heads: int,
    num_query_groups: int,
    num_layers: int,
    vision_num_heads: int | None = None,
    seed: int = 1234,
    timeout_minutes: int = 30,
) -> ParallelDims:
    """Validate the layout, start torch.distributed from the torchrun env, build Megatron groups, seed.

    Works under torchrun and under torch.multiprocessing spawn (RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT
    in the environment). Idempotent for an already-initialised default group.
    """
    world_size = (
        torch.distributed.get_world_size()
        if torch.distributed.is_initialized()
        else _env_int("WORLD_SIZE", 1)
    )
    layout = layout_from_config(parallel, world_size)
    validate_layout(
        layout,
        world_size=world_size,
        num_attention_heads=num_attention_heads,
        num_query_groups=num_query_groups,
        num_layers=num_layers,
        vision_num_heads=vision_num_heads,
        te_available=te_available(),
    )

    use_cuda = torch.cuda.is_available()
    local_rank = _env_int("LOCAL_RANK", _env_int("RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        from megatron_vppo.megatron_cpu import apply_cpu_adapter

        apply_cpu_adapter()
        device = torch.device("cpu")

    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        torch.distributed.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            rank=_env_int("RANK", 0),
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )

    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        context_parallel_size=layout.cp,
        distributed_timeout_minutes=timeout_minutes,
    )
    seed_everything(seed)
    return ParallelDims.from_megatron(device, sp=layout.sp)


def seed_everything(seed: int) -> None:
    """Same seed on every rank for data/dropout outside TP regions; per-TP-rank seed inside them."""
    import random

    import numpy as np
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    """Tear down Megatron groups and the default process group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def force_param_sync(model_chunks) -> bool:
    """Complete the distributed optimizer's deferred parameter all-gather now (collective over DP).

    With overlap_param_gather, `optimizer.step()` updates only this DP rank's shard of each parameter;
    the other shards arrive in the next forward's pre-hooks. Whatever reads the weights outside a
    forward (engine weight sync, HF export, checkpoint save) must call this first, on every rank, or it
    reads stale shards at DP >= 2. Megatron's own `start_param_sync(force_sync=True)`: waits for an
    all-gather in flight, else runs one synchronously; the next forward then finds the params
    gathered. Returns whether anything was synced (False for chunks without deferred gathers)."""
    synced = False
    for chunk in model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]:
        ddp_config = getattr(chunk, "ddp_config", None)
        if ddp_config is not None and ddp_config.use_distributed_optimizer and ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)
            synced = True
    return synced
