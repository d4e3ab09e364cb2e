"""Golden-vector CLI (spec §8): `python -m megatron_vppo.algo.golden IN.json` → output JSON on stdout.

A thin wrapper: it only converts JSON to float64 tensors and calls the functions the trainer uses.

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
from .rollout_correction import rollout_weights
from .vppo import compute_shaping

CONFIG_KEYS = ("top_k_ratio", "beta_min", "clip_low", "clip_high", "dual_clip", "entropy_coef", "tas_scope")
OPTIONAL_CONFIG_KEYS = ("rollout_correction",)
INPUT_KEYS = ("config", "response_mask", "old_log_probs", "aug_log_probs", "cur_log_probs", "rewards",
              "group", "minibatches", "microbatches")


def run(inp: dict) -> dict:
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
