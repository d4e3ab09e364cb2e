"""VEPO (arXiv 2606.03937): token selection by visual divergence (spec/perception_family.md).

From π_old's full distributions on the original view (P) and a pixel-noise view (Q), per response token
(computed vocab-parallel in the no-grad pass: `vocab_parallel.vocab_parallel_jsd_entropies`):

    JSD_t = ½ KL(P‖M) + ½ KL(Q‖M),  M = ½ (P + Q)   (clamped ≥ 0)
    H_t   = H(P_t),   G_t = |H(Q_t) − H(P_t)|
    ĵ, ĥ, ĝ = per-response min-max of each: (x − min) / (max − min + 1e-8)
    s_t   = [1 − (1 − ĵ_t)^α (1 − ĝ_t)^{1−α}] · ĥ_t

The top ⌈top_ratio · L⌉ tokens of each response by s_t are kept (ties to the earlier position, as
VPPO's TGF); the policy-gradient loss is averaged over the kept tokens, the sequence advantage unchanged.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .pgpo import _row_minmax
from .tgf import tgf_mask


@torch.no_grad()
def vepo_scores(jsd: Tensor, ent_old: Tensor, ent_aug: Tensor, mask: Tensor, alpha: float = 0.7) -> Tensor:
    """s [B, T] (0 where mask = 0)."""
    if not (jsd.shape == ent_old.shape == ent_aug.shape == mask.shape) or jsd.dim() != 2:
        raise ValueError(f"jsd, ent_old, ent_aug and mask must all be [B, T], got {tuple(jsd.shape)}, "
                         f"{tuple(ent_old.shape)}, {tuple(ent_aug.shape)} and {tuple(mask.shape)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"vepo alpha={alpha} must be in [0, 1]")
    valid = mask.bool()
    j = _row_minmax(torch.clamp(jsd, min=0.0), valid)
    h = _row_minmax(ent_old, valid)
    g = _row_minmax((ent_aug - ent_old).abs(), valid)
    s = (1.0 - (1.0 - j) ** alpha * (1.0 - g) ** (1.0 - alpha)) * h
    return torch.where(valid, s, torch.zeros_like(s))


def vepo_token_mask(scores: Tensor, mask: Tensor, top_ratio: float = 0.2) -> Tensor:
    """{0,1} (dtype of mask): the top ⌈top_ratio · L⌉ tokens of each response by score."""
    return tgf_mask(scores, mask, top_ratio)
