"""3-D M-RoPE position ids for Qwen2.5-VL, computed from token ids and image grids alone.

Needs nothing from the vision tower, so it can be computed once per trajectory on the host and
handed to every pipeline stage with the micro-batch (`rl_batch`), or locally by a stage when none are
given. Matches transformers' `Qwen2_5_VLModel.get_rope_index`:

* text tokens: (p, p, p) with p counting up by one;
* an image of grid (t, h, w) after the spatial merge (h/m, w/m) at text position p: temporal ids p + i·dt
  (dt = 1 for images, tokens_per_second·seconds_per_grid for videos), height ids p + row, width ids
  p + col; the next text token starts at p + max(h/m, w/m) (for images t = 1, so this is one past
  the largest id);
* padding (attention_mask == 0) keeps position 0 and is skipped when counting.

Vectorised (no per-token Python loop): every valid token gets an increment (text 1; the last token of
an image max(h/m, w/m), its other tokens 0); a row's exclusive cumulative sum of increments is each
token's base p, and image tokens add their (t, row, col) offsets inside their image.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _explain_run(i: int, name: str, grid: list, count: int, where: Tensor, row: Tensor, first: int) -> str:
    """The error for image i whose tokens are not one run of `count` (error path only)."""
    run = 1
    while (first + run < where.numel() and run < count and int(where[first + run]) == int(where[first]) + run
           and int(row[where[first + run]]) == int(row[where[first]])):
        run += 1
    return (f"sample {int(row[where[first]])}: {name} {i} with grid_thw {grid} needs {count} <|{name}_pad|>"
            f" tokens, found a run of {run}; re-expand the prompt's pad tokens for this grid")


def _check_runs(name: str, grid: Tensor, counts: Tensor, starts: Tensor, where: Tensor, row: Tensor) -> None:
    """Each grid's tokens must be one run in one sample, images consumed in order across the batch."""
    m, n_img = where.numel(), counts.numel()
    ends = starts + counts
    complete = ends <= m
    first = where[starts[complete]]
    last = where[ends[complete] - 1]
    ok = torch.ones(n_img, dtype=torch.bool)
    ok[complete] = (last - first == counts[complete] - 1) & (row[first] == row[last])
    ok &= complete
    if not bool(ok.all()):
        i = int((~ok).nonzero()[0])
        if int(starts[i]) >= m:
            raise ValueError(f"{n_img} {name}_grid_thw rows but only {i} {name}s in input_ids")
        raise ValueError(_explain_run(i, name, grid[i].tolist(), int(counts[i]), where, row, int(starts[i])))
    total = int(counts.sum())
    if m > total:
        raise ValueError(f"sample {int(row[where[total]])} has more <|{name}_pad|> runs than {name}_grid_thw"
                         f" rows ({n_img})")


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
    ids = input_ids.detach().cpu()
    valid = (torch.ones(b, s, dtype=torch.bool) if attention_mask is None
             else attention_mask.detach().cpu().bool())
    tok = ids[valid]  # the valid tokens, row-major
    row = torch.arange(b).unsqueeze(1).expand(b, s)[valid]
    n = tok.numel()
    inc = torch.ones(n, dtype=torch.long)
    off = torch.zeros(3, n, dtype=torch.long)  # (t, h, w) offsets inside an image; 0 for text
    merge2 = spatial_merge_size**2
    kinds = [("image", image_token_id, image_grid_thw, None)]
    if video_token_id is not None:
        secs = second_per_grid_ts if second_per_grid_ts is not None else None
        kinds.append(("video", video_token_id, video_grid_thw, secs))
    for name, token_id, grid, secs in kinds:
        where = (tok == token_id).nonzero().squeeze(1)
        grid = (torch.zeros(0, 3, dtype=torch.long) if grid is None else grid.detach().cpu().long().reshape(-1, 3))
        counts = grid.prod(1) // merge2
        starts = torch.cumsum(counts, 0) - counts
        _check_runs(name, grid, counts, starts, where, row)
        if where.numel() == 0:
            continue
        img = torch.searchsorted(starts + counts, torch.arange(where.numel()), right=True)
        o = torch.arange(where.numel()) - starts[img]
        hm, wm = grid[:, 1] // spatial_merge_size, grid[:, 2] // spatial_merge_size
        dt = torch.ones(grid.shape[0], dtype=torch.float32)
        if name == "video":
            dt = tokens_per_second * (secs.detach().cpu().float().reshape(-1) if secs is not None else dt)
        hw = (hm * wm)[img]
        off[0, where] = ((o // hw).float() * dt[img]).long()
        off[1, where] = (o % hw) // wm[img]
        off[2, where] = o % wm[img]
        inc[where] = 0
        inc[where[starts + counts - 1]] = torch.maximum(hm, wm)
    # Exclusive cumulative sum of increments, restarted at each row: the base position p of a token.
    cs = torch.cumsum(inc, 0)
    row_len = valid.sum(1)
    row_first = torch.cumsum(row_len, 0) - row_len
    row_base = torch.zeros(b, dtype=torch.long)
    has = row_len > 0
    row_base[has] = cs[row_first[has]] - inc[row_first[has]]
    pos = off + (cs - inc - row_base[row]).unsqueeze(0)
    position_ids = torch.zeros(3, b, s, dtype=torch.long)
    position_ids[:, valid] = pos
    largest = torch.full((b,), -1, dtype=torch.long).scatter_reduce(0, row, pos.amax(0), "amax")
    rope_deltas = (largest + 1 - row_len).unsqueeze(1)
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


def trajectory_positions(arch, input_ids: Tensor, image_grid_thw: Tensor | None = None) -> Tensor:
    """One sequence's M-RoPE ids [3, n]: what a packed segment or a padded row needs."""
    return rope_index_for(arch, input_ids.reshape(1, -1), image_grid_thw)[0][:, 0]
