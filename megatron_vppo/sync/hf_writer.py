"""Write a Hugging Face model directory from the weight stream: safetensors shards (+ index),
config.json and the tokenizer / processor / chat-template files of the source directory. Published
atomically (checkpoint/atomic_dir.py): the output is either complete or untouched."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed as dist

from megatron_vppo.checkpoint.atomic_dir import atomic_dir
from megatron_vppo.checkpoint.hf_load import HF_SIDE_FILES, copy_side_files  # noqa: F401  (re-exported)
from megatron_vppo.distributed import ParallelDims, all_ranks_ok
from megatron_vppo.sync.buckets import DEFAULT_BUCKET_BYTES, iter_named_tensors
from megatron_vppo.errors import ExportError
from megatron_vppo.sync.stream import drain, export_hf_buckets

def _owned(t: torch.Tensor) -> torch.Tensor:
    """safetensors refuses tensors that share storage (views into one bucket buffer)."""
    t = t.detach().to("cpu").contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def _write_shards(stream: Iterable, tmp: Path, max_shard_bytes: int) -> None:
    """The stream's tensors as `model.safetensors`, or `model-0000i-of-0000n.safetensors` + index."""
    from safetensors.torch import save_file

    shards: list[tuple[str, list[str], int]] = []
    pending: dict[str, torch.Tensor] = {}
    size, total, seen = 0, 0, set()

    def flush():
        nonlocal pending, size
        fname = f"part-{len(shards):05d}.safetensors"
        save_file(pending, str(tmp / fname), metadata={"format": "pt"})
        shards.append((fname, list(pending), size))
        pending, size = {}, 0

    for name, t in iter_named_tensors(stream):
        if name in seen:
            raise ExportError(f"weight stream holds {name!r} twice")
        seen.add(name)
        n = t.numel() * t.element_size()
        if pending and size + n > max_shard_bytes:
            flush()
        pending[name] = _owned(t)
        size += n
        total += n
    if pending or not shards:
        if not pending:
            raise ExportError("the weight stream was empty; was it consumed on a non-destination rank?")
        flush()
    if len(shards) == 1:
        os.rename(tmp / shards[0][0], tmp / "model.safetensors")
        return
    weight_map = {}
    for i, (fname, names, _) in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.rename(tmp / fname, tmp / final)
        weight_map.update({n: final for n in names})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def save_hf_checkpoint(
    stream: Iterable,
    out_dir,
    hf_config,
    source_dir=None,
    *,
    max_shard_bytes: int = 2 * 1024**3,
    overwrite: bool = False,
) -> Path:
    """Write a Hugging Face directory from a weight stream ((name, tensor) pairs and/or Buckets).

    Produces safetensors shards (`model.safetensors`, or `model-0000i-of-0000n.safetensors` + the
    index), `config.json` (from `hf_config`: a dict, a config.json path or an HF directory) and the
    tokenizer / processor / chat-template files found in `source_dir`. Written into a temporary sibling
    directory and renamed into place at the end, so `out_dir` is either complete or untouched.
    At most one shard (`max_shard_bytes`) is held in memory besides the stream's own tensors."""
    from megatron_vppo.models import spec_for_hf_config

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; choose another output directory or pass overwrite=True")
    config = spec_for_hf_config(hf_config).load_hf_config(hf_config)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        _write_shards(stream, tmp, max_shard_bytes)
        if source_dir is not None:
            copy_side_files(source_dir, tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def export_hf_checkpoint(
    model_chunks,
    adapter,
    out_dir,
    hf_config,
    source_dir=None,
    *,
    bucket_bytes: int | None = DEFAULT_BUCKET_BYTES,
    overwrite: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
    dims: ParallelDims,
) -> Path:
    """Collective: global rank 0 writes the HF directory from the export stream, the others feed it.
    Every rank raises if the write failed."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    exists = rank == 0 and Path(out_dir).exists() and not overwrite
    if not all_ranks_ok(not exists):
        raise ExportError(f"{out_dir} already exists; choose another output directory or pass overwrite=True")
    stream = export_hf_buckets(model_chunks, adapter, bucket_bytes, dst="rank0", dims=dims)
    err = None
    if rank == 0:
        try:
            save_hf_checkpoint(stream, out_dir, hf_config, source_dir,
                               max_shard_bytes=max_shard_bytes, overwrite=overwrite)
        except Exception as e:  # noqa: BLE001 — finish the collective first
            err = e
        drain(stream)
    else:
        drain(stream)
    if not all_ranks_ok(err is None):
        if err is not None:
            raise err
        raise ExportError(f"writing {out_dir} failed on rank 0 (see its log)")
    return Path(out_dir)
