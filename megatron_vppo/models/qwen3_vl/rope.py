"""Qwen3-VL's position ids and rotary angles.

* `get_rope_index`: the (t, h, w) M-RoPE ids. For images they are Qwen2.5-VL's (text counts up; an
  image at text position p takes p + (frame, row, col) and the next text token p + max(h, w)/merge), so
  the vectorised index of models/qwen2_5_vl/rope_index.py is reused; videos differ — Qwen3-VL puts a
  timestamp before every frame, so each frame is its own grid of t = 1 (transformers splits
  `video_grid_thw` the same way).
* `InterleavedMRoPE`: the angles. Qwen2.5-VL gives each of t/h/w a contiguous block of frequencies
  (`mrope_section`); Qwen3-VL interleaves them — frequency j takes the h position when j % 3 == 1 and
  j < 3·section[1], the w position when j % 3 == 2 and j < 3·section[2], else the t position — then
  rotates by halves over the whole head (angles [f, f]). Drop-in for Megatron's
  MultimodalRotaryEmbedding (same call, same [s, b, 1, head_dim] output, thd packing included).
"""
from __future__ import annotations

import torch
from torch import Tensor

from megatron_vppo.models.qwen2_5_vl.rope_index import get_rope_index as _sectioned_index


def split_video_grid(video_grid_thw: Tensor | None) -> Tensor | None:
    """[k, 3] video grids -> one grid of t = 1 per frame (each frame follows its own timestamp)."""
    if video_grid_thw is None:
        return None
    g = video_grid_thw.reshape(-1, 3)
    out = torch.repeat_interleave(g, g[:, 0], dim=0).clone()
    out[:, 0] = 1
    return out


def get_rope_index(arch, input_ids: Tensor, image_grid_thw: Tensor | None = None,
                   attention_mask: Tensor | None = None, video_grid_thw: Tensor | None = None):
    """input_ids [b, s] -> (position_ids [3, b, s], rope_deltas [b, 1]); transformers' `get_rope_index`."""
    return _sectioned_index(
        input_ids, image_grid_thw, attention_mask,
        image_token_id=arch.image_token_id, spatial_merge_size=arch.spatial_merge_size,
        video_token_id=arch.video_token_id, video_grid_thw=split_video_grid(video_grid_thw),
    )


def trajectory_positions(arch, input_ids: Tensor, image_grid_thw: Tensor | None = None) -> Tensor:
    """One sequence's M-RoPE ids [3, n]: what a packed segment or a padded row needs."""
    return get_rope_index(arch, input_ids.reshape(1, -1), image_grid_thw)[0][:, 0]


def interleave_sections(freqs: Tensor, mrope_section) -> Tensor:
    """[3, ..., d/2] per-axis angles -> [..., d/2] interleaved (see the module docstring)."""
    out = freqs[0].clone()
    for axis in (1, 2):
        idx = slice(axis, 3 * int(mrope_section[axis]), 3)
        out[..., idx] = freqs[axis, ..., idx]
    return out


class InterleavedMRoPE(torch.nn.Module):
    """Rotary angles for interleaved M-RoPE; `forward(position_ids [3, b, s], mrope_section)`."""

    def __init__(self, head_dim: int, rotary_base: float):
        super().__init__()
        inv = 1.0 / (rotary_base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, position_ids: Tensor, mrope_section, cp_group=None) -> Tensor:
        if cp_group is not None and cp_group.size() > 1:
            raise ValueError("interleaved M-RoPE has no context parallelism here; set parallel.cp=1")
        inv = self.inv_freq.to(position_ids.device)
        freqs = position_ids.float()[..., None] * inv  # [3, b, s, d/2]
        f = interleave_sections(freqs, mrope_section)
        emb = torch.cat([f, f], dim=-1)  # [b, s, d]
        return emb.transpose(0, 1)[:, :, None, :].contiguous()  # [s, b, 1, d]
