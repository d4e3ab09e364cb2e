"""3-D M-RoPE position ids for Qwen2.5-VL, computed from token ids and image grids alone.

Needs nothing from the vision tower, so every pipeline stage computes the same ids locally instead
of receiving them. Matches transformers' `Qwen2_5_VLModel.get_rope_index`:

* text tokens: (p, p, p) with p counting up by one;
* an image of grid (t, h, w) after the spatial merge (h/m, w/m) at text position p: temporal ids p + i·dt
  (dt = 1 for images, tokens_per_second·seconds_per_grid for videos), height ids p + row, width ids
  p + col; the next text token starts at p + max(h/m, w/m) (for images t = 1, so this is one past
  the largest id);
* padding (attention_mask == 0) keeps position 0 and is skipped when counting.
"""
from __future__ import annotations

import torch


def _vision_positions(start: int, grid_thw, merge: int, time_interval: float) -> torch.Tensor:
    t, h, w = (int(x) for x in grid_thw)
    h, w = h // merge, w // merge
    tt = (torch.arange(t) * time_interval).long() + start
    hh = torch.arange(h) + start
    ww = torch.arange(w) + start
    return torch.stack(
        [
            tt.view(t, 1, 1).expand(t, h, w),
            hh.view(1, h, 1).expand(t, h, w),
            ww.view(1, 1, w).expand(t, h, w),
        ]
    ).reshape(3, -1)


def get_rope_index(
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    image_token_id: int,
    spatial_merge_size: int = 2,
    video_token_id: int | None = None,
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts: torch.Tensor | None = None,
    tokens_per_second: float = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [b, s] -> (position_ids [3, b, s] long, rope_deltas [b, 1]).

    Images (and videos) are consumed in order across the whole batch, one grid per image; a sample
    without image tokens is plain text. `rope_deltas` = (largest id + 1) − (number of valid tokens),
    what generation adds to 1-D positions after the prompt.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    b, s = input_ids.shape
    ids_cpu = input_ids.detach().cpu()
    mask_cpu = None if attention_mask is None else attention_mask.detach().cpu().bool()
    merge2 = spatial_merge_size**2
    grids = {1: list(image_grid_thw.tolist()) if image_grid_thw is not None else []}
    grids[2] = list(video_grid_thw.tolist()) if video_grid_thw is not None else []
    video_secs = list(second_per_grid_ts.tolist()) if second_per_grid_ts is not None else []
    used = {1: 0, 2: 0}

    position_ids = torch.zeros(3, b, s, dtype=torch.long)
    deltas = []
    for i in range(b):
        row = ids_cpu[i] if mask_cpu is None else ids_cpu[i][mask_cpu[i]]
        kind = torch.zeros_like(row, dtype=torch.long)
        kind[row == image_token_id] = 1
        if video_token_id is not None:
            kind[row == video_token_id] = 2
        chunks, pos, j, n = [], 0, 0, row.numel()
        while j < n:
            k = int(kind[j])
            if k == 0:
                end = j
                while end < n and int(kind[end]) == 0:
                    end += 1
                chunks.append(torch.arange(end - j).view(1, -1).expand(3, -1) + pos)
                pos += end - j
                j = end
                continue
            # One image (or video) per grid, consumed in order; a run of pad tokens may hold several.
            name = "image" if k == 1 else "video"
            if used[k] >= len(grids[k]):
                raise ValueError(
                    f"sample {i} has more <|{name}_pad|> runs than {name}_grid_thw rows ({len(grids[k])})"
                )
            grid = grids[k][used[k]]
            used[k] += 1
            count = int(grid[0] * grid[1] * grid[2]) // merge2
            run = 0
            while j + run < n and int(kind[j + run]) == k and run < count:
                run += 1
            if run != count:
                raise ValueError(
                    f"sample {i}: {name} {used[k] - 1} with grid_thw {grid} needs {count} <|{name}_pad|>"
                    f" tokens, found a run of {run}; re-expand the prompt's pad tokens for this grid"
                )
            dt = 1.0
            if k == 2:
                sec = video_secs[used[k] - 1] if video_secs else 1.0
                dt = tokens_per_second * sec
            chunks.append(_vision_positions(pos, grid, spatial_merge_size, dt))
            pos += max(int(grid[1]), int(grid[2])) // spatial_merge_size
            j += count
        llm = torch.cat(chunks, dim=1) if chunks else torch.zeros(3, 0, dtype=torch.long)
        if mask_cpu is None:
            position_ids[:, i] = llm
        else:
            position_ids[:, i, mask_cpu[i]] = llm
        deltas.append((int(llm.max()) + 1 if llm.numel() else 0) - n)
    for k, name in ((1, "image"), (2, "video")):
        if used[k] != len(grids[k]):
            raise ValueError(
                f"{len(grids[k])} {name}_grid_thw rows but only {used[k]} {name}s in input_ids"
            )
    rope_deltas = torch.tensor(deltas, dtype=torch.long).unsqueeze(1)
    return position_ids.to(input_ids.device), rope_deltas.to(input_ids.device)


def rope_index_for(arch, input_ids, image_grid_thw=None, attention_mask=None):
    """`get_rope_index` with the token ids / merge size from a `QwenTextArch`."""
    return get_rope_index(
        input_ids,
        image_grid_thw,
        attention_mask,
        image_token_id=arch.image_token_id,
        spatial_merge_size=arch.spatial_merge_size,
        video_token_id=arch.video_token_id,
        tokens_per_second=arch.tokens_per_second,
    )
