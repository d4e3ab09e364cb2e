"""Token visual dependency d[i,t] and its sequence mean S̄_i (spec §3, §4).

`sampled_k3` needs only the sampled-token log-probs under the original and the perturbed image; its
expectation under the policy is KL(π(·|I) ‖ π(·|I')). `exact_kl` takes the full-vocabulary KL per
token, computed vocab-parallel elsewhere (vocab_parallel.vocab_parallel_kl), and only masks it here.
"""
from __future__ import annotations

import torch
from torch import Tensor

LOG_RATIO_CLAMP = 20.0
K3_MAX = 10.0


def _check_pair(a: Tensor, b: Tensor, names: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def sampled_k3(old_logp: Tensor, aug_logp: Tensor, mask: Tensor) -> Tensor:
    """d = clamp(exp(Δ) - Δ - 1, 0, 10), Δ = clamp(aug - old, -20, 20); 0 where mask = 0."""
    _check_pair(old_logp, aug_logp, "old_logp and aug_logp")
    _check_pair(old_logp, mask, "old_logp and mask")
    delta = torch.clamp(aug_logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    d = torch.clamp(torch.exp(delta) - delta - 1.0, 0.0, K3_MAX)
    # where (not multiply) so a garbage log-prob on a padded position cannot leak a NaN.
    return torch.where(mask.bool(), d, torch.zeros_like(d))


def exact_kl_dependency(kl: Tensor, mask: Tensor) -> Tensor:
    """The per-token full-vocabulary KL as dependency: clamped at 0 (rounding), 0 where mask = 0."""
    _check_pair(kl, mask, "kl and mask")
    d = torch.clamp(kl, min=0.0)
    return torch.where(mask.bool(), d, torch.zeros_like(d))


def sequence_dependency(dependency: Tensor, mask: Tensor) -> Tensor:
    """S̄_i = Σ_t d[i,t]·M[i,t] / max(n_i, 1)."""
    _check_pair(dependency, mask, "dependency and mask")
    keep = mask.bool()
    n = keep.sum(-1).clamp(min=1).to(dependency.dtype)
    return torch.where(keep, dependency, torch.zeros_like(dependency)).sum(-1) / n
