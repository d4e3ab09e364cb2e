"""Save and resume training state with Megatron-Core distributed checkpointing (torch_dist).

One module per job; this package's names are the public API (`from megatron_vppo.checkpoint.dist_checkpoint
import save_checkpoint, select_resume, ...`):

    format.py           the directory, meta.json, the COMPLETE marker, CheckpointError
    listing.py          complete checkpoints under a directory, and pruning
    integrity.py        sha256 digests of every file, verified before a load
    resume.py           train.resume (auto / never / a path) -> the checkpoint to load
    layout.py           the layout recorded in meta.json, rank/world helpers
    rng.py              per-rank RNG states
    optimizer_state.py  Adam state around a save or load (Megatron-Core 0.16.1 with torch AdamW)
    signals.py          SIGINT / SIGTERM held during a save, SaveInterrupted after it
    disk.py             a failed save (a full disk included): agreed on, cleaned up, named
    writer.py           Megatron's torch_dist writer run synchronously
    sharding.py         the model's sharded state dict and the one-main-replica check
    save.py             save_checkpoint
    load.py             load_checkpoint
"""
from megatron_vppo.checkpoint.dist_checkpoint.disk import DISK_FULL_BYTES, free_bytes
from megatron_vppo.checkpoint.dist_checkpoint.format import (
    COMPLETE_MARKER, DIST_SUBDIR, FORMAT, FORMAT_VERSION, META_FILE, OPTIMIZER_SHARDING_TYPE, RNG_SUBDIR,
    CheckpointError, LoadedCheckpoint, check_complete, checkpoint_name, read_meta)
from megatron_vppo.checkpoint.dist_checkpoint.integrity import verify_checkpoint
from megatron_vppo.checkpoint.dist_checkpoint.layout import current_layout
from megatron_vppo.checkpoint.dist_checkpoint.listing import find_latest_complete, list_complete, prune_checkpoints
from megatron_vppo.checkpoint.dist_checkpoint.load import load_checkpoint
from megatron_vppo.checkpoint.dist_checkpoint.resume import resolve_resume, select_resume
from megatron_vppo.checkpoint.dist_checkpoint.rng import get_rng_state, set_rng_state
from megatron_vppo.checkpoint.dist_checkpoint.save import save_checkpoint
from megatron_vppo.checkpoint.dist_checkpoint.sharding import check_sharding
from megatron_vppo.checkpoint.dist_checkpoint.signals import SaveInterrupted

__all__ = [
    "COMPLETE_MARKER", "DIST_SUBDIR", "DISK_FULL_BYTES", "FORMAT", "FORMAT_VERSION", "META_FILE",
    "OPTIMIZER_SHARDING_TYPE", "RNG_SUBDIR", "CheckpointError", "LoadedCheckpoint", "SaveInterrupted",
    "check_complete", "check_sharding", "checkpoint_name", "current_layout", "find_latest_complete",
    "free_bytes", "get_rng_state", "list_complete", "load_checkpoint", "prune_checkpoints", "read_meta",
    "resolve_resume", "save_checkpoint", "select_resume", "set_rng_state", "verify_checkpoint",
]
