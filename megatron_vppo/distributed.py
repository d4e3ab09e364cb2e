"""Process groups for one run: torch.distributed (gloo on CPU, NCCL on GPU) + Megatron parallel_state.

The layout is validated before any process-group work, so an impossible size fails fast with a
message naming the rule, on every rank, without a hang.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

from megatron_vppo.config import ParallelConfig
from megatron_vppo.parallel_layout import Layout, LayoutError, validate_layout


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    layout: Layout


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
) -> DistInfo:
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
    return DistInfo(
        rank=torch.distributed.get_rank(),
        world_size=world_size,
        local_rank=local_rank,
        device=device,
        layout=layout,
    )


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
