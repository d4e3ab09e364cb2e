"""GRPO advantages and the DAPO dynamic-sampling filter (spec §1.3–§1.4).

Both work on one value per trajectory and a prompt-group id per trajectory; group ids are arbitrary
integers (they need not be contiguous or sorted).
"""
from __future__ import annotations

import torch
from torch import Tensor

GRPO_EPS = 1e-6


def _group_index(group_ids: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Map arbitrary group ids to 0..G-1; returns (inverse index [B], group sizes [G])."""
    if group_ids.dim() != 1 or group_ids.numel() != n:
        raise ValueError(f"group_ids must be 1-D with one id per trajectory ({n}), got shape "
                         f"{tuple(group_ids.shape)}")
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    return inverse, counts


def _group_mean(values: Tensor, inverse: Tensor, counts: Tensor) -> Tensor:
    sums = torch.zeros(counts.numel(), dtype=values.dtype, device=values.device)
    sums.index_add_(0, inverse, values)
    return sums / counts.to(values.dtype)


def grpo_advantages(rewards: Tensor, group_ids: Tensor, eps: float = GRPO_EPS) -> Tensor:
    """A_i = (R_i - mean_g R) / (std_g R + eps), std with ddof=1 over each prompt group.

    Computed in float64 and returned in the rewards' floating dtype (float32 for integer rewards).
    A group of one has no ddof=1 std: that is a configuration error (rollout group size must be > 1).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    r = rewards.to(torch.float64)
    inverse, counts = _group_index(group_ids, r.numel())
    if bool((counts < 2).any()):
        raise ValueError("GRPO needs at least 2 responses per prompt group (ddof=1 std); "
                         "set rollout.group_size > 1 and keep whole groups together")
    mean = _group_mean(r, inverse, counts)
    centred = r - mean[inverse]
    sq = torch.zeros_like(mean).index_add_(0, inverse, centred * centred)
    std = torch.sqrt(sq / (counts.to(r.dtype) - 1))
    return (centred / (std[inverse] + eps)).to(out_dtype)


def dynamic_sampling_keep(accuracy: Tensor, group_ids: Tensor, low: float = 0.01,
                          high: float = 0.99) -> Tensor:
    """Indices (ascending) of trajectories whose group's mean accuracy lies strictly in (low, high).

    DAPO drops groups with mean accuracy <= low or >= high: every response right or every response
    wrong gives zero GRPO advantage and so no gradient.
    """
    if accuracy.dim() != 1:
        raise ValueError(f"accuracy must be 1-D [B], got shape {tuple(accuracy.shape)}")
    acc = accuracy.to(torch.float64)
    inverse, counts = _group_index(group_ids, acc.numel())
    mean = _group_mean(acc, inverse, counts)[inverse]
    keep = (mean > low) & (mean < high)
    return torch.nonzero(keep, as_tuple=False).flatten()
