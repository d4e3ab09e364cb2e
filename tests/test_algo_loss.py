"""Spec §6 loss: VPPO with shaping switched off equals plain DAPO; micro-batch shares add up to J."""
import pytest
import torch

from megatron_vppo.algo.advantages import grpo_advantages
from megatron_vppo.algo.loss import ppo_token_loss, vppo_policy_loss
from megatron_vppo.algo.vppo import compute_shaping
from megatron_vppo.config import AlgoConfig

CLIP = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0)


def dapo_oracle(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0):
    """Token-mean dual-clip PPO written the usual way (ratio clamp, verl-style dual clip)."""
    a = adv[:, None]
    ratio = torch.exp(logp - old)
    l1 = -a * ratio
    l2 = -a * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clip1 = torch.maximum(l1, l2)
    clip2 = torch.minimum(-a * dual_clip, clip1)
    per_tok = torch.where(a < 0, clip2, clip1)
    m = mask.to(logp.dtype)
    return (per_tok * m).sum() / m.sum()


def _batch(seed=0, B=8, T=11):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([11, 4, 7, 1, 11, 9, 6, 3])[:B]
    mask = (torch.arange(T) < lengths[:, None]).long()
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    aug = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5
    cur = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.4  # wide enough to hit both clips
    cur[1, :2] = old[1, :2] + 1.5  # ratio e^1.5 > 3 on a negative-advantage row → dual clip
    rewards = torch.tensor([1, 0, 0, 1, 1, 1, 0, 1], dtype=torch.float64)[:B]
    adv = grpo_advantages(rewards, torch.arange(B) // 4)
    return mask, old, aug, cur, adv


def test_vppo_reduces_to_dapo():
    mask, old, aug, cur, adv = _batch()
    cfg = AlgoConfig(top_k_ratio=1.0, beta_min=1.0, entropy_coef=0.0)
    sh = compute_shaping(old, aug, mask, adv, cfg)
    assert torch.equal(sh.tgf_mask, mask)
    assert torch.equal(sh.alpha, torch.ones_like(sh.alpha))
    cur1 = cur.clone().requires_grad_()
    cur2 = cur.clone().requires_grad_()
    j, metrics = vppo_policy_loss(cur1, old, sh.shaped_advantages, mask, sh.tgf_mask, entropy_coef=0.0, **CLIP)
    ref = dapo_oracle(cur2, old, adv, mask)
    j.backward()
    ref.backward()
    assert j.item() == pytest.approx(ref.item(), abs=1e-12)
    torch.testing.assert_close(cur1.grad, cur2.grad, atol=1e-12, rtol=0)
    assert metrics["pg_clipfrac"] > 0 and metrics["pg_clipfrac_dual"] > 0  # both clip branches exercised


def test_microbatch_shares_sum_to_minibatch_loss():
    mask, old, aug, cur, adv = _batch(1)
    sh = compute_shaping(old, aug, mask, adv, AlgoConfig())
    kw = dict(entropy_coef=0.06, **CLIP)
    whole = cur.clone().requires_grad_()
    j, m_whole = vppo_policy_loss(whole, old, sh.shaped_advantages, mask, sh.tgf_mask, **kw)
    j.backward()
    parts = cur.clone().requires_grad_()
    n_global = int(mask.sum())
    total = 0.0
    metric_sums = {}
    for rows in ([0, 1, 2], [3], [4, 5, 6, 7]):  # uneven micro-batches, as different DP ranks would hold
        idx = torch.tensor(rows)
        jm, mm = vppo_policy_loss(parts[idx], old[idx], sh.shaped_advantages[idx], mask[idx], sh.tgf_mask[idx],
                                  num_tokens=n_global, **kw)
        jm.backward()
        total = total + jm.item()
        for k, v in mm.items():
            metric_sums[k] = metric_sums.get(k, 0.0) + v.item()
    assert total == pytest.approx(j.item(), abs=1e-12)
    torch.testing.assert_close(parts.grad, whole.grad, atol=1e-12, rtol=0)
    for k, v in m_whole.items():
        assert metric_sums[k] == pytest.approx(v.item(), abs=1e-12), k


def test_entropy_gradient_reaches_filtered_tokens_and_padding_is_inert():
    mask, old, aug, cur, adv = _batch(2)
    sh = compute_shaping(old, aug, mask, adv, AlgoConfig())
    c = cur.clone()
    c[mask == 0] = float("nan")  # garbage on padded slots must not leak
    c.requires_grad_()
    j, _ = vppo_policy_loss(c, old, sh.shaped_advantages, mask, sh.tgf_mask, entropy_coef=0.06, **CLIP)
    j.backward()
    assert torch.isfinite(j)
    n = mask.sum().item()
    dropped = (mask == 1) & (sh.tgf_mask == 0)
    torch.testing.assert_close(c.grad[dropped], torch.full_like(c.grad[dropped], -0.06 / n))
    assert torch.all(c.grad[mask == 0] == 0)


def test_token_loss_branches():
    old = torch.zeros(1, 4, dtype=torch.float64)
    logp = torch.log(torch.tensor([[1.0, 1.5, 0.5, 5.0]], dtype=torch.float64))
    pos = ppo_token_loss(logp, old, torch.tensor([1.0], dtype=torch.float64))
    assert pos.loss[0].tolist() == pytest.approx([-1.0, -1.28, -0.5, -1.28])
    neg = ppo_token_loss(logp, old, torch.tensor([-1.0], dtype=torch.float64))
    assert neg.loss[0].tolist() == pytest.approx([1.0, 1.5, 0.8, 3.0])  # last one hits the dual clip c=3
    assert neg.dual_clipped[0].tolist() == [False, False, False, True]
