"""Save and resume training state with Megatron-Core distributed checkpointing (torch_dist).

One checkpoint is a directory `DIR/step_0000010/`:

    dist/                 Megatron dist checkpoint: model (sharded_state_dict of every chunk) and
                          optimizer (distributed optimizer: `dp_reshardable`), plus common.pt holding
                          the LR scheduler and the trainer state (step, data-loader position, ...)
    rng/rank_00003.pt     per-rank RNG states: python, numpy, torch CPU, CUDA, Megatron's RNG tracker
    meta.json             step, layout, optimizer format, config snapshot, versions, "complete": true
    COMPLETE              written last, after every rank finished writing

It is written into `DIR/step_0000010.tmp-<nonce>/` and renamed to its final name by rank 0 only after
all ranks report success, so a crash at any point leaves either the previous checkpoints untouched or
a `.tmp-*` directory that `find_latest_complete` ignores. Older checkpoints are pruned (keep last K)
only after the new one is complete.

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

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import queue
import random
import re
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

FORMAT = "megatron_vppo.dist_checkpoint"
FORMAT_VERSION = 1
META_FILE = "meta.json"
COMPLETE_MARKER = "COMPLETE"
DIST_SUBDIR = "dist"
RNG_SUBDIR = "rng"
OPTIMIZER_SHARDING_TYPE = "dp_reshardable"
_NAME_RE = re.compile(r"^step_(\d{7,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the directory and the fix."""


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


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    'never' (None), or an explicit checkpoint directory (must be complete)."""
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
    `keep_last <= 0` keeps everything."""
    root = Path(ckpt_dir)
    removed: list[Path] = []
    complete = list_complete(root)
    if keep_last > 0 and len(complete) > keep_last:
        for _, p in complete[:-keep_last]:
            if protect is not None and p.resolve() == protect.resolve():
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
# Layout and RNG


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def current_layout(num_chunks: int) -> dict:
    from megatron.core import parallel_state as ps

    _, world = _dist_rank_world()
    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "vpp": ps.get_virtual_pipeline_model_parallel_world_size(),
        "cp": ps.get_context_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
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


def all_ranks_ok(ok: bool) -> bool:
    """True iff `ok` on every rank (so one rank's failure stops all of them without a hang)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return ok
    t = torch.tensor([1 if ok else 0], dtype=torch.int32)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


def _broadcast_str(value: str | None) -> str:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value  # type: ignore[return-value]
    obj = [value]
    torch.distributed.broadcast_object_list(obj, src=0)
    return obj[0]


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


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
) -> Path:
    """Write `ckpt_dir/step_XXXXXXX` from every rank (collective: call on all ranks).

    `model_chunks`: this rank's chunks (DDP-wrapped or not). `train_state`: trainer state that is the
    same on every rank (data-loader position, counters) as plain data — dict / list / str / int /
    float / bool / None / tensors (it is read back with weights_only=True); `step` is added to it.
    `config`: a RunConfig (or dict) snapshot for meta.json. `keep_last`: prune to the newest K
    complete checkpoints after this one is complete (0 = keep all). Returns the final path.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy

    _check_plain(train_state or {})
    root = Path(ckpt_dir)
    rank, world = _dist_rank_world()
    name = checkpoint_name(step)
    final = root / name

    nonce = None
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        nonce = secrets.token_hex(4)
    nonce = _broadcast_str(nonce)
    tmp = root / f"{name}.tmp-{nonce}"

    ok, err = True, ""
    try:
        if rank == 0:
            (tmp / DIST_SUBDIR).mkdir(parents=True)
            (tmp / RNG_SUBDIR).mkdir()
    except OSError as e:
        ok, err = False, f"cannot create {tmp}: {e}"
    if not all_ranks_ok(ok):
        raise CheckpointError(err or f"rank 0 could not create {tmp}; check that {root} is writable")

    layout = current_layout(len(model_chunks))
    is_dist_opt = optimizer is not None and _is_distributed_optimizer(optimizer)
    rng_state = get_rng_state()  # before anything below could draw random numbers
    try:
        sharded = _model_sharded_state_dict(model_chunks)
        check_sharding(sharded)  # collective, so a bad module fails every rank instead of hanging them
        if optimizer is not None:
            # An optimizer that never stepped (every group so far dropped by dynamic sampling) has no
            # torch-Adam state yet; give it the zero state a fresh optimizer would use.
            _prepare_for_load(optimizer)
            sharded["optimizer"] = optimizer.sharded_state_dict(
                sharded, is_loading=False, metadata=_optimizer_metadata()
            )
        # Non-sharded entries go to common.pt (written by rank 0).
        sharded["scheduler"] = scheduler.state_dict() if scheduler is not None else None
        sharded["train_state"] = {**(train_state or {}), "step": int(step)}
        with _in_process_results_queue():
            dist_checkpointing.save(
                sharded,
                str(tmp / DIST_SUBDIR),
                sharded_strategy=get_default_save_sharded_strategy("torch_dist"),
                async_sharded_save=False,
            )
        rng_path = tmp / RNG_SUBDIR / f"rank_{rank:05d}.pt"
        tmp_rng = rng_path.with_suffix(".part")
        torch.save(rng_state, tmp_rng)
        os.replace(tmp_rng, rng_path)
    except BaseException as e:  # noqa: BLE001 — reported collectively below (DCP raises BaseException)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        ok, err = False, f"rank {rank}: {_first_line(e)}"
        logger.exception("checkpoint save failed on rank %d", rank)
    if not all_ranks_ok(ok):
        raise CheckpointError(
            f"saving {final} failed ({err or 'on another rank; see its log'}); the partial directory "
            f"{tmp} is ignored on resume and removed by the next successful save"
        )

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
                },
                "scheduler": scheduler is not None,
                "config": _config_snapshot(config),
                "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "versions": _versions(),
            }
            _write_file(tmp / META_FILE, (json.dumps(meta, indent=2) + "\n").encode())
            _write_file(tmp / COMPLETE_MARKER, f"step {int(step)}\n".encode())
            _fsync_dir(tmp)
            old = None
            if final.exists():  # re-saving a step (e.g. after resuming before it): replace it
                old = root / f"{name}.tmp-replaced-{nonce}"
                os.rename(final, old)
            try:
                os.rename(tmp, final)
            except BaseException:
                if old is not None:  # the next prune would delete it under its .tmp name: restore it
                    os.rename(old, final)
                raise
            _fsync_dir(root)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            prune_checkpoints(root, keep_last, protect=final)
        except Exception as e:  # noqa: BLE001
            ok, err = False, f"{type(e).__name__}: {e}"
            logger.exception("checkpoint finalize failed")
    if not all_ranks_ok(ok):
        raise CheckpointError(f"finalizing {final} failed on rank 0 ({err}); {tmp} is left as a partial save")
    logger.info("saved checkpoint %s", final)
    return final


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
        f"checkpoint {path} cannot be loaded: {what}. Fix: delete or move {path} (then resume=auto "
        f"picks the newest complete checkpoint under {parent}), or set train.resume to another "
        f"step_NNNNNNN directory / resume=never to start fresh"
    )


def load_checkpoint(
    path: str | Path,
    model_chunks: Sequence[torch.nn.Module],
    optimizer=None,
    scheduler=None,
    *,
    load_optimizer: bool = True,
    load_rng: bool = True,
) -> LoadedCheckpoint:
    """Load a complete checkpoint into this rank's chunks / optimizer / scheduler (collective).

    Model weights load at any TP/PP/VPP/DP layout. The optimizer loads when `load_optimizer` and it was
    saved (see the module doc for which layouts its format allows); when it is not loaded, its fp32
    main params are refreshed from the loaded weights. Pass a freshly built scheduler.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    p = Path(path)
    try:
        meta = check_complete(p)
    except CheckpointError as e:
        raise _corrupt(p, str(e)) from None
    rank, world = _dist_rank_world()
    saved_layout = meta.get("layout", {})
    now_layout = current_layout(len(model_chunks))
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

    sharded = _model_sharded_state_dict(model_chunks)
    if want_opt:
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

    if want_opt:
        with torch.no_grad():  # it copies into views of the (grad-requiring) main params
            optimizer.load_state_dict(state["optimizer"])
        _restore_adam_steps(optimizer)
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
    _barrier()
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
    every = [mine]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        every = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(every, mine)
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
