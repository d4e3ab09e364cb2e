"""Golden-vector CLI (spec §8): `python -m megatron_vppo.algo.golden IN.json` → output JSON on stdout.

A thin wrapper: it only converts JSON to float64 tensors and calls the functions the trainer uses.

`config.algorithm` (default "vppo") picks the method: "papo", "pgpo" and "vepo" take the keys and
inputs of `PERCEPTION_CONFIG_KEYS` / `PERCEPTION_INPUT_KEYS` (spec/perception_family.md) and output,
besides "advantages" and "loss_per_minibatch": papo "perception_term_per_minibatch"; pgpo
"token_weights"; vepo "jsd", "entropy_old", "entropy_aug", "scores" and "token_mask" (vepo reads full
logits [B, T, V] of both views, "old_logits" and "aug_logits", instead of "aug_log_probs").

Optional (beyond spec §8): `rollout_log_probs` ([B, T], the engine's sampling log-probs) with
`config.rollout_correction` = {"level": none|token|sequence, "mode": truncate|mask, "cap": C} applies
rollout correction (algo/rollout_correction.py) to the loss and adds "rollout_weights" to the output.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from .advantages import grpo_advantages
from .loss import ppo_token_loss, vppo_policy_loss
from .papo import perception_term
from .pgpo import pgpo_token_weights
from .rollout_correction import rollout_weights
from .vepo import vepo_scores, vepo_token_mask
from .vocab_parallel import vocab_parallel_jsd_entropies
from .vppo import compute_shaping

CONFIG_KEYS = ("top_k_ratio", "beta_min", "clip_low", "clip_high", "dual_clip", "entropy_coef", "tas_scope")
OPTIONAL_CONFIG_KEYS = ("rollout_correction",)
INPUT_KEYS = ("config", "response_mask", "old_log_probs", "aug_log_probs", "cur_log_probs", "rewards",
              "group", "minibatches", "microbatches")


_PPO_KEYS = ("clip_low", "clip_high", "dual_clip")
PERCEPTION_CONFIG_KEYS = {
    "papo": ("gamma", "eta") + _PPO_KEYS,
    "pgpo": ("tau", "beta", "threshold", "low_weight_floor", "mass_normalization") + _PPO_KEYS,
    "vepo": ("alpha", "top_ratio", "entropy_coef") + _PPO_KEYS,
}
_COMMON_INPUTS = ("config", "response_mask", "old_log_probs", "cur_log_probs", "rewards", "group", "minibatches")
PERCEPTION_INPUT_KEYS = {
    "papo": _COMMON_INPUTS + ("aug_log_probs",),
    "pgpo": _COMMON_INPUTS + ("aug_log_probs",),
    "vepo": _COMMON_INPUTS + ("old_logits", "aug_logits"),
}


def run(inp: dict) -> dict:
    algorithm = inp.get("config", {}).get("algorithm", "vppo")
    if algorithm in PERCEPTION_CONFIG_KEYS:
        return run_perception(algorithm, inp)
    if algorithm != "vppo":
        raise ValueError(f"config.algorithm={algorithm!r} is not one of {['vppo', *PERCEPTION_CONFIG_KEYS]}")
    inp = {**inp, "config": {k: v for k, v in inp["config"].items() if k != "algorithm"}}
    missing = [k for k in INPUT_KEYS if k not in inp]
    if missing:
        raise ValueError(f"golden input lacks {missing} (spec §8 lists {list(INPUT_KEYS)})")
    cfg = dict(inp["config"])
    correction = cfg.pop("rollout_correction", None)
    unknown = sorted(set(cfg) - set(CONFIG_KEYS))
    if unknown or any(k not in cfg for k in CONFIG_KEYS):
        raise ValueError(f"config must have exactly {list(CONFIG_KEYS)} (optional: {list(OPTIONAL_CONFIG_KEYS)}); "
                         f"got {sorted(cfg)}")
    if (correction is None) != ("rollout_log_probs" not in inp):
        raise ValueError("rollout correction needs both input 'rollout_log_probs' and config 'rollout_correction'")
    f64 = dict(dtype=torch.float64)
    mask = torch.tensor(inp["response_mask"], dtype=torch.int64)
    old = torch.tensor(inp["old_log_probs"], **f64)
    aug = torch.tensor(inp["aug_log_probs"], **f64)
    cur = torch.tensor(inp["cur_log_probs"], **f64)
    rewards = torch.tensor(inp["rewards"], **f64)
    group = torch.tensor(inp["group"], dtype=torch.int64)

    adv = grpo_advantages(rewards, group)
    shaping_cfg = {**cfg, "name": "vppo", "dependency_estimator": "sampled_k3"}
    sh = compute_shaping(old, aug, mask, adv, shaping_cfg, minibatches=inp["minibatches"],
                         microbatches=inp["microbatches"], with_metrics=False)
    clip = dict(clip_low=cfg["clip_low"], clip_high=cfg["clip_high"], dual_clip=cfg["dual_clip"])
    weights = None
    if correction is not None:
        extra = sorted(set(correction) - {"level", "mode", "cap"})
        if extra:
            raise ValueError(f"rollout_correction has unknown keys {extra}; allowed: level, mode, cap")
        rollout = torch.tensor(inp["rollout_log_probs"], **f64)
        weights = rollout_weights(old, rollout, mask, level=correction.get("level", "token"),
                                  mode=correction.get("mode", "truncate"), cap=correction.get("cap", 2.0)).weights
    token_loss = ppo_token_loss(cur, old, sh.shaped_advantages, **clip).loss
    if weights is not None:
        token_loss = token_loss * weights
    token_loss = torch.where(mask.bool(), token_loss, torch.zeros_like(token_loss))
    losses = []
    for mb in inp["minibatches"]:
        idx = torch.tensor(mb, dtype=torch.long)
        j, _ = vppo_policy_loss(cur[idx], old[idx], sh.shaped_advantages[idx], mask[idx], sh.tgf_mask[idx],
                                entropy_coef=cfg["entropy_coef"], **clip,
                                is_weights=None if weights is None else weights[idx])
        losses.append(j.item())
    out = {
        "dependency": sh.dependency.tolist(),
        "seq_dependency": sh.seq_dependency.tolist(),
        "advantages": adv.tolist(),
        "alpha": sh.alpha.tolist(),
        "shaped_advantages": sh.shaped_advantages.tolist(),
        "tgf_mask": sh.tgf_mask.tolist(),
        "per_token_loss": token_loss.tolist(),
        "loss_per_minibatch": losses,
    }
    if weights is not None:
        out["rollout_weights"] = weights.tolist()
    return out


def run_perception(algorithm: str, inp: dict) -> dict:
    """PAPO / PGPO / VEPO on one batch: the functions the trainer uses, mini-batch by mini-batch."""
    missing = [k for k in PERCEPTION_INPUT_KEYS[algorithm] if k not in inp]
    if missing:
        raise ValueError(f"golden input for {algorithm} lacks {missing} (it needs "
                         f"{list(PERCEPTION_INPUT_KEYS[algorithm])})")
    cfg = {k: v for k, v in inp["config"].items() if k != "algorithm"}
    want = PERCEPTION_CONFIG_KEYS[algorithm]
    if sorted(cfg) != sorted(want):
        raise ValueError(f"config for {algorithm} must have exactly {list(want)} (and 'algorithm'); got {sorted(cfg)}")
    f64 = dict(dtype=torch.float64)
    mask = torch.tensor(inp["response_mask"], dtype=torch.int64)
    old = torch.tensor(inp["old_log_probs"], **f64)
    cur = torch.tensor(inp["cur_log_probs"], **f64)
    adv = grpo_advantages(torch.tensor(inp["rewards"], **f64), torch.tensor(inp["group"], dtype=torch.int64))
    clip = {k: cfg[k] for k in _PPO_KEYS}
    out: dict = {"advantages": adv.tolist()}
    token_adv, keep, entropy_coef = adv[:, None].expand_as(old), mask, 0.0
    if algorithm == "pgpo":
        aug = torch.tensor(inp["aug_log_probs"], **f64)
        w = pgpo_token_weights(old, aug, mask, tau=cfg["tau"], beta=cfg["beta"], threshold=cfg["threshold"],
                               low_weight_floor=cfg["low_weight_floor"],
                               mass_normalization=bool(cfg["mass_normalization"]))
        token_adv = w * adv[:, None]
        out["token_weights"] = w.tolist()
    elif algorithm == "vepo":
        jsd, h_old, h_aug = vocab_parallel_jsd_entropies(torch.tensor(inp["old_logits"], **f64),
                                                         torch.tensor(inp["aug_logits"], **f64))
        jsd, h_old, h_aug = (torch.where(mask.bool(), x, torch.zeros_like(x)) for x in (jsd, h_old, h_aug))
        s = vepo_scores(jsd, h_old, h_aug, mask, cfg["alpha"])
        keep = vepo_token_mask(s, mask, cfg["top_ratio"]) * mask
        entropy_coef = cfg["entropy_coef"]
        out.update(jsd=jsd.tolist(), entropy_old=h_old.tolist(), entropy_aug=h_aug.tolist(), scores=s.tolist(),
                   token_mask=keep.tolist())
    token_loss = ppo_token_loss(cur, old, token_adv, **clip).loss
    out["per_token_loss"] = torch.where(keep.bool(), token_loss, torch.zeros_like(token_loss)).tolist()
    losses, terms = [], []
    for mb in inp["minibatches"]:
        idx = torch.tensor(mb, dtype=torch.long)
        j, _ = vppo_policy_loss(cur[idx], old[idx], token_adv[idx], keep[idx], entropy_coef=entropy_coef, **clip)
        if algorithm == "papo":
            aug = torch.tensor(inp["aug_log_probs"], **f64)
            term, _ = perception_term(cur[idx], aug[idx], mask[idx], gamma=cfg["gamma"], eta=cfg["eta"])
            terms.append(term.item())
            j = j + term
        losses.append(j.item())
    out["loss_per_minibatch"] = losses
    if algorithm == "papo":
        out["perception_term_per_minibatch"] = terms
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_vppo.algo.golden", description=__doc__)
    parser.add_argument("input", help="JSON file with the spec §8 input (or an {'input', 'expected'} vector)")
    args = parser.parse_args(argv)
    with open(args.input) as f:
        data = json.load(f)
    if "input" in data and "config" not in data:
        data = data["input"]
    json.dump(run(data), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
