"""The algorithm registry (`megatron_vppo.algo.ALGORITHMS`), GSPO, and the `algo:` config section.

Oracles: GSPO's loss and gradient against a scalar transcription of the paper's formula (python loops
over sequences and tokens, autograd on each scalar); the additive-denominator convention against the
whole batch's loss; every registered algorithm through two real trainer steps on the tiny model.
"""
from __future__ import annotations

import math

import pytest
import torch

from dist_helpers import run_distributed


def test_registry_holds_the_algorithms_and_their_semantics():
    from megatron_vppo.algo import ALGORITHMS
    from megatron_vppo.config import AlgoConfig, PapoConfig

    assert set(ALGORITHMS) == {"grpo", "dapo", "vppo", "gspo", "papo", "papo_d", "pgpo", "vepo"}
    cfg = AlgoConfig(entropy_coef=0.06)
    grpo, dapo, vppo, gspo = (ALGORITHMS[k].settings(cfg) for k in ("grpo", "dapo", "vppo", "gspo"))
    assert (grpo.clip_low, grpo.clip_high, grpo.entropy_coef) == (0.2, 0.2, 0.0)  # symmetric, no entropy
    assert (dapo.clip_low, dapo.clip_high, dapo.entropy_coef) == (0.2, 0.28, 0.0)  # clip-higher
    assert (vppo.clip_low, vppo.clip_high, vppo.entropy_coef) == (0.2, 0.28, 0.06)
    assert (gspo.clip_low, gspo.clip_high) == (3e-4, 4e-4)  # the GSPO paper's values
    assert [ALGORITHMS[k].dynamic_sampling for k in ("grpo", "dapo", "vppo", "gspo")] == [False, True, True, False]
    assert [k for k, a in ALGORITHMS.items() if a.needs_perturbed_view] == ["vppo", "papo", "papo_d", "pgpo", "vepo"]
    assert ALGORITHMS["gspo"].unit == "sequence"
    assert ALGORITHMS["dapo"].settings(AlgoConfig(clip_low=0.1, clip_high=0.3)).clip_high == 0.3
    # perception family (spec/perception_family.md): presets, views, recipes
    papo_g, papo_d = ALGORITHMS["papo"].settings(cfg), ALGORITHMS["papo_d"].settings(cfg)
    assert (papo_g.clip_high, papo_g.extra["gamma"], papo_g.extra["eta"], papo_g.entropy_coef) == (0.2, 0.02, 0.05, 0.0)
    assert (papo_d.clip_high, papo_d.extra["gamma"], papo_d.extra["eta"]) == (0.28, 0.01, 0.03)
    assert ALGORITHMS["papo"].settings(AlgoConfig(papo=PapoConfig(gamma=0.5))).extra["gamma"] == 0.5
    assert [ALGORITHMS[k].dynamic_sampling for k in ("papo", "papo_d", "pgpo", "vepo")] == [False, True, True, False]
    views = {k: ALGORITHMS[k].view(cfg) for k in ("papo", "pgpo", "vepo")}
    assert (views["papo"].kind, views["papo"].prob, views["pgpo"].kind, views["vepo"].kind) == \
        ("patches", 0.6, "blind", "noise")
    assert views["vepo"].noise_std == 2.0
    vepo = ALGORITHMS["vepo"].settings(cfg)
    assert (vepo.clip_low, vepo.clip_high, vepo.entropy_coef) == (0.2, 0.2, 1e-3)
    assert [k for k, a in ALGORITHMS.items() if not a.engine_view(cfg)] == ["pgpo", "vepo"]


# ------------------------------------------------------------------------------------------ GSPO


def _random_batch(seed: int, rows: int = 6, width: int = 7, scale: float = 1.0):
    """Six sequences of different lengths; `scale` shrinks the log-ratios with the clip range."""
    g = torch.Generator().manual_seed(seed)
    lengths = [width, 1, 3, width - 2, 4, 2][:rows]
    mask = torch.zeros(rows, width, dtype=torch.float64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    old = -torch.rand(rows, width, generator=g, dtype=torch.float64) * 3
    # per-sequence shifts: some sequences well outside the clip range on either side, some inside
    shift = torch.tensor([0.6, -0.5, 0.01, -0.02, 0.3, 0.0][:rows], dtype=torch.float64)[:, None]
    cur = old + scale * (shift + 0.05 * torch.randn(rows, width, generator=g, dtype=torch.float64))
    cur = torch.where(mask.bool(), cur, torch.full_like(cur, float("nan")))  # padding must not leak
    adv = torch.tensor([1.3, -0.7, 0.9, -1.1, -0.4, 0.8][:rows], dtype=torch.float64)
    w = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.0, 1.5][:rows], dtype=torch.float64)
    return cur, old, adv, mask, w, lengths


def _scalar_gspo(cur, old, adv, lengths, clip_low, clip_high, weights=None):
    """The paper's objective, one sequence and one token at a time: −(1/G) Σ_i w_i·min(s_i·A_i, clip(s_i)·A_i)."""
    leaf = cur.detach().clone().requires_grad_(True)
    total = 0.0
    for i, n in enumerate(lengths):
        log_ratio = 0.0
        for t in range(n):
            log_ratio = log_ratio + (leaf[i, t] - old[i, t])
        s = torch.exp(log_ratio / n)
        clipped = torch.clamp(s, 1 - clip_low, 1 + clip_high)
        a = float(adv[i])
        term = -torch.minimum(s * a, clipped * a)
        total = total + (term * float(weights[i]) if weights is not None else term)
    loss = total / len(lengths)
    loss.backward()
    return loss.detach(), torch.nan_to_num(leaf.grad, nan=0.0)


@pytest.mark.parametrize("clip", [(0.2, 0.28), (3e-4, 4e-4)], ids=["wide", "paper"])
@pytest.mark.parametrize("weighted", [False, True], ids=["w1", "is_weights"])
def test_gspo_loss_and_gradient_equal_the_scalar_formula(clip, weighted):
    from megatron_vppo.algo.gspo import gspo_policy_loss

    cur, old, adv, mask, w, lengths = _random_batch(0, scale=clip[0] / 0.2)
    rows, width = mask.shape
    seq_ids = torch.arange(rows)[:, None].expand(rows, width)
    is_w = w[:, None].expand(rows, width) if weighted else None
    leaf = cur.clone().requires_grad_(True)
    loss, metrics = gspo_policy_loss(leaf, old, adv, mask, seq_ids, clip_low=clip[0], clip_high=clip[1],
                                     is_weights=is_w)
    loss.backward()
    want, want_grad = _scalar_gspo(cur, old, adv, lengths, *clip, weights=w if weighted else None)
    assert float(loss) == pytest.approx(float(want), rel=1e-12, abs=1e-14)
    grad = torch.where(mask.bool(), leaf.grad, torch.zeros_like(leaf.grad))
    assert torch.allclose(grad, want_grad, rtol=1e-10, atol=1e-14)
    assert torch.all(leaf.grad[~mask.bool()] == 0), "padded positions get no gradient"
    # both advantage signs, and clipped sequences on both sides (so some rows have a zero gradient)
    log_s = torch.stack([(cur[i, :n] - old[i, :n]).mean() for i, n in enumerate(lengths)])
    outside = (log_s < math.log(1 - clip[0])) | (log_s > math.log(1 + clip[1]))
    assert outside.any() and (~outside).any() and (adv > 0).any() and (adv < 0).any()
    assert 0 < float(metrics["pg_clipfrac"]) < 1
    zero_rows = [i for i in range(rows) if float(grad[i].abs().sum()) == 0.0]
    assert zero_rows, "a clipped sequence's ratio must stop its gradient"


def test_gspo_packed_segments_equal_padded_rows():
    from megatron_vppo.algo.gspo import gspo_policy_loss

    cur, old, adv, mask, w, lengths = _random_batch(1)
    rows, width = mask.shape
    pad = gspo_policy_loss(cur, old, adv, mask, torch.arange(rows)[:, None].expand(rows, width),
                           clip_low=0.2, clip_high=0.28)[0]
    # one thd row: the sequences back to back, each position tagged with its sequence
    valid = mask.bool()
    flat = lambda x: x[valid][None]  # noqa: E731
    ids = torch.arange(rows)[:, None].expand(rows, width)[valid][None]
    adv_tok = adv[:, None].expand(rows, width)
    packed = gspo_policy_loss(flat(cur), flat(old), flat(adv_tok), torch.ones_like(flat(old)), ids,
                              clip_low=0.2, clip_high=0.28)[0]
    assert float(packed) == pytest.approx(float(pad), rel=1e-12)


def test_gspo_micro_batch_losses_add_up_to_the_batch_loss():
    """The denominator convention: with the global sequence count, micro-batch losses (and their
    gradients) sum to the mini-batch's; the registry's loss returns the count the schedule sums."""
    from megatron_vppo.algo.gspo import gspo_policy_loss
    from megatron_vppo.algo.registry import ALGORITHMS, LossInputs, LossSettings

    cur, old, adv, mask, w, lengths = _random_batch(2)
    rows, width = mask.shape
    seq = torch.arange(rows)[:, None].expand(rows, width)
    is_w = w[:, None].expand(rows, width)
    whole_leaf = cur.clone().requires_grad_(True)
    whole, _ = gspo_policy_loss(whole_leaf, old, adv, mask, seq, clip_low=0.2, clip_high=0.28, is_weights=is_w)
    whole.backward()
    parts_leaf = cur.clone().requires_grad_(True)
    total, numerators, counts = 0.0, 0.0, 0
    ls = LossSettings(clip_low=0.2, clip_high=0.28, dual_clip=3.0, entropy_coef=0.0)
    for idx in ([0, 3], [1], [2, 4, 5]):
        i = torch.tensor(idx)
        local_seq = torch.arange(len(idx))[:, None].expand(len(idx), width)
        part, _ = gspo_policy_loss(parts_leaf[i], old[i], adv[i], mask[i], local_seq, clip_low=0.2,
                                   clip_high=0.28, num_sequences=rows, is_weights=is_w[i])
        total = total + part
        x = LossInputs(old_logp=old[i], advantage=adv[i][:, None].expand(len(idx), width), mask=mask[i],
                       tgf_mask=mask[i], is_weight=is_w[i], seq_id=local_seq)
        num, count, _ = ALGORITHMS["gspo"].loss(cur[i], x, ls)
        numerators, counts = numerators + float(num), counts + int(count)
    total.backward()
    assert float(total) == pytest.approx(float(whole), rel=1e-12)
    assert counts == rows
    assert numerators / counts == pytest.approx(float(whole), rel=1e-12)
    assert torch.allclose(torch.nan_to_num(parts_leaf.grad), torch.nan_to_num(whole_leaf.grad), rtol=1e-10,
                          atol=1e-15)


# ------------------------------------------------------------------------------------------ config


def test_old_vppo_section_names_the_algo_section(tmp_path):
    from megatron_vppo.config import ConfigError
    from megatron_vppo.run_config import load_config

    path = tmp_path / "old.yaml"
    path.write_text("vppo:\n  algorithm: dapo\n  clip_high: 0.3\n")
    with pytest.raises(ConfigError, match=r"`vppo:` section is now `algo:`; vppo.algorithm is algo.name; "
                                          r"vppo.clip_high is algo.clip_high"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"`vppo:` section is now `algo:`.*vppo.rollout_correction is "
                                          r"algo.rollout_correction"):
        load_config(None, ["vppo.rollout_correction.level=token"])


@pytest.mark.parametrize("name, key, value", [("grpo", "clip_high", 0.3), ("dapo", "entropy_coef", 0.1),
                                              ("gspo", "dual_clip", 2.0), ("dapo", "tas_scope", "official")])
def test_a_key_the_algorithm_does_not_read_is_an_error(name, key, value):
    from megatron_vppo.config import ConfigError
    from megatron_vppo.run_config import load_config

    with pytest.raises(ConfigError, match=rf"algo.{key}=.* algorithm '{name}' does not read it"):
        load_config(None, [f"algo.name={name}", f"algo.{key}={value}"])
    load_config(None, [f"algo.name=vppo", f"algo.{key}={value}"])  # vppo reads them all


def test_perception_family_config_rules():
    from megatron_vppo.config import ConfigError
    from megatron_vppo.run_config import load_config

    load_config(None, ["algo.name=papo", "algo.papo.second_view_grad=true"])  # TRL's variant
    with pytest.raises(ConfigError, match=r"algo.papo.gamma=0.1 is set, but algorithm 'vppo' does not read it"):
        load_config(None, ["algo.name=vppo", "algo.papo.gamma=0.1"])
    with pytest.raises(ConfigError, match="view=blind changes no pixels"):
        load_config(None, ["algo.name=pgpo", "algo.perturb_prob=0.3"])
    load_config(None, ["algo.name=pgpo", "algo.pgpo.view=patches", "algo.perturb_prob=0.3"])
    load_config(None, ["algo.name=pgpo", "train.max_tokens_per_micro_batch=4096"])  # the packed blind view
    with pytest.raises(ConfigError, match="old_logp_source=engine: the second view of algo.name=vepo"):
        load_config(None, ["algo.name=vepo", "train.old_logp_source=engine"])
    load_config(None, ["algo.name=papo_d", "train.old_logp_source=engine"])
    with pytest.raises(ConfigError, match=r"algo.pgpo.threshold='mean' is not one of"):
        load_config(None, ["algo.name=pgpo", "algo.pgpo.threshold=mean"])
    with pytest.raises(ConfigError, match=r"algo.vepo.top_ratio=0.0 is out of range"):
        load_config(None, ["algo.name=vepo", "algo.vepo.top_ratio=0"])


def test_gspo_refuses_token_level_rollout_correction():
    from megatron_vppo.config import ConfigError
    from megatron_vppo.run_config import load_config

    with pytest.raises(ConfigError, match="rollout_correction.level=sequence"):
        load_config(None, ["algo.name=gspo", "algo.rollout_correction.level=token"])
    cfg = load_config(None, ["algo.name=gspo", "algo.rollout_correction.level=sequence"])
    assert cfg.algo.rollout_correction.level == "sequence"


# ------------------------------------------------------------------------------------------ trainer


VARIANTS = (("grpo", {}), ("dapo", {}), ("vppo", {"tas_scope": "global"}), ("vppo", {"tas_scope": "official"}),
            ("gspo", {}), ("papo", {}), ("papo_d", {"mini_batch_prompts": 2}), ("pgpo", {}), ("vepo", {}),
            ("papo_d", {"old_logp_source": "engine", "mini_batch_prompts": 2}))


def _variants_worker(rank, world, config_path, out_root):
    """One process: build the trainer once, then two RL steps per algorithm from the same data position.

    `papo_d/engine` repeats papo_d from the weights papo_d started from (restored, and synced into the
    engine) with old_logp_source=engine: the engine scores the masked view, and step 1 must equal the
    trainer-mode step 1 (the same rollouts). Both papo_d runs update once per step (one mini-batch), so
    step 1's loss is taken before any optimizer step (Adam's moments differ between the two runs)."""
    from megatron_vppo.config import AlgoConfig
    from megatron_vppo.run_config import load_config, validate_algorithm
    from megatron_vppo.rollout import ENGINES
    from megatron_vppo.train.engine_sync import sync_engine_weights
    from megatron_vppo.train.build import build_trainer, teardown
    from megatron_vppo.train.loop import rl_step

    cfg = load_config(config_path, [f"train.output_dir={out_root}/run", "train.val_every=0"])
    trainer = build_trainer(cfg)
    results = {}
    snapshots = {}
    try:
        data_state = trainer.train_batches.state_dict()
        train_defaults = dict(vars(trainer.cfg.train))
        for name, extra in VARIANTS:
            extra = dict(extra)
            source = extra.pop("old_logp_source", "trainer")
            for k, v in train_defaults.items():
                setattr(trainer.cfg.train, k, v)
            for k in [k for k in extra if k in train_defaults]:
                setattr(trainer.cfg.train, k, extra.pop(k))
            params = [p for c in trainer.model_chunks for p in c.parameters()]
            if source == "engine":  # back to the weights the trainer-mode run of `name` started from
                with torch.no_grad():
                    for p, s in zip(params, snapshots[name]):
                        p.copy_(s)
                sync_engine_weights(trainer.model_chunks, trainer.adapter, trainer.engine,
                                    engine_cls=ENGINES[trainer.cfg.rollout.engine], bucket_bytes=trainer.cfg.rollout.bucket_bytes,
                                    dims=trainer.dims, step=0)
            else:
                snapshots[name] = [p.detach().clone() for p in params]
            trainer.cfg.train.old_logp_source = source
            trainer.cfg.algo = AlgoConfig(name=name, **extra)
            validate_algorithm(trainer.cfg.algo)
            trainer.train_batches.load_state_dict(data_state)
            before = [p.detach().clone() for p in params]
            steps = []
            for step in (1, 2):
                trainer.step = step
                steps.append(rl_step(trainer))
            after = [p.detach() for c in trainer.model_chunks for p in c.parameters()]
            change = max(float((a - b).abs().max()) for a, b in zip(after, before))
            tag = "engine" if source == "engine" else extra.get("tas_scope", "")
            results[f"{name}/{tag}"] = {"steps": steps, "weight_change": change}
    finally:
        teardown(trainer)
    return results


@pytest.fixture(scope="module")
def variant_runs(warm_model_dir, tmp_path_factory):
    from test_trainer_e2e import CONFIG, PIXELS, _write_data

    root = tmp_path_factory.mktemp("algorithms")
    clean, _, _ = _write_data(root / "data")
    model = warm_model_dir
    config = root / "run.yaml"
    text = CONFIG.format(model=model, train=clean, val="''", min_px=PIXELS[0], max_px=PIXELS[1], steps=2)
    config.write_text(text.replace("algo: {name: vppo, entropy_coef: 0.06}", "algo: {name: vppo}"))
    return run_distributed(_variants_worker, 1, str(config), str(root), timeout=600)[0]


@pytest.mark.parametrize("key", ["grpo/", "dapo/", "vppo/global", "vppo/official", "gspo/", "papo/", "papo_d/",
                                 "pgpo/", "vepo/", "papo_d/engine"])
def test_every_algorithm_trains_two_steps(variant_runs, key):
    run = variant_runs[key]
    for m in run["steps"]:
        assert "actor/skipped" not in m, f"{key}: every group was filtered out"
        assert math.isfinite(m["actor/loss"]) and math.isfinite(m["actor/pg_loss"]), m
        assert m["actor/nonfinite_skipped"] == 0
    assert run["weight_change"] > 0, f"{key}: the weights did not move"
    if key == "grpo/":
        assert all(m["rollout/groups_dropped"] == 0 for m in run["steps"]), "grpo has no dynamic sampling"
    if key.startswith("vppo"):
        assert all(m["tas/alpha_min"] < 1.0 for m in run["steps"]), "TAS must scale some trajectory"
    if key == "gspo/":
        assert all("actor/seq_ratio_mean" in m for m in run["steps"])
    if key.startswith("papo"):  # the perception term: k3 against the masked view, and its share of the loss
        assert all(m["actor/papo/k3"] > 0 and m["actor/papo/term"] != 0 for m in run["steps"])
    if key == "pgpo/":  # per-token weights that vary, with each response's mass kept (mean 1)
        assert all(m["pgpo/weight_max"] > 1.0 and m["pgpo/weight_mean"] == pytest.approx(1.0) for m in run["steps"])
    if key == "vepo/":  # the top 20 % of each response's tokens kept, by a nonzero visual divergence
        assert all(0 < m["tgf/kept_token_frac"] < 0.5 and m["vepo/jsd_mean"] > 0 for m in run["steps"])


def test_papo_engine_mode_equals_trainer_mode(variant_runs):
    """old_logp_source=engine: the engine's sampling log-probs and its prefill of the masked image give the
    trainer-mode step (same weights, same rollouts) to float tolerance."""
    t, e = variant_runs["papo_d/"]["steps"][0], variant_runs["papo_d/engine"]["steps"][0]
    assert e["reward/mean"] == t["reward/mean"] and e["response/trajectories"] == t["response/trajectories"]
    for k in ("actor/loss", "actor/pg_loss", "actor/papo/k3", "actor/papo/term", "dependency/mean"):
        assert e[k] == pytest.approx(t[k], abs=1e-5, rel=1e-4), k
