"""Rollout correction: importance weights between the trainer's π_old and the engine that sampled.

The engine (SGLang, vLLM, the in-process engine) samples with its own kernels and precision, so its
log-probs `rollout` differ from the trainer's `old` for the same tokens. The policy gradient is an
expectation under π_old, but the samples came from π_rollout; each token's loss is re-weighted by
w = π_old / π_rollout, and w is bounded so a few tokens with a large mismatch cannot dominate.

With δ_t = clamp(old_t − rollout_t, −20, 20) on valid tokens (M = 1):

    level token:     log w_t = δ_t
    level sequence:  log w_i = Σ_t M[i,t]·δ_t      (one weight per trajectory, broadcast to its tokens)

    mode truncate (TIS):  w = min(exp(log w), C)
    mode mask (MIS):      w = exp(log w) if 1/C ≤ exp(log w) ≤ C, else 0 (the token / sequence is dropped)

(closed interval: w exactly at C or 1/C is kept, and truncation at w = C changes nothing.) The weights are
detached and multiply the per-token PPO loss ℓ (algo/loss.py) on the policy-gradient term only, never
the entropy term. Dropped tokens keep counting in the denominator N (all valid tokens of the mini-batch),
like TGF-filtered tokens: J's scale does not depend on how many tokens the correction dropped, and it
stays the same at every parallel layout. `level: none` gives w = 1 everywhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

LOG_RATIO_CLAMP = 20.0
LEVELS = ("none", "token", "sequence")
MODES = ("truncate", "mask")


@dataclass(frozen=True)
class CorrectionWeights:
    weights: Tensor  # [B, T] detached, 0 on invalid positions
    capped: Tensor   # bool [B, T]: truncate mode, the cap was applied (w > C); mask mode, the token was dropped


def check_correction(level: str, mode: str, cap: float) -> None:
    if level not in LEVELS:
        raise ValueError(f"rollout_correction.level={level!r}: choose one of {', '.join(LEVELS)}")
    if mode not in MODES:
        raise ValueError(f"rollout_correction.mode={mode!r}: choose one of {', '.join(MODES)}")
    if not (isinstance(cap, (int, float)) and math.isfinite(cap) and cap >= 1.0):
        raise ValueError(f"rollout_correction.cap={cap!r}: must be a finite number >= 1 (e.g. 2.0)")


def rollout_weights(old_logp: Tensor, rollout_logp: Tensor, response_mask: Tensor, *, level: str,
                    mode: str = "truncate", cap: float = 2.0) -> CorrectionWeights:
    """Importance weights π_old / π_rollout per token (see the module doc for the exact formulas)."""
    check_correction(level, mode, cap)
    if old_logp.shape != rollout_logp.shape or old_logp.shape != response_mask.shape:
        raise ValueError(f"old_logp {tuple(old_logp.shape)}, rollout_logp {tuple(rollout_logp.shape)} and "
                         f"response_mask {tuple(response_mask.shape)} must have one shape")
    valid = response_mask.bool()
    zero = torch.zeros_like(old_logp)
    if level == "none":
        return CorrectionWeights(valid.to(old_logp.dtype), torch.zeros_like(valid))
    with torch.no_grad():
        delta = torch.where(valid, (old_logp - rollout_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP), zero)
        if level == "sequence":
            delta = delta.sum(-1, keepdim=True).expand_as(delta)
        log_cap = math.log(cap)
        if mode == "truncate":
            capped = valid & (delta > log_cap)
            w = torch.exp(delta.clamp(max=log_cap))
        else:
            capped = valid & ((delta > log_cap) | (delta < -log_cap))
            w = torch.where(capped, zero, torch.exp(delta))
        w = torch.where(valid, w, zero)
    return CorrectionWeights(w, capped)


def mismatch_metrics(old_logp: Tensor, rollout_logp: Tensor, response_mask: Tensor,
                     correction: CorrectionWeights | None = None) -> dict[str, float]:
    """Engine-vs-trainer log-prob mismatch over valid tokens: |Δ| mean/max, k3 KL(π_rollout ‖ π_old)
    (the unbiased estimate from tokens sampled by the engine), and the corrected fraction."""
    valid = response_mask.bool()
    n = int(valid.sum())
    if n == 0:
        return {}
    d = (old_logp - rollout_logp)[valid].double()  # log π_old − log π_rollout at rollout samples
    out = {
        "rollout_correction/logp_abs_diff_mean": d.abs().mean().item(),
        "rollout_correction/logp_abs_diff_max": d.abs().max().item(),
        # k3 = r − 1 − log r with r = π_old / π_rollout: ≥ 0, unbiased for KL(π_rollout ‖ π_old)
        "rollout_correction/k3_kl": (torch.exp(d.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)) - 1 - d).mean().item(),
    }
    if correction is not None:
        capped = correction.capped & valid
        out["rollout_correction/token_frac_corrected"] = capped.sum().item() / n
        rows = valid.any(-1)
        out["rollout_correction/seq_frac_corrected"] = (capped.any(-1) & rows).sum().item() / max(int(rows.sum()), 1)
        out["rollout_correction/weight_mean"] = correction.weights[valid].double().mean().item()
    return out
