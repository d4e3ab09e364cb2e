"""GSPO: Group Sequence Policy Optimization (Zheng et al. 2025), a sequence-level clipped objective.

With GRPO group advantages Â_i and, per trajectory i of length |y_i| (valid tokens M = 1):

    s_i   = exp( (1/|y_i|) Σ_t (log π_θ(y_i,t) − log π_old(y_i,t)) )      (log clamped to ±20)
    ℓ_i   = −min( s_i·Â_i, clip(s_i, 1−ε_low, 1+ε_high)·Â_i )
    J     = Σ_i w_i·ℓ_i / N_seq

N_seq is the number of trajectories of the whole mini-batch (the paper's 1/G Σ_i): pass it as
`num_sequences` (summed over micro-batches and data-parallel ranks) and micro-batch losses add up to J,
as the token-mean losses of algo/loss.py do with their token count. w_i is the detached rollout-correction
weight of the trajectory (level `sequence`: one weight per trajectory; 1 without correction); a token-level
weight has no sequence-level meaning here and is refused by the registry.

Clip range: the paper uses ε_low = 3e-4, ε_high = 4e-4 (s_i is a per-token geometric mean, so it stays
near 1); they are gspo's defaults in `algo.registry` (Algorithm.clip_defaults), overridden by
`algo.clip_low` / `algo.clip_high`.

Tokens of one trajectory are found by `seq_ids` (any integer per position; equal ids = one trajectory),
so padded rows and packed (thd) segments work alike.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

LOG_RATIO_CLAMP = 20.0
PAPER_CLIP_LOW = 3e-4
PAPER_CLIP_HIGH = 4e-4


def _segment_sum(values: Tensor, ids: Tensor, size: int) -> Tensor:
    return torch.zeros(size, dtype=values.dtype, device=values.device).index_add(0, ids, values)


def gspo_policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, response_mask: Tensor,
                     seq_ids: Tensor, *, clip_low: float = PAPER_CLIP_LOW, clip_high: float = PAPER_CLIP_HIGH,
                     num_sequences: float | int | Tensor | None = None,
                     is_weights: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """J for these rows (module doc). Returns (loss scalar, detached metrics whose denominator is N_seq).

    logp, old_logp, response_mask, seq_ids: [B, T] (or any one shape); advantages: [B, T] constant over
    each trajectory, or [B] with one trajectory per row; is_weights: per position, constant over each
    trajectory (a per-sequence weight broadcast), None = 1. `num_sequences` None: this batch's own count.
    No host synchronisation: trajectories are summed into a buffer of one slot per position.
    """
    if logp.shape != old_logp.shape or response_mask.shape != logp.shape or seq_ids.shape != logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)}, response_mask "
                         f"{tuple(response_mask.shape)} and seq_ids {tuple(seq_ids.shape)} must have one shape")
    if not 0.0 <= clip_low < 1.0 or clip_high < 0.0:
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    if advantages.dim() == logp.dim() - 1:
        advantages = advantages.unsqueeze(-1).expand_as(logp)
    valid = response_mask.bool()
    zero = torch.zeros_like(logp)
    dt = logp.dtype
    # Sanitise first: a NaN/inf log-prob on a padded slot would otherwise poison the gradient.
    lp = torch.where(valid, logp, zero)
    old = torch.where(valid, old_logp.to(dt), zero.detach())
    ids = torch.where(valid, seq_ids.to(torch.long), torch.zeros_like(seq_ids, dtype=torch.long)).reshape(-1)
    if valid.any() and (ids.min() < 0 or ids.max() >= ids.numel()):
        raise ValueError(f"seq_ids must lie in [0, {ids.numel()}) on valid positions")
    size = ids.numel()
    fvalid = valid.to(dt).reshape(-1)
    length = _segment_sum(fvalid, ids, size)
    present = length > 0
    n = length.clamp(min=1)
    log_s = _segment_sum((lp - old).reshape(-1), ids, size) / n
    adv = _segment_sum(torch.where(valid, advantages.to(dt), zero).reshape(-1), ids, size).detach() / n
    s = torch.exp(log_s.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    s_c = torch.exp(log_s.clamp(math.log(1.0 - clip_low), math.log(1.0 + clip_high)))
    unclipped, clipped = -adv * s, -adv * s_c
    per_seq = torch.maximum(unclipped, clipped)
    if is_weights is not None:  # detached; sanitised like the log-probs (0·NaN would be a NaN gradient)
        w = torch.where(valid, is_weights.detach().to(dt), zero).reshape(-1)
        per_seq = per_seq * (_segment_sum(w, ids, size) / n)
    per_seq = torch.where(present, per_seq, torch.zeros_like(per_seq))
    count = present.sum()
    if num_sequences is None:
        denom = count.clamp(min=1).to(dt)
    else:
        denom = torch.as_tensor(num_sequences, dtype=dt, device=logp.device).clamp(min=1)
    loss = per_seq.sum() / denom
    with torch.no_grad():
        metrics = {
            "pg_loss": per_seq.detach().sum() / denom,
            "pg_clipfrac": ((clipped > unclipped) & present).sum().to(dt) / denom,
            "approx_kl": torch.where(present, -log_s.detach(), torch.zeros_like(log_s)).sum() / denom,
            "seq_ratio_mean": torch.where(present, s.detach(), torch.zeros_like(s)).sum() / denom,
            "sequences": count.to(dt) / denom,
        }
    return loss, metrics
