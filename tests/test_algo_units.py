"""Advantages, dependency, TAS and TGF against straightforward per-element Python oracles (spec §1, §3–§5)."""
import math
import random
import statistics

import pytest
import torch

from megatron_vppo.algo.advantages import dynamic_sampling_keep, grpo_advantages
from megatron_vppo.algo.dependency import exact_kl_dependency, sampled_k3, sequence_dependency
from megatron_vppo.algo.tas import tas_alpha, tas_alpha_global, tas_alpha_official
from megatron_vppo.algo.tgf import keep_counts, tgf_mask
from megatron_vppo.algo.vppo import compute_shaping
from megatron_vppo.config import AlgoConfig


# ---------------------------------------------------------------- oracles (plain Python, spec text)

def oracle_alpha(seq, valid, beta_min, minmax_sets, mean_sets):
    alpha = [1.0] * len(seq)
    for mm in minmax_sets:
        vals = [seq[i] for i in mm if valid[i]]
        if len(vals) < 2 or max(vals) - min(vals) <= 1e-6:
            continue
        mn, mx = min(vals), max(vals)
        norm = {i: min(max((seq[i] - mn) / (mx - mn), 0.0), 1.0) for i in mm if valid[i]}
        for ms in mean_sets:
            if not set(ms) <= set(mm):
                continue
            members = [i for i in ms if valid[i]]
            if not members:
                continue
            mu = sum(norm[i] for i in members) / len(members)
            for i in members:
                alpha[i] = beta_min + (1 - beta_min) * norm[i] / (mu + 1e-8)
    return alpha


def oracle_tgf(dep, mask, ratio_num, ratio_den):
    out = []
    for d, m in zip(dep, mask):
        pos = [t for t in range(len(m)) if m[t]]
        k = -(-len(pos) * ratio_num // ratio_den)
        ranked = sorted(pos, key=lambda t: (-d[t], t))[:k]
        out.append([1 if t in ranked else 0 for t in range(len(m))])
    return out


# ---------------------------------------------------------------- advantages

def test_grpo_matches_statistics_module():
    rng = random.Random(0)
    groups = [7, 7, 7, 3, 3, 3, 3, 11, 11]
    rewards = [float(rng.randint(0, 1)) for _ in groups]
    rewards[7], rewards[8] = 1.0, 0.0
    adv = grpo_advantages(torch.tensor(rewards, dtype=torch.float64), torch.tensor(groups))
    for i, g in enumerate(groups):
        members = [rewards[j] for j in range(len(groups)) if groups[j] == g]
        expect = (rewards[i] - statistics.mean(members)) / (statistics.stdev(members) + 1e-6)
        assert adv[i].item() == pytest.approx(expect, abs=1e-12)


def test_grpo_rejects_singleton_group():
    with pytest.raises(ValueError, match="at least 2"):
        grpo_advantages(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 1]))


def test_dynamic_sampling_keeps_mixed_groups():
    acc = torch.tensor([1, 1, 1, 0, 0, 0, 1, 0, 0, 1, 0, 0], dtype=torch.float32)
    grp = torch.tensor([5, 5, 5, 2, 2, 2, 9, 9, 9, 4, 4, 4])
    assert dynamic_sampling_keep(acc, grp).tolist() == [6, 7, 8, 9, 10, 11]


# ---------------------------------------------------------------- dependency

def test_sampled_k3_elementwise():
    old = torch.tensor([[-0.5, -1.0, -30.0, -2.0]], dtype=torch.float64)
    aug = torch.tensor([[-0.5, -2.0, -1.0, float("nan")]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    d = sampled_k3(old, aug, mask)
    expect = [0.0, math.exp(-1) + 1 - 1, 10.0, 0.0]  # Δ=0; Δ=-1; Δ clamps to 20 → k3 clamps to 10; masked
    assert d[0].tolist() == pytest.approx(expect, abs=1e-12)
    assert sequence_dependency(d, mask).item() == pytest.approx(sum(expect) / 3)
    assert exact_kl_dependency(torch.tensor([[-1e-9, 0.3]]), torch.tensor([[1, 0]])).tolist() == [[0.0, 0.0]]


def test_sequence_dependency_empty_row_is_zero():
    d = torch.ones(2, 3, dtype=torch.float64)
    assert sequence_dependency(d, torch.tensor([[0, 0, 0], [1, 1, 0]])).tolist() == [0.0, 1.0]


# ---------------------------------------------------------------- TGF

@pytest.mark.parametrize("n,ratio,k", [(5, 0.4, 2), (3, 0.4, 2), (10, 0.4, 4), (7, 1.0, 7), (1, 0.4, 1),
                                       (0, 0.4, 0), (15, 0.2, 3), (20, 0.35, 7), (100, 0.07, 7)])
def test_keep_counts_exact_ceil(n, ratio, k):
    assert keep_counts(torch.tensor([n]), ratio).item() == k
    # The same ratio carried through float32 (0.4 → 0.4000000059604645) must not round up.
    f32 = torch.tensor(ratio, dtype=torch.float32).item()
    assert keep_counts(torch.tensor([n]), f32).item() == k


def test_tgf_ties_lower_position_first():
    dep = torch.tensor([[0.5, 0.5, 0.5, 0.5, 0.5], [0.0, 0.2, 0.2, 0.1, 0.2]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert tgf_mask(dep, mask, 0.4).tolist() == [[1, 1, 0, 0, 0], [0, 1, 1, 0, 0]]


def test_tgf_random_against_oracle():
    g = torch.Generator().manual_seed(3)
    B, T = 9, 17
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    mask = (torch.arange(T) < lengths[:, None]).long()
    # quantised values create many ties
    dep = torch.randint(0, 4, (B, T), generator=g).double() / 4 * mask
    for ratio, num, den in [(0.4, 2, 5), (0.25, 1, 4), (1.0, 1, 1), (0.3, 3, 10)]:
        assert tgf_mask(dep, mask, ratio).tolist() == oracle_tgf(dep.tolist(), mask.tolist(), num, den)


# ---------------------------------------------------------------- TAS

def _random_batch(seed, B=12):
    g = torch.Generator().manual_seed(seed)
    seq = torch.rand(B, generator=g, dtype=torch.float64)
    valid = torch.rand(B, generator=g) > 0.2
    return seq, valid


def test_tas_global_matches_oracle():
    seq, valid = _random_batch(0)
    got = tas_alpha_global(seq, valid, 0.9)
    expect = oracle_alpha(seq.tolist(), valid.tolist(), 0.9, [range(12)], [range(12)])
    assert got.tolist() == pytest.approx(expect, abs=1e-12)
    mean_valid = got[valid].mean().item()
    assert mean_valid == pytest.approx(1.0, abs=1e-6)  # α averages 1 over the averaging set


def test_tas_official_matches_oracle():
    seq, valid = _random_batch(1)
    minis = [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]
    micros = [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9, 10, 11]]
    got = tas_alpha_official(seq, valid, 0.8, minis, micros)
    expect = oracle_alpha(seq.tolist(), valid.tolist(), 0.8, minis, micros)
    assert got.tolist() == pytest.approx(expect, abs=1e-12)


@pytest.mark.parametrize("scope", ["global", "official"])
def test_tas_degenerate_cases(scope):
    kw = dict(minibatches=[[0, 1, 2, 3]], microbatches=[[0, 1], [2, 3]])
    s = torch.tensor([0.3, 0.3, 0.3 + 5e-7, 0.1], dtype=torch.float64)
    # only one valid → α ≡ 1
    assert tas_alpha(s, torch.tensor([True, False, False, False]), 0.9, scope, **kw).tolist() == [1.0] * 4
    # range ≤ 1e-6 → α ≡ 1
    assert tas_alpha(s, torch.tensor([True, True, True, False]), 0.9, scope, **kw).tolist() == [1.0] * 4
    # no valid at all
    assert tas_alpha(s, torch.zeros(4, dtype=torch.bool), 0.9, scope, **kw).tolist() == [1.0] * 4
    # n_i = 0 → α_i = 1 while the others are shaped
    a = tas_alpha(torch.tensor([0.0, 1.0, 0.5, 9.0], dtype=torch.float64),
                  torch.tensor([True, True, True, False]), 0.9, scope, **kw)
    assert a[3].item() == 1.0 and a[0].item() == pytest.approx(0.9)


def test_tas_official_zero_mu_gives_beta_min():
    s = torch.tensor([0.0, 0.0, 1.0, 0.5], dtype=torch.float64)
    a = tas_alpha_official(s, torch.ones(4, dtype=torch.bool), 0.9, [[0, 1, 2, 3]], [[0, 1], [2, 3]])
    assert a[:2].tolist() == [0.9, 0.9]


def test_tas_official_rejects_bad_microbatches():
    s, v = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.bool)
    with pytest.raises(ValueError, match="inside exactly one mini-batch"):
        tas_alpha_official(s, v, 0.9, [[0, 1], [2, 3]], [[1, 2], [0], [3]])
    with pytest.raises(ValueError, match="do not cover"):
        tas_alpha_official(s, v, 0.9, [[0, 1, 2, 3]], [[0, 1]])


# ---------------------------------------------------------------- composition

def test_compute_shaping_config_object_and_metrics():
    g = torch.Generator().manual_seed(5)
    B, T = 6, 8
    mask = (torch.arange(T) < torch.tensor([8, 5, 0, 3, 8, 6])[:, None]).long()
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    aug = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    cfg = AlgoConfig()
    sh = compute_shaping(old, aug, mask, adv, cfg)
    dep = sampled_k3(old, aug, mask)
    assert torch.equal(sh.dependency, dep)
    assert torch.equal(sh.alpha, tas_alpha_global(sequence_dependency(dep, mask), mask.bool().any(-1), 0.9))
    assert torch.equal(sh.shaped_advantages, sh.alpha * adv)
    assert torch.equal(sh.tgf_mask, tgf_mask(dep, mask, 0.4))
    m = sh.metrics
    assert m["dependency/mean"] == pytest.approx(dep[mask.bool()].mean().item())
    assert m["tgf/kept_token_frac"] == pytest.approx(sh.tgf_mask.sum().item() / mask.sum().item())
    assert m["tas/alpha_min"] <= m["tas/alpha_mean"] <= m["tas/alpha_max"]
    assert {"dependency/p50", "dependency/p90", "dependency/p99"} <= set(m)
    # DAPO: no shaping, all valid tokens kept
    d = compute_shaping(old, None, mask, adv, AlgoConfig(name="dapo"), tas=False)
    assert torch.equal(d.alpha, torch.ones(B, dtype=torch.float64)) and torch.equal(d.tgf_mask, mask)
    # ... and it reports none of VPPO's signals (a constant "dep 0 | kept 1" would read as a result, issue 19)
    assert not [k for k in d.metrics if k.startswith(("dependency/", "tgf/", "tas/"))], d.metrics
    # a perturbed view scored without TAS/TGF: the dependency is measured and reported, the shaping is not
    d = compute_shaping(old, aug, mask, adv, AlgoConfig(name="dapo"), tas=False)
    assert d.metrics["dependency/mean"] == pytest.approx(dep[mask.bool()].mean().item())
    assert not [k for k in d.metrics if k.startswith(("tgf/", "tas/"))], d.metrics
    with pytest.raises(ValueError, match="needs kl"):
        compute_shaping(old, aug, mask, adv, AlgoConfig(dependency_estimator="exact_kl"))
