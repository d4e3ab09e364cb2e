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
rotary, the TP layer spec, the patch embedding and the merger MLP are models/common/vision.py's.
"""
from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_vppo.models.common import vision as _v
from megatron_vppo.models.common.vision import INHERITED_KEYS, patch_positions
from megatron_vppo.models.qwen3_vl.config import vision_ffn_size

__all__ = ["INHERITED_KEYS", "Qwen3VisionModel", "vision_transformer_config", "position_embedding_weights"]


def vision_transformer_config(hf_vision_cfg: dict, base_kwargs: dict) -> TransformerConfig:
    """The tower's TransformerConfig (models/common/vision.py): LayerNorm, plain GELU-tanh MLP padded
    to a multiple of lcm(TP, 8)."""
    return _v.vision_transformer_config(hf_vision_cfg, base_kwargs, ffn_size=vision_ffn_size, gated=False,
                                        normalization="LayerNorm", default_act="gelu_pytorch_tanh")


def position_embedding_weights(grid_thw, side: int, merge: int, device=None):
    """Bilinear (align_corners) resampling of a side x side table to every patch, in merge-block order:
    (indices [N, 4] into the flattened table, weights [N, 4])."""
    idx, wts = [], []
    for t, h, w in _v.grid_list(grid_thw):
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


class PatchMerger(_v.MergerMLP):
    """LayerNorm (over D before the 2x2 merge, or over 4D after it for DeepStack) -> Column/Row MLP."""

    def __init__(self, config: TransformerConfig, out_hidden: int, merge: int, norm_after_merge: bool):
        norm_size = config.hidden_size * merge * merge if norm_after_merge else config.hidden_size
        super().__init__(config, out_hidden, merge, "norm",
                         torch.nn.LayerNorm(norm_size, eps=1e-6, dtype=config.params_dtype))
        self.norm_after_merge = norm_after_merge

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 1, D] -> [N/merge², 1, out_hidden]."""
        if self.norm_after_merge:
            return self.mlp(self.norm(x.reshape(-1, 1, self.in_size)))
        return self.mlp(self.norm(x).reshape(-1, 1, self.in_size))


class Qwen3VisionModel(MegatronModule):
    """forward(pixel_values, image_grid_thw) -> (merged [N/4, out], [DeepStack features [N/4, out]])."""

    def __init__(self, hf_vision_cfg: dict, base_kwargs: dict, use_te: bool = False, tp_group=None):
        config = vision_transformer_config(hf_vision_cfg, base_kwargs)
        super().__init__(config=config)
        self.tp_group = tp_group
        c = hf_vision_cfg
        self.merge = int(_v.hf_get(c, "spatial_merge_size", 2))
        self.head_dim = config.kv_channels
        self.theta = _v.rope_theta(c)
        num_pos = int(_v.hf_get(c, "num_position_embeddings"))
        self.side = int(round(num_pos**0.5))
        if self.side * self.side != num_pos:
            raise ValueError(f"num_position_embeddings {num_pos} is not a square; Qwen3-VL's table is side x side")
        self.deepstack_indexes = tuple(int(i) for i in (c.get("deepstack_visual_indexes") or ()))
        bad = [i for i in self.deepstack_indexes if not 0 <= i < config.num_layers]
        if bad:
            raise ValueError(f"deepstack_visual_indexes {bad} are outside depth {config.num_layers}")
        self.patch_embed = _v.PatchEmbed(_v.in_channels(c), int(_v.hf_get(c, "temporal_patch_size", 2)),
                                         int(_v.hf_get(c, "patch_size", 16)), config.hidden_size, config.params_dtype,
                                         bias=True)
        self.pos_embed = torch.nn.Embedding(num_pos, config.hidden_size, dtype=config.params_dtype)
        if config.perform_initialization:
            config.init_method(self.patch_embed.proj.weight.data)
            config.init_method(self.pos_embed.weight.data)
            torch.nn.init.zeros_(self.patch_embed.proj.bias.data)
        spec = _v.vision_layer_spec(config.ffn_hidden_size, use_te=use_te)
        self.blocks = torch.nn.ModuleList(
            build_module(spec, config=config, layer_number=i + 1) for i in range(config.num_layers)
        )
        out = int(_v.hf_get(c, "out_hidden_size"))
        self.merger = PatchMerger(config, out, self.merge, norm_after_merge=False)
        self.deepstack_mergers = torch.nn.ModuleList(
            PatchMerger(config, out, self.merge, norm_after_merge=True) for _ in self.deepstack_indexes
        )

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor):
        grid = _v.grid_list(image_grid_thw)
        _v.check_pixels(pixel_values, grid, self.merge)
        dev = pixel_values.device
        x = self.patch_embed(pixel_values)
        idx, wts = position_embedding_weights(grid, self.side, self.merge, dev)
        x = x + (self.pos_embed(idx) * wts[..., None].to(x.dtype)).sum(1)
        x = x.unsqueeze(1)  # [N, 1, D]
        freqs = _v.rotary_freqs(patch_positions(grid, self.merge, dev), self.head_dim, self.theta)[:, None, None, :]
        full = _v.packed(_v.frame_cu_seqlens(grid, dev))
        deepstack = []
        for i, layer in enumerate(self.blocks):
            x, _ = layer(x, attention_mask=None, rotary_pos_emb=freqs, packed_seq_params=full)
            if i in self.deepstack_indexes:
                deepstack.append(self.deepstack_mergers[self.deepstack_indexes.index(i)](x).squeeze(1))
        return self.merger(x).squeeze(1), deepstack

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """Distributed-checkpoint view, each block and DeepStack merger under `{name}.{i}.` with its own
        TP sharding (`ParallelDims.tp_group` given at construction)."""
        return _v.tower_sharded_state_dict(self, self.tp_group, ("blocks", "deepstack_mergers"), prefix,
                                           sharded_offsets, metadata)
