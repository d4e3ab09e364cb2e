"""Megatron DDP + optimizer + LR schedule for a list of model chunks (one per virtual pipeline stage).

Everything here is Megatron-Core's own machinery, configured from `OptimConfig`:
  * `DistributedDataParallel` — contiguous fp32 grad buffers, DP all-reduce (or reduce-scatter for
    the distributed optimizer); overlap of grad reduction with backward only on GPU;
  * `get_megatron_optimizer` — Adam with decoupled weight decay (AdamW), no decay on biases and 1-D
    params, global grad-norm clipping over the model-parallel group, fp32 main params for bf16/fp16;
  * `OptimizerParamScheduler` — warmup then constant / linear / cosine, applied per param group (it is
    also what turns the groups' `wd_mult` into their weight decay), state_dict-able for resume.

Step protocol the trainer follows (Megatron's):
    for chunk in ddp_chunks: chunk.zero_grad_buffer()
    optimizer.zero_grad()
    forward_backward_func(...)            # finalize_model_grads runs at its end (see attach_to_model_config)
    ok, grad_norm, _ = optimizer.step()
    if ok: scheduler.step(1)
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from megatron_vppo.config import OptimConfig
from megatron_vppo.distributed import force_param_sync  # noqa: F401  (re-exported: the trainer's name for it)

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _as_dtype(model_dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(model_dtype, torch.dtype):
        return model_dtype
    if model_dtype not in _DTYPES:
        raise ValueError(f"model dtype {model_dtype!r}: use one of {sorted(_DTYPES)}")
    return _DTYPES[model_dtype]


def _model_config(chunk):
    from megatron.core.utils import get_model_config

    return get_model_config(chunk)


def wrap_ddp(
    model_chunks: Sequence[torch.nn.Module],
    *,
    use_distributed_optimizer: bool,
    overlap: bool | None = None,
    bucket_size: int | None = None,
) -> list[torch.nn.Module]:
    """Wrap each chunk in mcore DistributedDataParallel (grads reduced in fp32).

    `overlap` (grad reduce / param gather overlapped with compute) defaults to on with CUDA, off on CPU;
    with it on, the model config must carry the no_sync / grad_sync hooks — `attach_to_model_config`.
    With the distributed optimizer it also defers the param all-gather after `optimizer.step()` to the
    next forward's pre-hooks: read the weights outside a forward only after `force_param_sync`.
    Interleaved pipelines (several chunks) align the all-gathers across stages: the schedule launches
    them through `param_sync_func` (Megatron-LM's pairing of align_param_gather and param_sync_func).
    Only the first chunk buckets its grads (Megatron's choice for interleaved pipelines: the other
    chunks' grads are reduced per chunk).
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    if overlap is None:
        overlap = torch.cuda.is_available()
    gather_overlap = bool(overlap and use_distributed_optimizer)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap,
        overlap_param_gather=gather_overlap,
        align_param_gather=gather_overlap and len(model_chunks) > 1,
        use_distributed_optimizer=use_distributed_optimizer,
        check_for_nan_in_grad=False,
        bucket_size=bucket_size,
    )
    wrapped = []
    for i, chunk in enumerate(model_chunks):
        wrapped.append(
            DistributedDataParallel(
                config=_model_config(chunk),
                ddp_config=ddp_config,
                module=chunk,
                # Megatron disables bucketing for all but the first virtual chunk.
                disable_bucketing=i > 0,
            )
        )
    # Every DP rank must start from rank 0's weights (init is seeded per TP rank, not per DP rank).
    for w in wrapped:
        w.broadcast_params()
    return wrapped


def cast_params(model_chunks: Sequence[torch.nn.Module], dtype: torch.dtype) -> int:
    """Give every floating parameter the model dtype, in place (what Megatron's Float16Module does with
    `module.bfloat16()`); returns how many were cast.

    Torch norms (Megatron's WrappedTorchNorm on the local spec, a plain `torch.nn.RMSNorm`) create
    fp32 weights whatever `params_dtype` says. A bf16 model with a few fp32 params breaks Megatron-Core
    0.16.1's distributed optimizer: it lists each param group's fp32 shards before its bf16 ones but
    indexes its state by the original order, so `sharded_state_dict` (checkpoint save) pairs params
    with another param's Adam state and fails. The norms' fp32 main copies live in the optimizer."""
    n = 0
    for chunk in model_chunks:
        for p in chunk.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
                n += 1
    return n


def build_scheduler(optimizer, optim_cfg: OptimConfig, total_steps: int):
    """Megatron's OptimizerParamScheduler for `lr_schedule` with `warmup_steps` linear warmup.

    Step s (0-based, counted in optimizer steps) uses:
      warmup (s <= W): lr/W + (lr - lr/W) * s / W   — starts at lr/W, not a wasted zero-lr step
      then constant:   lr
           linear:     lr * (1 - (s - W)/(T - W))           T = total_steps, reaching 0 at T
           cosine:     lr * (1 + cos(pi (s - W)/(T - W))) / 2
    (Megatron's warmup is init + (lr - init) * s / W; we pass init = lr / W.)
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps}: must be >= 1")
    if optim_cfg.warmup_steps < 0:
        raise ValueError(f"optim.warmup_steps={optim_cfg.warmup_steps}: must be >= 0")
    if optim_cfg.lr_schedule != "constant" and optim_cfg.warmup_steps >= total_steps:
        raise ValueError(
            f"optim.warmup_steps={optim_cfg.warmup_steps} >= train.total_steps={total_steps}: "
            f"a {optim_cfg.lr_schedule} decay needs steps after warmup; lower warmup_steps"
        )
    warmup = optim_cfg.warmup_steps
    init_lr = optim_cfg.lr / warmup if warmup > 0 else optim_cfg.lr
    # Megatron requires decay_steps > warmup even for a constant schedule.
    decay_steps = max(total_steps, warmup + 1)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=init_lr,
        max_lr=optim_cfg.lr,
        min_lr=0.0,
        lr_warmup_steps=warmup,
        lr_decay_steps=decay_steps,
        lr_decay_style=optim_cfg.lr_schedule,
        start_wd=optim_cfg.weight_decay,
        end_wd=optim_cfg.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
        # On resume the checkpoint supplies only the step count; lr, schedule, warmup and weight decay
        # are this config's, so a changed optim.lr takes effect (train/resume.py reports the change).
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )


def build_optimizer(
    model_chunks: Sequence[torch.nn.Module],
    optim_cfg: OptimConfig,
    model_dtype: str | torch.dtype,
    total_steps: int,
    *,
    overlap: bool | None = None,
):
    """Wrap chunks in DDP and build Megatron's optimizer and LR scheduler.

    `model_chunks`: unwrapped Megatron modules (e.g. GPTModel, or Float16Module(GPTModel) for bf16),
    one per virtual pipeline stage on this rank. `model_dtype`: the dtype the model's params are in
    ('fp32' | 'bf16' | 'fp16'); for bf16/fp16 the optimizer keeps fp32 main params. Floating params
    of another dtype are cast to it first (`cast_params`).
    Returns (ddp_chunks, optimizer, scheduler); train and checkpoint through `ddp_chunks`.
    """
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    dtype = _as_dtype(model_dtype)
    if not model_chunks:
        raise ValueError("build_optimizer: model_chunks is empty; pass this rank's model chunks")
    cast_params(model_chunks, dtype)
    ddp_chunks = wrap_ddp(
        model_chunks, use_distributed_optimizer=optim_cfg.use_distributed_optimizer, overlap=overlap
    )
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=optim_cfg.lr,
        min_lr=0.0,
        weight_decay=optim_cfg.weight_decay,
        adam_beta1=optim_cfg.adam_beta1,
        adam_beta2=optim_cfg.adam_beta2,
        clip_grad=optim_cfg.grad_clip,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        use_distributed_optimizer=optim_cfg.use_distributed_optimizer,
        overlap_param_gather=bool(ddp_chunks[0].ddp_config.overlap_param_gather),
    )
    optimizer = get_megatron_optimizer(opt_config, list(ddp_chunks))
    scheduler = build_scheduler(optimizer, optim_cfg, total_steps)
    return ddp_chunks, optimizer, scheduler


def attach_to_model_config(ddp_chunks: Sequence[torch.nn.Module], optimizer) -> None:
    """Give Megatron's pipeline schedules the hooks they call (as Megatron's training loop does).

    * finalize_model_grads: DP grad sync (finish_grad_sync), TP all-reduce of sequence-parallel norm
      grads, tied-embedding grad sync between first and last pipeline stages — run by
      forward_backward_func after the last micro-batch;
    * grad_scale_func: fp16 loss scaling (a no-op scale of 1 for fp32/bf16);
    * no_sync_func / grad_sync_func / param_sync_func when DDP overlaps communication.
    """
    from megatron.core.distributed import finalize_model_grads

    config = _model_config(ddp_chunks[0])
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    ddp_config = ddp_chunks[0].ddp_config
    if ddp_config.overlap_grad_reduce:
        no_sync = [c.no_sync for c in ddp_chunks]
        grad_sync = [c.start_grad_sync for c in ddp_chunks]
        config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        config.grad_sync_func = grad_sync[0] if len(grad_sync) == 1 else grad_sync
    if ddp_config.overlap_param_gather and ddp_config.align_param_gather:
        # Only the interleaved schedule calls it; without alignment the forward pre-hooks gather.
        config.param_sync_func = [c.start_param_sync for c in ddp_chunks]


def current_lr(optimizer) -> float:
    """The lr of the default-schedule param group (what to log)."""
    from megatron.core.optimizer_param_scheduler import get_canonical_lr_for_logging

    lr = get_canonical_lr_for_logging(optimizer.param_groups)
    return float(lr if lr is not None else optimizer.param_groups[0]["lr"])
