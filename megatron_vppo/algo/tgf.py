"""Token Gradient Filtering: keep the k_i = ⌈top_k_ratio · n_i⌉ most visually dependent tokens of each
sequence (spec §5); ties go to the lower position. The mask is detached and fixed for the RL step.
"""
from __future__ import annotations

from fractions import Fraction

import torch
from torch import Tensor

MAX_RATIO_DENOMINATOR = 10**6


def ratio_fraction(top_k_ratio: float) -> Fraction:
    """The ratio as an exact fraction (nearest with denominator <= 1e6).

    Float products such as 0.4 * 5 may land a hair above an integer (or, from a float32 ratio,
    2.0000000298); a float ceil would then keep one token too many. Integer arithmetic on the
    fraction gives the intended ⌈p·n/q⌉ exactly.
    """
    r = float(top_k_ratio)
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"top_k_ratio={top_k_ratio} must be in [0, 1]")
    return Fraction(repr(r)).limit_denominator(MAX_RATIO_DENOMINATOR)


def keep_counts(lengths: Tensor, top_k_ratio: float) -> Tensor:
    """k_i = ⌈top_k_ratio · n_i⌉ as int64, exact (see ratio_fraction)."""
    f = ratio_fraction(top_k_ratio)
    n = lengths.to(torch.int64)
    return (n * f.numerator + f.denominator - 1) // f.denominator


def tgf_mask(dependency: Tensor, mask: Tensor, top_k_ratio: float) -> Tensor:
    """{0,1} mask (dtype of `mask`) keeping the top-k_i valid positions of each row by dependency."""
    if dependency.shape != mask.shape or dependency.dim() != 2:
        raise ValueError(f"dependency and mask must both be [B, T], got {tuple(dependency.shape)} and "
                         f"{tuple(mask.shape)}")
    valid = mask.bool()
    k = keep_counts(valid.sum(-1), top_k_ratio)
    d = dependency.detach().to(torch.float64)
    score = torch.where(valid, d, torch.full_like(d, float("-inf")))
    # Stable descending sort keeps equal scores in position order: ties → lower position first.
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    keep = (rank < k.unsqueeze(-1)) & valid
    return keep.to(mask.dtype)
