"""PAPO (arXiv 2507.06448): an implicit perception loss on top of the GRPO / DAPO objective.

spec/perception_family.md, PAPO. With p_t = log π_θ(y_t | x, I, y_<t) (current policy, with gradient)
and q_t = log π_old(y_t | x, I', y_<t) (the patch-blackened view I', scored once before the update,
no gradient):

    d_t  = clamp(q_t − p_t, ±20),   k3_t = clamp(e^{d_t} − d_t − 1, −10, 10)
    term = −γ · tokmean(k3_t) + η · tokmean(−p_t)         (added to L_pg)

tokmean divides by the mini-batch's response-token count (the loss's global denominator), so the
numerators of micro-batches and data-parallel ranks add up to the term of the whole mini-batch, as in
algo/loss.py. q is a constant, so the gradient reaches the model only through p: with q detached,
maximising E[k3] follows ∇ KL(q ‖ p) (the reimplementation's notes), i.e. it pushes the original view's
distribution away from the masked view's — "perceive the image". The authors' second entropy term (on
the masked view) carries no gradient and is left out.

`clamp_small` (off by default) clamps k3 to [0, 0.2] instead (an option of the authors' scripts).
`aug_grad` (algo.papo.second_view_grad, TRL's variant): q is the masked view's log-prob under the current
policy, forwarded with gradient in the update, and the term's gradient flows through both views.
"""
from __future__ import annotations

import torch
from torch import Tensor

LOG_RATIO_CLAMP = 20.0
K3_CLAMP = 10.0
K3_CLAMP_SMALL = (0.0, 0.2)


def papo_k3(cur_logp: Tensor, aug_logp: Tensor, mask: Tensor, *, clamp_small: bool = False,
            aug_grad: bool = False) -> Tensor:
    """k3_t(p_cur, q) with gradient through `cur_logp` (and `aug_logp` with `aug_grad`); 0 where mask = 0
    (whatever the padding holds)."""
    if cur_logp.shape != aug_logp.shape or mask.shape != cur_logp.shape:
        raise ValueError(f"cur_logp {tuple(cur_logp.shape)}, aug_logp {tuple(aug_logp.shape)} and mask "
                         f"{tuple(mask.shape)} must have one shape")
    valid = mask.bool()
    zero = torch.zeros_like(cur_logp)
    p = torch.where(valid, cur_logp, zero)
    q = torch.where(valid, (aug_logp if aug_grad else aug_logp.detach()).to(cur_logp.dtype), zero.detach())
    d = torch.clamp(q - p, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    k3 = torch.exp(d) - d - 1.0
    k3 = torch.clamp(k3, *K3_CLAMP_SMALL) if clamp_small else torch.clamp(k3, -K3_CLAMP, K3_CLAMP)
    return torch.where(valid, k3, zero)


def perception_term(cur_logp: Tensor, aug_logp: Tensor, mask: Tensor, *, gamma: float, eta: float,
                    num_tokens: float | int | Tensor | None = None, clamp_small: bool = False,
                    aug_grad: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
    """(−γ·Σ k3 + η·Σ(−p)) / N over the valid tokens, and detached metrics with the same denominator.

    `num_tokens` None: this batch's own valid-token count; pass 1 to get the numerator (the trainer's
    per-token-loss mode divides by the global count).
    """
    valid = mask.bool()
    k3 = papo_k3(cur_logp, aug_logp, mask, clamp_small=clamp_small, aug_grad=aug_grad)
    neg_p = torch.where(valid, -cur_logp, torch.zeros_like(cur_logp))
    if num_tokens is None:
        denom = valid.sum().clamp(min=1).to(cur_logp.dtype)
    else:
        denom = torch.as_tensor(num_tokens, dtype=cur_logp.dtype, device=cur_logp.device).clamp(min=1)
    k3_sum, neg_p_sum = k3.sum(), neg_p.sum()
    term = (-gamma * k3_sum + eta * neg_p_sum) / denom
    with torch.no_grad():
        metrics = {"papo/k3": k3_sum.detach() / denom, "papo/neg_logp": neg_p_sum.detach() / denom,
                   "papo/term": term.detach()}
    return term, metrics
