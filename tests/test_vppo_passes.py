"""The paired no-grad pass and the policy pass against independent oracles.

* exact_kl, old_logp and aug_logp from the trainer's paired pass (`loop.score_step_batch` with
  `dependency_estimator: exact_kl`) equal a brute-force float64 full-softmax KL and log-probs computed
  from transformers' logits on the original and the perturbed pixel values — at TP1 and at TP2, where
  the KL is reduced vocab-parallel inside the pipeline's last stage.
* With top_k_ratio 1, β_min 1 and entropy coefficient 0 the VPPO machinery must add nothing: the
  loss and the gradient of the VPPO update equal those of the DAPO update on the same batch.
* `loop.perturbed_views` is deterministic per (seed, step, trajectory), changes only image
  trajectories, and never changes a shape.
* Regressions: the interleaved (VPP) schedule with fewer micro-batches than pipeline stages; the LR
  schedule must not advance on a skipped (fp16 overflow) optimizer step.

The fixed batch and the trainer construction are shared with test_vppo_layout_invariance.py.
"""
from __future__ import annotations

import pytest
import torch
from conftest import make_test_images
from dist_helpers import run_distributed
from test_vppo_layout_invariance import (
    RUN_SEED,
    STEP,
    _max_diff,
    _merged_grads,
    _worst_grad,
    build_trainer,
    hf_batch,
    hf_forward,
    make_trajectories,
    response_rows,
    run_config,
    train_side_step,
)

ATOL = 1e-5
PERTURB_PROB = 0.5  # AlgoConfig default, what the trainer passes


def _passes_worker(rank, world, model_dir, trajs, tp):
    """VPPO (switched off: k=1, β_min=1, c_ent=0, exact KL) then DAPO, on the same weights.

    The optimizer proxy records the gradient and does not step, so both updates start from π_old."""
    from megatron_vppo.config import AlgoConfig

    cfg = run_config(4, top_k_ratio=1.0, beta_min=1.0, entropy_coef=0.0, dependency_estimator="exact_kl")
    trainer, proxy = build_trainer(model_dir, tp, 1, cfg, really_step=False)
    vppo = train_side_step(trainer, proxy, trajs)
    proxy.grads.clear()
    trainer.cfg.algo = AlgoConfig(name="dapo")
    dapo = train_side_step(trainer, proxy, trajs)
    return {"vppo": vppo, "dapo": dapo}


@pytest.fixture(scope="module")
def trajs(tiny_model_dir):
    return make_trajectories(tiny_model_dir)


@pytest.fixture(scope="module")
def views(tiny_model_dir, trajs):
    """The perturbed pixels the trainer uses at DP1 (trajectory offset 0)."""
    from megatron_vppo.data.processor import VLProcessor
    from megatron_vppo.train.loop import perturbed_views

    proc = VLProcessor.from_pretrained(tiny_model_dir)
    return perturbed_views(trajs, proc, RUN_SEED, STEP, 0, PERTURB_PROB)


@pytest.fixture(scope="module")
def hf_oracle(tiny_model_dir, trajs, views):
    """float64 response-token log-probs on both views and the full-vocabulary KL(orig ‖ perturbed)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    out = {}
    with torch.no_grad():
        logp = {}
        for name, pixels in (("orig", None), ("aug", views)):
            batch = hf_batch(tiny_model_dir, trajs, pixels)
            logp[name] = torch.log_softmax(hf_forward(model, batch).double(), -1)  # [B, S, V]
            tgt = torch.nn.functional.pad(batch["input_ids"][:, 1:], (0, 1))
            out[name] = response_rows(logp[name].gather(-1, tgt[..., None])[..., 0], trajs)
        kl = (logp["orig"].exp() * (logp["orig"] - logp["aug"])).sum(-1)  # [B, S]
        out["kl"] = response_rows(kl, trajs)
    n = [t.response_len for t in trajs]
    return {k: [v[i, : n[i]] for i in range(len(trajs))] for k, v in out.items()}


@pytest.fixture(scope="module", params=[1, 2], ids=["TP1", "TP2"])
def passes_run(request, tiny_model_dir, trajs):
    tp = request.param
    return tp, run_distributed(_passes_worker, tp, str(tiny_model_dir), trajs, tp)


def test_paired_pass_matches_transformers(passes_run, hf_oracle, trajs):
    tp, results = passes_run
    kl_scale = max(float(k.abs().max()) for k in hf_oracle["kl"])
    assert kl_scale > 1e-4, "the perturbation should move the distribution of image trajectories"
    for rank, res in enumerate(results):
        r = res["vppo"]
        d_old = _max_diff(r["old"], hf_oracle["orig"])
        d_aug = _max_diff(r["aug"], hf_oracle["aug"])
        d_kl = _max_diff(r["kl"], hf_oracle["kl"])
        print(f"TP{tp} rank {rank}: old_logp {d_old:.1e}, aug_logp {d_aug:.1e}, exact KL {d_kl:.1e} "
              f"(KL up to {kl_scale:.1e})")
        assert d_old <= ATOL, f"old_logp differs from transformers by {d_old:.3e}"
        assert d_aug <= ATOL, f"aug_logp differs from transformers (perturbed pixels) by {d_aug:.3e}"
        assert d_kl <= ATOL, f"exact KL differs from the full-softmax KL by {d_kl:.3e}"
        # DAPO's original-only pass gives the same old_logp as the paired pass.
        assert _max_diff(res["dapo"]["old"], r["old"]) <= ATOL
        assert all(a is None for a in res["dapo"]["aug"])
    text = [i for i, t in enumerate(trajs) if not t.has_image]
    for i in text:  # text-only: the perturbed view is the original, so KL is 0 up to float noise
        assert float(results[0]["vppo"]["kl"][i].abs().max()) <= 1e-6


def test_vppo_switched_off_equals_dapo(passes_run):
    tp, results = passes_run
    v, d = results[0]["vppo"], results[0]["dapo"]
    assert float((v["alpha"] - 1).abs().max()) == 0.0, "β_min = 1 must give α ≡ 1"
    assert all(torch.equal(p.tgf_mask, torch.ones_like(p.tgf_mask)) for p in v["per_traj"])
    assert max(abs(a.advantage - b.advantage) for a, b in zip(v["per_traj"], d["per_traj"])) == 0.0
    print(f"TP{tp}: J vppo {v['loss']:.8f}, dapo {d['loss']:.8f}")
    assert abs(v["loss"] - d["loss"]) <= 1e-7
    for key in ("actor/pg_loss", "actor/pg_clipfrac", "actor/kept_token_frac"):
        assert v["metrics"][key] == pytest.approx(d["metrics"][key], abs=1e-7), key
    rel, name = _worst_grad(_merged_grads([v]), _merged_grads([d]))
    print(f"TP{tp}: VPPO(off) vs DAPO worst relative gradient difference {rel:.1e} ({name})")
    assert rel <= 1e-6, f"gradient of {name} differs between VPPO(off) and DAPO by {rel:.3e}"


# ------------------------------------------------------------------------------ perturbation


def test_perturbed_views_deterministic_and_image_only(tiny_model_dir, trajs, views):
    from megatron_vppo.data.processor import VLProcessor
    from megatron_vppo.train.loop import perturbed_views

    proc = VLProcessor.from_pretrained(tiny_model_dir)
    originals = [None if t.pixel_values is None else t.pixel_values.clone() for t in trajs]
    again = perturbed_views(trajs, proc, RUN_SEED, STEP, 0, PERTURB_PROB)
    other_seed = perturbed_views(trajs, proc, RUN_SEED + 1, STEP, 0, PERTURB_PROB)
    other_step = perturbed_views(trajs, proc, RUN_SEED, STEP + 1, 0, PERTURB_PROB)
    ip = proc.image_processor
    black = -torch.tensor(ip.image_mean) / torch.tensor(ip.image_std)  # per channel
    blackened = total = 0
    for i, t in enumerate(trajs):
        if not t.has_image:
            assert views[i] is None and again[i] is None and other_seed[i] is None
            continue
        v = views[i]
        assert torch.equal(t.pixel_values, originals[i]), "the original pixels must not be edited in place"
        assert v.shape == t.pixel_values.shape and v.dtype == t.pixel_values.dtype
        assert torch.equal(v, again[i]), "same (seed, step, trajectory) -> same view"
        assert not torch.equal(v, other_seed[i]) and not torch.equal(v, other_step[i])
        changed = (v != t.pixel_values).any(-1)
        assert changed.any(), "an image trajectory's pixels must change"
        rows = v[changed].view(int(changed.sum()), 3, -1)
        assert torch.allclose(rows, black.view(1, 3, 1).expand_as(rows)), "changed patches are black"
        blackened += int(changed.sum())
        total += changed.numel()
    assert 0.3 < blackened / total < 0.7, f"{blackened}/{total} patches blackened, expected about half"
    # A fresh mask per trajectory: two responses to the same image see different masks.
    same_image = [i for i, t in enumerate(trajs) if t.has_image and t.group == trajs[0].group]
    assert len(same_image) >= 2 and not torch.equal(views[same_image[0]], views[same_image[1]])
    # The offset is the global trajectory index: a DP shard starting at k reproduces views[k:].
    k = 3
    shard = perturbed_views(trajs[k:], proc, RUN_SEED, STEP, k, PERTURB_PROB)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(shard, views[k:]))


# ------------------------------------------------------------------------ interleaved pipeline


def _vpp_worker(rank, world, model_dir, trajs, pp, vpp, max_tokens=None):
    cfg = run_config(4)
    cfg.train.max_tokens_per_micro_batch = max_tokens
    trainer, proxy = build_trainer(model_dir, 1, pp, cfg, vpp=vpp)
    return train_side_step(trainer, proxy, trajs)


@pytest.fixture(scope="module")
def four_layer_model_dir(tiny_model_dir_4layers):
    return tiny_model_dir_4layers


def test_interleaved_pipeline_small_shard_matches_single_process(four_layer_model_dir):
    """PP2 × VPP2: same step as one process, even when a shard has fewer micro-batches than stages."""
    from test_vppo_layout_invariance import check_same

    trajs = make_trajectories(four_layer_model_dir)
    vpp = run_distributed(_vpp_worker, 2, str(four_layer_model_dir), trajs, 2, 2)
    ref = run_distributed(_vpp_worker, 1, str(four_layer_model_dir), trajs, 1, None)[0]
    check_same(vpp, ref, "PP2xVPP2")
    # Packed micro-batches (300 tokens: two or one trajectory each) under the interleaved schedule.
    packed = run_distributed(_vpp_worker, 2, str(four_layer_model_dir), trajs, 2, 2, 300)
    check_same(packed, ref, "PP2xVPP2-packed")


# ------------------------------------------------------------------------ optimizer-step protocol


def test_skipped_optimizer_step_does_not_advance_the_schedule(monkeypatch):
    from types import SimpleNamespace

    from megatron_vppo.train import loop

    calls = {"opt": 0, "sched": 0}

    class SkippingOptimizer:  # what Megatron's fp16 optimizer returns on an inf/nan gradient
        param_groups = [{"lr": 1e-6}]

        def zero_grad(self):
            pass

        def step(self):
            calls["opt"] += 1
            return False, None, None

    class Scheduler:
        def step(self, increment):
            calls["sched"] += increment

    from megatron_vppo.distributed import ParallelDims

    monkeypatch.setattr(loop.passes, "policy_update_pass",
                        lambda *a, **k: {"loss": 0.0, "units": 1.0, "tokens": 1.0})
    trajs = [SimpleNamespace(input_ids=torch.zeros(4, dtype=torch.long))] * 2
    trainer = SimpleNamespace(cfg=run_config(4), model_chunks=[], optimizer=SkippingOptimizer(),
                              scheduler=Scheduler(), processor=SimpleNamespace(pad_token_id=0), vocab_size=8,
                              step=1, state={}, dims=ParallelDims.single())
    loop.update_policy(trainer, trajs, [{}, {}], [[0], [1]])
    assert calls["opt"] == 2
    assert calls["sched"] == 0, "a skipped optimizer step must not advance the learning-rate schedule"


def test_image_mode_blackens_the_same_cells_as_pixel_mode(tiny_model_dir):
    """`image` mode (blacken the resized image, re-run the processor) gives the pixel-mode view: the
    same seed draws the same mask on the same (h, w) patch grid, and the re-processing is exact."""
    from megatron_vppo.data.processor import VLProcessor
    from megatron_vppo.train.loop import perturbed_views
    from megatron_vppo.train.rl_batch import Trajectory

    import numpy as np
    from PIL import Image

    proc = VLProcessor.from_pretrained(tiny_model_dir)
    odd = Image.fromarray(np.random.default_rng(3).integers(0, 255, (73, 101, 3), dtype=np.uint8))
    images = [*make_test_images(), odd]  # the last one is resized by the processor
    trajs = []
    for img in images:
        enc = proc.encode("<image> How many?", [img], response="\\boxed{2}")
        trajs.append(Trajectory(group=0, input_ids=enc["input_ids"], response_start=enc["response_start"],
                                pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"],
                                extra={"images": [img]}))
    pixel = perturbed_views(trajs, proc, RUN_SEED, STEP, 0, 0.5, "pixel")
    image = perturbed_views(trajs, proc, RUN_SEED, STEP, 0, 0.5, "image")
    for t, p, q in zip(trajs, pixel, image):
        assert q.shape == p.shape == t.pixel_values.shape
        assert not torch.equal(p, t.pixel_values)
        assert (p - q).abs().max() <= 1e-5
    no_images = Trajectory(group=0, input_ids=trajs[0].input_ids, response_start=trajs[0].response_start,
                           pixel_values=trajs[0].pixel_values, image_grid_thw=trajs[0].image_grid_thw)
    with pytest.raises(ValueError, match="needs the trajectory's PIL images"):
        perturbed_views([no_images], proc, RUN_SEED, STEP, 0, 0.5, "image")


def test_k3_vs_exact_kl_correlation_metric():
    """With exact_kl on, the dependency is the exact KL and the logged correlation compares the k3
    estimate (from old/aug log-probs) with it — not the KL with itself."""
    from types import SimpleNamespace

    from megatron_vppo.algo.dependency import sampled_k3
    from megatron_vppo.config import RunConfig
    from megatron_vppo.distributed import ParallelDims
    from megatron_vppo.train.loop import shape_step
    from megatron_vppo.train.records import TokenScores
    from megatron_vppo.train.rl_batch import Trajectory

    cfg = RunConfig()
    cfg.algo.dependency_estimator = "exact_kl"
    cfg.rollout.group_size = 2
    g = torch.Generator().manual_seed(0)
    trajs, scored = [], []
    for i in range(4):
        n = 5 + i
        old = -torch.rand(n, generator=g, dtype=torch.float64)
        aug = old + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
        k3 = sampled_k3(old[None], aug[None], torch.ones(1, n, dtype=torch.float64))[0]
        kl = k3 * 0.5 + 0.05 * torch.rand(n, generator=g, dtype=torch.float64)
        trajs.append(Trajectory(group=i // 2, input_ids=torch.arange(3 + n), response_start=3, reward=float(i % 2)))
        scored.append(TokenScores(old=old, aug=aug, kl=kl))
    _, _, metrics = shape_step(SimpleNamespace(cfg=cfg, dims=ParallelDims.single()), trajs, scored)
    k3 = torch.cat([sampled_k3(s.old[None], s.aug[None], torch.ones_like(s.old[None]))[0] for s in scored])
    kl = torch.cat([s.kl for s in scored])
    want = float(torch.corrcoef(torch.stack([k3, kl]))[0, 1])
    assert metrics["dependency/k3_vs_kl_corr"] == pytest.approx(want, abs=1e-9)
    assert metrics["dependency/k3_vs_kl_corr"] < 0.9999
    assert metrics["dependency/mean"] == pytest.approx(float(kl.mean()), abs=1e-9)


# ------------------------------------------------------------------------ micro-batch placement


def test_forward_step_hands_the_model_its_own_device():
    """Micro-batches are collated on the host; the model (and the loss on its logits) lives on the
    accelerator. `_forward_step` must move the micro-batch to the model's device — a 'meta' parameter
    stands in for a GPU here. Grids stay on the host: the model reads them as metadata."""
    from megatron_vppo.train.passes import _forward_step
    from megatron_vppo.train.rl_batch import Trajectory, collate

    t = Trajectory(group=0, input_ids=torch.arange(6), response_start=3, pixel_values=torch.zeros(4, 1176),
                   image_grid_thw=torch.tensor([[1, 2, 2]]))
    mb = collate([t], rows=2, seq_len=8, pad_id=0)
    mb.per_token["old_logp"] = mb.to_positions([torch.zeros(3)])
    seen = {}

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.empty(1, device="meta"))

        def forward(self, input_ids, attention_mask, pixel_values, image_grid_thw, position_ids=None,
                    packed_seq_params=None):
            seen.update(input_ids=input_ids.device.type, attention_mask=attention_mask.device.type,
                        pixel_values=pixel_values.device.type, image_grid_thw=image_grid_thw.device.type)
            return torch.empty(2, 8, 5, device="meta")

    logits, loss_fn = _forward_step(lambda mb, logits: mb, iter([mb]), Probe())
    got = loss_fn(logits)
    assert seen == {"input_ids": "meta", "attention_mask": "meta", "pixel_values": "meta", "image_grid_thw": "cpu"}
    assert {got.labels.device.type, got.loss_mask.device.type, got.per_token["old_logp"].device.type} == {"meta"}
    assert mb.input_ids.device.type == "cpu", "the host copy is left as it was"


# ------------------------------------------------------------------------------ rollout correction


def _correction_worker(rank, world, model_dir, trajs):
    """DAPO updates (no entropy term) on the same weights with the engine's log-probs set to
    π_old / 2 on every token: no correction, TIS (w = 2 everywhere, inside cap 3), MIS with cap 1.5
    (every token outside [1/1.5, 1.5]: all dropped)."""
    import math

    from megatron_vppo.config import RolloutCorrectionConfig
    from megatron_vppo.train import loop

    cfg = run_config(4, name="dapo")
    trainer, proxy = build_trainer(model_dir, 1, 1, cfg, really_step=False)
    scored = loop.score_step_batch(trainer, trajs)
    for t, r in zip(trajs, scored):
        t.rollout_log_probs = r.old.float() - math.log(2.0)
    out = {}
    for name, rc in (("none", RolloutCorrectionConfig()),
                     ("tis", RolloutCorrectionConfig(level="token", mode="truncate", cap=3.0)),
                     ("mis", RolloutCorrectionConfig(level="token", mode="mask", cap=1.5))):
        trainer.cfg.algo.rollout_correction = rc
        proxy.grads.clear()
        per_traj, minibatches, metrics = loop.shape_step(trainer, trajs, scored)
        upd = loop.update_policy(trainer, trajs, per_traj, minibatches)
        out[name] = {"grads": [dict(g) for g in proxy.grads], "minibatches": minibatches,
                     "metrics": {**metrics, **upd}}
    return out


def test_rollout_correction_weights_reach_the_policy_gradient(tiny_model_dir, trajs):
    """The correction weights travel through shape_step -> policy_update_pass -> the loss: w = 2 on every
    token doubles the policy-gradient loss and every gradient; MIS dropping every token zeroes them."""
    import copy

    res = run_distributed(_correction_worker, 1, str(tiny_model_dir), copy.deepcopy(trajs))[0]
    none, tis, mis = res["none"], res["tis"], res["mis"]
    assert tis["metrics"]["rollout_correction/weight_mean"] == pytest.approx(2.0, rel=1e-5)
    assert mis["metrics"]["rollout_correction/token_frac_corrected"] == 1.0
    assert none["metrics"]["actor/pg_loss"] != 0.0
    assert tis["metrics"]["actor/pg_loss"] == pytest.approx(2 * none["metrics"]["actor/pg_loss"], rel=1e-5)
    assert mis["metrics"]["actor/pg_loss"] == 0.0
    for step in range(len(none["minibatches"])):
        g_none, g_tis, g_mis = (_merged_grads([r], step) for r in (none, tis, mis))
        assert set(g_none) == set(g_tis) == set(g_mis)
        for k in g_none:
            assert torch.allclose(g_tis[k], 2 * g_none[k], rtol=1e-4, atol=1e-9), k
            assert float(g_mis[k].abs().max()) == 0.0, k
        assert max(float(g.abs().max()) for g in g_none.values()) > 0
