"""Load a complete, verified checkpoint into this rank's chunks, optimizer, scheduler and RNG.

Model weights load at any TP/PP/VPP/DP layout. Distributed-optimizer state (`dp_reshardable`) loaded at
another TP/PP/VPP raises CheckpointError naming the fix (resume at the saved layout, or
`train.load_optimizer=false` to restart the optimizer moments). RNG states are restored only at the saved
layout and world size (another layout keeps the freshly seeded RNG and logs it).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch

from megatron_vppo.checkpoint.dist_checkpoint.format import (
    DIST_SUBDIR, OPTIMIZER_SHARDING_TYPE, RNG_SUBDIR, CheckpointError, LoadedCheckpoint, check_complete,
    corrupt, first_line)
from megatron_vppo.checkpoint.dist_checkpoint.integrity import verify_checkpoint
from megatron_vppo.checkpoint.dist_checkpoint.layout import current_layout, dist_rank_world, same_model_parallel
from megatron_vppo.checkpoint.dist_checkpoint.optimizer_state import (
    group_hparams, is_distributed_optimizer, optimizer_metadata, prepare_for_load, restore_adam_steps,
    set_group_hparams)
from megatron_vppo.checkpoint.dist_checkpoint.rng import set_rng_state
from megatron_vppo.checkpoint.dist_checkpoint.sharding import model_sharded_state_dict, unwrap
from megatron_vppo.distributed import ParallelDims, all_ranks_ok, barrier

logger = logging.getLogger(__name__)

def load_checkpoint(
    path: str | Path,
    model_chunks: Sequence[torch.nn.Module],
    optimizer=None,
    scheduler=None,
    *,
    load_optimizer: bool = True,
    load_rng: bool = True,
    verify: bool = True,
    dims: ParallelDims,
) -> LoadedCheckpoint:
    """Load a complete checkpoint into this rank's chunks / optimizer / scheduler (collective).

    Model weights load at any TP/PP/VPP/DP layout. The optimizer loads when `load_optimizer` and it was
    saved (see the module doc for which layouts its format allows); when it is not loaded, its fp32
    main params are refreshed from the loaded weights. Pass a freshly built scheduler. `verify`:
    check every file's size and sha256 first (`verify_checkpoint`); pass False only for a checkpoint
    this process has just verified (e.g. chosen by `select_resume`). `dims` (required): this rank's layout,
    the ParallelDims from init_distributed, compared with the saved one.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    p = Path(path)
    try:
        meta = verify_checkpoint(p) if verify else check_complete(p)
    except CheckpointError as e:
        raise corrupt(p, str(e)) from None
    rank, world = dist_rank_world()
    saved_layout = meta.get("layout", {})
    now_layout = current_layout(len(model_chunks), dims=dims)
    saved_opt = meta.get("optimizer")

    want_opt = optimizer is not None and load_optimizer and saved_opt is not None
    if optimizer is not None and load_optimizer and saved_opt is None:
        logger.warning("%s has no optimizer state; optimizer starts fresh", p)
    if want_opt:
        is_dist_now = is_distributed_optimizer(optimizer)
        if bool(saved_opt.get("distributed")) != is_dist_now:
            kind = lambda d: "distributed" if d else "non-distributed"  # noqa: E731
            raise CheckpointError(
                f"checkpoint {p} holds {kind(saved_opt.get('distributed'))} optimizer state but this run "
                f"uses the {kind(is_dist_now)} optimizer. Fix: set optim.use_distributed_optimizer="
                f"{str(bool(saved_opt.get('distributed'))).lower()}, or set train.load_optimizer=false "
                f"(weights only; Adam moments restart)"
            )
        if is_dist_now and not same_model_parallel(saved_layout, now_layout):
            s, n = saved_layout, now_layout
            raise CheckpointError(
                f"checkpoint {p}: distributed-optimizer state ({OPTIMIZER_SHARDING_TYPE}) reshards over "
                f"data parallel only; it was saved at tp={s.get('tp')} pp={s.get('pp')} vpp={s.get('vpp')} "
                f"and this run is tp={n['tp']} pp={n['pp']} vpp={n['vpp']}. Fix: resume at the saved "
                f"tp/pp/vpp, or set train.load_optimizer=false (weights only; Adam moments restart)"
            )

    # A never-stepped optimizer was saved as such: a freshly built one is already in that state.
    read_opt = want_opt and saved_opt.get("state") != "never_stepped"
    sharded = model_sharded_state_dict(model_chunks)
    if read_opt:
        prepare_for_load(optimizer)
        sharded["optimizer"] = optimizer.sharded_state_dict(
            sharded, is_loading=True, metadata=optimizer_metadata()
        )
    try:
        state = dist_checkpointing.load(
            sharded, str(p / DIST_SUBDIR), strict=StrictHandling.RAISE_UNEXPECTED
        )
    except BaseException as e:  # noqa: BLE001 — torch DCP's CheckpointException is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        why = first_line(e)
        if "shape" in why.lower():  # another model, not a damaged file: skipping to an older one cannot help
            raise another_model(p, why) from e
        raise corrupt(p, why) from e

    # From here on a failure can be local to one rank (one pipeline stage's chunk, one rank's RNG
    # file): agree on it before the next collective, or the other ranks block there forever.
    err = None
    for i, chunk in enumerate(model_chunks):
        try:
            unwrap(chunk).load_state_dict(state[f"model{i}"], strict=True)
        except Exception as e:  # noqa: BLE001
            err = another_model(p, f"model chunk {i} does not match the checkpoint ({e})")
            break
    raise_on_any_rank(err, p)

    if read_opt:
        hparams = group_hparams(optimizer)
        with torch.no_grad():  # it copies into views of the (grad-requiring) main params
            optimizer.load_state_dict(state["optimizer"])
        restore_adam_steps(optimizer)
        set_group_hparams(optimizer, hparams)
    elif optimizer is not None:
        optimizer.reload_model_params()

    sched_loaded = False
    if scheduler is not None and state.get("scheduler") is not None:
        if hasattr(scheduler, "num_steps"):
            scheduler.num_steps = 0  # Megatron's load_state_dict adds the saved step count
        scheduler.load_state_dict(state["scheduler"])
        sched_loaded = True

    rng_restored = False
    if load_rng:
        same = same_model_parallel(saved_layout, now_layout) and saved_layout.get("world_size") == world
        rng_file = p / RNG_SUBDIR / f"rank_{rank:05d}.pt"
        err = None
        if not same:
            logger.warning(
                "%s was saved at layout %s, this run is %s: RNG states not restored (fresh seeds)",
                p, saved_layout, now_layout,
            )
        elif not rng_file.is_file():
            err = corrupt(p, f"{rng_file} is missing")
        else:
            try:
                set_rng_state(torch.load(rng_file, weights_only=True))
                rng_restored = True
            except Exception as e:  # noqa: BLE001
                err = corrupt(p, f"{rng_file} is unreadable ({e})")
        raise_on_any_rank(err, p)

    train_state = dict(state.get("train_state") or {})
    barrier()
    logger.info("loaded checkpoint %s (step %d)", p, meta["step"])
    return LoadedCheckpoint(
        path=p,
        step=int(meta["step"]),
        meta=meta,
        train_state=train_state,
        optimizer_loaded=want_opt,
        scheduler_loaded=sched_loaded,
        rng_restored=rng_restored,
    )

def another_model(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} was saved from a model of another structure than the one model.path builds ({what}). "
        f"Fix: set model.path to the model the run was trained from (meta.json config.model.path)")


def raise_on_any_rank(err: CheckpointError | None, path: Path) -> None:
    """Collective: raise `err` here, or a pointer to the failing rank's log on every other rank."""
    if not all_ranks_ok(err is None):
        raise err or corrupt(path, "loading failed on another rank (see its log)")
