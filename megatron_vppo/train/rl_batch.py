"""Trajectories of one RL step and their packing into micro-batches.

Two micro-batch layouts, one `MicroBatch` type:
* padded: [rows, seq_len], one trajectory per row, right-padded (`collate`);
* packed (thd): [1, T], trajectories concatenated with `cu_seqlens` boundaries (Megatron's
  PackedSeqParams), each segment with its own M-RoPE positions, a filler segment up to T (`collate_packed`).
  `pack_by_tokens` forms packed micro-batches first-fit decreasing up to a token budget.

Every rank holds the whole step's trajectory list (token ids and scalars are small); each data-parallel
rank then takes its shard for the forward passes. Per-token results live at the *response* level
(one value per generated token, spec's [B, T] layout) so they do not depend on how a micro-batch was
padded; `to_positions` / `from_positions` translate to and from the padded label positions a model sees.

Label position t of a padded row (or segment) predicts token t + 1, so response token j sits at position
offset + response_start - 1 + j, offset being the segment's start (0 in the padded layout).

M-RoPE positions are computed once per trajectory per step (`Trajectory.position_ids`, filled by the
passes) and travel with the micro-batch, so no pipeline stage recomputes them.
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
    position_ids: Tensor | None = None  # [3, n] M-RoPE ids, cached for the step (`ensure_positions`)
    pixel_source: object | None = None  # pixels on demand: anything with `.pixel_values` (an EncodedPrompt)

    def pixels(self) -> Tensor | None:
        """The original view's pixels; from `pixel_source` (processed there once) when not held here."""
        if self.pixel_values is None and self.pixel_source is not None:
            return self.pixel_source.pixel_values
        return self.pixel_values

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

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
    """One micro-batch, padded ([rows, s]; rows past `num_real` are filler) or packed ([1, T], `cu_seqlens`
    set; a trailing filler segment). Trajectory i sits in row `rows[i]` from column `offsets[i]`.
    `views` = 2 when original and perturbed views ride together (`stack_views`)."""
    input_ids: Tensor  # [b, s]
    labels: Tensor  # [b, s]; labels[:, t] = input_ids[:, t + 1] inside a row / segment
    loss_mask: Tensor  # [b, s] float; 1 at response label positions
    attention_mask: Tensor | None  # [b, s] long; 1 at real tokens (padded layout only)
    pixel_values: Tensor | None
    image_grid_thw: Tensor | None
    num_real: int
    response_starts: list[int]
    response_lens: list[int]
    per_token: dict = field(default_factory=dict)  # position-level tensors [b, s] delivered to the loss
    position_ids: Tensor | None = None  # [3, b, s] M-RoPE ids
    cu_seqlens: Tensor | None = None  # int32 [segments + 1]: packed (thd) when set
    max_seqlen: int = 0
    rows: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    views: int = 1

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    def packed_seq_params(self):
        """Megatron's PackedSeqParams for the thd layout (None when padded)."""
        if not self.packed:
            return None
        from megatron.core.packed_seq_params import PackedSeqParams

        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=self.cu_seqlens, cu_seqlens_kv=self.cu_seqlens,
                               max_seqlen_q=self.max_seqlen, max_seqlen_kv=self.max_seqlen)

    def split_views(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """A [b, s, ...] tensor of a two-view micro-batch -> (original view's part, perturbed view's part)."""
        if self.packed:
            half = t.shape[1] // 2
            return t[:, :half], t[:, half:]
        half = t.shape[0] // 2
        return t[:half], t[half:]

    def to(self, device) -> "MicroBatch":
        """The tensors the model and the loss read, on `device`. `image_grid_thw` stays on the host: the
        model reads it as metadata (`.tolist()`) to lay out positions and vision windows."""
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return replace(self, input_ids=move(self.input_ids), labels=move(self.labels),
                       loss_mask=move(self.loss_mask), attention_mask=move(self.attention_mask),
                       pixel_values=move(self.pixel_values), position_ids=move(self.position_ids),
                       cu_seqlens=move(self.cu_seqlens),
                       per_token={k: move(v) for k, v in self.per_token.items()})

    def _spans(self):
        for i, (s, n) in enumerate(zip(self.response_starts, self.response_lens)):
            a = self.offsets[i] + s - 1
            yield self.rows[i], a, a + n

    def to_positions(self, values: list[Tensor], dtype=torch.float32) -> Tensor:
        """Per-trajectory response vectors -> one view's [b, s] position layout (0 elsewhere)."""
        b, s = self.loss_mask.shape
        b, s = (b, s // self.views) if self.packed else (b // self.views, s)
        out = torch.zeros(b, s, dtype=dtype)
        for v, (r, a, e) in zip(values, self._spans()):
            out[r, a:e] = v.to(dtype)
        return out

    def from_positions(self, values: Tensor) -> list[Tensor]:
        """One view's [b, s] position-level values -> per-trajectory response vectors."""
        return [values[r, a:e].detach().clone() for r, a, e in self._spans()]


def ensure_positions(trajs: list[Trajectory], arch) -> None:
    """Fill each trajectory's position ids once (they depend only on its tokens and image grids), with
    the M-RoPE function of the model `arch` (its text arch, which names its MODELS entry) belongs to."""
    from megatron_vppo.models import MODELS

    trajectory_positions = MODELS[arch.arch_name].trajectory_positions
    for t in trajs:
        if t.position_ids is None or t.position_ids.shape[-1] != t.num_tokens:
            t.position_ids = trajectory_positions(arch, t.input_ids, t.image_grid_thw if t.has_image else None)


def _check(t: Trajectory, room: int) -> int:
    n = t.num_tokens
    if n > room:
        raise ValueError(f"trajectory of {n} tokens exceeds the micro-batch length {room}")
    if t.response_start < 1:
        raise ValueError("a trajectory needs at least one prompt token before its response")
    return n


def _images(trajs, pixel_values_override, with_pixels: bool = True):
    """(pixels, grids) of the micro-batch's images in order. Without `with_pixels` (a stage that does
    not embed) only the grids: the pixels are neither fetched nor processed."""
    pixels, grids = [], []
    for i, t in enumerate(trajs):
        if t.has_image:
            if with_pixels:
                pixels.append(t.pixels() if pixel_values_override is None else pixel_values_override[i])
            grids.append(t.image_grid_thw)
    return (torch.cat(pixels) if pixels else None), (torch.cat(grids) if grids else None)


def collate(
    trajs: list[Trajectory],
    *,
    rows: int,
    seq_len: int,
    pad_id: int,
    pixel_values_override: list[Tensor | None] | None = None,
    with_pixels: bool = True,
) -> MicroBatch:
    """Right-pad `trajs` into a [rows, seq_len] micro-batch (rows >= len(trajs)).

    `pixel_values_override[i]` replaces trajectory i's pixels (the perturbed view); token ids and
    grids are reused unchanged, which is why the perturbation never changes shapes. Position ids are
    filled from `Trajectory.position_ids` when every trajectory has them (pads get 0).
    """
    if len(trajs) > rows:
        raise ValueError(f"{len(trajs)} trajectories do not fit a micro-batch of {rows} rows")
    input_ids = torch.full((rows, seq_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(rows, seq_len, dtype=torch.long)
    loss_mask = torch.zeros(rows, seq_len, dtype=torch.float32)
    with_pos = all(t.position_ids is not None for t in trajs)
    position_ids = torch.zeros(3, rows, seq_len, dtype=torch.long) if with_pos else None
    for i, t in enumerate(trajs):
        n = _check(t, seq_len)
        input_ids[i, :n] = t.input_ids
        attention_mask[i, :n] = 1
        loss_mask[i, t.response_start - 1 : n - 1] = 1
        if with_pos:
            position_ids[:, i, :n] = t.position_ids
    labels = torch.zeros_like(input_ids)
    labels[:, :-1] = input_ids[:, 1:]
    return _micro_batch(trajs, pixel_values_override, with_pixels, input_ids=input_ids, labels=labels,
                        loss_mask=loss_mask, attention_mask=attention_mask, position_ids=position_ids,
                        rows=list(range(len(trajs))), offsets=[0] * len(trajs))


def _micro_batch(trajs, pixel_values_override, with_pixels, **layout) -> MicroBatch:
    """The fields both layouts (padded rows, packed segments) fill the same way, around `layout`'s."""
    pixels, grids = _images(trajs, pixel_values_override, with_pixels)
    return MicroBatch(pixel_values=pixels, image_grid_thw=grids, num_real=len(trajs),
                      response_starts=[t.response_start for t in trajs],
                      response_lens=[t.response_len for t in trajs], **layout)


def collate_packed(
    trajs: list[Trajectory],
    *,
    seq_len: int,
    pad_id: int,
    pixel_values_override: list[Tensor | None] | None = None,
    with_pixels: bool = True,
) -> MicroBatch:
    """Concatenate `trajs` into one [1, seq_len] packed (thd) sequence; the rest is one filler segment.

    Every trajectory is its own segment (its own causal attention block and M-RoPE positions, which
    `ensure_positions` must have filled); its last token has no label. The filler segment (pad ids,
    positions 0.., loss mask 0) keeps the length fixed for the pipeline and a multiple of TP for
    sequence parallel."""
    total = sum(_check(t, seq_len) for t in trajs)
    if total > seq_len:
        raise ValueError(f"{len(trajs)} trajectories of {total} tokens exceed the packed length {seq_len}")
    if any(t.position_ids is None for t in trajs):
        raise ValueError("packed micro-batches need Trajectory.position_ids; call rl_batch.ensure_positions")
    input_ids = torch.full((1, seq_len), pad_id, dtype=torch.long)
    labels = torch.zeros(1, seq_len, dtype=torch.long)
    loss_mask = torch.zeros(1, seq_len, dtype=torch.float32)
    position_ids = torch.zeros(3, 1, seq_len, dtype=torch.long)
    bounds, offsets, off = [0], [], 0
    for t in trajs:
        n = t.num_tokens
        input_ids[0, off : off + n] = t.input_ids
        labels[0, off : off + n - 1] = t.input_ids[1:]
        loss_mask[0, off + t.response_start - 1 : off + n - 1] = 1
        position_ids[:, 0, off : off + n] = t.position_ids
        offsets.append(off)
        off += n
        bounds.append(off)
    if off < seq_len:  # filler segment
        position_ids[:, 0, off:] = torch.arange(seq_len - off)
        bounds.append(seq_len)
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    return _micro_batch(trajs, pixel_values_override, with_pixels, input_ids=input_ids, labels=labels,
                        loss_mask=loss_mask, attention_mask=None, position_ids=position_ids,
                        cu_seqlens=torch.tensor(bounds, dtype=torch.int32), max_seqlen=max(sizes + [1]),
                        rows=[0] * len(trajs), offsets=offsets)


def stack_views(a: MicroBatch, b: MicroBatch) -> MicroBatch:
    """Original and perturbed views together in one micro-batch: padded, the rows of `a` then the rows
    of `b`; packed, the sequence of `a` then the sequence of `b` (segments of `b` shifted by its length).

    Images follow the same order, so the vision tower sees both views in one call.
    """
    def cat_opt(x, y, dim=0):
        parts = [p for p in (x, y) if p is not None]
        return torch.cat(parts, dim) if parts else None

    dim = 1 if a.packed else 0
    cu = None
    if a.packed:
        cu = torch.cat([a.cu_seqlens, b.cu_seqlens[1:] + a.input_ids.shape[1]])
    return replace(
        a,
        input_ids=torch.cat([a.input_ids, b.input_ids], dim),
        labels=torch.cat([a.labels, b.labels], dim),
        loss_mask=torch.cat([a.loss_mask, b.loss_mask], dim),
        attention_mask=cat_opt(a.attention_mask, b.attention_mask),
        pixel_values=cat_opt(a.pixel_values, b.pixel_values),
        image_grid_thw=cat_opt(a.image_grid_thw, b.image_grid_thw),
        position_ids=cat_opt(a.position_ids, b.position_ids, dim + 1),
        cu_seqlens=cu,
        views=2,
        per_token={},
    )


def pack_by_tokens(lengths: list[int], budget: int) -> list[list[int]]:
    """First-fit decreasing: indices into `lengths` grouped so each group's sum is <= `budget` (a longer
    item gets a group of its own). Groups in order of creation; indices inside a group ascending."""
    if budget < 1:
        raise ValueError(f"token budget {budget} must be >= 1; set train.max_tokens_per_micro_batch to a "
                         "positive number of tokens")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        for b, r in enumerate(room):
            if lengths[i] <= r:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(budget - lengths[i])
    return [sorted(b) for b in bins]


def shard_by_tokens(items: list, lengths: list[int], rank: int, world: int) -> list:
    """Contiguous data-parallel shard with about the same number of tokens per rank (cut where the
    running token count crosses k/world of the total), so results still gather in rank order."""
    total = sum(lengths)
    prefix = [0]
    for n in lengths:
        prefix.append(prefix[-1] + n)
    cuts = [0]
    for k in range(1, world):
        cuts.append(min(range(cuts[-1], len(items) + 1), key=lambda j: (abs(prefix[j] * world - k * total), j)))
    cuts.append(len(items))
    return items[cuts[rank] : cuts[rank + 1]]


def shard(items: list, rank: int, world: int) -> list:
    """Contiguous, balanced data-parallel shard (the first len % world ranks get one extra)."""
    base, extra = divmod(len(items), world)
    start = rank * base + min(rank, extra)
    return items[start : start + base + (1 if rank < extra else 0)]


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]
