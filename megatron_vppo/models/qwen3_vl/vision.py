"""Qwen3-VL's vision tower on Megatron-Core transformer layers, TP-sharded like the LM.

    pixel_values [N, C*T*P*P] (flattened 16-px patches in merge-block order, as the processor emits)
      -> Conv3d patch embed (with bias)                                         [N, D]
      -> + learned position embeddings: the square table (`num_position_embeddings` = side²) resampled
         bilinearly (align_corners) to each image's patch grid
      -> depth x TransformerLayer (LayerNorm, QKV+bias, 2-D rotary, GELU-tanh MLP+bias), full attention
         over each frame (packed `thd` segments through PackedSeqAttention)
      -> merger: LayerNorm(D), 2x2 merge, Column/RowParallel MLP with GELU        [N/4, out_hidden]
    DeepStack: the output of each block in `deepstack_visual_indexes` goes through its own merger
    (2x2 merge first, then LayerNorm(4D)) -> one [N/4, out_hidden] tensor per index.

No window reordering (every block attends the whole frame), so rows stay in the processor's order.
Like Qwen2.5-VL's tower, its TransformerConfig is its own (no SP/PP/CP; activations [N, 1, D]
replicated over TP), the MLP width is zero-padded (`config.vision_ffn_size`: a multiple of lcm(TP, 8),
so checkpoints reshard between TP sizes; GELU(0)·0 = 0), and the 2-D
rotary and the TP layer spec are the ones models/qwen2_5_vl/vision.py defines.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import sharded_state_dict_default

from megatron_vppo.models.qwen2_5_vl.vision import (
    INHERITED_KEYS,
    _grid_list,
    _packed,
    frame_cu_seqlens,
    in_channels,
    patch_positions,
    rope_theta,
    rotary_freqs,
    vision_layer_spec,
)
from megatron_vppo.models.qwen3_vl.config import vision_ffn_size

__all__ = ["INHERITED_KEYS", "Qwen3VisionModel", "vision_transformer_config", "position_embedding_weights"]

_ACTIVATIONS = {"gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu, "silu": F.silu}


def _get(cfg: dict, key: str, default=None):
    if key in cfg:
        return cfg[key]
    if default is None:
        raise KeyError(f"vision config has no {key!r}; pass config.json's `vision_config` dict")
    return default


def vision_transformer_config(hf_vision_cfg: dict, base_kwargs: dict) -> TransformerConfig:
    """The tower's TransformerConfig: shapes from `vision_config`, run-time knobs from the LM's."""
    hidden, heads = int(_get(hf_vision_cfg, "hidden_size")), int(_get(hf_vision_cfg, "num_heads"))
    act = _get(hf_vision_cfg, "hidden_act", "gelu_pytorch_tanh")
    if act not in _ACTIVATIONS:
        raise ValueError(f"vision hidden_act {act!r} is not supported; expected one of {sorted(_ACTIVATIONS)}")
    if hidden % heads or (hidden // heads) % 4:
        raise ValueError(f"vision hidden_size {hidden} / num_heads {heads} must give a head_dim divisible by 4")
    tp = int(base_kwargs.get("tensor_model_parallel_size", 1))
    if heads % tp:
        raise ValueError(f"tp={tp} does not divide the vision tower's num_heads={heads}; choose tp dividing it")
    kw = {k: base_kwargs[k] for k in INHERITED_KEYS if k in base_kwargs}
    kw.update(
        num_layers=int(_get(hf_vision_cfg, "depth")), hidden_size=hidden, num_attention_heads=heads,
        num_query_groups=heads, kv_channels=hidden // heads,
        ffn_hidden_size=vision_ffn_size(int(_get(hf_vision_cfg, "intermediate_size")), tp),
        gated_linear_unit=False, activation_func=_ACTIVATIONS[act], add_bias_linear=True, add_qkv_bias=True,
        normalization="LayerNorm", layernorm_epsilon=1e-6, hidden_dropout=0.0, attention_dropout=0.0,
        sequence_parallel=False, pipeline_model_parallel_size=1, virtual_pipeline_model_parallel_size=None,
        context_parallel_size=1, apply_rope_fusion=False, rotary_interleaved=False, tp_comm_overlap=False,
    )
    return TransformerConfig(**kw)


def position_embedding_weights(grid_thw, side: int, merge: int, device=None):
    """Bilinear (align_corners) resampling of a side x side table to every patch, in merge-block order:
    (indices [N, 4] into the flattened table, weights [N, 4])."""
    idx, wts = [], []
    for t, h, w in _grid_list(grid_thw):
        pos = patch_positions([(1, h, w)], merge)  # [h*w, 2] (row, col)
        taps_w = []
        for axis, size in ((0, h), (1, w)):
            src = pos[:, axis].double() * (side - 1) / max(size - 1, 1)
            lo = src.floor()
            frac = src - lo
            lo = lo.long().clamp(0, side - 1)
            hi = (lo + 1).clamp(max=side - 1)
            taps_w.append((lo, hi, 1 - frac, frac))
        (r0, r1, wr0, wr1), (c0, c1, wc0, wc1) = taps_w
        i = torch.stack([r0 * side + c0, r0 * side + c1, r1 * side + c0, r1 * side + c1], dim=-1)
        v = torch.stack([wr0 * wc0, wr0 * wc1, wr1 * wc0, wr1 * wc1], dim=-1)
        idx.append(i.repeat(t, 1))
        wts.append(v.repeat(t, 1))
    return torch.cat(idx).to(device), torch.cat(wts).float().to(device)


class PatchEmbed(torch.nn.Module):
    """Conv3d with kernel = stride = (T, P, P) over already-flattened patches, with bias."""

    def __init__(self, in_ch: int, temporal: int, patch: int, hidden: int, dtype: torch.dtype):
        super().__init__()
        self.shape = (in_ch, temporal, patch, patch)
        k = (temporal, patch, patch)
        self.proj = torch.nn.Conv3d(in_ch, hidden, kernel_size=k, stride=k, bias=True, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.view(-1, *self.shape).to(self.proj.weight.dtype)).flatten(1)


class PatchMerger(MegatronModule):
    """LayerNorm (over D before the 2x2 merge, or over 4D after it for DeepStack) -> Column/Row MLP."""

    def __init__(self, config: TransformerConfig, out_hidden: int, merge: int, norm_after_merge: bool):
        super().__init__(config=config)
        self.in_size = config.hidden_size * merge * merge
        self.norm_after_merge = norm_after_merge
        norm_size = self.in_size if norm_after_merge else config.hidden_size
        self.norm = torch.nn.LayerNorm(norm_size, eps=1e-6, dtype=config.params_dtype)
        self.linear_fc1 = tensor_parallel.ColumnParallelLinear(
            self.in_size, self.in_size, config=config, init_method=config.init_method,
            bias=True, gather_output=False, skip_bias_add=False,
        )
        self.linear_fc2 = tensor_parallel.RowParallelLinear(
            self.in_size, out_hidden, config=config, init_method=config.output_layer_init_method,
            bias=True, input_is_parallel=True, skip_bias_add=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 1, D] -> [N/merge², 1, out_hidden]."""
        if self.norm_after_merge:
            h = self.norm(x.reshape(-1, 1, self.in_size))
        else:
            h = self.norm(x).reshape(-1, 1, self.in_size)
        h, _ = self.linear_fc1(h)
        h, _ = self.linear_fc2(F.gelu(h))
        return h


class Qwen3VisionModel(MegatronModule):
    """forward(pixel_values, image_grid_thw) -> (merged [N/4, out], [DeepStack features [N/4, out]])."""

    def __init__(self, hf_vision_cfg: dict, base_kwargs: dict, use_te: bool = False, tp_group=None):
        config = vision_transformer_config(hf_vision_cfg, base_kwargs)
        super().__init__(config=config)
        self.tp_group = tp_group
        c = hf_vision_cfg
        self.merge = int(_get(c, "spatial_merge_size", 2))
        self.head_dim = config.kv_channels
        self.theta = rope_theta(c)
        num_pos = int(_get(c, "num_position_embeddings"))
        self.side = int(round(num_pos**0.5))
        if self.side * self.side != num_pos:
            raise ValueError(f"num_position_embeddings {num_pos} is not a square; Qwen3-VL's table is side x side")
        self.deepstack_indexes = tuple(int(i) for i in (c.get("deepstack_visual_indexes") or ()))
        bad = [i for i in self.deepstack_indexes if not 0 <= i < config.num_layers]
        if bad:
            raise ValueError(f"deepstack_visual_indexes {bad} are outside depth {config.num_layers}")
        self.patch_embed = PatchEmbed(in_channels(c), int(_get(c, "temporal_patch_size", 2)),
                                      int(_get(c, "patch_size", 16)), config.hidden_size, config.params_dtype)
        self.pos_embed = torch.nn.Embedding(num_pos, config.hidden_size, dtype=config.params_dtype)
        if config.perform_initialization:
            config.init_method(self.patch_embed.proj.weight.data)
            config.init_method(self.pos_embed.weight.data)
            torch.nn.init.zeros_(self.patch_embed.proj.bias.data)
        spec = vision_layer_spec(config.ffn_hidden_size, use_te=use_te)
        self.blocks = torch.nn.ModuleList(
            build_module(spec, config=config, layer_number=i + 1) for i in range(config.num_layers)
        )
        out = int(_get(c, "out_hidden_size"))
        self.merger = PatchMerger(config, out, self.merge, norm_after_merge=False)
        self.deepstack_mergers = torch.nn.ModuleList(
            PatchMerger(config, out, self.merge, norm_after_merge=True) for _ in self.deepstack_indexes
        )

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor):
        grid = _grid_list(image_grid_thw)
        n = sum(t * h * w for t, h, w in grid)
        if pixel_values.dim() != 2 or pixel_values.size(0) != n:
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)} but image_grid_thw {grid} needs {n} "
                "patch rows; pass the processor's flattened patches and their grid together"
            )
        if any(h % self.merge or w % self.merge for _, h, w in grid):
            raise ValueError(f"image_grid_thw {grid}: h and w must be multiples of spatial_merge_size {self.merge}")
        dev = pixel_values.device
        x = self.patch_embed(pixel_values)
        idx, wts = position_embedding_weights(grid, self.side, self.merge, dev)
        x = x + (self.pos_embed(idx) * wts[..., None].to(x.dtype)).sum(1)
        x = x.unsqueeze(1)  # [N, 1, D]
        freqs = rotary_freqs(patch_positions(grid, self.merge, dev), self.head_dim, self.theta)[:, None, None, :]
        full = _packed(frame_cu_seqlens(grid, dev))
        deepstack = []
        for i, layer in enumerate(self.blocks):
            x, _ = layer(x, attention_mask=None, rotary_pos_emb=freqs, packed_seq_params=full)
            if i in self.deepstack_indexes:
                deepstack.append(self.deepstack_mergers[self.deepstack_indexes.index(i)](x).squeeze(1))
        return self.merger(x).squeeze(1), deepstack

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """Distributed-checkpoint view, each block under `blocks.{i}.` with its own TP sharding (the TP
        group, `ParallelDims.tp_group` given at construction, gives TP-replicated tensors distinct replica ids)."""
        tp_group = self.tp_group
        sd = {}
        for name, child in self.named_children():
            if name in ("blocks", "deepstack_mergers"):
                for i, sub in enumerate(child):
                    sd.update(sharded_state_dict_default(sub, f"{prefix}{name}.{i}.", sharded_offsets, metadata,
                                                         tp_group=tp_group))
            else:
                sd.update(sharded_state_dict_default(child, f"{prefix}{name}.", sharded_offsets, metadata,
                                                     tp_group=tp_group))
        return sd
