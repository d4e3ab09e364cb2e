"""Save: every rank writes into `DIR/step_NNNNNNN.tmp-<nonce>/`; rank 0 renames it to its final name
only after all ranks report success, so a crash at any point leaves either the previous checkpoints
untouched or a `.tmp-*` directory that the scan ignores; a save that fails (a full disk included)
removes its own `.tmp-*` directory.

Test hook: `MEGATRON_VPPO_TEST_SAVE_DELAY_S=<seconds>` sleeps that long inside the save, after the
tensor files are written and before they are hashed and published, so a test can deliver a real
signal to a real save (unset in normal use).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import secrets
import signal
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from megatron_vppo.checkpoint.atomic_dir import publish, temp_sibling
from megatron_vppo.checkpoint.dist_checkpoint.disk import (
    DISK_FULL_BYTES, agree_or_clean_up, free_bytes, looks_like_enospc, reason)
from megatron_vppo.checkpoint.dist_checkpoint.format import (
    COMPLETE_MARKER, DIST_SUBDIR, FORMAT, FORMAT_VERSION, META_FILE, OPTIMIZER_SHARDING_TYPE, RNG_SUBDIR,
    CheckpointError, checkpoint_name, write_file)
from megatron_vppo.checkpoint.dist_checkpoint.integrity import hash_files, payload_files
from megatron_vppo.checkpoint.dist_checkpoint.layout import current_layout, dist_rank_world, gather_objects
from megatron_vppo.checkpoint.dist_checkpoint.listing import prune_checkpoints
from megatron_vppo.checkpoint.dist_checkpoint.optimizer_state import (
    is_distributed_optimizer, never_stepped, optimizer_metadata, prepare_for_load)
from megatron_vppo.checkpoint.dist_checkpoint.rng import get_rng_state
from megatron_vppo.checkpoint.dist_checkpoint.sharding import check_sharding, model_sharded_state_dict
from megatron_vppo.checkpoint.dist_checkpoint.signals import SaveInterrupted, signals_held
from megatron_vppo.checkpoint.dist_checkpoint.writer import in_process_results_queue, rank0_writes_reported
from megatron_vppo.distributed import ParallelDims, all_ranks_ok, broadcast_object

logger = logging.getLogger(__name__)

def _config_snapshot(config: Any) -> Any:
    if config is None:
        return None
    if dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    try:
        json.dumps(config)
        return config
    except TypeError:
        return json.loads(json.dumps(config, default=str))

def _check_plain(obj: Any, where: str = "train_state") -> None:
    """train_state is read back with torch.load(weights_only=True): plain containers, scalars, tensors."""
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise CheckpointError(f"{where}: key {k!r} must be a str or int")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise CheckpointError(
        f"{where} is a {type(obj).__name__}; checkpoints hold plain data only (dict, list, tuple, str, "
        f"int, float, bool, None, torch.Tensor) — convert it (e.g. numpy -> .tolist() / int())"
    )

def _versions() -> dict:
    out = {"torch": torch.__version__}
    try:
        import megatron.core

        out["megatron_core"] = megatron.core.__version__
    except Exception:  # noqa: BLE001
        pass
    return out

def save_checkpoint(
    ckpt_dir: str | Path,
    step: int,
    model_chunks: Sequence[torch.nn.Module],
    optimizer=None,
    scheduler=None,
    *,
    train_state: dict | None = None,
    config: Any = None,
    keep_last: int = 0,
    dims: ParallelDims,
    extra_meta: dict | None = None,
) -> Path:
    """Write `ckpt_dir/step_XXXXXXX` from every rank (collective: call on all ranks).

    `model_chunks`: this rank's chunks (DDP-wrapped or not). `train_state`: trainer state that is the
    same on every rank (data-loader position, counters) as plain data — dict / list / str / int /
    float / bool / None / tensors (it is read back with weights_only=True); `step` is added to it.
    `config`: a RunConfig (or dict) snapshot for meta.json. `keep_last`: prune to the newest K
    complete checkpoints after this one is complete (0 = keep all). `dims` (required): this rank's layout,
    the ParallelDims from init_distributed, recorded in meta.json. `extra_meta`: more JSON entries for meta.json
    (the trainer records the model's structure and the checkpoint's parent there). Returns the final path.

    A failure (a full disk included) removes the partial save and raises CheckpointError on every
    rank; SIGINT / SIGTERM during the save raise SaveInterrupted after it (see the module doc).
    """
    _check_plain(train_state or {})
    with signals_held() as held:
        final = _save(Path(ckpt_dir), int(step), model_chunks, optimizer, scheduler, train_state, config,
                      keep_last, dims, extra_meta)
        signums = [s for s in gather_objects(held["signum"]) if s is not None]
    if signums:
        name = signal.Signals(signums[0]).name
        raise SaveInterrupted(
            signums[0],
            f"{name} during the checkpoint save of step {step}: the save was finished first ({final} is "
            f"complete); stopping. Continue with train.resume=auto",
        )
    return final

def _save(root: Path, step: int, model_chunks, optimizer, scheduler, train_state, config, keep_last,
          dims: ParallelDims, extra_meta: dict | None = None) -> Path:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy

    rank, world = dist_rank_world()
    name = checkpoint_name(step)
    final = root / name

    nonce = None
    ok, err = True, ""
    if rank == 0:
        nonce = secrets.token_hex(4)
        tmp = temp_sibling(final, nonce, hidden=False)  # the form list_complete skips
        try:
            root.mkdir(parents=True, exist_ok=True)
            (tmp / DIST_SUBDIR).mkdir(parents=True)
            (tmp / RNG_SUBDIR).mkdir()
        except OSError as e:
            ok, err = False, f"cannot create {tmp}: {reason(e)}"
    nonce = broadcast_object(nonce)
    tmp = temp_sibling(final, nonce, hidden=False)
    agree_or_clean_up(ok, err, root, final, tmp)

    layout = current_layout(len(model_chunks), dims=dims)
    is_dist_opt = optimizer is not None and is_distributed_optimizer(optimizer)
    # A per-parameter optimizer that never stepped holds no state; Megatron would save it without the
    # moments (and without the zero step) that a load then asks for. Its state is a fresh optimizer's:
    # record that instead of saving it.
    opt_unstepped = optimizer is not None and not is_dist_opt and all_ranks_ok(never_stepped(optimizer))
    rng_state = get_rng_state()  # before anything below could draw random numbers
    try:
        sharded = model_sharded_state_dict(model_chunks)
        check_sharding(sharded)  # collective, so a bad module fails every rank instead of hanging them
        if optimizer is not None and not opt_unstepped:
            # An optimizer that never stepped (every group so far dropped by dynamic sampling) has no
            # torch-Adam state yet; give it the zero state a fresh optimizer would use.
            prepare_for_load(optimizer)
            sharded["optimizer"] = optimizer.sharded_state_dict(
                sharded, is_loading=False, metadata=optimizer_metadata()
            )
        # Non-sharded entries go to common.pt (written by rank 0).
        sharded["scheduler"] = scheduler.state_dict() if scheduler is not None else None
        sharded["train_state"] = {**(train_state or {}), "step": int(step)}
        with in_process_results_queue(), rank0_writes_reported() as rank0_error:
            dist_checkpointing.save(
                sharded,
                str(tmp / DIST_SUBDIR),
                sharded_strategy=get_default_save_sharded_strategy("torch_dist"),
                async_sharded_save=False,
            )
        if rank0_error:
            raise rank0_error[0]
        rng_path = tmp / RNG_SUBDIR / f"rank_{rank:05d}.pt"
        tmp_rng = rng_path.with_suffix(".part")
        torch.save(rng_state, tmp_rng)
        os.replace(tmp_rng, rng_path)
    except BaseException as e:  # noqa: BLE001 — reported collectively below (DCP raises BaseException)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        ok, err = False, f"rank {rank}: {reason(e)}"
        if looks_like_enospc(err) or free_bytes(root) < DISK_FULL_BYTES:  # a full disk: the one line says it all
            logger.error("checkpoint save failed on rank %d: %s", rank, err)
        else:
            logger.exception("checkpoint save failed on rank %d", rank)
    agree_or_clean_up(ok, err, root, final, tmp)

    delay = float(os.environ.get("MEGATRON_VPPO_TEST_SAVE_DELAY_S", "0") or 0)
    if delay > 0:  # test hook (module doc): a window in which a real save is in progress
        time.sleep(delay)

    # Digests of what is on disk now, each rank hashing a share of the files.
    files: dict = {}
    try:
        files = hash_files(tmp, payload_files(tmp)[rank::world])
    except OSError as e:
        ok, err = False, f"rank {rank}: hashing the saved files: {reason(e)}"
    parts = gather_objects(files if ok else None)
    agree_or_clean_up(ok, err, root, final, tmp)
    files = {k: v for part in parts for k, v in (part or {}).items()}

    ok, err = True, ""
    if rank == 0:
        try:
            meta = {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "step": int(step),
                "complete": True,
                "layout": layout,
                "optimizer": None
                if optimizer is None
                else {
                    "distributed": is_dist_opt,
                    "sharding_type": OPTIMIZER_SHARDING_TYPE if is_dist_opt else "per_parameter",
                    "state": "never_stepped" if opt_unstepped else "saved",
                },
                "scheduler": scheduler is not None,
                "config": _config_snapshot(config),
                "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "versions": _versions(),
                "files": dict(sorted(files.items())),
            }
            meta = {**_config_snapshot(extra_meta or {}), **meta}  # the format's own entries win
            write_file(tmp / META_FILE, (json.dumps(meta, indent=2) + "\n").encode())
            write_file(tmp / COMPLETE_MARKER, f"step {int(step)}\n".encode())
            # Re-saving a step (e.g. after resuming before it) replaces it; a failed rename puts the old
            # one back (the next prune would delete it under its .tmp name).
            publish(tmp, final, overwrite=True)
            prune_checkpoints(root, keep_last, protect=final)
        except Exception as e:  # noqa: BLE001
            ok, err = False, reason(e)
            logger.exception("checkpoint finalize failed")
    agree_or_clean_up(ok, err, root, final, tmp)
    logger.info("saved checkpoint %s", final)
    return final
