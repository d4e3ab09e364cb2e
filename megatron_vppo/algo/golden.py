"""Golden-vector CLI (spec §8): `python -m megatron_vppo.algo.golden IN.json` → output JSON on stdout.

A thin wrapper: it only converts JSON to float64 tensors and calls the functions the trainer uses.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from .advantages import grpo_advantages
from .loss import ppo_token_loss, vppo_policy_loss
from .vppo import compute_shaping

CONFIG_KEYS = ("top_k_ratio", "beta_min", "clip_low", "clip_high", "dual_clip", "entropy_coef", "tas_scope")
INPUT_KEYS = ("config", "response_mask", "old_log_probs", "aug_log_probs", "cur_log_probs", "rewards",
              "group", "minibatches", "microbatches")


def run(inp: dict) -> dict:
    missing = [k for k in INPUT_KEYS if k not in inp]
    if missing:
        raise ValueError(f"golden input lacks {missing} (spec §8 lists {list(INPUT_KEYS)})")
    cfg = dict(inp["config"])
    unknown = sorted(set(cfg) - set(CONFIG_KEYS))
    if unknown or any(k not in cfg for k in CONFIG_KEYS):
        raise ValueError(f"config must have exactly {list(CONFIG_KEYS)}; got {sorted(cfg)}")
    f64 = dict(dtype=torch.float64)
    mask = torch.tensor(inp["response_mask"], dtype=torch.int64)
    old = torch.tensor(inp["old_log_probs"], **f64)
    aug = torch.tensor(inp["aug_log_probs"], **f64)
    cur = torch.tensor(inp["cur_log_probs"], **f64)
    rewards = torch.tensor(inp["rewards"], **f64)
    group = torch.tensor(inp["group"], dtype=torch.int64)

    adv = grpo_advantages(rewards, group)
    shaping_cfg = {**cfg, "algorithm": "vppo", "dependency_estimator": "sampled_k3"}
    sh = compute_shaping(old, aug, mask, adv, shaping_cfg, minibatches=inp["minibatches"],
                         microbatches=inp["microbatches"], with_metrics=False)
    clip = dict(clip_low=cfg["clip_low"], clip_high=cfg["clip_high"], dual_clip=cfg["dual_clip"])
    token_loss = ppo_token_loss(cur, old, sh.shaped_advantages, **clip).loss
    token_loss = torch.where(mask.bool(), token_loss, torch.zeros_like(token_loss))
    losses = []
    for mb in inp["minibatches"]:
        idx = torch.tensor(mb, dtype=torch.long)
        j, _ = vppo_policy_loss(cur[idx], old[idx], sh.shaped_advantages[idx], mask[idx], sh.tgf_mask[idx],
                                entropy_coef=cfg["entropy_coef"], **clip)
        losses.append(j.item())
    return {
        "dependency": sh.dependency.tolist(),
        "seq_dependency": sh.seq_dependency.tolist(),
        "advantages": adv.tolist(),
        "alpha": sh.alpha.tolist(),
        "shaped_advantages": sh.shaped_advantages.tolist(),
        "tgf_mask": sh.tgf_mask.tolist(),
        "per_token_loss": token_loss.tolist(),
        "loss_per_minibatch": losses,
    }


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
