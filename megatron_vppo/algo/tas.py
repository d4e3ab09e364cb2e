"""Trajectory Advantage Shaping: α_i from the sequence dependency S̄_i (spec §4).

    ñ_i = clamp((S̄_i - mn) / (mx - mn), 0, 1),   α_i = β_min + (1 - β_min) · ñ_i / (μ + 1e-8)

over trajectories with n_i > 0 (`valid`). Degenerate cases: fewer than 2 valid trajectories in the
min/max scope, or mx - mn <= 1e-6 → α ≡ 1 there; n_i = 0 → α_i = 1; μ = 0 → α ≡ β_min (falls out of
the formula). Two scopes:

* global   — min/max and μ over the whole RL-step batch; with a data-parallel `group` they are
             all-reduced so every rank gets the α a single process would compute on the whole batch.
* official — the reference trainer: min/max over each (rank-local) mini-batch, μ over each micro-batch.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

RANGE_EPS = 1e-6
MU_EPS = 1e-8
SCOPES = ("global", "official")

IndexLists = Sequence[Sequence[int]]


def _check(seq_dep: Tensor, valid: Tensor) -> None:
    if seq_dep.dim() != 1 or valid.shape != seq_dep.shape:
        raise ValueError(f"seq_dep and valid must both be 1-D [B] of the same length, got "
                         f"{tuple(seq_dep.shape)} and {tuple(valid.shape)}")


def _alpha(seq_dep: Tensor, mn: Tensor, mx: Tensor, mu: Tensor, beta_min: float) -> Tensor:
    """The §4 formula for given statistics (no degenerate-case handling)."""
    norm = torch.clamp((seq_dep - mn) / (mx - mn), 0.0, 1.0)
    return beta_min + (1.0 - beta_min) * norm / (mu + MU_EPS)


def _is_dist(group) -> bool:
    return group is not None and dist.is_initialized() and dist.get_world_size(group) > 1


def tas_alpha_global(seq_dep: Tensor, valid: Tensor, beta_min: float, group=None) -> Tensor:
    """α with min/max and μ over the whole batch; `group` = data-parallel group holding the rest of it.

    No host synchronisation: degenerate cases are resolved with `torch.where`.
    Collectives: two all-reduces (MIN of [mn, -mx], SUM of [count, Σñ]) when `group` has > 1 rank.
    """
    _check(seq_dep, valid)
    valid = valid.bool()
    s = seq_dep
    inf = torch.tensor(float("inf"), dtype=s.dtype, device=s.device)
    mn = torch.where(valid, s, inf).min() if s.numel() else inf
    neg_mx = torch.where(valid, -s, inf).min() if s.numel() else inf
    if _is_dist(group):
        ext = torch.stack([mn, neg_mx])
        dist.all_reduce(ext, op=dist.ReduceOp.MIN, group=group)
        mn, neg_mx = ext[0], ext[1]
    mx = -neg_mx
    count = valid.sum().to(s.dtype)
    degenerate_range = ~(mx - mn > RANGE_EPS)  # also true for inf - inf / empty
    span = torch.where(degenerate_range, torch.ones_like(mn), mx - mn)
    base = torch.where(degenerate_range, torch.zeros_like(mn), mn)
    norm = torch.where(valid, torch.clamp((s - base) / span, 0.0, 1.0), torch.zeros_like(s))
    stats = torch.stack([count, norm.sum()])
    if _is_dist(group):
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
    count, norm_sum = stats[0], stats[1]
    mu = norm_sum / count.clamp(min=1.0)
    alpha = beta_min + (1.0 - beta_min) * norm / (mu + MU_EPS)
    degenerate = degenerate_range | (count < 2)
    return torch.where(valid & ~degenerate, alpha, torch.ones_like(alpha))


def _as_index(idx, n: int, device) -> Tensor:
    t = torch.as_tensor(list(idx) if not isinstance(idx, Tensor) else idx, dtype=torch.long, device=device)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
        raise ValueError(f"index list {t.tolist()} out of range for a batch of {n} trajectories")
    return t


def tas_alpha_official(seq_dep: Tensor, valid: Tensor, beta_min: float, minibatches: IndexLists,
                       microbatches: IndexLists) -> Tensor:
    """α as the reference trainer: min/max per mini-batch, μ per micro-batch (rank-local lists).

    The micro-batches must partition the mini-batches; trajectories in no mini-batch get α = 1.
    """
    _check(seq_dep, valid)
    valid = valid.bool()
    n = seq_dep.numel()
    alpha = torch.ones_like(seq_dep)
    owner = [-1] * n
    mini_sets = []
    for m, mb in enumerate(minibatches):
        idx = _as_index(mb, n, seq_dep.device)
        for i in idx.tolist():
            if owner[i] != -1:
                raise ValueError(f"trajectory {i} is in more than one mini-batch")
            owner[i] = m
        mini_sets.append(idx)
    covered = [set() for _ in mini_sets]
    micro_of = [[] for _ in mini_sets]
    for mb in microbatches:
        idx = _as_index(mb, n, seq_dep.device)
        if idx.numel() == 0:
            continue
        owners = {owner[i] for i in idx.tolist()}
        if len(owners) != 1 or -1 in owners:
            raise ValueError(f"micro-batch {idx.tolist()} must lie inside exactly one mini-batch")
        m = owners.pop()
        if covered[m] & set(idx.tolist()):
            raise ValueError(f"micro-batch {idx.tolist()} overlaps another micro-batch")
        covered[m] |= set(idx.tolist())
        micro_of[m].append(idx)
    for m, idx in enumerate(mini_sets):
        if covered[m] != set(idx.tolist()):
            raise ValueError(f"micro-batches do not cover mini-batch {m}: missing "
                             f"{sorted(set(idx.tolist()) - covered[m])}")
        v = valid[idx]
        if int(v.sum()) < 2:
            continue
        s = seq_dep[idx][v]
        mn, mx = s.min(), s.max()
        if not bool(mx - mn > RANGE_EPS):
            continue
        for micro in micro_of[m]:
            mv = valid[micro]
            if not bool(mv.any()):
                continue
            sm = seq_dep[micro]
            mu = torch.clamp((sm[mv] - mn) / (mx - mn), 0.0, 1.0).mean()
            a = _alpha(sm, mn, mx, mu, beta_min)
            alpha[micro] = torch.where(mv, a, torch.ones_like(a))
    return alpha


def tas_alpha(seq_dep: Tensor, valid: Tensor, beta_min: float, scope: str = "global", *, group=None,
              minibatches: IndexLists | None = None, microbatches: IndexLists | None = None) -> Tensor:
    """Dispatch on `scope` (spec §4, config key algo.tas_scope)."""
    if scope == "global":
        return tas_alpha_global(seq_dep, valid, beta_min, group=group)
    if scope == "official":
        if minibatches is None or microbatches is None:
            raise ValueError("tas_scope 'official' needs the rank-local minibatches and microbatches "
                             "index lists")
        return tas_alpha_official(seq_dep, valid, beta_min, minibatches, microbatches)
    raise ValueError(f"tas_scope={scope!r} is not one of {list(SCOPES)}")


def shape_advantages(advantages: Tensor, alpha: Tensor) -> Tensor:
    """Â_i = α_i · A_i."""
    return advantages * alpha
