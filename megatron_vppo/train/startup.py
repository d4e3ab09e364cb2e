"""A run's start-up: every check that needs no model, in seconds, before `build_run` (train/build.py) builds
the model and the engine (minutes). Each mistake is one line (ConfigError / DataError, exit 2).

`start_run(cfg)` in order:

1. the config itself: `train.output_dir` set; no Transformer Engine / fp8 without a GPU;
2. the paths: `model.path` is a model whose `model_type` is in MODELS; the data files exist and are data;
3. the output directory (global rank 0): created and writable, then locked for the run's life
   (`output_lock.py`: a second run on it exits at once naming the first);
4. (`--print-config` has printed and exited before this sequence: cli.py);
5. a finished run (`train.resume=auto` at `train.total_steps`): said so, nothing built;
6. the output directory's plan (`resume.check_output_dir`): another run refused or moved aside, a
   failed start's leftovers cleared, a branch's newer checkpoints moved aside — decided here, carried
   out by rank 0 last, once every check passed;
7. the checkpoint to resume from has the configured model's structure (`checkpoint/model_structure.py`);
8. the data has at least one usable row (reasons with counts otherwise);
9. the grader's package imports;
10. the resolved config saved as `<output_dir>/config.yaml` (rank 0, after the plan: never over another
    run's).

Ranks other than 0 run the read-only checks (1, 2, 5-9) and find the same mistakes.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from megatron_vppo.config import ConfigError, RunConfig, save_config
from megatron_vppo.data.dataset import DataError, check_data_file
from megatron_vppo.train import output_lock
from megatron_vppo.train.resume import apply_output_plan, check_output_dir, checkpoint_dir, metrics_steps

log = logging.getLogger("megatron_vppo.train")

SCAN_FIRST_BAD = 5  # rows named (index and reason) when a data file has no usable row


@dataclass
class StartPlan:
    model_dir: Path
    complete: Path | None = None  # the finished run's last checkpoint: nothing to do


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


# ------------------------------------------------------------------------------ 1, 2: config and paths


def check_config(cfg: RunConfig) -> None:
    """Settings that cannot work on this machine, or at all, found before anything loads."""
    if not str(cfg.train.output_dir).strip():
        raise ConfigError("train.output_dir is empty; set it to the run's directory (e.g. "
                          "train.output_dir=outputs/run)")
    import torch

    if not torch.cuda.is_available():
        if cfg.model.transformer_impl == "transformer_engine":
            raise ConfigError("model.transformer_impl=transformer_engine needs a GPU (Transformer Engine); on "
                              "CPU set model.transformer_impl=local (or auto)")
        if cfg.model.fp8:
            raise ConfigError(f"model.fp8={cfg.model.fp8} needs a GPU with Transformer Engine; on CPU set "
                              f"model.fp8=null")


def megatron_checkpoint_hint(path: Path, option: str) -> str | None:
    """For a model path that is a trainer checkpoint (a step dir, or a run's output dir): what to run instead."""
    if not path.is_dir():
        return None
    from megatron_vppo.checkpoint.model_checkpoint import resolve_model_path

    for cand in (path, path / "checkpoints"):
        try:
            kind, step, hf = resolve_model_path(cand)
        except Exception:  # noqa: BLE001 - not a checkpoint either: the plain message
            continue
        if kind == "megatron" and step is not None:
            hf_flag = "" if hf is not None else " --hf-config HF_DIR_IT_WAS_TRAINED_FROM"
            return (f"is a Megatron checkpoint ({step}), not a Hugging Face directory; convert it first: "
                    f"megatron-vppo convert mcore-to-hf --ckpt {step} --out HF_DIR{hf_flag}, then pass HF_DIR as "
                    f"{option}")
    return None


def model_dir_problem(path: str | None, option: str) -> str | None:
    """Why `path` is not a model directory of a type in MODELS (one line naming `option`), or None.
    The trainer, `megatron-vppo eval` and tools/generate.py check their model this way first."""
    from megatron_vppo.models import MODELS

    model_dir = Path(path) if path else None
    named = f"{option} {path}" if option.startswith("--") else f"{option}={path!r}"
    if model_dir is None or not (model_dir / "config.json").is_file():
        hint = megatron_checkpoint_hint(model_dir, option) if model_dir is not None else None
        if hint:
            return f"{named} {hint}"
        what = "is not set" if model_dir is None else (
            "does not exist" if not model_dir.exists() else "has no config.json")
        return (f"{named} {what}; point it at a Hugging Face model directory of a type in MODELS "
                f"(tools/convert_checkpoint.py mcore-to-hf turns a Megatron checkpoint into one)")
    try:
        hf = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        return f"{named}: config.json is unreadable ({e})"
    model_type = hf.get("model_type") if isinstance(hf, dict) else None
    known = sorted({t for name in MODELS for t in MODELS[name].hf_model_types})
    if model_type not in known:
        return (f"{named}: model_type {model_type!r} not in MODELS (known: {', '.join(known)}); point {option} "
                f"at a model of a known type")
    return None


def check_paths(cfg: RunConfig) -> Path:
    """Fail before any process group exists when the model or the data is not where the config says,
    or the model is of a type MODELS does not know."""
    from megatron_vppo.models import MODELS, check_hf_config

    problem = model_dir_problem(cfg.model.path, "model.path")
    if problem:
        raise ConfigError(problem)
    model_dir = Path(cfg.model.path)
    hf = json.loads((model_dir / "config.json").read_text())
    try:
        check_hf_config(MODELS[cfg.model.arch], hf, f"model.path {model_dir}")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    from megatron_vppo.rollout import check_engine_model

    check_engine_model(cfg.rollout.engine, model_dir)  # e.g. vLLM on CPU and a head_dim it cannot run
    if not cfg.data.train:
        raise ConfigError("data.train is empty; set it to a parquet/jsonl/arrow file or a saved dataset dir")
    for key in ("train", "val"):
        path = getattr(cfg.data, key)
        if path and not Path(path).exists():
            raise ConfigError(f"data.{key}={path!r} does not exist; pass a .parquet/.jsonl/.json/.arrow file "
                              f"or a directory written by Dataset.save_to_disk")
        if path:
            check_data_file(path, f"data.{key}")
    return model_dir


# ------------------------------------------------------------------------------ 3, 4: the output directory


def prepare_output_dir(out: Path) -> None:
    """Rank 0: create `out`, prove it writable, lock it for this run."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"train.output_dir={out} is not writable ({e.strerror or e}); choose a writable "
                          f"directory for train.output_dir") from None
    output_lock.acquire(out)


def _save_config(cfg: RunConfig, out: Path) -> None:
    """<output_dir>/config.yaml: this start's resolved settings (once no other run's is there). On a full
    disk a warning only: a resume must start there (it needs no space until its next save)."""
    from megatron_vppo.checkpoint.dist_checkpoint import DISK_FULL_BYTES, free_bytes

    try:
        save_config(cfg, out)
    except ConfigError as e:
        if free_bytes(out) >= DISK_FULL_BYTES:
            raise
        log.warning("%s (the disk is full); the run starts without it", e)


# ------------------------------------------------------------------------------ 5, 7: the checkpoint


def finished_run(cfg: RunConfig) -> Path | None:
    """With train.resume=auto: the newest complete checkpoint when it is at train.total_steps already and
    metrics.jsonl does not run past it (a record that does, from a continuation that crashed, is cut back
    by a normal resume)."""
    from megatron_vppo.checkpoint.dist_checkpoint import CheckpointError, find_latest_complete, read_meta

    if cfg.train.resume != "auto":
        return None
    latest = find_latest_complete(checkpoint_dir(cfg))
    try:
        step = int(read_meta(latest).get("step", -1)) if latest is not None else -1
    except (CheckpointError, TypeError, ValueError):
        return None
    if step < cfg.train.total_steps or any(s > step for s in metrics_steps(Path(cfg.train.output_dir) /
                                                                             "metrics.jsonl")):
        return None
    return latest


def resume_candidate(cfg: RunConfig) -> Path | None:
    """The checkpoint a resume would load, by markers only (select_resume verifies it later)."""
    from megatron_vppo.checkpoint.dist_checkpoint import find_latest_complete

    resume = cfg.train.resume
    if resume in ("never", ""):
        return None
    if resume == "auto":
        return find_latest_complete(checkpoint_dir(cfg))
    return Path(resume) if Path(resume).is_dir() else None


def check_structure(ckpt: Path, model_dir: Path) -> None:
    """ConfigError when `ckpt` was saved from a model of another structure than `model_dir`'s."""
    from megatron_vppo.checkpoint.dist_checkpoint import CheckpointError, read_meta
    from megatron_vppo.checkpoint.model_structure import model_structure, structure_differences

    try:
        meta = read_meta(ckpt)
    except CheckpointError:
        return  # select_resume names what is wrong with it
    diffs = structure_differences(meta.get("model"), model_structure(model_dir))
    if not diffs:
        return
    saved_path = ((meta.get("config") or {}).get("model") or {}).get("path")
    raise ConfigError(
        f"resume from {ckpt}: model.path={model_dir} has another structure than the model this checkpoint was "
        f"trained as ({'; '.join(diffs)}); its weights cannot load into it. Fix: set model.path to the model "
        f"the run was trained from" + (f" ({saved_path})" if saved_path else "") + ", or start a new run from "
        f"model.path with train.resume=never and a new train.output_dir")


# ------------------------------------------------------------------------------ 8: the data


def check_rows(path: str, option: str, keys: dict) -> None:
    """DataError (one line, the reasons with counts and the first bad rows) when no row of `path` is
    usable by its schema (missing problem, bad images, ...); stops at the first usable row."""
    from megatron_vppo.data.dataset import PromptDataset

    ds = PromptDataset(path, **keys)
    skipped, first = Counter(ds.load_skipped), []
    for i in range(len(ds)):
        rec, reason = ds.get(i)
        if rec is not None:
            return
        skipped[reason] += 1
        if len(first) < SCAN_FIRST_BAD:
            first.append(f"row {i}: {reason}")
    raise DataError(f"{option} {path}: every row is invalid ({sum(skipped.values())} rows: "
                    f"{', '.join(f'{k}={v}' for k, v in sorted(skipped.items()))}; first: {'; '.join(first)}); "
                    f"fix the data file" + (" or set data.val='' to train without validation"
                                            if option == "data.val" else ""))


# ------------------------------------------------------------------------------ the sequence


def start_run(cfg: RunConfig) -> StartPlan:
    """Steps 1-10 of the module doc. Returns the model directory, or the finished run's last checkpoint
    (`complete`) when there is nothing to train."""
    from megatron_vppo.reward.grade import GraderImportError, import_problem

    check_config(cfg)
    model_dir = check_paths(cfg)
    out = Path(cfg.train.output_dir)
    if _rank() == 0:
        prepare_output_dir(out)
    done = finished_run(cfg)
    if done is not None:
        if _rank() == 0:
            log.warning("train.output_dir=%s: this run is already complete (%s, train.total_steps=%d); nothing to "
                        "do. To train further, raise train.total_steps", out, done.name, cfg.train.total_steps)
        return StartPlan(model_dir, complete=done)
    plan = check_output_dir(cfg)  # decided here, carried out below once every read-only check passed
    candidate = resume_candidate(cfg)
    if candidate is not None:
        check_structure(candidate, model_dir)
    keys = {"problem_key": cfg.data.problem_key, "images_key": cfg.data.images_key,
            "answer_key": cfg.data.answer_key}
    check_rows(cfg.data.train, "data.train", keys)
    if cfg.data.val:
        check_rows(cfg.data.val, "data.val", keys)
    problem = import_problem(cfg.reward.method)  # every rank, before the model loads: a reward of 0 is no default
    if problem:
        raise GraderImportError(problem)
    if _rank() == 0:
        apply_output_plan(out, plan)
        _save_config(cfg, out)
    return StartPlan(model_dir)


def end_run(cfg: RunConfig) -> None:
    """Release the output directory (rank 0's lock)."""
    output_lock.release(cfg.train.output_dir)
