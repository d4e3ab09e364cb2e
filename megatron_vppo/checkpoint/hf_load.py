"""Load a Hugging Face safetensors directory into a TP/PP-sharded Megatron model, model-independently.

The model's weight adapter (a `models.weight_adapter.WeightAdapter`, from its `MODELS` spec's
`weight_adapter`) knows names and layouts; this module knows the sharding:

1. every local parameter is renamed to its GLOBAL name — `layers.{local}` becomes
   `layers.{layer_number - 1}` of the TransformerLayer that owns it (Megatron numbers layers globally,
   so this covers PP and VPP offsets) — and canonicalised by the adapter (TE aliases);
2. `adapter.groups(names)` says which HF tensors (by name, or all under a prefix such as `visual.`)
   produce which FULL Megatron tensors; only those HF tensors are read (lazily, from safetensors), so a pipeline stage reads only its own layers;
3. each full tensor is checked against the parameter (shape × TP along `partition_dim`) and this TP
   rank's chunk is copied in. A missing or mis-shaped tensor is an error naming it.

The adapter methods used: `canonical_mcore_name(name)`, `canonical_hf_name(name)` and
`groups(names) -> [Group(hf_names, mcore_names, to_mcore)]`.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

_LAYERS_RE = re.compile(r"^(.*?layers)\.(\d+)\.(.*)$")


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / Float16Module wrappers (they hold the model as `.module`)."""
    while hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
        module = module.module
    return module


def global_param_names(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """{global name: parameter} for one model chunk; layer indices made global via `layer_number`."""
    model = unwrap(model)
    out = {}
    for name, p in model.named_parameters():
        m = _LAYERS_RE.match(name)
        if m:
            prefix, idx, rest = m.groups()
            layer = model.get_submodule(f"{prefix}.{idx}")
            if hasattr(layer, "layer_number") and prefix.endswith("decoder.layers"):
                name = f"{prefix}.{layer.layer_number - 1}.{rest}"
        out[name] = p
    return out


class SafetensorsDir:
    """Lazy reader over a directory's *.safetensors (with or without an index file)."""

    def __init__(self, path, canonical=lambda n: n):
        from safetensors import safe_open

        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.path}: no *.safetensors files; pass a Hugging Face model directory")
        self._handles = {f: safe_open(str(self.path / f), framework="pt") for f in files}
        self.where: dict[str, tuple[str, str]] = {}
        for f, h in self._handles.items():
            for k in h.keys():
                self.where[canonical(k)] = (f, k)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise KeyError(f"{self.path}: no tensor {name!r} in the safetensors files")
        f, k = self.where[name]
        return self._handles[f].get_tensor(k)

    def shape(self, name: str) -> tuple:
        f, k = self.where[name]
        return tuple(self._handles[f].get_slice(k).get_shape())


def tp_shard(full: torch.Tensor, param: torch.Tensor, name: str, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This rank's chunk of `full` for `param`, with a clear error on any shape mismatch."""
    if getattr(param, "tensor_model_parallel", False) and tp_size > 1:
        dim = param.partition_dim
        expect = list(param.shape)
        expect[dim] *= tp_size
        if list(full.shape) != expect:
            raise ValueError(
                f"{name}: full tensor has shape {tuple(full.shape)}, expected {tuple(expect)}"
                f" (local {tuple(param.shape)} x tp={tp_size} along dim {dim})"
            )
        return full.chunk(tp_size, dim=dim)[tp_rank]
    if tuple(full.shape) != tuple(param.shape):
        raise ValueError(f"{name}: tensor has shape {tuple(full.shape)}, parameter expects {tuple(param.shape)}")
    return full


def _tp_rank_size(tp_rank, tp_size, dims=None):
    if tp_rank is None or tp_size is None:
        if dims is None:
            raise TypeError("load_hf_weights needs dims= (init_distributed's ParallelDims) or tp_rank= and tp_size=")
        tp_rank = dims.tp_rank if tp_rank is None else tp_rank
        tp_size = dims.tp if tp_size is None else tp_size
    return tp_rank, tp_size


@torch.no_grad()
def load_hf_weights(model_chunks, hf_dir, adapter, *, dims=None, tp_rank=None, tp_size=None) -> dict:
    """Copy an HF directory's tensors into this rank's parameters. Returns a small report
    {"loaded": n_params, "hf_tensors_read": n, "unused_hf": [names not needed by this rank]}.
    The TP rank and size: `tp_rank`/`tp_size`, else `dims` (a ParallelDims)."""
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    tp_rank, tp_size = _tp_rank_size(tp_rank, tp_size, dims)
    reader = SafetensorsDir(hf_dir, adapter.canonical_hf_name)

    params: dict[str, torch.nn.Parameter] = {}
    for chunk in chunks:
        for name, p in global_param_names(chunk).items():
            params[adapter.canonical_mcore_name(name)] = p

    read, loaded = set(), 0
    groups = adapter.groups(list(params))
    produced = {n for g in groups for n in g.mcore_names}
    not_covered = sorted(set(params) - produced)
    if not_covered:
        raise KeyError(f"no HF source for Megatron parameter(s) {not_covered[:4]}")
    for grp in groups:
        names = list(grp.hf_names)
        if grp.hf_prefix:
            names += sorted(k for k in reader.where if k.startswith(grp.hf_prefix))
            if len(names) == len(grp.hf_names):
                raise KeyError(f"{hf_dir}: no HF tensors under {grp.hf_prefix!r}, needed for {grp.mcore_names[:2]}")
        missing = [h for h in names if h not in reader]
        if missing:
            raise KeyError(
                f"{hf_dir}: missing HF tensor(s) {missing[:4]} needed for Megatron parameter(s)"
                f" {grp.mcore_names[:2]}"
            )
        full = grp.to_mcore({h: reader.get(h) for h in names})
        read.update(names)
        for name in grp.mcore_names:
            if name not in full:
                raise KeyError(f"adapter produced no tensor for Megatron parameter {name!r}")
            p = params[name]
            p.data.copy_(tp_shard(full[name], p, name, tp_rank, tp_size).to(p.dtype))
            loaded += 1
    return {"loaded": loaded, "hf_tensors_read": len(read), "unused_hf": sorted(set(reader.where) - read)}


@torch.no_grad()
def gather_full_state(model_chunks, adapter=None, *, grads: bool = False, tp_group) -> dict:
    """{global canonical name: FULL tensor} of this rank's chunks, all-gathered over TP.

    With `grads=True` the gradients (`main_grad` when DDP keeps one, else `.grad`). Every TP rank
    must call it (collective; `tp_group`: `ParallelDims.tp_group`, None for one TP rank). Tied output
    layers are included under their own name."""
    group = tp_group
    tp = torch.distributed.get_world_size(group) if group is not None and torch.distributed.is_initialized() else 1
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    out = {}
    for chunk in chunks:
        for name, p in global_param_names(chunk).items():
            if adapter is not None:
                name = adapter.canonical_mcore_name(name)
            t = p
            if grads:
                t = getattr(p, "main_grad", None)
                if t is None:
                    t = p.grad
                if t is None:
                    t = torch.zeros_like(p)
            t = t.detach()
            if getattr(p, "tensor_model_parallel", False) and tp > 1:
                parts = [torch.empty_like(t) for _ in range(tp)]
                torch.distributed.all_gather(parts, t.contiguous(), group=group)
                t = torch.cat(parts, dim=p.partition_dim)
            out[name] = t.clone()
    return out


def chunk_list(model_chunks) -> list[torch.nn.Module]:
    """A model given as one module or as its list of (virtual pipeline) chunks, as a list."""
    return list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]


# Files that make an HF directory usable besides its weights (tokenizer, processor, chat template).
HF_SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "qwen.tiktoken",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
)


def copy_side_files(src_dir, dst_dir) -> list[str]:
    """Copy tokenizer / processor / chat-template / generation files (those present) from src_dir."""
    src, dst = Path(src_dir), Path(dst_dir)
    copied = []
    for f in sorted(set(HF_SIDE_FILES) | {p.name for p in src.glob("*.jinja")}):
        if (src / f).is_file():
            shutil.copy2(src / f, dst / f)
            copied.append(f)
    return copied
