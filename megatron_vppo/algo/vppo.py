"""One RL step's VPPO signals from π_old (spec §1.6): dependency → TAS α → shaped advantages, TGF mask.

Computed once per RL step and held fixed for all its optimizer steps. `cfg` is an AlgoConfig (or any
object / dict with its attribute names). With `tas` off (the baselines; the registry's `Algorithm.shaping` decides)
the shaping is off (α = 1, every valid token kept) but the dependency is still reported when aug_logp is given.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .dependency import exact_kl_dependency, sampled_k3, sequence_dependency
from .tas import IndexLists, shape_advantages, tas_alpha
from .tgf import tgf_mask as make_tgf_mask

QUANTILES = (0.5, 0.9, 0.99)


@dataclass
class Shaping:
    dependency: Tensor         # [B, T], 0 where M = 0
    seq_dependency: Tensor     # [B]
    alpha: Tensor              # [B]
    shaped_advantages: Tensor  # [B]
    tgf_mask: Tensor           # [B, T] {0,1}, dtype of the response mask
    metrics: dict[str, float] = field(default_factory=dict)
    token_weights: Tensor | None = None  # [B, T] per-token advantage weights (PGPO): Â_{i,t} = w_t · Â_i


def _reduce(values: list[Tensor], op, group) -> list[Tensor]:
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return values
    t = torch.stack(values)
    dist.all_reduce(t, op=op, group=group)
    return list(t.unbind(0))


def shaping_metrics(dependency: Tensor, mask: Tensor, alpha: Tensor, keep: Tensor,
                    group=None, *, measured: bool = True, shaped: bool = True) -> dict[str, float]:
    """Dependency mean/quantiles, kept-token fraction, α min/mean/max.

    With a data-parallel `group`, means/min/max are global; quantiles stay rank-local (exact global
    quantiles would need the whole token set on one rank). Only what was computed is reported:
    `measured` False (no perturbed view scored) drops the dependency keys, `shaped` False (no TAS / TGF:
    α = 1, every token kept) drops the tas/ and tgf/ keys — a constant 0 or 1 there would read as a result.
    """
    valid = mask.bool()
    dt = torch.float64
    d = dependency.detach().to(dt)
    a = alpha.detach().to(dt)
    has_tok = valid.any(-1)
    tok, dep_sum, kept, n_traj, a_sum = _reduce(
        [valid.sum().to(dt), torch.where(valid, d, 0.0).sum(), (keep.bool() & valid).sum().to(dt),
         has_tok.sum().to(dt), torch.where(has_tok, a, 0.0).sum()], dist.ReduceOp.SUM, group)
    inf = torch.tensor(float("inf"), dtype=dt, device=a.device)
    a_min = torch.where(has_tok, a, inf).min() if a.numel() else inf
    a_negmax = torch.where(has_tok, -a, inf).min() if a.numel() else inf
    a_min, a_negmax = _reduce([a_min, a_negmax], dist.ReduceOp.MIN, group)
    out = {
        "dependency/mean": float(dep_sum / tok.clamp(min=1)),
        "tgf/kept_token_frac": float(kept / tok.clamp(min=1)),
        "tas/alpha_mean": float(a_sum / n_traj.clamp(min=1)),
        "tas/alpha_min": float(a_min) if n_traj > 0 else 1.0,
        "tas/alpha_max": float(-a_negmax) if n_traj > 0 else 1.0,
    }
    if not shaped:
        out = {k: v for k, v in out.items() if not k.startswith(("tgf/", "tas/"))}
    if not measured:
        return {k: v for k, v in out.items() if not k.startswith("dependency/")}
    local = d[valid]
    if local.numel():
        qs = torch.quantile(local, torch.tensor(QUANTILES, dtype=dt, device=local.device))
        for q, v in zip(QUANTILES, qs.tolist()):
            out[f"dependency/p{int(round(q * 100))}"] = v
    return out


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def compute_shaping(old_logp: Tensor, aug_logp: Tensor | None, response_mask: Tensor,
                    advantages: Tensor, cfg: Any, *, kl: Tensor | None = None, group=None,
                    minibatches: IndexLists | None = None, microbatches: IndexLists | None = None,
                    with_metrics: bool = True, tas: bool = True) -> Shaping:
    """Dependency, α, Â, TGF mask (+ metrics) for the rows given.

    old_logp, aug_logp, response_mask: [B, T]; advantages: [B] (GRPO, per trajectory).
    kl: [B, T] per-token full-vocabulary KL, required for dependency_estimator 'exact_kl'.
    group: data-parallel group for tas_scope 'global' (and global metrics); minibatches/microbatches:
    rank-local index lists for tas_scope 'official'.
    """
    if old_logp.dim() != 2 or response_mask.shape != old_logp.shape:
        raise ValueError(f"old_logp and response_mask must both be [B, T], got {tuple(old_logp.shape)} "
                         f"and {tuple(response_mask.shape)}")
    if advantages.shape != old_logp.shape[:1]:
        raise ValueError(f"advantages must be [B]={old_logp.shape[0]} (one per trajectory), got "
                         f"{tuple(advantages.shape)}")
    estimator = _get(cfg, "dependency_estimator", "sampled_k3")
    measured = True
    if estimator == "exact_kl" and kl is not None:
        dep = exact_kl_dependency(kl, response_mask)
    elif aug_logp is not None and estimator == "sampled_k3":
        dep = sampled_k3(old_logp, aug_logp, response_mask)
    elif tas:
        need = "kl (per-token exact KL)" if estimator == "exact_kl" else "aug_logp"
        raise ValueError(f"dependency_estimator={estimator!r} needs {need} for algorithm 'vppo'")
    else:
        dep, measured = torch.zeros_like(old_logp), False
    seq = sequence_dependency(dep, response_mask)
    valid = response_mask.bool().any(-1)
    if tas:
        alpha = tas_alpha(seq, valid, float(_get(cfg, "beta_min")), _get(cfg, "tas_scope", "global"),
                          group=group, minibatches=minibatches, microbatches=microbatches)
        keep = make_tgf_mask(dep, response_mask, float(_get(cfg, "top_k_ratio")))
    else:
        alpha = torch.ones_like(seq)
        keep = (response_mask != 0).to(response_mask.dtype)
    alpha = alpha.to(advantages.dtype)
    shaped = shape_advantages(advantages, alpha)
    metrics = (shaping_metrics(dep, response_mask, alpha, keep, group, measured=measured, shaped=tas)
               if with_metrics else {})
    return Shaping(dep, seq, alpha, shaped, keep, metrics)
