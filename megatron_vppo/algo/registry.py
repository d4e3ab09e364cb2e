"""The RL algorithms the trainer runs, each declared once: `ALGORITHMS[name]` says what a step needs.

Adding an algorithm is one file (its loss, and its shaping if it has one) plus one line in `ALGORITHMS`.
The trainer reads only these fields: whether dynamic sampling filters groups, whether the perturbed
view is scored (the paired no-grad pass / the engine's perturbed prefill) and which view it is
(`ViewSpec`: blackened patches, pixel noise, or the blind view), whether that pass also reduces the
full-vocabulary divergences (VEPO), the shaping of GRPO advantages into Â (per token for PGPO) and the
token mask, whether the loss reads the second view's log-probs (PAPO), the per-micro-batch loss, and the
`algo.*` keys it reads — a key it does not read, set away from its default, is a ConfigError
(run_config.validate).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from megatron_vppo.config import TOKEN_CLIP_DEFAULTS

from .gspo import PAPER_CLIP_HIGH, PAPER_CLIP_LOW, gspo_policy_loss
from .loss import vppo_policy_loss
from .papo import perception_term
from .pgpo import pgpo_token_weights
from .vepo import vepo_scores, vepo_token_mask
from .vppo import Shaping, compute_shaping


@dataclass(frozen=True)
class LossSettings:
    """The loss's hyperparameters, resolved from `algo.*` for one algorithm (`Algorithm.settings`)."""
    clip_low: float
    clip_high: float
    dual_clip: float
    entropy_coef: float
    extra: dict = field(default_factory=dict, compare=False)  # the algorithm's own settings (Algorithm.options)


@dataclass
class LossInputs:
    """One micro-batch's per-position tensors [b, s] (label positions, as `MicroBatch.to_positions`)."""
    old_logp: Tensor
    advantage: Tensor  # shaped Â of each position's trajectory
    mask: Tensor  # 1 at response label positions
    tgf_mask: Tensor  # tokens the policy-gradient term keeps (1 = kept)
    is_weight: Tensor  # detached rollout-correction weight
    seq_id: Tensor  # which trajectory of the micro-batch a position belongs to (0, 1, ...)
    aug_logp: Tensor | None = None  # π_old on the second view (Algorithm.loss_reads_aug)


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


def papo_loss(logp: Tensor, x: LossInputs, ls: LossSettings):
    """PAPO (algo/papo.py): the token-mean PPO loss plus −γ·tokmean(k3(p_cur, q)) + η·tokmean(−p_cur)."""
    if x.aug_logp is None:
        raise ValueError("the PAPO loss needs the second view's log-probs (LossInputs.aug_logp)")
    numerator, count, metrics = token_mean_loss(logp, x, ls)
    term, extra = perception_term(logp, x.aug_logp, x.mask, gamma=ls.extra["gamma"], eta=ls.extra["eta"],
                                  num_tokens=1, clamp_small=ls.extra["clamp_k3_small"],
                                  aug_grad=ls.extra.get("second_view_grad", False))
    metrics.update(extra)
    return numerator + term, count, metrics


def kept_mean_loss(logp: Tensor, x: LossInputs, ls: LossSettings):
    """VEPO: dual-clip PPO (and the entropy bonus) over the kept tokens only; the unit is a kept token."""
    keep = x.mask * x.tgf_mask
    numerator, metrics = vppo_policy_loss(logp, x.old_logp, x.advantage, keep, None, is_weights=x.is_weight,
                                          clip_low=ls.clip_low, clip_high=ls.clip_high, dual_clip=ls.dual_clip,
                                          entropy_coef=ls.entropy_coef, num_tokens=1)
    for k in ("token_frac", "kept_token_frac"):
        metrics.pop(k)
    return numerator, keep.sum().to(torch.int), metrics


def vppo_shaping(*args, divergence=None, **kwargs) -> Shaping:
    """dependency → TAS α → Â, TGF mask (algo/vppo.py)."""
    return compute_shaping(*args, tas=True, **kwargs)


def no_shaping(*args, divergence=None, **kwargs) -> Shaping:
    """Â = A, every valid token kept (the dependency is still reported when the perturbed view is scored)."""
    return compute_shaping(*args, tas=False, **kwargs)


def pgpo_shaping(old, aug, mask, advantages, cfg, *, divergence=None, with_metrics: bool = True, **kwargs) -> Shaping:
    """Â_{i,t} = w_t · A_i with PGPO's weights from k3(old, second view) (algo/pgpo.py); every token kept."""
    sh = compute_shaping(old, aug, mask, advantages, cfg, tas=False, with_metrics=with_metrics, **kwargs)
    p = cfg.pgpo
    w = pgpo_token_weights(old, aug, mask, tau=p.tau, beta=p.beta, threshold=p.threshold,
                           low_weight_floor=p.low_weight_floor, mass_normalization=p.mass_normalization)
    sh.token_weights = w.to(advantages.dtype)
    if with_metrics:
        sh.metrics.update(_masked_stats(w, mask, "pgpo/weight"))
        valid = mask.bool()
        sh.metrics["pgpo/weight_below1_frac"] = float((w < 1.0)[valid].double().mean()) if valid.any() else 0.0
    return sh


def vepo_shaping(old, aug, mask, advantages, cfg, *, divergence=None, with_metrics: bool = True, **kwargs) -> Shaping:
    """Keep each response's top ⌈top_ratio·L⌉ tokens by VEPO's fused score (algo/vepo.py); Â = A."""
    if divergence is None:
        raise ValueError("vepo needs the per-token JSD and both entropies of the no-grad pass "
                         "(Algorithm.divergence); use train.old_logp_source=trainer")
    jsd, ent_old, ent_aug = divergence
    sh = compute_shaping(old, aug, mask, advantages, cfg, tas=False, with_metrics=with_metrics, **kwargs)
    v = cfg.vepo
    scores = vepo_scores(jsd, ent_old, ent_aug, mask, v.alpha)
    sh.tgf_mask = vepo_token_mask(scores, mask, v.top_ratio)
    if with_metrics:
        valid = mask.bool()
        n = max(int(valid.sum()), 1)
        sh.metrics.update({
            "vepo/jsd_mean": float(torch.where(valid, jsd, 0.0).sum()) / n,
            "vepo/entropy_mean": float(torch.where(valid, ent_old, 0.0).sum()) / n,
            "vepo/entropy_gap_mean": float(torch.where(valid, (ent_aug - ent_old).abs(), 0.0).sum()) / n,
            "vepo/score_mean": float(torch.where(valid, scores, 0.0).sum()) / n,
            "tgf/kept_token_frac": float((sh.tgf_mask.bool() & valid).sum()) / n,
        })
    return sh


def _masked_stats(x: Tensor, mask: Tensor, name: str) -> dict[str, float]:
    valid = mask.bool()
    if not valid.any():
        return {}
    v = x[valid].double()
    return {f"{name}_mean": float(v.mean()), f"{name}_max": float(v.max()), f"{name}_min": float(v.min()),
            f"{name}_std": float(v.std()) if v.numel() > 1 else 0.0}


def _sequence_level_correction(cfg: Any) -> None:
    level = cfg.rollout_correction.level
    if level == "token":
        raise ValueError("algo.name=gspo weights whole sequences: algo.rollout_correction.level=token has no "
                         "sequence-level meaning there; use algo.rollout_correction.level=sequence (or none)")


def _no_check(cfg: Any) -> None:
    return None


def _pgpo_check(cfg: Any) -> None:
    if cfg.pgpo.view == "blind" and (cfg.perturb_prob != 0.5 or cfg.perturbation != "pixel"):
        raise ValueError("algo.pgpo.view=blind changes no pixels: algo.perturb_prob / algo.perturbation apply to "
                         "algo.pgpo.view=patches only; set algo.pgpo.view=patches or remove them")


@dataclass(frozen=True)
class ViewSpec:
    """The second view an algorithm scores beside the original (spec/perception_family.md)."""
    kind: str  # patches (blackened cells) | noise (Gaussian on normalised pixel_values) | blind (attention mask)
    prob: float = 0.5  # patches: probability a cell is black
    noise_std: float = 0.0  # noise: its standard deviation
    mode: str = "pixel"  # patches: pixel (edit pixel_values) | image (blacken the image, re-process)
    per_prompt: bool = False  # one view per prompt, shared by its rollouts (else one per trajectory)


def _vppo_view(cfg: Any) -> ViewSpec:
    return ViewSpec("patches", float(cfg.perturb_prob), mode=cfg.perturbation)


def _papo_view(cfg: Any) -> ViewSpec:
    return ViewSpec("patches", float(cfg.papo.mask_ratio), mode=cfg.perturbation, per_prompt=True)


def _pgpo_view(cfg: Any) -> ViewSpec:
    return ViewSpec("blind") if cfg.pgpo.view == "blind" else _vppo_view(cfg)


def _vepo_view(cfg: Any) -> ViewSpec:
    return ViewSpec("noise", noise_std=float(cfg.vepo.noise_std), per_prompt=True)


def _no_options(cfg: Any) -> dict:
    return {}


def _papo_options(gamma: float, eta: float):
    """PAPO's settings; `gamma` / `eta` are the preset's values, used when algo.papo.gamma / eta are unset."""
    def options(cfg: Any) -> dict:
        p = cfg.papo
        return {"gamma": gamma if p.gamma is None else float(p.gamma), "eta": eta if p.eta is None else float(p.eta),
                "clamp_k3_small": bool(p.clamp_k3_small), "second_view_grad": bool(p.second_view_grad)}
    return options


def _vepo_options(cfg: Any) -> dict:
    return {"entropy_coef": float(cfg.vepo.entropy_coef)}


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
    view: Callable[[Any], ViewSpec] = field(default=_vppo_view, compare=False)  # the second view (when scored)
    divergence: bool = False  # the no-grad pass also reduces JSD and both entropies over the vocabulary (vepo)
    loss_reads_aug: bool = False  # the policy pass carries the second view's log-probs to the loss (papo)
    # (LossSettings.extra["second_view_grad"]: the policy pass forwards the second view too, with gradient)
    # the no-grad pass's log-probs in fp64 (pgpo: its per-response min-max of log(1 + k3) divides by a range
    # that fp32's rounding of log-probs near −log V, 1 ulp ≈ 1e-6, blurs; the math is chunked, the cost small)
    fp64_scores: bool = False
    options: Callable[[Any], dict] = field(default=_no_options, compare=False)  # LossSettings.extra
    panels: tuple = ()  # (title, candidate metric keys) plot panels of what this algorithm computes

    def settings(self, cfg: Any) -> LossSettings:
        low = self.clip_defaults[0] if cfg.clip_low is None else float(cfg.clip_low)
        high = self.clip_defaults[1] if cfg.clip_high is None else float(cfg.clip_high)
        extra = dict(self.options(cfg))
        entropy = float(cfg.entropy_coef) if "entropy_coef" in self.reads else extra.pop("entropy_coef", 0.0)
        return LossSettings(clip_low=low, clip_high=low if self.symmetric_clip else high,
                            dual_clip=float(cfg.dual_clip), entropy_coef=entropy, extra=extra)

    def engine_view(self, cfg: Any) -> bool:
        """Whether `train.old_logp_source=engine` can give what the step needs: the engine scores an image
        view (patches), never an attention mask (blind) or full distributions (divergence)."""
        if not self.needs_perturbed_view:
            return True
        return not self.divergence and self.view(cfg).kind == "patches"


_PAPO_PANELS = (("PAPO k3 (current vs masked view)", ("actor/papo/k3",)),
                ("PAPO perception term", ("actor/papo/term",)))

ALGORITHMS: dict[str, Algorithm] = {
    "grpo": Algorithm("grpo", False, False, no_shaping, token_mean_loss, _PPO, symmetric_clip=True),
    "dapo": Algorithm("dapo", True, False, no_shaping, token_mean_loss, _PPO | {"clip_high"}),
    "vppo": Algorithm("vppo", True, True, vppo_shaping, token_mean_loss, _VPPO),
    "gspo": Algorithm("gspo", False, False, no_shaping, sequence_mean_loss,
                      frozenset({"clip_low", "clip_high", "rollout_correction"}),
                      clip_defaults=(PAPER_CLIP_LOW, PAPER_CLIP_HIGH), unit="sequence",
                      check=_sequence_level_correction),
    # PAPO-G (on GRPO) and PAPO-D (on DAPO): spec/perception_family.md's presets
    "papo": Algorithm("papo", False, True, no_shaping, papo_loss, _PPO | {"papo", "perturbation"},
                      symmetric_clip=True, view=_papo_view, loss_reads_aug=True,
                      options=_papo_options(0.02, 0.05), panels=_PAPO_PANELS),
    "papo_d": Algorithm("papo_d", True, True, no_shaping, papo_loss, _PPO | {"clip_high", "papo", "perturbation"},
                        view=_papo_view, loss_reads_aug=True, options=_papo_options(0.01, 0.03),
                        panels=_PAPO_PANELS),
    "pgpo": Algorithm("pgpo", True, True, pgpo_shaping, token_mean_loss,
                      _PPO | {"clip_high", "pgpo", "perturbation", "perturb_prob"}, check=_pgpo_check, view=_pgpo_view,
                      fp64_scores=True,
                      panels=(("PGPO token weight max", ("pgpo/weight_max",)),
                              ("PGPO share of tokens weighted < 1", ("pgpo/weight_below1_frac",)))),
    "vepo": Algorithm("vepo", False, True, vepo_shaping, kept_mean_loss, _PPO | {"vepo"}, symmetric_clip=True,
                      unit="kept_token", view=_vepo_view, divergence=True, options=_vepo_options,
                      panels=(("VEPO JSD (original vs noisy view)", ("vepo/jsd_mean",)),
                              ("VEPO |H(Q) - H(P)|", ("vepo/entropy_gap_mean",)))),
}


def get_algorithm(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"algo.name={name!r} is not one of {sorted(ALGORITHMS)}") from None
