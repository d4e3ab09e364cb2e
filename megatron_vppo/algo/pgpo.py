"""PGPO (arXiv 2604.01840): per-token advantage weights from a second view (spec/perception_family.md).

From π_old's log-probs of the original view (p) and the second view (q; the blind view by default):

    S_t = clamp(k3_t, 0, 10)  (VPPO's sampled k3),   S̃_t = log(1 + S_t)
    I_t = (S̃_t − min_s S̃_s) / (max_s S̃_s − min_s S̃_s + 1e-8)        (over the response's tokens)
    w_t = I_t / τ                       if I_t < τ
        = 1 + β (I_t − τ) / (1 − τ)     otherwise                     (w ∈ [0, 1 + β])
    w_t ← w_t · L / Σ_s w_s   (mass normalisation; every w_t = 1 if Σ_s w_s < 1e-8)

and Â_{i,t} = w_t · A_i in the usual clipped policy gradient. Switches (the authors' development code):
`threshold` fixed (τ as given) or quantile (τ = the response's ascending I at index ⌊L·τ⌋),
`low_weight_floor` (a lower bound on the weights below the threshold: 0 in the paper, 0.1 in that code),
`mass_normalization` (on in the paper, off in that code). With τ = 1 (quantile mode, a constant response)
the upper branch divides by max(1 − τ, 1e-8) and gives w = 1.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .dependency import sampled_k3

RANGE_EPS = 1e-8
MASS_EPS = 1e-8
THRESHOLDS = ("fixed", "quantile")


def _row_minmax(x: Tensor, valid: Tensor) -> Tensor:
    inf = torch.full_like(x, float("inf"))
    mn = torch.where(valid, x, inf).amin(-1, keepdim=True)
    mx = torch.where(valid, x, -inf).amax(-1, keepdim=True)
    mn = torch.where(torch.isfinite(mn), mn, torch.zeros_like(mn))  # a row without tokens
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    return torch.where(valid, (x - mn) / (mx - mn + RANGE_EPS), torch.zeros_like(x))


def quantile_threshold(importance: Tensor, valid: Tensor, tau: float) -> Tensor:
    """[B, 1]: each row's ascending valid I at index ⌊L·τ⌋ (clamped to L − 1); 0 for an empty row."""
    lengths = valid.sum(-1)
    big = torch.full_like(importance, float("inf"))
    ordered = torch.sort(torch.where(valid, importance, big), dim=-1).values
    index = torch.clamp(torch.floor(lengths.to(torch.float64) * tau).to(torch.long), max=(lengths - 1).clamp(min=0))
    out = ordered.gather(-1, index.unsqueeze(-1))
    return torch.where(lengths.unsqueeze(-1) > 0, out, torch.zeros_like(out))


@torch.no_grad()
def pgpo_token_weights(old_logp: Tensor, aug_logp: Tensor, mask: Tensor, *, tau: float = 0.4, beta: float = 2.0,
                       threshold: str = "fixed", low_weight_floor: float = 0.0,
                       mass_normalization: bool = True) -> Tensor:
    """w [B, T] (dtype of old_logp, 0 where mask = 0) for whole responses (rows)."""
    if old_logp.dim() != 2 or aug_logp.shape != old_logp.shape or mask.shape != old_logp.shape:
        raise ValueError(f"old_logp, aug_logp and mask must all be [B, T], got {tuple(old_logp.shape)}, "
                         f"{tuple(aug_logp.shape)} and {tuple(mask.shape)}")
    if threshold not in THRESHOLDS:
        raise ValueError(f"pgpo threshold={threshold!r} is not one of {list(THRESHOLDS)}")
    if not 0.0 < tau <= 1.0 if threshold == "fixed" else not 0.0 <= tau <= 1.0:
        raise ValueError(f"pgpo tau={tau} must be in (0, 1] (fixed) or [0, 1] (quantile)")
    valid = mask.bool()
    score = torch.log1p(sampled_k3(old_logp, aug_logp, mask))  # sampled_k3 is already clamped to [0, 10]
    imp = _row_minmax(score, valid)
    t = quantile_threshold(imp, valid, tau) if threshold == "quantile" else torch.full_like(imp[:, :1], tau)
    low = imp < t
    below = imp / torch.where(t > 0, t, torch.ones_like(t))
    above = 1.0 + beta * (imp - t) / torch.clamp(1.0 - t, min=RANGE_EPS)
    w = torch.where(low, torch.clamp(below, min=low_weight_floor), above)
    w = torch.where(valid, w, torch.zeros_like(w))
    if mass_normalization:
        total = w.sum(-1, keepdim=True)
        n = valid.sum(-1, keepdim=True).to(w.dtype)
        w = torch.where(total < MASS_EPS, valid.to(w.dtype), w * n / torch.where(total < MASS_EPS,
                                                                               torch.ones_like(total), total))
    return w
