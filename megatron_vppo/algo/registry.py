"""The RL algorithms the trainer runs, each declared once: `ALGORITHMS[name]` says what a step needs.

Adding an algorithm is one file (its loss, and its shaping if it has one) plus one line in `ALGORITHMS`.
The trainer reads only these fields: whether dynamic sampling filters groups, whether the perturbed
view is scored (the paired no-grad pass / the engine's perturbed prefill), the shaping of GRPO
advantages into Â and the token mask, the per-micro-batch loss, and the `algo.*` keys it reads — a key
it does not read, set away from its default, is a ConfigError (run_config.validate).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from megatron_vppo.config import TOKEN_CLIP_DEFAULTS

from .gspo import PAPER_CLIP_HIGH, PAPER_CLIP_LOW, gspo_policy_loss
from .loss import vppo_policy_loss
from .vppo import Shaping, compute_shaping


@dataclass(frozen=True)
class LossSettings:
    """The loss's hyperparameters, resolved from `algo.*` for one algorithm (`Algorithm.settings`)."""
    clip_low: float
    clip_high: float
    dual_clip: float
    entropy_coef: float


@dataclass
class LossInputs:
    """One micro-batch's per-position tensors [b, s] (label positions, as `MicroBatch.to_positions`)."""
    old_logp: Tensor
    advantage: Tensor  # shaped Â of each position's trajectory
    mask: Tensor  # 1 at response label positions
    tgf_mask: Tensor  # tokens the policy-gradient term keeps (1 = kept)
    is_weight: Tensor  # detached rollout-correction weight
    seq_id: Tensor  # which trajectory of the micro-batch a position belongs to (0, 1, ...)


# loss(logp, inputs, settings) -> (numerator, count of denominator units, metric numerators). The
# schedule sums numerators and counts over micro-batches and DP ranks and divides (per-token-loss mode),
# so J of the mini-batch is Σ numerators / Σ counts for any split of it.
LossFn = Callable[[Tensor, LossInputs, LossSettings], "tuple[Tensor, Tensor, dict[str, Tensor]]"]
ShapingFn = Callable[..., Shaping]


def token_mean_loss(logp: Tensor, x: LossInputs, ls: LossSettings):
    """Dual-clip PPO, token-mean (grpo, dapo, vppo): the denominator unit is a valid token."""
    numerator, metrics = vppo_policy_loss(logp, x.old_logp, x.advantage, x.mask, x.tgf_mask,
                                          is_weights=x.is_weight, clip_low=ls.clip_low, clip_high=ls.clip_high,
                                          dual_clip=ls.dual_clip, entropy_coef=ls.entropy_coef, num_tokens=1)
    metrics.pop("token_frac")
    return numerator, x.mask.sum().to(torch.int), metrics


def sequence_mean_loss(logp: Tensor, x: LossInputs, ls: LossSettings):
    """GSPO (algo/gspo.py): the denominator unit is a trajectory."""
    numerator, metrics = gspo_policy_loss(logp, x.old_logp, x.advantage, x.mask, x.seq_id, clip_low=ls.clip_low,
                                          clip_high=ls.clip_high, num_sequences=1, is_weights=x.is_weight)
    return numerator, metrics.pop("sequences").to(torch.int), metrics


def vppo_shaping(*args, **kwargs) -> Shaping:
    """dependency → TAS α → Â, TGF mask (algo/vppo.py)."""
    return compute_shaping(*args, tas=True, **kwargs)


def no_shaping(*args, **kwargs) -> Shaping:
    """Â = A, every valid token kept (the dependency is still reported when the perturbed view is scored)."""
    return compute_shaping(*args, tas=False, **kwargs)


def _sequence_level_correction(cfg: Any) -> None:
    level = cfg.rollout_correction.level
    if level == "token":
        raise ValueError("algo.name=gspo weights whole sequences: algo.rollout_correction.level=token has no "
                         "sequence-level meaning there; use algo.rollout_correction.level=sequence (or none)")


def _no_check(cfg: Any) -> None:
    return None


_PPO = frozenset({"clip_low", "dual_clip", "rollout_correction"})
_VPPO = _PPO | {"clip_high", "top_k_ratio", "beta_min", "entropy_coef", "dependency_estimator", "tas_scope",
                "perturbation", "perturb_prob"}


@dataclass(frozen=True)
class Algorithm:
    name: str
    dynamic_sampling: bool  # DAPO's filter: drop groups whose answers are all right or all wrong
    needs_perturbed_view: bool  # score the perturbed view (paired pass / engine prefill) for the shaping
    shaping: ShapingFn  # (old, aug, mask, advantages, cfg, *, kl, group, minibatches, microbatches, with_metrics)
    loss: LossFn  # per micro-batch, at the last pipeline stage
    reads: frozenset[str]  # `algo.*` keys it reads (besides name)
    clip_defaults: tuple[float, float] = TOKEN_CLIP_DEFAULTS  # (clip_low, clip_high) when algo.clip_* is unset
    symmetric_clip: bool = False  # clip_high = clip_low
    unit: str = "token"  # what the loss's denominator counts: token | sequence (update_policy averages over it)
    check: Callable[[Any], None] = field(default=_no_check, compare=False)  # extra config rules (ValueError)

    def settings(self, cfg: Any) -> LossSettings:
        low = self.clip_defaults[0] if cfg.clip_low is None else float(cfg.clip_low)
        high = self.clip_defaults[1] if cfg.clip_high is None else float(cfg.clip_high)
        return LossSettings(clip_low=low, clip_high=low if self.symmetric_clip else high,
                            dual_clip=float(cfg.dual_clip),
                            entropy_coef=float(cfg.entropy_coef) if "entropy_coef" in self.reads else 0.0)


ALGORITHMS: dict[str, Algorithm] = {
    "grpo": Algorithm("grpo", False, False, no_shaping, token_mean_loss, _PPO, symmetric_clip=True),
    "dapo": Algorithm("dapo", True, False, no_shaping, token_mean_loss, _PPO | {"clip_high"}),
    "vppo": Algorithm("vppo", True, True, vppo_shaping, token_mean_loss, _VPPO),
    "gspo": Algorithm("gspo", False, False, no_shaping, sequence_mean_loss,
                      frozenset({"clip_low", "clip_high", "rollout_correction"}),
                      clip_defaults=(PAPER_CLIP_LOW, PAPER_CLIP_HIGH), unit="sequence",
                      check=_sequence_level_correction),
}


def get_algorithm(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"algo.name={name!r} is not one of {sorted(ALGORITHMS)}") from None
