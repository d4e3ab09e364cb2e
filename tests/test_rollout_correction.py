"""Rollout correction (TIS / MIS) against a direct, scalar transcription of the formulas in
docs/rollout_correction.md, and through the golden CLI on the spec's worked vectors."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_vppo.algo.loss import vppo_policy_loss
from megatron_vppo.algo.rollout_correction import check_correction, mismatch_metrics, rollout_weights

REPO = Path(__file__).resolve().parents[1]
VECTORS = REPO / "tests" / "data" / "vectors"  # the spec's vectors, copied (tests/test_algo_golden.py)


def transcribed(old, roll, mask, level, mode, cap):
    """Scalar Python, one token at a time: w = π_old/π_rollout, bounded as the docs say."""
    out = []
    for o_row, r_row, m_row in zip(old, roll, mask):
        deltas = [min(max(o - r, -20.0), 20.0) if m else 0.0 for o, r, m in zip(o_row, r_row, m_row)]
        seq = sum(deltas)
        row = []
        for d, m in zip(deltas, m_row):
            if not m:
                row.append(0.0)
                continue
            w = math.exp(seq if level == "sequence" else d)
            if level == "none":
                w = 1.0
            elif mode == "truncate":
                w = min(w, cap)
            elif not (1.0 / cap <= w <= cap):
                w = 0.0
            row.append(w)
        out.append(row)
    return out


def _random_case(seed, b=5, t=7):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    roll = old + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.6
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    return old, roll, mask


@pytest.mark.parametrize("level", ["none", "token", "sequence"])
@pytest.mark.parametrize("mode", ["truncate", "mask"])
@pytest.mark.parametrize("cap", [1.0, 1.5, 2.0, 10.0])
def test_weights_equal_the_transcription(level, mode, cap):
    old, roll, mask = _random_case(int(cap * 10) + len(level) + len(mode))
    got = rollout_weights(old, roll, mask, level=level, mode=mode, cap=cap)
    want = torch.tensor(transcribed(old.tolist(), roll.tolist(), mask.tolist(), level, mode, cap), dtype=torch.float64)
    torch.testing.assert_close(got.weights, want, rtol=1e-12, atol=0)
    assert not got.weights.requires_grad


def test_caps_at_the_boundary_are_kept():
    """w exactly C or 1/C is inside the closed interval: kept by MIS, unchanged by TIS."""
    cap = 2.0
    old = torch.tensor([[math.log(cap), 0.0, math.log(cap) + 1e-9, 0.0]], dtype=torch.float64)
    roll = torch.tensor([[0.0, math.log(cap), 0.0, math.log(cap) + 1e-9]], dtype=torch.float64)
    mask = torch.ones_like(old, dtype=torch.long)
    mis = rollout_weights(old, roll, mask, level="token", mode="mask", cap=cap)
    assert mis.weights[0, :2].tolist() == [2.0, 0.5] and mis.weights[0, 2:].tolist() == [0.0, 0.0]
    assert mis.capped[0].tolist() == [False, False, True, True]
    tis = rollout_weights(old, roll, mask, level="token", mode="truncate", cap=cap)
    assert tis.weights[0].tolist() == [2.0, 0.5, 2.0, pytest.approx(0.5)]
    assert tis.capped[0].tolist() == [False, False, True, False]


def test_all_masked_sequence_drops_out_of_the_gradient_but_not_the_denominator():
    old, roll, mask = _random_case(3, b=3, t=6)
    roll = old + 0.05  # rows 0 and 2: a small mismatch, inside the cap
    roll[1] = old[1] - 3.0  # w = e^3·… far above the cap: sequence 1 is masked at sequence level
    corr = rollout_weights(old, roll, mask, level="sequence", mode="mask", cap=2.0)
    assert corr.weights[1].abs().sum() == 0 and corr.capped[1][mask[1].bool()].all()
    logp = old.clone().requires_grad_(True)
    adv = torch.tensor([1.0, -0.5, 0.7], dtype=torch.float64)
    loss, metrics = vppo_policy_loss(logp, old, adv, mask, is_weights=corr.weights)
    loss.backward()
    assert logp.grad[1].abs().sum() == 0 and logp.grad[0].abs().sum() > 0
    # N is all valid tokens (the masked sequence's too): the scale matches the uncorrected loss's
    assert metrics["token_frac"] == 1.0
    ref = sum(-adv[i].item() * corr.weights[i, t].item()
              for i in range(3) for t in range(6) if mask[i, t]) / mask.sum().item()
    assert loss.item() == pytest.approx(ref, rel=1e-12)


def test_level_none_is_the_uncorrected_loss():
    old, roll, mask = _random_case(5)
    cur = (old + 0.1).requires_grad_(True)
    adv = torch.linspace(-1, 1, old.shape[0], dtype=torch.float64)
    w = rollout_weights(old, roll, mask, level="none").weights
    a, _ = vppo_policy_loss(cur, old, adv, mask, entropy_coef=0.06, is_weights=w)
    b, _ = vppo_policy_loss(cur, old, adv, mask, entropy_coef=0.06)
    assert a.item() == b.item()


def test_mismatch_metrics():
    old, roll, mask = _random_case(9)
    corr = rollout_weights(old, roll, mask, level="token", mode="mask", cap=1.5)
    m = mismatch_metrics(old, roll, mask, corr)
    d = [o - r for o_row, r_row, m_row in zip(old.tolist(), roll.tolist(), mask.tolist())
         for o, r, k in zip(o_row, r_row, m_row) if k]
    assert m["rollout_correction/logp_abs_diff_max"] == pytest.approx(max(abs(x) for x in d))
    assert m["rollout_correction/logp_abs_diff_mean"] == pytest.approx(sum(abs(x) for x in d) / len(d))
    assert m["rollout_correction/k3_kl"] == pytest.approx(sum(math.exp(x) - 1 - x for x in d) / len(d))
    assert m["rollout_correction/token_frac_corrected"] == pytest.approx(
        sum(1 for x in d if not (1 / 1.5 <= math.exp(x) <= 1.5)) / len(d))


@pytest.mark.parametrize("bad", [dict(level="tokens"), dict(mode="clip"), dict(cap=0.5), dict(cap=float("inf"))])
def test_bad_settings_name_the_key(bad):
    kw = {**dict(level="token", mode="truncate", cap=2.0), **bad}
    with pytest.raises(ValueError, match="rollout_correction.(level|mode|cap)"):
        check_correction(**kw)


@pytest.mark.parametrize("level,mode", [("token", "truncate"), ("token", "mask"), ("sequence", "truncate")])
def test_golden_cli_with_rollout_log_probs(tmp_path, level, mode):
    """The CLI's weights and losses equal the transcription applied to its own uncorrected outputs."""
    inp = json.loads((VECTORS / "worked_micro2.json").read_text())["input"]
    g = torch.Generator().manual_seed(1)
    old = torch.tensor(inp["old_log_probs"], dtype=torch.float64)
    inp["rollout_log_probs"] = (old + 0.5 * torch.randn(old.shape, generator=g, dtype=torch.float64)).tolist()

    def cli(data):
        path = tmp_path / "in.json"
        path.write_text(json.dumps(data))
        p = subprocess.run([sys.executable, "-m", "megatron_vppo.algo.golden", str(path)], cwd=REPO,
                           capture_output=True, text=True, check=True)
        return json.loads(p.stdout)

    base = cli({k: v for k, v in inp.items() if k != "rollout_log_probs"})
    cfg = {"level": level, "mode": mode, "cap": 1.6}
    got = cli({**inp, "config": {**inp["config"], "rollout_correction": cfg}})
    w = transcribed(inp["old_log_probs"], inp["rollout_log_probs"], inp["response_mask"], level, mode, 1.6)
    flat = [x for row in w for x in row]
    assert [x for row in got["rollout_weights"] for x in row] == pytest.approx(flat, rel=1e-12)
    assert any(x not in (0.0, 1.0) for row in w for x in row) and any(x == 0.0 or x == 1.6 for row in w for x in row)
    for k in ("dependency", "alpha", "shaped_advantages", "tgf_mask", "advantages"):
        assert got[k] == base[k]  # correction touches the loss only
    assert [x for row in got["per_token_loss"] for x in row] == pytest.approx(
        [l * x for lr, wr in zip(base["per_token_loss"], w) for l, x in zip(lr, wr)], rel=1e-12, abs=1e-15)
    c_ent = inp["config"]["entropy_coef"]
    for mb, j in zip(inp["minibatches"], got["loss_per_minibatch"]):
        n = sum(inp["response_mask"][i][t] for i in mb for t in range(len(inp["response_mask"][i])))
        pg = sum(base["tgf_mask"][i][t] * w[i][t] * base["per_token_loss"][i][t]
                 for i in mb for t in range(len(w[i])) if inp["response_mask"][i][t])
        ent = sum(-inp["cur_log_probs"][i][t] for i in mb for t in range(len(w[i])) if inp["response_mask"][i][t])
        assert j == pytest.approx((pg + c_ent * ent) / n, rel=1e-10)
