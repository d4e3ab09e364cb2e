"""Trajectories of one RL step and their packing into fixed-shape micro-batches.

Every rank holds the whole step's trajectory list (token ids and scalars are small); each data-parallel
rank then takes its shard for the forward passes. Per-token results live at the *response* level
(one value per generated token, spec's [B, T] layout) so they do not depend on how a micro-batch was
padded; `to_positions` / `from_positions` translate to and from the padded label positions a model sees.

Label position t of a padded row predicts token t + 1, so response token j sits at position
response_start - 1 + j.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor


@dataclass
class Trajectory:
    group: int  # prompt id inside the step: GRPO groups and TAS use it
    input_ids: Tensor  # LongTensor [prompt + response]
    response_start: int
    pixel_values: Tensor | None = None  # [patches, 1176] flattened patches, merge-window order
    image_grid_thw: Tensor | None = None  # [images, 3]
    reward: float = 0.0
    rollout_log_probs: Tensor | None = None
    extra: dict = field(default_factory=dict)

    @property
    def response_len(self) -> int:
        return int(self.input_ids.numel()) - self.response_start

    @property
    def has_image(self) -> bool:
        return self.image_grid_thw is not None and self.image_grid_thw.numel() > 0


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# Micro-batch lengths are a multiple of SEQ_MULTIPLE·TP: sequence parallel splits them over TP ranks.
SEQ_MULTIPLE = 8


def padded_length(trajs: list[Trajectory], tp: int) -> int:
    """The fixed micro-batch length for `trajs`: the longest, rounded up to SEQ_MULTIPLE·tp."""
    return round_up(max(int(t.input_ids.numel()) for t in trajs), SEQ_MULTIPLE * tp)


def responses_to_matrix(values: list[Tensor], dtype=torch.float64) -> tuple[Tensor, Tensor]:
    """List of per-trajectory response vectors -> ([B, T] values, [B, T] mask), zero-padded."""
    width = max([int(v.numel()) for v in values] + [1])
    out = torch.zeros(len(values), width, dtype=dtype)
    mask = torch.zeros(len(values), width, dtype=dtype)
    for i, v in enumerate(values):
        out[i, : v.numel()] = v.to(dtype)
        mask[i, : v.numel()] = 1
    return out, mask


@dataclass
class MicroBatch:
    """A fixed-shape micro-batch: rows past `num_real` are all-padding filler (mask 0, no image)."""
    input_ids: Tensor  # [b, s]
    labels: Tensor  # [b, s]; labels[:, t] = input_ids[:, t + 1]
    loss_mask: Tensor  # [b, s] float; 1 at response label positions
    attention_mask: Tensor  # [b, s] long; 1 at real tokens (for mrope positions)
    pixel_values: Tensor | None
    image_grid_thw: Tensor | None
    num_real: int
    response_starts: list[int]
    response_lens: list[int]
    per_token: dict = field(default_factory=dict)  # position-level tensors [b, s] delivered to the loss

    def to(self, device) -> "MicroBatch":
        """The tensors the model and the loss read, on `device`. `image_grid_thw` stays on the host: the
        model reads it as metadata (`.tolist()`) to lay out positions and vision windows."""
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return replace(self, input_ids=move(self.input_ids), labels=move(self.labels),
                       loss_mask=move(self.loss_mask), attention_mask=move(self.attention_mask),
                       pixel_values=move(self.pixel_values),
                       per_token={k: move(v) for k, v in self.per_token.items()})

    def to_positions(self, values: list[Tensor], dtype=torch.float32) -> Tensor:
        out = torch.zeros(self.loss_mask.shape, dtype=dtype)
        for i, v in enumerate(values):
            s, n = self.response_starts[i], self.response_lens[i]
            out[i, s - 1 : s - 1 + n] = v.to(dtype)
        return out

    def from_positions(self, values: Tensor) -> list[Tensor]:
        return [
            values[i, s - 1 : s - 1 + n].detach().clone()
            for i, (s, n) in enumerate(zip(self.response_starts, self.response_lens))
        ]


def collate(
    trajs: list[Trajectory],
    *,
    rows: int,
    seq_len: int,
    pad_id: int,
    pixel_values_override: list[Tensor | None] | None = None,
) -> MicroBatch:
    """Right-pad `trajs` into a [rows, seq_len] micro-batch (rows >= len(trajs)).

    `pixel_values_override[i]` replaces trajectory i's pixels (the perturbed view); token ids and
    grids are reused unchanged, which is why the perturbation never changes shapes.
    """
    if len(trajs) > rows:
        raise ValueError(f"{len(trajs)} trajectories do not fit a micro-batch of {rows} rows")
    input_ids = torch.full((rows, seq_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(rows, seq_len, dtype=torch.long)
    loss_mask = torch.zeros(rows, seq_len, dtype=torch.float32)
    pixels, grids = [], []
    for i, t in enumerate(trajs):
        n = int(t.input_ids.numel())
        if n > seq_len:
            raise ValueError(f"trajectory of {n} tokens exceeds the micro-batch length {seq_len}")
        if t.response_start < 1:
            raise ValueError("a trajectory needs at least one prompt token before its response")
        input_ids[i, :n] = t.input_ids
        attention_mask[i, :n] = 1
        loss_mask[i, t.response_start - 1 : n - 1] = 1
        pv = t.pixel_values if pixel_values_override is None else pixel_values_override[i]
        if t.has_image:
            pixels.append(pv)
            grids.append(t.image_grid_thw)
    labels = torch.zeros_like(input_ids)
    labels[:, :-1] = input_ids[:, 1:]
    return MicroBatch(
        input_ids=input_ids,
        labels=labels,
        loss_mask=loss_mask,
        attention_mask=attention_mask,
        pixel_values=torch.cat(pixels) if pixels else None,
        image_grid_thw=torch.cat(grids) if grids else None,
        num_real=len(trajs),
        response_starts=[t.response_start for t in trajs],
        response_lens=[t.response_len for t in trajs],
    )


def stack_views(a: MicroBatch, b: MicroBatch) -> MicroBatch:
    """Original and perturbed views side by side in one micro-batch (rows of `a`, then rows of `b`).

    Images follow the same row order, so the vision tower sees both views in one call.
    """
    def cat_opt(x, y):
        parts = [p for p in (x, y) if p is not None]
        return torch.cat(parts) if parts else None

    return MicroBatch(
        input_ids=torch.cat([a.input_ids, b.input_ids]),
        labels=torch.cat([a.labels, b.labels]),
        loss_mask=torch.cat([a.loss_mask, b.loss_mask]),
        attention_mask=torch.cat([a.attention_mask, b.attention_mask]),
        pixel_values=cat_opt(a.pixel_values, b.pixel_values),
        image_grid_thw=cat_opt(a.image_grid_thw, b.image_grid_thw),
        num_real=a.num_real,
        response_starts=a.response_starts,
        response_lens=a.response_lens,
    )


def shard(items: list, rank: int, world: int) -> list:
    """Contiguous, balanced data-parallel shard (the first len % world ranks get one extra)."""
    base, extra = divmod(len(items), world)
    start = rank * base + min(rank, extra)
    return items[start : start + base + (1 if rank < extra else 0)]


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]
