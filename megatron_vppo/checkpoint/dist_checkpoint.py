"""Save and resume training state with Megatron-Core distributed checkpointing (torch_dist).

One checkpoint is a directory `DIR/step_0000010/`:

    dist/                 Megatron dist checkpoint: model (sharded_state_dict of every chunk) and
                          optimizer (distributed optimizer: `dp_reshardable`), plus common.pt holding
                          the LR scheduler and the trainer state (step, data-loader position, ...)
    rng/rank_00003.pt     per-rank RNG states: python, numpy, torch CPU, CUDA, Megatron's RNG tracker
    meta.json             step, layout, optimizer format, config snapshot, versions, "complete": true,
                          and "files": {relative path: {"bytes", "sha256"}} of every other file
    COMPLETE              written last, after every rank finished writing

It is written into `DIR/step_0000010.tmp-<nonce>/` and renamed to its final name by rank 0 only after
all ranks report success, so a crash at any point leaves either the previous checkpoints untouched or
a `.tmp-*` directory that `find_latest_complete` ignores; a save that fails (a full disk included) removes
its own `.tmp-*` directory. Older checkpoints are pruned (keep last K) only after the new one is
complete, and only those older than it: it is the newest verified one, and it is never pruned.

Integrity. After the ranks wrote their files, the files are hashed (sha256, split over the ranks) and
the sizes and digests go into meta.json; `verify_checkpoint` (run by `load_checkpoint` and by
`select_resume`) re-hashes them and names the first file that differs, so a zeroed block or a
truncated shard fails loudly instead of loading. `select_resume("auto", ...)` walks back to the newest
checkpoint that verifies and logs every one it skipped and why. Checkpoints of format version 1 (no
digests) are checked for truncated shards only (file sizes against torch DCP's storage index).

Signals. SIGINT / SIGTERM that arrive during `save_checkpoint` are held until the save has finished;
then the ranks agree and every rank raises `SaveInterrupted` (a KeyboardInterrupt) naming the
checkpoint, so the run exits non-zero with a complete checkpoint behind it (a save that fails raises
its CheckpointError instead, its partial directory removed). Writer processes forked meanwhile inherit
the holding handler, so a Ctrl-C sent to the whole process group does not kill them half-way.
Test hook: `MEGATRON_VPPO_TEST_SAVE_DELAY_S=<seconds>` sleeps that long inside the save, after the
tensor files are written and before they are hashed and published, so a test can deliver a real
signal to a real save (unset in normal use).

Layouts. Model tensors are stored in global (unsharded) coordinates, so a checkpoint saved at one
TP/PP/VPP layout loads at any other. Optimizer state: the non-distributed optimizer's state is stored
per parameter in the same global coordinates and reshards across TP/PP/DP like the model; the
distributed optimizer's `dp_reshardable` format stores its flat grad-buffer shards and reshards across
DP only — loading it at another TP/PP/VPP raises CheckpointError naming the fix (resume at the saved
layout, or `train.load_optimizer=false` to restart the optimizer moments). RNG states are restored only at
the saved layout and world size (another layout keeps the freshly seeded RNG and logs it).

Saving is synchronous. Megatron's torch_dist writer forks writer processes (so the calling process
must be allowed children: torchrun ranks are; daemonic multiprocessing workers are not); the `spawn`
queue manager it would also start is replaced by an in-process queue for the duration of our sync
save, so scripts that save need no `if __name__ == "__main__":` guard on its account (keep one
anyway if the script itself spawns processes).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime
import errno
import hashlib
import json
import logging
import os
import queue
import random
import re
import secrets
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from megatron_vppo.checkpoint.atomic_dir import publish, temp_sibling
from megatron_vppo.distributed import ParallelDims, all_gather_world, all_ranks_ok, barrier, broadcast_object

logger = logging.getLogger(__name__)

FORMAT = "megatron_vppo.dist_checkpoint"
FORMAT_VERSION = 2  # 2: per-file sha256 digests in meta.json
META_FILE = "meta.json"
COMPLETE_MARKER = "COMPLETE"
DIST_SUBDIR = "dist"
RNG_SUBDIR = "rng"
OPTIMIZER_SHARDING_TYPE = "dp_reshardable"
_NAME_RE = re.compile(r"^step_(\d{7,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the directory and the fix."""


class SaveInterrupted(KeyboardInterrupt):
    """SIGINT / SIGTERM arrived during a save; raised once the save finished (or was cleaned up)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass
class LoadedCheckpoint:
    path: Path
    step: int
    meta: dict
    train_state: dict = field(default_factory=dict)
    optimizer_loaded: bool = False
    scheduler_loaded: bool = False
    rng_restored: bool = False


# ---------------------------------------------------------------------------------------------
# Names, metadata, discovery (no process group needed)


def checkpoint_name(step: int) -> str:
    return f"step_{int(step):07d}"


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_meta(path: str | Path) -> dict:
    """meta.json of a checkpoint directory; CheckpointError when missing or unreadable."""
    p = Path(path) / META_FILE
    try:
        meta = json.loads(p.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{p} is missing") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{p} is unreadable ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{p} is not a JSON object")
    return meta


def check_complete(path: str | Path) -> dict:
    """Return the meta of a complete checkpoint, else raise CheckpointError saying what is wrong."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p} is not a directory")
    m = _NAME_RE.match(p.name)
    if m is None:
        raise CheckpointError(f"{p.name} is not a checkpoint name (step_NNNNNNN; .tmp-* is a partial save)")
    if not (p / COMPLETE_MARKER).is_file():
        raise CheckpointError(f"{p} has no {COMPLETE_MARKER} marker (save did not finish)")
    meta = read_meta(p)
    if meta.get("format") != FORMAT or not meta.get("complete"):
        raise CheckpointError(f"{p / META_FILE} does not describe a complete {FORMAT} checkpoint")
    if meta.get("step") != int(m.group(1)):
        raise CheckpointError(
            f"{p / META_FILE} says step {meta.get('step')!r} but the directory is step {int(m.group(1))}"
        )
    if not (p / DIST_SUBDIR / "metadata.json").is_file():
        raise CheckpointError(f"{p / DIST_SUBDIR} lacks Megatron's metadata.json (model/optimizer not saved)")
    return meta


def list_complete(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under ckpt_dir, oldest first; skipped ones are logged."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        if not p.name.startswith("step_"):
            continue
        if ".tmp" in p.name:
            logger.info("checkpoint scan: ignoring %s (partial save: temporary directory)", p)
            continue
        try:
            meta = check_complete(p)
        except CheckpointError as e:
            logger.warning("checkpoint scan: ignoring %s: %s", p, e)
            continue
        out.append((int(meta["step"]), p))
    return sorted(out)


def find_latest_complete(ckpt_dir: str | Path) -> Path | None:
    """Newest complete checkpoint under ckpt_dir, or None. Ignores `.tmp*` dirs, dirs without the
    COMPLETE marker and dirs with an unreadable / inconsistent meta.json (each logged with the reason)."""
    found = list_complete(ckpt_dir)
    return found[-1][1] if found else None


def resolve_resume(resume: str, ckpt_dir: str | Path) -> Path | None:
    """TrainConfig.resume -> a checkpoint path or None: 'auto' (latest complete, None if none),
    'never' (None), or an explicit checkpoint directory (must be complete). Markers and meta.json
    only, no process group; the trainer uses `select_resume`, which also verifies the files."""
    if resume in ("never", "", None):
        return None
    if resume == "auto":
        latest = find_latest_complete(ckpt_dir)
        if latest is None:
            logger.info("resume=auto: no complete checkpoint under %s; starting fresh", ckpt_dir)
        return latest
    p = Path(resume)
    try:
        check_complete(p)
    except CheckpointError as e:
        raise CheckpointError(
            f"train.resume={resume!r}: {e}. Fix: point resume at a complete step_NNNNNNN directory, "
            f"or use resume=auto to pick the newest complete one under {ckpt_dir}"
        ) from None
    return p


def prune_checkpoints(ckpt_dir: str | Path, keep_last: int, protect: Path | None = None) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints, and stale `.tmp-*` dirs of steps
    at or below the newest complete one (leftovers of crashed saves). Returns what was deleted.
    `keep_last <= 0` keeps everything.

    `protect`: the checkpoint just saved — verified, since its digests were computed from the files on
    disk. It is never deleted, and only checkpoints up to its step count toward `keep_last`: a newer
    one is a leftover of an earlier attempt (e.g. the corrupt checkpoint a resumed run skipped), which
    the run replaces when it reaches that step. Counting it could prune the last checkpoint that
    verifies."""
    root = Path(ckpt_dir)
    removed: list[Path] = []
    complete = list_complete(root)
    candidates = complete
    if protect is not None:
        m = _NAME_RE.match(Path(protect).name)
        if m is not None:
            candidates = [(s, p) for s, p in complete if s <= int(m.group(1))]
    if keep_last > 0 and len(candidates) > keep_last:
        for _, p in candidates[:-keep_last]:
            if protect is not None and p.resolve() == Path(protect).resolve():
                continue
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    if complete:
        newest = complete[-1][0]
        for p in root.iterdir():
            m = re.match(r"^step_(\d+)\.tmp", p.name)
            if m and int(m.group(1)) <= newest and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    for p in removed:
        logger.info("checkpoint prune: removed %s", p)
    return removed


# ---------------------------------------------------------------------------------------------
# Integrity: per-file sizes and sha256 digests in meta.json

_HASH_CHUNK = 8 << 20


def _file_digest(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(_HASH_CHUNK)
            if not block:
                break
            h.update(block)  # releases the GIL: the thread pool below hashes files in parallel
            n += len(block)
    return n, h.hexdigest()


def _payload_files(ckpt: Path) -> list[str]:
    """Relative paths of every file the digests cover: all but meta.json (which holds them) and the
    COMPLETE marker."""
    out = []
    for p in sorted(ckpt.rglob("*")):
        rel = p.relative_to(ckpt).as_posix()
        if p.is_file() and rel not in (META_FILE, COMPLETE_MARKER):
            out.append(rel)
    return out


def _hash_files(root: Path, rels: list[str]) -> dict:
    if not rels:
        return {}
    workers = max(1, min(8, os.cpu_count() or 1, len(rels)))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda r: _file_digest(root / r), rels))
    return {r: {"bytes": n, "sha256": d} for r, (n, d) in zip(rels, results)}


def _gather_objects(obj: Any) -> list:
    """Every rank's `obj` in rank order (collective); [obj] without a process group."""
    return all_gather_world([obj])


def _dcp_size_problem(path: Path) -> str | None:
    """Format version 1 (no digests): a tensor file shorter than torch DCP's index says is truncated."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        md = FileSystemReader(str(path / DIST_SUBDIR)).read_metadata()
    except Exception as e:  # noqa: BLE001
        return f"{DIST_SUBDIR}/.metadata is unreadable ({_first_line(e)})"
    need: dict = {}
    for info in (getattr(md, "storage_data", None) or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for rel, n in sorted(need.items()):
        f = path / DIST_SUBDIR / rel
        if not f.is_file():
            return f"{DIST_SUBDIR}/{rel} is missing"
        if f.stat().st_size < n:
            return f"{DIST_SUBDIR}/{rel} is truncated ({f.stat().st_size} bytes; the index needs {n})"
    return None


def _file_problem(path: Path, files: dict, rels: list[str]) -> str | None:
    """The first of `rels` whose size or sha256 differs from meta.json, as a reason; else None."""
    for rel in rels:
        f = path / rel
        want = files[rel]
        try:
            size = f.stat().st_size
        except FileNotFoundError:
            return f"{rel} is missing"
        if size != want.get("bytes"):
            return f"{rel} has {size} bytes, meta.json records {want.get('bytes')} (truncated or overwritten)"
    for rel in rels:
        if _file_digest(path / rel)[1] != files[rel].get("sha256"):
            return f"{rel}: sha256 differs from the one recorded at save (the file changed on disk)"
    return None


def verify_checkpoint(path: str | Path) -> dict:
    """Check a checkpoint before loading it (collective when a process group exists: each rank hashes
    a share of the files): complete (marker, meta.json, names), and every file's size and sha256 as
    recorded in meta.json at save. Returns the meta; CheckpointError names the first bad file."""
    p = Path(path)
    rank, world = _dist_rank_world()
    err, meta = None, None
    try:
        meta = check_complete(p)
        files = meta.get("files")
        if files is None:  # format version 1: no digests, sizes against DCP's index only
            err = _dcp_size_problem(p) if rank == 0 else None
            if rank == 0:
                logger.warning("%s has no checksums (saved by format version %s): checked for truncated "
                               "shards only", p, meta.get("version"))
        else:
            err = _file_problem(p, files, sorted(files)[rank::world])
    except CheckpointError as e:
        err = str(e)
    except OSError as e:
        err = f"unreadable ({e})"
    errs = [e for e in _gather_objects(err) if e]
    if errs:
        raise CheckpointError(f"{p} does not verify: {errs[0]}")
    return meta


def select_resume(resume: str, ckpt_dir: str | Path) -> Path | None:
    """TrainConfig.resume -> the checkpoint to load (collective: verification hashes files on every
    rank). 'never' -> None; 'auto' -> the newest complete checkpoint under ckpt_dir that verifies,
    walking back past those that do not (each logged with the reason), None when there is no complete
    one at all; PATH -> that checkpoint, which must verify."""
    if resume in ("never", "", None):
        return None
    if resume != "auto":
        try:
            verify_checkpoint(resume)
        except CheckpointError as e:
            raise CheckpointError(
                f"train.resume={resume!r}: {e}. Fix: point train.resume at a step_NNNNNNN directory that "
                f"verifies, or use train.resume=auto to pick the newest one under {ckpt_dir} that does"
            ) from None
        return Path(resume)
    found = list_complete(ckpt_dir)
    if not found:
        logger.info("resume=auto: no complete checkpoint under %s; starting fresh", ckpt_dir)
        return None
    skipped = []
    for _, p in reversed(found):
        try:
            verify_checkpoint(p)
        except CheckpointError as e:
            logger.warning("resume=auto: skipping %s: %s", p.name, e)
            skipped.append(f"{p.name} ({e})")
            continue
        if skipped:
            logger.warning("resume=auto: resuming from %s, the newest checkpoint that verifies (skipped %d "
                           "newer: %s)", p, len(skipped), ", ".join(s.split(" ")[0] for s in skipped))
        return p
    raise CheckpointError(
        f"resume=auto: no checkpoint under {ckpt_dir} verifies: {'; '.join(skipped)}. Fix: set train.resume "
        f"to a checkpoint directory that verifies, or start fresh with a new train.output_dir (or "
        f"train.resume=never train.existing_output=move_aside to move these aside)"
    )


# ---------------------------------------------------------------------------------------------
# Layout and RNG


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def current_layout(num_chunks: int, dims: ParallelDims | None = None) -> dict:
    """The layout recorded in meta.json (`dims`: this rank's; default read from Megatron's groups)."""
    dims = dims or ParallelDims.from_megatron()
    _, world = _dist_rank_world()
    return {
        "tp": dims.tp,
        "pp": dims.pp,
        "vpp": dims.vpp,
        "cp": dims.cp,
        "dp": dims.dp,
        "world_size": world,
        "num_chunks": num_chunks,
    }


def _same_model_parallel(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in ("tp", "pp", "vpp", "cp", "num_chunks"))


def get_rng_state() -> dict:
    """This rank's RNG states in a weights_only-loadable form."""
    from megatron.core import tensor_parallel

    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "tracker": None,
    }
    tracker = tensor_parallel.get_cuda_rng_tracker()
    if tracker.is_initialized():
        states = tracker.get_states()
        state["tracker"] = {k: v.clone() if torch.is_tensor(v) else v for k, v in states.items()}
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state.get("tracker") is not None:
        tensor_parallel.get_cuda_rng_tracker().set_states(dict(state["tracker"]))


# ---------------------------------------------------------------------------------------------
# State dicts


def _unwrap(chunk):
    from megatron.core.utils import unwrap_model

    return unwrap_model(chunk)


def _model_sharded_state_dict(model_chunks: Sequence[torch.nn.Module]) -> dict:
    # Keys inside are global (layer offsets, TP shards), so the "model{i}" nesting does not have to
    # match between save and load layouts.
    return {f"model{i}": _unwrap(c).sharded_state_dict() for i, c in enumerate(model_chunks)}


def _is_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer import ChainedOptimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    opts = optimizer.chained_optimizers if isinstance(optimizer, ChainedOptimizer) else [optimizer]
    return any(isinstance(o, DistributedOptimizer) for o in opts)


_TORCH_ADAM = (torch.optim.Adam, torch.optim.AdamW)


def _prepare_for_load(optimizer) -> None:
    """Allocate a fresh distributed optimizer's torch-Adam state, `step` included (before a load, and
    before saving an optimizer that has not stepped yet).

    Without Apex / Transformer Engine, Megatron-Core 0.16.1 falls back to torch AdamW, whose per-param
    state needs a `step`; its init_state_fn allocates only exp_avg / exp_avg_sq, and
    DistributedOptimizer.state_dict() (called while building the loading sharded state dict) then
    fails on an optimizer that has not stepped yet. The placeholder step is overwritten by the load.
    """
    from megatron.core.optimizer import ChainedOptimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    opts = optimizer.chained_optimizers if isinstance(optimizer, ChainedOptimizer) else [optimizer]
    for o in opts:
        inner = getattr(o, "optimizer", None)
        if not isinstance(o, DistributedOptimizer) or not isinstance(inner, _TORCH_ADAM):
            continue
        if getattr(o, "init_state_fn", None) is not None:
            o.init_state_fn(inner, o.config)
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                if st and "step" not in st:
                    st["step"] = torch.tensor(0.0)


def _restore_adam_steps(optimizer) -> None:
    """Put the saved Adam step back into every per-param state after a distributed-optimizer load.

    With torch AdamW (no Apex/TE), `dp_reshardable` stores the step in the param groups and marks the
    per-param `step` tensor non-persistent, so Megatron-Core 0.16.1's loader copies the *loading*
    optimizer's own step over it (0 for a fresh one) and Adam's bias correction restarts. The saved
    step is still in the inner optimizer's param groups after the load; copy it back.
    """
    from megatron.core.optimizer import ChainedOptimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    opts = optimizer.chained_optimizers if isinstance(optimizer, ChainedOptimizer) else [optimizer]
    for o in opts:
        inner = getattr(o, "optimizer", None)
        if not isinstance(o, DistributedOptimizer) or not isinstance(inner, _TORCH_ADAM):
            continue
        for group in inner.param_groups:
            if group.get("step") is None:
                continue
            for p in group["params"]:
                st = inner.state.get(p)
                if st and "step" in st:
                    st["step"] = torch.tensor(float(group["step"]), dtype=st["step"].dtype)


def _group_hparams(optimizer) -> list[dict]:
    """The param groups' hyperparameters as this run built them (lr bounds, betas, eps, weight decay,
    multipliers): everything but the params and Adam's step."""
    return [{k: v for k, v in g.items() if k not in ("params", "step")} for g in optimizer.param_groups]


def _set_group_hparams(optimizer, hparams: list[dict]) -> None:
    """After a load: torch's load_state_dict replaced the param groups' hyperparameters with the saved
    ones (Megatron's per-group max_lr included, which its LR schedule reads); this run's config wins,
    so a changed optim.lr or Adam beta takes effect. The checkpoint supplies the state only."""
    groups = optimizer.param_groups
    if len(groups) != len(hparams):
        return
    for g, h in zip(groups, hparams):
        g.update(h)


def _never_stepped(optimizer) -> bool:
    """No torch-optimizer state on this rank yet (no step has run)."""
    from megatron.core.optimizer import ChainedOptimizer

    opts = optimizer.chained_optimizers if isinstance(optimizer, ChainedOptimizer) else [optimizer]
    return all(not any(st for st in getattr(getattr(o, "optimizer", None), "state", {}).values()) for o in opts)


def _optimizer_metadata() -> dict:
    return {"distrib_optim_sharding_type": OPTIMIZER_SHARDING_TYPE}


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


# ---------------------------------------------------------------------------------------------
# Save


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
    dims: ParallelDims | None = None,
) -> Path:
    """Write `ckpt_dir/step_XXXXXXX` from every rank (collective: call on all ranks).

    `model_chunks`: this rank's chunks (DDP-wrapped or not). `train_state`: trainer state that is the
    same on every rank (data-loader position, counters) as plain data — dict / list / str / int /
    float / bool / None / tensors (it is read back with weights_only=True); `step` is added to it.
    `config`: a RunConfig (or dict) snapshot for meta.json. `keep_last`: prune to the newest K
    complete checkpoints after this one is complete (0 = keep all). `dims`: this rank's layout, recorded
    in meta.json (default: read from Megatron's groups). Returns the final path.

    A failure (a full disk included) removes the partial save and raises CheckpointError on every
    rank; SIGINT / SIGTERM during the save raise SaveInterrupted after it (see the module doc).
    """
    _check_plain(train_state or {})
    with _signals_held() as held:
        final = _save(Path(ckpt_dir), int(step), model_chunks, optimizer, scheduler, train_state, config,
                      keep_last, dims)
        signums = [s for s in _gather_objects(held["signum"]) if s is not None]
    if signums:
        name = signal.Signals(signums[0]).name
        raise SaveInterrupted(
            signums[0],
            f"{name} during the checkpoint save of step {step}: the save was finished first ({final} is "
            f"complete); stopping. Continue with train.resume=auto",
        )
    return final


def _save(root: Path, step: int, model_chunks, optimizer, scheduler, train_state, config, keep_last,
          dims: ParallelDims | None) -> Path:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy

    rank, world = _dist_rank_world()
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
            ok, err = False, f"cannot create {tmp}: {_reason(e)}"
    nonce = broadcast_object(nonce)
    tmp = temp_sibling(final, nonce, hidden=False)
    _agree_or_clean_up(ok, err, root, final, tmp)

    layout = current_layout(len(model_chunks), dims)
    is_dist_opt = optimizer is not None and _is_distributed_optimizer(optimizer)
    # A per-parameter optimizer that never stepped holds no state; Megatron would save it without the
    # moments (and without the zero step) that a load then asks for. Its state is a fresh optimizer's:
    # record that instead of saving it.
    opt_unstepped = optimizer is not None and not is_dist_opt and all_ranks_ok(_never_stepped(optimizer))
    rng_state = get_rng_state()  # before anything below could draw random numbers
    try:
        sharded = _model_sharded_state_dict(model_chunks)
        check_sharding(sharded)  # collective, so a bad module fails every rank instead of hanging them
        if optimizer is not None and not opt_unstepped:
            # An optimizer that never stepped (every group so far dropped by dynamic sampling) has no
            # torch-Adam state yet; give it the zero state a fresh optimizer would use.
            _prepare_for_load(optimizer)
            sharded["optimizer"] = optimizer.sharded_state_dict(
                sharded, is_loading=False, metadata=_optimizer_metadata()
            )
        # Non-sharded entries go to common.pt (written by rank 0).
        sharded["scheduler"] = scheduler.state_dict() if scheduler is not None else None
        sharded["train_state"] = {**(train_state or {}), "step": int(step)}
        with _in_process_results_queue(), _rank0_writes_reported() as rank0_error:
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
        ok, err = False, f"rank {rank}: {_reason(e)}"
        logger.exception("checkpoint save failed on rank %d", rank)
    _agree_or_clean_up(ok, err, root, final, tmp)

    delay = float(os.environ.get("MEGATRON_VPPO_TEST_SAVE_DELAY_S", "0") or 0)
    if delay > 0:  # test hook (module doc): a window in which a real save is in progress
        time.sleep(delay)

    # Digests of what is on disk now, each rank hashing a share of the files.
    files: dict = {}
    try:
        files = _hash_files(tmp, _payload_files(tmp)[rank::world])
    except OSError as e:
        ok, err = False, f"rank {rank}: hashing the saved files: {_reason(e)}"
    parts = _gather_objects(files if ok else None)
    _agree_or_clean_up(ok, err, root, final, tmp)
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
            _write_file(tmp / META_FILE, (json.dumps(meta, indent=2) + "\n").encode())
            _write_file(tmp / COMPLETE_MARKER, f"step {int(step)}\n".encode())
            # Re-saving a step (e.g. after resuming before it) replaces it; a failed rename puts the old
            # one back (the next prune would delete it under its .tmp name).
            publish(tmp, final, overwrite=True)
            prune_checkpoints(root, keep_last, protect=final)
        except Exception as e:  # noqa: BLE001
            ok, err = False, _reason(e)
            logger.exception("checkpoint finalize failed")
    _agree_or_clean_up(ok, err, root, final, tmp)
    logger.info("saved checkpoint %s", final)
    return final


def _reason(e: BaseException) -> str:
    """_first_line, marked when an OSError in the chain is ENOSPC (DCP's writers report a full disk
    as a C++ enforce message that does not say so)."""
    text = _first_line(e)
    seen, cur = set(), e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno == errno.ENOSPC:
            return f"{text} [ENOSPC]"
        cur = cur.__cause__ or cur.__context__
    return text


DISK_FULL_BYTES = 1 << 20  # less free space than this after a failed write: the disk is full


def free_bytes(path: str | Path) -> int:
    """Free bytes on the filesystem holding `path` (its nearest existing parent), as this user sees it."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    st = os.statvfs(p)
    blocks = st.f_bfree if os.geteuid() == 0 else st.f_bavail  # root may use the reserved blocks
    return blocks * st.f_frsize


def _looks_like_enospc(text: str) -> bool:
    return any(k in text for k in ("[ENOSPC]", "No space left on device", "[Errno 28]"))


def _agree_or_clean_up(ok: bool, err: str, root: Path, final: Path, tmp: Path) -> None:
    """Collective: when any rank failed, remove the partial save and raise the same CheckpointError on
    every rank — "no space left on <dir>" when the disk is full."""
    errs = [e for e in _gather_objects(None if ok else (err or "failed")) if e]
    if not errs:
        return
    rank, _ = _dist_rank_world()
    free = free_bytes(root)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    if free < DISK_FULL_BYTES or any(_looks_like_enospc(e) for e in errs):
        latest = find_latest_complete(root)
        raise CheckpointError(
            f"no space left on {root} ({free} bytes free): saving {final.name} failed ({errs[0]}); the partial "
            f"save was removed. Fix: free space there (or set train.output_dir to a disk with room), then "
            f"continue with train.resume=auto" + (f" (newest complete checkpoint: {latest.name})" if latest else "")
        )
    raise CheckpointError(f"saving {final} failed ({errs[0]}); the partial save {tmp.name} was removed")


@contextlib.contextmanager
def _signals_held():
    """Hold SIGINT / SIGTERM while a save runs (main thread only): the first one is recorded in the
    yielded box and acted on by the caller once the save is done. Writer processes forked meanwhile
    inherit the handler and so keep writing instead of dying half-way."""
    box: dict = {"signum": None}
    if threading.current_thread() is not threading.main_thread():
        yield box
        return
    pid = os.getpid()

    def hold(signum, frame):  # noqa: ARG001
        if os.getpid() != pid:  # a forked writer: finish writing
            return
        if box["signum"] is None:
            box["signum"] = signum
            os.write(2, f"{signal.Signals(signum).name} received during a checkpoint save: finishing the save, "
                        f"then stopping\n".encode())

    previous = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield box
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _rank0_writes_reported():
    """Let a rank-0-only write that fails inside `dist_checkpointing.save` (common.pt, metadata.json —
    e.g. on a full disk) be reported after the save instead of raised in the middle of it.

    Megatron-Core 0.16.1 writes those on rank 0 around its collective sharded save; raising there
    leaves every other rank blocked in that collective. Here the first such error is recorded in the
    yielded list, rank 0 goes on through the collective part (whose own write failures torch DCP
    reports on every rank), and the caller raises it afterwards, where failures are agreed on by all
    ranks. Scoped to the call; restored afterwards.
    """
    errors: list = []
    try:
        from megatron.core.dist_checkpointing import serialization as ser
    except ImportError:
        yield errors
        return

    def recorded(fn):
        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 — re-raised by the caller after the collective part
                errors.append(e)
        return call

    common = ser.get_default_save_common_strategy()
    patched = [(common, "save_common", common.save_common), (ser, "save_config", ser.save_config)]
    for obj, name, fn in patched:
        setattr(obj, name, recorded(fn))
    try:
        yield errors
    finally:
        for obj, name, fn in patched:
            if obj is common:
                delattr(obj, name)  # back to the class's method
            else:
                setattr(obj, name, fn)


@contextlib.contextmanager
def _in_process_results_queue():
    """Let a synchronous torch_dist save collect its writers' results in a plain in-process queue.

    Megatron-Core 0.16.1 otherwise starts a `spawn` multiprocessing Manager for that queue (built for
    its async path): it re-imports the launching script — which then needs an
    `if __name__ == "__main__":` guard — and it outlives a rank that is killed. In a sync save the
    results are put and read by this same process (the forked writers report through their own
    queue), so a `queue.Queue` is enough. Scoped to the call; restored afterwards.
    """
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    except ImportError:
        yield
        return
    if not hasattr(fa, "_results_queue"):
        yield
        return
    previous = fa._results_queue
    fa._results_queue = queue.Queue()
    try:
        yield
    finally:
        fa._results_queue = previous


def _versions() -> dict:
    out = {"torch": torch.__version__}
    try:
        import megatron.core

        out["megatron_core"] = megatron.core.__version__
    except Exception:  # noqa: BLE001
        pass
    return out


# ---------------------------------------------------------------------------------------------
# Load


def _first_line(e: BaseException) -> str:
    """Short reason: the innermost error line of torch DCP's multi-rank report, else str(e)."""
    text = str(e).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errs = [ln for ln in lines if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", ln)]
    return f"{type(e).__name__}: {(errs[-1] if errs else (lines[0] if lines else ''))[:500]}"


def _corrupt(path: Path, what: str) -> CheckpointError:
    parent = path.parent
    return CheckpointError(
        f"checkpoint {path} cannot be loaded: {what}. Fix: train.resume=auto skips it and resumes from the "
        f"newest checkpoint under {parent} that verifies; or set train.resume to another step_NNNNNNN "
        f"directory"
    )


def load_checkpoint(
    path: str | Path,
    model_chunks: Sequence[torch.nn.Module],
    optimizer=None,
    scheduler=None,
    *,
    load_optimizer: bool = True,
    load_rng: bool = True,
    verify: bool = True,
    dims: ParallelDims | None = None,
) -> LoadedCheckpoint:
    """Load a complete checkpoint into this rank's chunks / optimizer / scheduler (collective).

    Model weights load at any TP/PP/VPP/DP layout. The optimizer loads when `load_optimizer` and it was
    saved (see the module doc for which layouts its format allows); when it is not loaded, its fp32
    main params are refreshed from the loaded weights. Pass a freshly built scheduler. `verify`:
    check every file's size and sha256 first (`verify_checkpoint`); pass False only for a checkpoint
    this process has just verified (e.g. chosen by `select_resume`). `dims`: this rank's layout, compared
    with the saved one (default: read from Megatron's groups).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    p = Path(path)
    try:
        meta = verify_checkpoint(p) if verify else check_complete(p)
    except CheckpointError as e:
        raise _corrupt(p, str(e)) from None
    rank, world = _dist_rank_world()
    saved_layout = meta.get("layout", {})
    now_layout = current_layout(len(model_chunks), dims)
    saved_opt = meta.get("optimizer")

    want_opt = optimizer is not None and load_optimizer and saved_opt is not None
    if optimizer is not None and load_optimizer and saved_opt is None:
        logger.warning("%s has no optimizer state; optimizer starts fresh", p)
    if want_opt:
        is_dist_now = _is_distributed_optimizer(optimizer)
        if bool(saved_opt.get("distributed")) != is_dist_now:
            kind = lambda d: "distributed" if d else "non-distributed"  # noqa: E731
            raise CheckpointError(
                f"checkpoint {p} holds {kind(saved_opt.get('distributed'))} optimizer state but this run "
                f"uses the {kind(is_dist_now)} optimizer. Fix: set optim.use_distributed_optimizer="
                f"{str(bool(saved_opt.get('distributed'))).lower()}, or set train.load_optimizer=false "
                f"(weights only; Adam moments restart)"
            )
        if is_dist_now and not _same_model_parallel(saved_layout, now_layout):
            s, n = saved_layout, now_layout
            raise CheckpointError(
                f"checkpoint {p}: distributed-optimizer state ({OPTIMIZER_SHARDING_TYPE}) reshards over "
                f"data parallel only; it was saved at tp={s.get('tp')} pp={s.get('pp')} vpp={s.get('vpp')} "
                f"and this run is tp={n['tp']} pp={n['pp']} vpp={n['vpp']}. Fix: resume at the saved "
                f"tp/pp/vpp, or set train.load_optimizer=false (weights only; Adam moments restart)"
            )

    # A never-stepped optimizer was saved as such: a freshly built one is already in that state.
    read_opt = want_opt and saved_opt.get("state") != "never_stepped"
    sharded = _model_sharded_state_dict(model_chunks)
    if read_opt:
        _prepare_for_load(optimizer)
        sharded["optimizer"] = optimizer.sharded_state_dict(
            sharded, is_loading=True, metadata=_optimizer_metadata()
        )
    try:
        state = dist_checkpointing.load(
            sharded, str(p / DIST_SUBDIR), strict=StrictHandling.RAISE_UNEXPECTED
        )
    except BaseException as e:  # noqa: BLE001 — torch DCP's CheckpointException is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise _corrupt(p, _first_line(e)) from e

    # From here on a failure can be local to one rank (one pipeline stage's chunk, one rank's RNG
    # file): agree on it before the next collective, or the other ranks block there forever.
    err = None
    for i, chunk in enumerate(model_chunks):
        try:
            _unwrap(chunk).load_state_dict(state[f"model{i}"], strict=True)
        except Exception as e:  # noqa: BLE001
            err = _corrupt(p, f"model chunk {i} does not match the checkpoint ({e})")
            break
    _raise_on_any_rank(err, p)

    if read_opt:
        hparams = _group_hparams(optimizer)
        with torch.no_grad():  # it copies into views of the (grad-requiring) main params
            optimizer.load_state_dict(state["optimizer"])
        _restore_adam_steps(optimizer)
        _set_group_hparams(optimizer, hparams)
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
        same = _same_model_parallel(saved_layout, now_layout) and saved_layout.get("world_size") == world
        rng_file = p / RNG_SUBDIR / f"rank_{rank:05d}.pt"
        err = None
        if not same:
            logger.warning(
                "%s was saved at layout %s, this run is %s: RNG states not restored (fresh seeds)",
                p, saved_layout, now_layout,
            )
        elif not rng_file.is_file():
            err = _corrupt(p, f"{rng_file} is missing")
        else:
            try:
                set_rng_state(torch.load(rng_file, weights_only=True))
                rng_restored = True
            except Exception as e:  # noqa: BLE001
                err = _corrupt(p, f"{rng_file} is unreadable ({e})")
        _raise_on_any_rank(err, p)

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


def _raise_on_any_rank(err: CheckpointError | None, path: Path) -> None:
    """Collective: raise `err` here, or a pointer to the failing rank's log on every other rank."""
    if not all_ranks_ok(err is None):
        raise err or _corrupt(path, "loading failed on another rank (see its log)")


def check_sharding(sharded: dict) -> None:
    """Collective: every tensor shard of a sharded state dict must have exactly one main replica
    across all ranks. Megatron checks this on rank 0 only, inside `dist_checkpointing.save`, where a
    failure leaves the other ranks blocked in a collective; checking first makes every rank raise the
    same clear error instead."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, is_main_replica

    mine = [(t.key, tuple(t.global_offset)) for t in nested_values(sharded)
            if isinstance(t, ShardedTensor) and is_main_replica(t.replica_id)]
    every = _gather_objects(mine)
    count: dict = {}
    for part in every:
        for k in part:
            count[k] = count.get(k, 0) + 1
    dup = sorted(k for k, n in count.items() if n > 1)
    if dup:
        key, offset = dup[0]
        raise CheckpointError(
            f"{len(dup)} checkpoint shard(s) are claimed as the main replica by several ranks, e.g. {key!r} at "
            f"offset {offset} ({count[dup[0]]} ranks): the module's sharded_state_dict gives TP-replicated "
            "tensors the same replica_id on every TP rank; pass tp_group to sharded_state_dict_default there"
        )
