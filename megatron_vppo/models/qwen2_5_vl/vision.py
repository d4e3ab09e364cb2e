"""Qwen2.5-VL vision tower built from Megatron-Core transformer layers, TP-sharded like the LM.

    pixel_values [N, C*T*P*P] (flattened patches, merge-block order, as the Qwen2-VL processor emits)
      -> Conv3d patch embed (no bias)                                     [N, D]
      -> reorder merge units into attention-window order (window_index)
      -> depth x TransformerLayer (RMSNorm, QKV+bias, 2-D rotary, SwiGLU+bias); blocks listed in
         `fullatt_block_indexes` attend over each whole frame, the others inside windows — both as
         packed `thd` segments (cu_seqlens) through PackedSeqAttention
      -> patch merger: RMSNorm, 2x2 merge, Column/RowParallel MLP with GELU    [N/4, out_hidden]
      -> undo the window order, so rows follow HF's `model.visual(...)` output.

The tower runs without sequence parallelism whatever the LM does: its config is its own
(`vision_transformer_config` turns SP, PP, CP and fused RoPE off), activations are [N, 1, D] replicated
over the TP group, and the output is replicated on every TP rank — the LM scatters it into its
embeddings (and splits it for SP) itself. The vision MLP's width is padded with zeros up to a multiple
of TP (Qwen2.5-VL's 3420 is not divisible by 8); the weight adapter adds and strips the padding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_vppo.models.common import vision as _v
from megatron_vppo.models.common.vision import (  # noqa: F401  (re-exported: model.py, tests)
    INHERITED_KEYS,
    frame_cu_seqlens,
    in_channels,
    patch_positions,
    rope_theta,
    rotary_freqs,
    vision_layer_spec,
)


def padded_ffn_size(intermediate_size: int, tp: int) -> int:
    """Vision MLP width rounded up to a multiple of TP (zero rows/cols are exact: silu(0)*0 = 0)."""
    return -(-intermediate_size // tp) * tp


def vision_transformer_config(hf_vision_cfg: dict, base_kwargs: dict) -> TransformerConfig:
    """The tower's TransformerConfig (models/common/vision.py): RMSNorm, gated SiLU MLP padded to TP."""
    return _v.vision_transformer_config(hf_vision_cfg, base_kwargs, ffn_size=padded_ffn_size, gated=True,
                                        normalization="RMSNorm", default_act="silu")


# ---- pure index / position functions (grid_thw -> tensors), HF semantics ----


def window_index(grid_thw, merge: int, window_size: int, patch_size: int, device=None):
    """Order of merge units for window attention, and the windows' cu_seqlens (in patches).

    Windows are `window_size` pixels square, tiled per frame from the top-left; units are sorted by
    (image, frame, window row, window col, row in window, col in window). Returns (index [N/merge²]
    long, cu_window_seqlens int32): unit `index[j]` of the input goes to position j."""
    vw = window_size // merge // patch_size
    if vw < 1:
        raise ValueError(f"window_size {window_size} is smaller than one merge unit ({merge}x{patch_size} px)")
    index, lens, offset = [], [], 0
    for t, h, w in _v.grid_list(grid_thw):
        gh, gw = h // merge, w // merge
        nwh, nww = -(-gh // vw), -(-gw // vw)
        ti, yi, xi = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
        win = ((ti * nwh + yi // vw) * nww + xi // vw).flatten()
        key = win * vw * vw + ((yi % vw) * vw + xi % vw).flatten()
        index.append(torch.argsort(key) + offset)
        counts = torch.bincount(win, minlength=t * nwh * nww)
        lens.append(counts[counts > 0])
        offset += t * gh * gw
    cu = F.pad(torch.cat(lens).cumsum(0) * merge * merge, (1, 0)).to(torch.int32)
    return torch.cat(index).to(device), cu.to(device)


class PatchMerger(_v.MergerMLP):
    """RMSNorm over D, concatenate each merge unit (merge² patches) -> Column/Row-parallel MLP."""

    def __init__(self, config: TransformerConfig, out_hidden: int, merge: int):
        super().__init__(config, out_hidden, merge, "ln_q", torch.nn.RMSNorm(config.hidden_size, eps=1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 1, D] in window order -> [N/merge², 1, out_hidden]."""
        return self.mlp(self.ln_q(x).reshape(-1, 1, self.in_size))


class Qwen25VisionModel(MegatronModule):
    """Qwen2.5-VL's vision encoder + merger; forward(pixel_values, image_grid_thw) -> [N/4, out_hidden]."""

    def __init__(
        self, hf_vision_cfg: dict, base_kwargs: dict, layer_spec: ModuleSpec | None = None, use_te: bool = False,
        tp_group=None,
    ):
        config = vision_transformer_config(hf_vision_cfg, base_kwargs)
        super().__init__(config=config)
        self.tp_group = tp_group  # distributed.ParallelDims.tp_group (None: one TP rank)
        c = hf_vision_cfg
        self.merge = int(_v.hf_get(c, "spatial_merge_size", 2))
        self.patch_size = int(_v.hf_get(c, "patch_size", 14))
        self.window_size = int(_v.hf_get(c, "window_size", 112))
        self.fullatt_block_indexes = tuple(int(i) for i in _v.hf_get(c, "fullatt_block_indexes", []))
        self.head_dim = config.kv_channels
        self.theta = rope_theta(c)
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < config.num_layers]
        if bad:
            raise ValueError(f"fullatt_block_indexes {bad} are outside depth {config.num_layers}")

        self.patch_embed = _v.PatchEmbed(
            in_channels(c), int(_v.hf_get(c, "temporal_patch_size", 2)),
            self.patch_size, config.hidden_size, config.params_dtype, bias=False,
        )
        if config.perform_initialization:
            config.init_method(self.patch_embed.proj.weight.data)
        spec = layer_spec or vision_layer_spec(config.ffn_hidden_size, use_te=use_te)
        self.blocks = torch.nn.ModuleList(
            build_module(spec, config=config, layer_number=i + 1) for i in range(config.num_layers)
        )
        self.merger = PatchMerger(config, int(_v.hf_get(c, "out_hidden_size")), self.merge)

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        grid = _v.grid_list(image_grid_thw)
        n = _v.check_pixels(pixel_values, grid, self.merge)
        dev, unit = pixel_values.device, self.merge * self.merge
        win_idx, cu_win = window_index(grid, self.merge, self.window_size, self.patch_size, dev)
        full, windowed = _v.packed(frame_cu_seqlens(grid, dev)), _v.packed(cu_win)

        def to_windows(x):  # permute merge units (groups of merge² consecutive rows) into window order
            return x.view(n // unit, unit, -1)[win_idx].reshape(n, -1)

        x = to_windows(self.patch_embed(pixel_values)).unsqueeze(1)  # [N, 1, D]
        freqs = to_windows(rotary_freqs(patch_positions(grid, self.merge, dev), self.head_dim, self.theta))
        freqs = freqs[:, None, None, :]  # [N, 1, 1, head_dim]: Megatron's thd rotary, exact positions
        for i, layer in enumerate(self.blocks):
            psp = full if i in self.fullatt_block_indexes else windowed
            x, _ = layer(x, attention_mask=None, rotary_pos_emb=freqs, packed_seq_params=psp)
        out = self.merger(x).squeeze(1)
        return out[torch.argsort(win_idx)]

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """Distributed-checkpoint view: each block under `blocks.{i}.` with its own TP sharding (the TP
        group, `ParallelDims.tp_group` given at construction, must be set at TP > 1)."""
        return _v.tower_sharded_state_dict(self, self.tp_group, ("blocks",), prefix, sharded_offsets, metadata)
