"""Dual-clip PPO token loss and the VPPO objective J (spec §6).

    r   = exp(clamp(logp - old, -20, 20)),   r_c = exp(clamp(logp - old, ln(1-ε_low), ln(1+ε_high)))
    ℓ   = max(-Â·r, -Â·r_c);  if Â < 0: ℓ = min(ℓ, -c·Â)
    J   = [Σ mask·M·w·ℓ + c_ent·Σ M·(-logp)] / N

w is the detached rollout-correction weight (algo/rollout_correction.py; 1 without correction).

N is the count of ALL valid response tokens of the mini-batch. Pass it as `num_tokens` (summed over
micro-batches and data-parallel ranks) and every micro-batch's J becomes its additive share: the sum of
micro-batch losses over all micro-batches and ranks is exactly J of the whole mini-batch, and so is the
sum of their gradients. (If the data-parallel gradient reduction averages over ranks instead of summing,
the caller multiplies by the data-parallel size.) Metrics use the same denominator, so they add up the
same way.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from megatron_vppo.config import TOKEN_CLIP_DEFAULTS, AlgoConfig

_CLIP_LOW, _CLIP_HIGH = TOKEN_CLIP_DEFAULTS
_DUAL_CLIP = AlgoConfig.dual_clip

LOG_RATIO_CLAMP = 20.0


class PPOTerms(NamedTuple):
    loss: Tensor          # ℓ per token, [B, T] (unmasked)
    clipped: Tensor       # bool: the clipped branch -Â·r_c won the max
    dual_clipped: Tensor  # bool: Â < 0 and the dual-clip bound -c·Â was taken
    log_ratio: Tensor     # logp - old (unclamped)


def ppo_token_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, clip_low: float = _CLIP_LOW,
                   clip_high: float = _CLIP_HIGH, dual_clip: float = _DUAL_CLIP) -> PPOTerms:
    """Per-token dual-clip PPO loss ℓ. `advantages` is [B] (broadcast over tokens) or [B, T]."""
    if logp.shape != old_logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and old_logp {tuple(old_logp.shape)} must match")
    if not 0.0 <= clip_low < 1.0 or clip_high < 0.0:
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    if dual_clip <= 1.0:
        raise ValueError(f"dual_clip={dual_clip} must be > 1 (spec: 3.0)")
    adv = advantages.unsqueeze(-1) if advantages.dim() == logp.dim() - 1 else advantages
    log_ratio = logp - old_logp
    ratio = torch.exp(torch.clamp(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    ratio_c = torch.exp(torch.clamp(log_ratio, math.log(1.0 - clip_low), math.log(1.0 + clip_high)))
    unclipped = -adv * ratio
    clipped_obj = -adv * ratio_c
    loss = torch.maximum(unclipped, clipped_obj)
    bound = -dual_clip * adv
    dual = (adv < 0) & (loss > bound)
    loss = torch.where(dual, bound.expand_as(loss), loss)
    return PPOTerms(loss, clipped_obj > unclipped, dual, log_ratio)


def vppo_policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, response_mask: Tensor,
                     tgf_mask: Tensor | None = None, *, clip_low: float = _CLIP_LOW, clip_high: float = _CLIP_HIGH,
                     dual_clip: float = _DUAL_CLIP, entropy_coef: float = 0.0,
                     num_tokens: float | int | Tensor | None = None,
                     is_weights: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """J for these rows (spec §6). Returns (loss scalar, detached metrics).

    `tgf_mask` None keeps every valid token (plain DAPO when entropy_coef = 0 and α = 1).
    `num_tokens` None uses this batch's own valid-token count; pass the global count (see module doc).
    `is_weights` [B, T] (rollout correction, detached here) scales each token's PPO term; None = 1.
    Positions with M = 0 contribute nothing and get zero gradient, whatever their log-probs hold.
    """
    valid = response_mask.bool()
    if valid.shape != logp.shape:
        raise ValueError(f"response_mask {tuple(valid.shape)} must match logp {tuple(logp.shape)}")
    zero = torch.zeros_like(logp)
    # Sanitise first: a NaN/inf log-prob on a padded slot would otherwise poison the gradient.
    lp = torch.where(valid, logp, zero)
    old = torch.where(valid, old_logp.to(logp.dtype), zero.detach())
    terms = ppo_token_loss(lp, old, advantages.to(logp.dtype), clip_low, clip_high, dual_clip)
    pg_keep = valid if tgf_mask is None else valid & tgf_mask.bool()
    if num_tokens is None:
        denom = valid.sum().clamp(min=1).to(logp.dtype)
    else:
        denom = torch.as_tensor(num_tokens, dtype=logp.dtype, device=logp.device).clamp(min=1)
    if is_weights is None:
        pg_terms = terms.loss
    else:  # sanitised like the log-probs: 0·NaN on a padded slot would be a NaN gradient
        pg_terms = terms.loss * torch.where(valid, is_weights.detach().to(logp.dtype), zero)
    pg_sum = torch.where(pg_keep, pg_terms, zero).sum()
    neg_logp_sum = torch.where(valid, -lp, zero).sum()
    loss = (pg_sum + entropy_coef * neg_logp_sum) / denom
    with torch.no_grad():
        def frac(b: Tensor) -> Tensor:
            return (b & valid).sum().to(logp.dtype) / denom

        metrics = {
            "pg_loss": pg_sum.detach() / denom,
            "neg_logp": neg_logp_sum.detach() / denom,
            "pg_clipfrac": frac(terms.clipped),
            "pg_clipfrac_dual": frac(terms.dual_clipped),
            "kept_token_frac": frac(pg_keep),
            "approx_kl": torch.where(valid, -terms.log_ratio, zero).sum() / denom,
            "token_frac": valid.sum().to(logp.dtype) / denom,
        }
    return loss, metrics
