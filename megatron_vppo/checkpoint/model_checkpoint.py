"""A self-contained Megatron model checkpoint, and loading a model from either an HF directory or a
Megatron checkpoint (what the converters and tools/score.py take as `--model`).

    OUT/megatron_vppo_model.json   format marker, the saved layout, where the parts are
    OUT/step_0000000/              `dist_checkpoint.save_checkpoint` (torch_dist, model only)
    OUT/hf/                        config.json + tokenizer / processor / chat-template files

Loadable at any TP/PP layout; `load_model` also takes a trainer checkpoint (`step_NNNNNNN` or its
parent), whose config snapshot names the HF model it started from.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from megatron_vppo.checkpoint.atomic_dir import publish, temp_sibling
from megatron_vppo.distributed import ParallelDims, all_ranks_ok, broadcast_object
from megatron_vppo.checkpoint.hf_load import chunk_list, copy_side_files
from megatron_vppo.errors import ExportError

MODEL_FORMAT = "megatron_vppo.model_checkpoint"
MODEL_META = "megatron_vppo_model.json"
HF_SUBDIR = "hf"


@dataclass
class LoadedModel:
    chunks: list  # this rank's model chunks
    adapter: object  # the model's HF <-> Megatron weight adapter for this TP size
    hf_config: dict
    hf_files: Path | None  # directory with config.json and the tokenizer / processor files
    kind: str  # "hf" | "megatron"
    checkpoint: Path | None = None  # the step directory loaded, for kind == "megatron"
    dims: ParallelDims | None = None  # the layout it was built for (what load_model was given)


def _is_hf_dir(p: Path) -> bool:
    return (p / "config.json").is_file() and (
        any(p.glob("*.safetensors")) or (p / "model.safetensors.index.json").is_file()
    )


def resolve_model_path(path, hf_files=None) -> tuple[str, Path | None, Path | None]:
    """-> (kind, step_dir or None, hf_files dir or None) for an HF dir or a Megatron checkpoint."""
    from megatron_vppo.checkpoint import dist_checkpoint as dc

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist; pass an HF model directory or a Megatron checkpoint")
    if _is_hf_dir(p) and not (p / MODEL_META).exists():
        return "hf", None, p
    hf = Path(hf_files) if hf_files else None
    if (p / MODEL_META).is_file():
        try:
            meta = json.loads((p / MODEL_META).read_text())
        except ValueError as e:
            raise ExportError(f"{p / MODEL_META} is unreadable ({e}); re-run tools/convert_checkpoint.py "
                              "hf-to-mcore to rebuild the checkpoint") from None
        step = p / meta.get("checkpoint", "")
        return "megatron", step, hf or p / meta.get("hf_dir", HF_SUBDIR)
    if (p / dc.META_FILE).is_file() or p.name.startswith("step_"):
        step = p
    else:
        step = dc.find_latest_complete(p)
        if step is None:
            raise ExportError(f"{p} is neither an HF model directory (config.json + *.safetensors) nor a "
                              "Megatron checkpoint (megatron_vppo_model.json or complete step_NNNNNNN dirs)")
    if hf is None:
        for cand in (step.parent / HF_SUBDIR, step / HF_SUBDIR):
            if (cand / "config.json").is_file():
                hf = cand
        if hf is None:
            try:
                cfg = (dc.read_meta(step).get("config") or {})
                mp = (cfg.get("model") or {}).get("path") if isinstance(cfg, dict) else None
            except dc.CheckpointError:
                mp = None
            if mp and (Path(mp) / "config.json").is_file():
                hf = Path(mp)
    return "megatron", step, hf


def model_spec(hf_config):
    """The MODELS entry of a model, from its HF config's `model_type` (a saved checkpoint keeps its
    config.json under hf/, so one rule serves both kinds of `--model`)."""
    from megatron_vppo.models import spec_for_hf_config

    try:
        return spec_for_hf_config(hf_config)
    except KeyError as e:
        raise ExportError(e.args[0]) from None


def read_model_config(path, hf_files=None) -> dict:
    """The HF config.json of an HF dir or Megatron checkpoint (before any process group exists)."""
    kind, step, hf = resolve_model_path(path, hf_files)
    if hf is None or not (hf / "config.json").is_file():
        raise ExportError(f"{path}: no HF config.json found for this Megatron checkpoint; pass the HF "
                          "directory it came from (--hf-config DIR)")
    if kind == "megatron" and step is not None:
        check_checkpoint_structure(step, hf)
    return model_spec(hf).load_hf_config(hf)


def check_checkpoint_structure(step: Path, hf: Path) -> None:
    """ExportError when a trainer checkpoint records a model structure (meta.json "model") that the HF
    directory `hf` (its config.json and tokenizer) does not have."""
    from megatron_vppo.checkpoint import dist_checkpoint as dc
    from megatron_vppo.checkpoint.model_structure import model_structure, structure_differences

    try:
        saved = dc.read_meta(step).get("model")
    except dc.CheckpointError:
        return
    diffs = structure_differences(saved, model_structure(hf))
    if diffs:
        raise ExportError(f"{step} was trained as another model than {hf} describes ({'; '.join(diffs)}); its "
                          f"weights cannot load into it. Fix: pass the HF directory the run was trained from "
                          f"(--hf-config DIR: the run's model.path)")


def model_dims(hf_config) -> dict:
    """Keyword arguments `distributed.init_distributed` validates the layout against."""
    return model_spec(hf_config).layout_dims(hf_config)


def build_model(hf_config, parallel=None, model_cfg=None, *, dims: ParallelDims, init_weights: bool = True):
    """(this rank's chunks, weight adapter) — after `init_distributed` (`dims`: what it returned).
    `init_weights=False` when every parameter is loaded next."""
    from megatron_vppo.config import ModelConfig, ParallelConfig

    spec = model_spec(hf_config)
    model_cfg = model_cfg or ModelConfig()
    parallel = parallel or ParallelConfig()
    chunks = spec.build_chunks(hf_config, model_cfg, parallel, dims, init_weights=init_weights)
    return chunks, spec.weight_adapter(hf_config, dims.tp, model_cfg.vocab_pad_multiple)


def load_model(path, parallel=None, model_cfg=None, *, hf_files=None, dims: ParallelDims) -> LoadedModel:
    """Build this rank's chunks and load an HF directory or a Megatron checkpoint into them
    (collective; after `init_distributed`)."""
    from megatron_vppo.checkpoint import dist_checkpoint as dc
    from megatron_vppo.checkpoint.hf_load import load_hf_weights

    kind, step, hf = resolve_model_path(path, hf_files)
    cfg = read_model_config(path, hf_files)
    chunks, adapter = build_model(cfg, parallel, model_cfg, dims=dims, init_weights=False)  # every param is loaded next
    if kind == "hf":
        load_hf_weights(chunks, path, adapter, dims=dims)
    else:
        try:
            dc.load_checkpoint(step, chunks, load_rng=False, dims=dims)
        except dc.CheckpointError as e:
            raise ExportError(
                f"Megatron checkpoint {step} cannot be loaded: {e}. If it came from "
                f"tools/convert_checkpoint.py, re-run hf-to-mcore to rebuild it"
            ) from None
    for c in chunks:
        c.eval()
    return LoadedModel(chunks, adapter, cfg, hf, kind, step, dims)


def save_model_checkpoint(model_chunks, out_dir, hf_config, hf_files=None, *, overwrite: bool = False,
                          source: str | None = None, dims: ParallelDims) -> Path:
    """Collective: write a self-contained Megatron model checkpoint (layout above) atomically —
    into a temporary sibling directory, renamed to `out_dir` only after every rank succeeded."""
    from megatron_vppo.checkpoint import dist_checkpoint as dc

    out = Path(out_dir)
    rank = dist.get_rank() if dist.is_initialized() else 0
    cfg = model_spec(hf_config).load_hf_config(hf_config)
    if not all_ranks_ok(rank != 0 or overwrite or not out.exists()):
        raise ExportError(f"{out} already exists; choose another --out (or remove it)")
    tmp = None
    if rank == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_sibling(out)
    tmp = Path(broadcast_object(str(tmp) if tmp else None))
    ok, err = True, ""
    try:
        step_dir = dc.save_checkpoint(tmp, 0, chunk_list(model_chunks), config={"hf_config": cfg, "source": source},
                                      dims=dims)
    except Exception as e:  # noqa: BLE001 — save_checkpoint already agreed on failure across ranks
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if str(e).startswith("no space left on"):  # the trainer's fix (train.resume=auto) does not apply here
            raise ExportError(f"no space left on the disk of {out} ({dc.free_bytes(out.parent)} bytes free): saving "
                              f"the Megatron checkpoint failed; the partial save was removed. Fix: free space "
                              f"there, or choose another --out") from None
        raise ExportError(f"saving the Megatron checkpoint to {out} failed: {e}") from e
    if rank == 0:
        try:
            (tmp / HF_SUBDIR).mkdir()
            if hf_files is not None:
                copy_side_files(hf_files, tmp / HF_SUBDIR)
            (tmp / HF_SUBDIR / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
            meta = {
                "format": MODEL_FORMAT,
                "version": 1,
                "checkpoint": step_dir.name,
                "hf_dir": HF_SUBDIR,
                "saved_layout": dc.current_layout(len(chunk_list(model_chunks)), dims=dims),
                "source": source,
            }
            (tmp / MODEL_META).write_text(json.dumps(meta, indent=2) + "\n")
            publish(tmp, out, overwrite=overwrite)
        except Exception as e:  # noqa: BLE001
            ok, err = False, f"{type(e).__name__}: {e}"
            shutil.rmtree(tmp, ignore_errors=True)
    if not all_ranks_ok(ok):
        raise ExportError(f"finalizing {out} failed on rank 0 ({err or 'see its log'})")
    return out
