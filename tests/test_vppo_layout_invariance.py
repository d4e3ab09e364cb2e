"""Design decision 1: one fixed RL batch gives the same VPPO numbers at every parallel layout.

Batch: 7 trajectories in 3 GRPO groups with mixed rewards — two image prompts whose images have
different sizes (grids [1,4,6] and [1,8,4]) and one text-only prompt — with fixed responses encoded
by the processor. 7 is odd on purpose: micro-batch size 4 leaves a filler row and DP2 splits 4 / 3.
Mini-batches of 4 trajectories give two optimizer steps per RL step; both steps' gradients are compared
(the second one runs at θ ≠ π_old, after the first Adam step).

Every model in ARCHS (Qwen2.5-VL and Qwen3-VL, each with its own tiny model; one launch runs both) and
every layout (TP2+SP among them) runs the trainer's own step functions (`loop.score_step_batch` -> `loop.shape_step` ->
`loop.update_policy`) on a model and optimizer built as `train/build.py` builds them, in its own
spawned gloo group, and returns old_logp, aug_logp, dependency, α, TGF mask, the loss J and the
gradient. Every layout is compared with the TP1·PP1 (micro-batch 4) run of the same session.

How the gradient is read: `update_policy` zeroes the DDP buffers, runs `policy_update_pass` (whose
`finalize_model_grads` all-reduces over DP and divides by the global token count) and then calls
`optimizer.step()`. The optimizer is wrapped so that `step()` first gathers `main_grad` — exactly
what the optimizer would consume, before clipping — over TP to full tensors, and maps them to HF
names with the layout's adapter. Reading gradients rather than post-step parameters keeps the check
sharp: Adam's first step is ≈ lr·sign(g), which hides gradient errors. The test uses the
non-distributed optimizer because the distributed one leaves each DP rank only its reduce-scattered
shard of the buffer.

Independent oracle for the gradient: transformers' Qwen2_5_VLForConditionalGeneration on the whole
first mini-batch at once, its log-probs through the algo's `vppo_policy_loss` (default num_tokens = the
batch's own valid-token count), with the step's constants (Â, TGF mask) from the TP1 run and π_old
= its own detached log-probs; its gradient must equal the Megatron TP1 gradient.
"""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from conftest import make_test_images
from dist_helpers import run_distributed

ATOL = 1e-5  # per-token / per-trajectory values and the loss
GRAD_RTOL_LAYOUT = 1e-5  # max |g - g_ref| / max |g_ref| per tensor, layout vs TP1
GRAD_RTOL_HF = 1e-4  # Megatron TP1 vs transformers

RUN_SEED, STEP = 5, 3

# (group, image index or None, response, reward). Listed so that both mini-batches of 4 hold both
# image sizes and a text-only trajectory; GRPO groups are by `group`, not by position.
SAMPLES = [
    (0, 0, "<think>a red circle and a blue box</think> There are 2 shapes. \\boxed{2}", 1.0),
    (1, 1, "<think>the triangle is green</think> \\boxed{green}", 1.0),
    (2, None, "4 + 3 = 7, so \\boxed{7}", 1.0),
    (0, 0, "<think>count them</think> \\boxed{3}", 0.0),
    (1, 1, "It is red. \\boxed{red}", 0.0),
    (2, None, "<think>4 and 3</think> \\boxed{8}", 0.0),
    (0, 0, "I see three things, so the answer is \\boxed{3}", 0.0),
]
MINI_BATCH = 4  # trajectories per optimizer step: two steps, [0..3] and [4..6]
PROBLEMS = {0: "How many shapes are in <image>?", 1: "<image> What colour is the triangle?",
            2: "What is 4 + 3?"}


def make_trajectories(model_dir, image_scale: int = 1):
    """The fixed batch as trainer Trajectories (built once, in the parent); `image_scale` enlarges both
    images by that factor (the perception steps' batch, PGPO_IMAGE_SCALE)."""
    from megatron_vppo.data.processor import VLProcessor
    from megatron_vppo.train.rl_batch import Trajectory

    proc = VLProcessor.from_pretrained(model_dir)
    images = [im.resize((im.width * image_scale, im.height * image_scale)) for im in make_test_images()]
    trajs = []
    for group, img, response, reward in SAMPLES:
        enc = proc.encode(PROBLEMS[group], [] if img is None else [images[img]], response=response)
        trajs.append(Trajectory(group=group, input_ids=enc["input_ids"], response_start=enc["response_start"],
                                pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"],
                                reward=reward))
    return trajs


def run_config(micro_batch_size: int, **algo):
    from megatron_vppo.config import OptimConfig, RunConfig, TrainConfig, AlgoConfig

    cfg = RunConfig()
    cfg.train = TrainConfig(seed=RUN_SEED, micro_batch_size=micro_batch_size, mini_batch_prompts=MINI_BATCH)
    cfg.rollout.group_size = 1  # so a mini-batch is MINI_BATCH trajectories
    cfg.algo = AlgoConfig(**algo)  # tas_scope global is the default
    # Non-distributed optimizer: main_grad holds the whole DP-reduced gradient on every rank.
    cfg.optim = OptimConfig(lr=1e-6, use_distributed_optimizer=False)
    return cfg


class GradCapture:
    """Optimizer proxy: on `step()` record the full HF-named gradients, then step (or not)."""

    def __init__(self, optimizer, chunks, adapter, tp_group, really_step: bool = True):
        self._opt, self._chunks, self._adapter, self._really_step = optimizer, chunks, adapter, really_step
        self._tp_group = tp_group
        self.grads: list[dict] = []

    def step(self):
        from megatron_vppo.checkpoint.hf_load import gather_full_state

        full = gather_full_state(self._chunks, self._adapter, grads=True, tp_group=self._tp_group)
        self.grads.append(self._adapter.mcore_to_hf(full))
        if self._really_step:
            return self._opt.step()
        return True, None, 0

    def __getattr__(self, name):
        return getattr(self._opt, name)


def build_trainer(model_dir, tp: int, pp: int, cfg, really_step: bool = True, vpp: int | None = None,
                  sp: bool = False, overlap: bool | None = None):
    """Process groups, model, HF weights, DDP + optimizer: the trainer's own build_policy."""
    from megatron_vppo.config import ParallelConfig
    from megatron_vppo.data.processor import VLProcessor
    from megatron_vppo.models import spec_for_hf_config
    from megatron_vppo.train.build import build_policy
    from megatron_vppo.train.loop import Trainer

    cfg.parallel = ParallelConfig(tp=tp, pp=pp, vpp=vpp, sp=sp)
    cfg.model.path = str(model_dir)
    cfg.model.arch = spec_for_hf_config(model_dir).name
    pol = build_policy(cfg, model_dir, total_steps=1, overlap=overlap)
    proxy = GradCapture(pol.optimizer, pol.model_chunks, pol.adapter, pol.dims.tp_group, really_step)
    trainer = Trainer(cfg=cfg, processor=VLProcessor.from_pretrained(model_dir), model_chunks=pol.model_chunks,
                      optimizer=proxy, scheduler=pol.scheduler, engine=None, grader=None, train_batches=None,
                      val_prompts=[], hf_config=pol.hf_config, adapter=pol.adapter,
                      vocab_size=pol.arch.vocab_size, dims=pol.dims, step=STEP)
    return trainer, proxy


def train_side_step(trainer, proxy, trajs) -> dict:
    """The trainer's step after rollout: paired pass -> shaping -> update. Returns every quantity."""
    from megatron_vppo.algo.advantages import grpo_advantages
    from megatron_vppo.algo.vppo import compute_shaping
    from megatron_vppo.train import loop
    from megatron_vppo.train.rl_batch import responses_to_matrix

    t0 = time.perf_counter()
    scored = loop.score_step_batch(trainer, trajs)
    per_traj, minibatches, shaping_metrics = loop.shape_step(trainer, trajs, scored)
    upd = loop.update_policy(trainer, trajs, per_traj, minibatches)
    elapsed = time.perf_counter() - t0
    # α is not handed out by shape_step; recompute it from the same gathered pass results.
    old, mask = responses_to_matrix([r.old for r in scored])
    aug = responses_to_matrix([r.aug for r in scored])[0] if scored[0].aug is not None else None
    kl = responses_to_matrix([r.kl for r in scored])[0] if scored[0].kl is not None else None
    adv = grpo_advantages(torch.tensor([t.reward for t in trajs], dtype=torch.float64),
                          torch.tensor([t.group for t in trajs]))
    shaping = compute_shaping(old, aug, mask, adv, trainer.cfg.algo, kl=kl, tas=trainer.cfg.algo.name == "vppo")
    keep_grads = trainer.dims.tp_rank == 0 and trainer.dims.dp_rank == 0
    return dict(
        old=[r.old for r in scored], aug=[r.aug for r in scored], kl=[r.kl for r in scored],
        dependency=shaping.dependency, alpha=shaping.alpha, mask=mask,
        per_traj=per_traj, minibatches=minibatches, metrics={**shaping_metrics, **upd},
        loss=upd["actor/loss"],
        grads=proxy.grads if keep_grads else None,
        # DP ranks > 0 return a digest of their gradient: it must equal rank 0's (all-reduced).
        grad_digest=[{k: float(v.double().abs().sum()) for k, v in g.items()} for g in proxy.grads],
        seconds=elapsed,
    )


# The perception family (spec/perception_family.md) rides in the same launches: after the VPPO step the
# same trainer runs one step of each, in this order, each from the model's own weights (perception_steps
# says why), so each layout's numbers are again compared with TP1's.
PERCEPTION = ("papo", "vepo", "pgpo")
# PGPO's step's batch: SAMPLES with both images 3× larger (grids [1,12,18] and [1,22,10]: 54 and 55
# image tokens in sequences of 121-197 tokens). Why: PGPO's weights are a per-response min-max of
# S̃ = log(1 + k3) followed by slopes up to β/(1−τ) = 3.3 and the mass normalisation (×L/Σw, up to ~2.5), so
# a weight moves by ≈ 8·δS̃ / (max S̃ − min S̃). With the 6- and 8-token images the blind view moved
# log-probs by ≤ 0.2 nats: max − min of S̃ was 6e-3 .. 2e-2, and the layouts' legitimate fp32 differences
# of the log-probs (1 ulp ≈ 9.5e-7 at log p ≈ −12, δS̃ ≈ 5e-8 .. 2e-7) became weight differences of up to
# 1.1e-4 (TP2, TP2xPP2) and 9e-5 (PP2), gradients 1.3e-5. Measured with this batch (blind view moves up to
# 0.8 nats, range of S̃ 0.17 .. 0.37) and PGPO's fp64 log-probs (algo/registry.py `fp64_scores`): weights
# ≤ 5.5e-6, gradients ≤ 2e-6 at every layout (2× images, 24 and 32 tokens: weights 1.1e-5 at TP2, too
# close). PAPO and VEPO are well conditioned and keep the small batch (cheaper).
PGPO_IMAGE_SCALE = 3
# PAPO with algo.papo.second_view_grad (TRL's variant: the masked view forwarded again in the update, with
# gradient) runs as a fourth step in the reference launch and in one layout's (the transformers oracle
# below checks its gradient; the layout, that the two-view update keeps its graph through TP and the
# pipeline schedule).
PAPO_GRAD = ("papo_grad", "papo", {"papo": {"second_view_grad": True}})
PAPO_GRAD_LAYOUTS = ("TP2xPP2", "packed-TP2xPP2")


def perception_steps(trainer, proxy, trajs, names=PERCEPTION, pgpo_trajs=None) -> dict:
    """One step (paired pass -> shaping -> update) per perception algorithm; what each computes. An entry
    of `names` is an algorithm name or (result key, algorithm name, algo overrides). PGPO's step runs on
    `pgpo_trajs` (PGPO_IMAGE_SCALE), the others on `trajs`."""
    from megatron_vppo.config import AlgoConfig, PapoConfig
    from megatron_vppo.run_config import validate_algorithm
    from megatron_vppo.train import loop

    from megatron_vppo.checkpoint.hf_load import load_hf_weights

    out = {}
    for entry in names:
        key, name, overrides = (entry, entry, {}) if isinstance(entry, str) else entry
        batch = pgpo_trajs if name == "pgpo" and pgpo_trajs is not None else trajs
        # Each method's step starts from the model's own weights. Without this, every step after the first
        # starts from weights that earlier optimizer steps moved, and those moves differ between layouts:
        # Adam's early steps (≈ lr·sign(g)) turn the ~1e-7 relative rounding differences of a gradient's
        # elements near 0 into parameter differences of up to lr. After the VPPO, PAPO and VEPO steps
        # (6 Adam steps at lr 1e-6) PGPO's log-probs differed by ~1e-6 at DP2 (0 with this reload).
        load_hf_weights(trainer.model_chunks, trainer.cfg.model.path, trainer.adapter, dims=trainer.dims)
        trainer.cfg.algo = AlgoConfig(name=name, **{k: PapoConfig(**v) if k == "papo" else v
                                                     for k, v in overrides.items()})
        validate_algorithm(trainer.cfg.algo)
        first = len(proxy.grads)
        scored = loop.score_step_batch(trainer, batch)
        per_traj, minibatches, metrics = loop.shape_step(trainer, batch, scored)
        upd = loop.update_policy(trainer, batch, per_traj, minibatches)
        keep_grads = trainer.dims.tp_rank == 0 and trainer.dims.dp_rank == 0
        out[key] = dict(old=[r.old for r in scored], aug=[r.aug for r in scored],
                         jsd=[r.jsd for r in scored], per_traj=per_traj, minibatches=minibatches,
                         metrics={**metrics, **upd}, loss=upd["actor/loss"],
                         grads=proxy.grads[first:] if keep_grads else None)
    return out


def _layout_worker(rank, world, model_dir, trajs, tp, pp, mbs, sp=False, pgpo_trajs=None,
                   papo_grad=False):
    trainer, proxy = build_trainer(model_dir, tp, pp, run_config(mbs), sp=sp)
    out = train_side_step(trainer, proxy, trajs)
    if out["grads"] is not None:
        out["grads"] = list(out["grads"])  # the VPPO step's; the perception steps append theirs after
    names = PERCEPTION + ((PAPO_GRAD,) if papo_grad else ())
    out["perception"] = perception_steps(trainer, proxy, trajs, names, pgpo_trajs) if pgpo_trajs else None
    return out


# ------------------------------------------------------------------------------ parent side

LAYOUTS = {  # name: (world, tp, pp, micro-batch size[, sequence parallel])
    "TP2": (2, 2, 1, 4),
    # SP: activations split over the sequence between TP ranks; the norms' partial grads are summed
    # over TP by the trainer's own finalize_model_grads (no reduction on the test side).
    "TP2+SP": (2, 2, 1, 4, True),
    "PP2": (2, 1, 2, 1),  # 7 paired micro-batches; 4 + 3 in the updates: 1F1B warm-up, steady, cool-down
    "DP2": (2, 1, 1, 4),  # pass shards of 4 and 3; update shards 2 + 2, then 2 + 1
    "TP2xPP2": (4, 2, 2, 4),
    "TP1-mbs1": (1, 1, 1, 1),
}


# Every launch runs each model in turn (its own process groups), so a second model costs no launch.
ARCHS = ("qwen2_5_vl", "qwen3_vl")


def _archs_worker(rank, world, model_dirs, all_trajs, pgpo_trajs, tp, pp, mbs, sp=False, papo_grad=False):
    """Every arch in turn; the perception algorithms' steps run on the first (Qwen2.5-VL) only."""
    return [_layout_worker(rank, world, d, t, tp, pp, mbs, sp, pgpo_trajs if i == 0 else None, papo_grad)
            for i, (d, t) in enumerate(zip(model_dirs, all_trajs))]


@pytest.fixture(scope="module")
def model_dirs(tiny_model_dir, tmp_path_factory):
    """The tiny model of every arch in ARCHS (Qwen2.5-VL's is the session one)."""
    from megatron_vppo.models import MODELS

    dirs = {"qwen2_5_vl": tiny_model_dir}
    for arch in ARCHS[1:]:
        dirs[arch] = MODELS[arch].make_tiny_model(tmp_path_factory.mktemp(f"tiny_{arch}"), seed=0)
    return [str(dirs[a]) for a in ARCHS]


@pytest.fixture(scope="module")
def all_trajs(model_dirs):
    return [make_trajectories(d) for d in model_dirs]


@pytest.fixture(scope="module")
def pgpo_trajs(model_dirs):
    """PGPO's step's batch (Qwen2.5-VL): SAMPLES with larger images (PGPO_IMAGE_SCALE)."""
    return make_trajectories(model_dirs[0], image_scale=PGPO_IMAGE_SCALE)


@pytest.fixture(scope="module")
def references(model_dirs, all_trajs, pgpo_trajs):
    """The single-process TP1·PP1 result of every arch, micro-batch size 4 (one launch)."""
    return run_distributed(_archs_worker, 1, model_dirs, all_trajs, pgpo_trajs, 1, 1, 4, False, True)[0]


@pytest.fixture(scope="module")
def trajs(all_trajs):
    return all_trajs[0]


@pytest.fixture(scope="module")
def reference(references):
    """Qwen2.5-VL's TP1·PP1 result (the transformers-oracle and packing tests use it)."""
    return references[0]


def _merged_grads(results, step: int = 0):
    """Full HF-named gradient of optimizer step `step`, merged over pipeline stages."""
    merged = {}
    for r in results:
        if r["grads"] is not None:
            assert len(r["grads"]) == len(r["minibatches"]), "one optimizer step per mini-batch"
            merged.update(r["grads"][step])
    return merged


def _max_diff(xs, ys) -> float:
    return max(float((x.double() - y.double()).abs().max()) if x.numel() else 0.0 for x, y in zip(xs, ys))


def _worst_grad(got: dict, ref: dict) -> tuple[float, str]:
    assert set(got) == set(ref), f"gradient names differ: {sorted(set(got) ^ set(ref))[:4]}"
    worst = (0.0, "")
    for name, g_ref in ref.items():
        g = got[name]
        assert g.shape == g_ref.shape, f"{name}: {tuple(g.shape)} vs {tuple(g_ref.shape)}"
        rel = float((g.double() - g_ref.double()).abs().max()) / max(float(g_ref.abs().max()), 1e-12)
        worst = max(worst, (rel, name))
    return worst


def check_same(results, ref, tag):
    """Every rank's view of the step equals the reference step."""
    for rank, r in enumerate(results):
        d = {
            "old_logp": _max_diff(r["old"], ref["old"]),
            "aug_logp": _max_diff([a for a in r["aug"] if a is not None], [a for a in ref["aug"] if a is not None]),
            "dependency": float((r["dependency"] - ref["dependency"]).abs().max()),
            "alpha": float((r["alpha"] - ref["alpha"]).abs().max()),
            "advantage": max(abs(a.advantage - b.advantage) for a, b in zip(r["per_traj"], ref["per_traj"])),
            "loss": abs(r["loss"] - ref["loss"]),
        }
        print(f"{tag} rank {rank}: " + ", ".join(f"{k} {v:.1e}" for k, v in d.items()))
        for key, v in d.items():
            assert v <= ATOL, f"{tag} rank {rank}: {key} differs from TP1 by {v:.3e}"
        masks = [p.tgf_mask for p in r["per_traj"]]
        ref_masks = [p.tgf_mask for p in ref["per_traj"]]
        assert all(torch.equal(a, b) for a, b in zip(masks, ref_masks)), f"{tag} rank {rank}: TGF mask differs"
        assert r["minibatches"] == ref["minibatches"]
    for step in range(len(ref["minibatches"])):
        rel, name = _worst_grad(_merged_grads(results, step), _merged_grads([ref], step))
        print(f"{tag}: optimizer step {step}: worst relative gradient difference {rel:.1e} ({name})")
        assert rel <= GRAD_RTOL_LAYOUT, f"{tag}: step {step} gradient of {name} differs from TP1 by {rel:.3e}"
    digests = [r["grad_digest"] for r in results]
    for rank, dg in enumerate(digests[1:], 1):  # every DP / TP / PP peer saw the same reduced gradient
        for step in range(len(dg)):
            for k in dg[step].keys() & digests[0][step].keys():
                assert dg[step][k] == pytest.approx(digests[0][step][k], rel=1e-6), f"{tag} rank {rank}: {k}"


@pytest.mark.parametrize("arch", ARCHS)
def test_reference_batch_is_nontrivial(arch, references, all_trajs):
    """The fixed batch exercises what the layouts must agree on."""
    reference, trajs = references[ARCHS.index(arch)], all_trajs[ARCHS.index(arch)]
    texts = [i for i, t in enumerate(trajs) if not t.has_image]
    assert texts and all(float(ref.abs().max()) == 0.0 for ref in (reference["dependency"][i] for i in texts))
    assert all(torch.equal(reference["aug"][i], reference["old"][i]) for i in texts)
    img = [i for i, t in enumerate(trajs) if t.has_image]
    assert float(reference["dependency"][img].max()) > 1e-3, "the perturbation should move image tokens"
    a = reference["alpha"]
    assert float(a.max() - a.min()) > 1e-3, "α should vary over the batch"
    kept = torch.cat([p.tgf_mask for p in reference["per_traj"]])
    assert 0.2 < float(kept.mean()) < 0.8, "TGF should drop part of the tokens"
    assert reference["minibatches"] == [[0, 1, 2, 3], [4, 5, 6]]
    assert all(torch.isfinite(g).all() for step in reference["grads"] for g in step.values())
    print(f"TP1 reference step: {reference['seconds']:.1f}s, J = {reference['loss']:.6f}")


def check_same_perception(results, ref, tag):
    """Each perception algorithm's step at this layout equals its TP1 step: both views' log-probs,
    VEPO's JSD, PGPO's per-token weights, the kept-token masks, Â, the loss and the gradients."""
    for algo in results[0]["perception"]:
        want = ref["perception"][algo]
        for rank, r in enumerate(results):
            got = r["perception"][algo]
            d = {"old_logp": _max_diff(got["old"], want["old"]), "aug_logp": _max_diff(got["aug"], want["aug"]),
                 "advantage": max(abs(a.advantage - b.advantage) for a, b in zip(got["per_traj"], want["per_traj"])),
                 "loss": abs(got["loss"] - want["loss"])}
            if want["jsd"][0] is not None:
                d["jsd"] = _max_diff(got["jsd"], want["jsd"])
            weights = want["per_traj"][0].token_weight is not None
            if weights:
                d["token_weight"] = _max_diff([p.token_weight for p in got["per_traj"]],
                                              [p.token_weight for p in want["per_traj"]])
                # They also equal the weights of this layout's own (old, aug) exactly (PGPO_IMAGE_SCALE
                # says how far a weight can move with the log-probs).
                from megatron_vppo.algo.pgpo import pgpo_token_weights
                from megatron_vppo.train.rl_batch import responses_to_matrix

                old, mask = responses_to_matrix(got["old"])
                w = pgpo_token_weights(old, responses_to_matrix(got["aug"])[0], mask)
                d["token_weight_vs_own_inputs"] = _max_diff([p.token_weight for p in got["per_traj"]],
                                                            [w[i, : len(p.old_logp)] for i, p in enumerate(got["per_traj"])])
            print(f"{tag} {algo} rank {rank}: " + ", ".join(f"{k} {v:.1e}" for k, v in d.items()))
            for key, v in d.items():
                assert v <= ATOL, f"{tag} {algo} rank {rank}: {key} differs from TP1 by {v:.3e}"
            assert all(torch.equal(a.tgf_mask, b.tgf_mask) for a, b in zip(got["per_traj"], want["per_traj"])), \
                f"{tag} {algo} rank {rank}: kept-token mask differs"
        for step in range(len(want["minibatches"])):
            merged = {}
            for r in results:
                if r["perception"][algo]["grads"] is not None:
                    merged.update(r["perception"][algo]["grads"][step])
            rel, name = _worst_grad(merged, want["grads"][step])
            print(f"{tag} {algo}: optimizer step {step}: worst relative gradient difference {rel:.1e} ({name})")
            assert rel <= GRAD_RTOL_LAYOUT, f"{tag} {algo}: step {step} gradient of {name} differs by {rel:.3e}"


def test_reference_perception_steps_are_nontrivial(reference, trajs, pgpo_trajs):
    """What each perception method computes on the fixed batch is not degenerate (TP1)."""
    per = reference["perception"]
    img = [i for i, t in enumerate(trajs) if t.has_image]
    text = [i for i, t in enumerate(trajs) if not t.has_image]
    for algo in PERCEPTION:  # the second view moves image trajectories only
        assert all(torch.equal(per[algo]["aug"][i], per[algo]["old"][i]) for i in text), algo
        assert max(float((per[algo]["aug"][i] - per[algo]["old"][i]).abs().max()) for i in img) > 1e-4, algo
        assert all(torch.isfinite(g).all() for step in per[algo]["grads"] for g in step.values())
    m = per["papo"]["metrics"]
    assert m["actor/papo/k3"] > 0 and m["actor/papo/term"] != 0.0
    # the same step with the second view's gradient (from the same weights and batch) moves the gradient
    rel, name = _worst_grad(per["papo_grad"]["grads"][0], per["papo"]["grads"][0])
    assert rel > 1e-3, f"second_view_grad should change the gradient (worst {rel:.1e}, {name})"
    w = torch.cat([p.token_weight for p in per["pgpo"]["per_traj"]])
    assert float(w.max()) > 1.2 and float(w.min()) < 0.8, "PGPO weights should vary"
    for p, t in zip(per["pgpo"]["per_traj"], trajs):  # mass normalisation: each response's weights sum to L
        assert float(p.token_weight.sum()) == pytest.approx(t.response_len, rel=1e-9)
    kept = [p.tgf_mask for p in per["vepo"]["per_traj"]]
    assert all(int(k.sum()) == -(-len(k) // 5) for k in kept), "VEPO keeps ceil(0.2 L) tokens per response"
    assert max(float(per["vepo"]["jsd"][i].max()) for i in img) > 0


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, model_dirs, all_trajs, pgpo_trajs, references):
    world, tp, pp, mbs, *sp = LAYOUTS[name]
    results = run_distributed(_archs_worker, world, model_dirs, all_trajs, pgpo_trajs, tp, pp, mbs,
                              bool(sp and sp[0]), name in PAPO_GRAD_LAYOUTS)
    for i, arch in enumerate(ARCHS):
        check_same([r[i] for r in results], references[i], f"{name} {arch}")
    check_same_perception([r[0] for r in results], references[0], name)  # perception steps: Qwen2.5-VL


# ------------------------------------------------------------------- transformers oracle (TP1)


def hf_batch(model_dir, trajs, pixel_values=None):
    """Right-padded HF inputs for the whole batch, with explicit M-RoPE position ids."""
    from megatron_vppo.data.processor import VLProcessor

    proc = VLProcessor.from_pretrained(model_dir)
    b = len(trajs)
    s = max(int(t.input_ids.numel()) for t in trajs)
    ids = torch.full((b, s), proc.pad_token_id, dtype=torch.long)
    att = torch.zeros(b, s, dtype=torch.long)
    for i, t in enumerate(trajs):
        ids[i, : t.input_ids.numel()] = t.input_ids
        att[i, : t.input_ids.numel()] = 1
    pixel_values = pixel_values or [t.pixel_values for t in trajs]
    pv = [p for p, t in zip(pixel_values, trajs) if t.has_image]
    grids = [t.image_grid_thw for t in trajs if t.has_image]
    return dict(input_ids=ids, attention_mask=att, mm_token_type_ids=(ids == proc.image_token_id).int(),
                pixel_values=torch.cat(pv) if pv else None, image_grid_thw=torch.cat(grids) if grids else None)


def hf_forward(model, batch):
    pos, _ = model.model.get_rope_index(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                                        image_grid_thw=batch["image_grid_thw"],
                                        attention_mask=batch["attention_mask"])
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=pos,
                 pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"]).logits


def response_rows(values, trajs):
    """[B, S] position-level values -> [B, T] response-level (token j at position start-1+j), zero-padded."""
    width = max(t.response_len for t in trajs)
    rows = []
    for i, t in enumerate(trajs):
        s, n = t.response_start, t.response_len
        rows.append(F.pad(values[i, s - 1 : s - 1 + n], (0, width - n)))
    return torch.stack(rows)


def hf_response_logp(logits, batch, trajs):
    logp = torch.log_softmax(logits.float(), -1)
    tgt = F.pad(batch["input_ids"][:, 1:], (0, 1))
    return response_rows(logp.gather(-1, tgt[..., None])[..., 0], trajs)


def test_tp1_gradient_equals_transformers_gradient_of_J(tiny_model_dir, trajs, reference):
    """First optimizer step: J of mini-batch [0..3] (denominator = ITS valid tokens) at θ = π_old."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_vppo.algo import ALGORITHMS
    from megatron_vppo.algo.loss import vppo_policy_loss
    from megatron_vppo.models.qwen2_5_vl.weights import canonical_hf_name
    from megatron_vppo.train.rl_batch import responses_to_matrix

    idx = reference["minibatches"][0]
    mb = [trajs[i] for i in idx]
    rows = [reference["per_traj"][i] for i in idx]
    cfg = run_config(4).algo
    ls = ALGORITHMS["vppo"].settings(cfg)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.train()
    batch = hf_batch(tiny_model_dir, mb)
    logp = hf_response_logp(hf_forward(model, batch), batch, mb)
    mask = responses_to_matrix([torch.ones(t.response_len) for t in mb], dtype=torch.float32)[0]
    tgf = responses_to_matrix([p.tgf_mask for p in rows], dtype=torch.float32)[0]
    adv = torch.tensor([p.advantage for p in rows], dtype=torch.float32)
    assert 0 < float(tgf.sum()) < float(mask.sum()), "TGF must drop some tokens (entropy term reaches them)"
    loss, _ = vppo_policy_loss(logp, logp.detach(), adv, mask, tgf, clip_low=ls.clip_low,
                               clip_high=ls.clip_high, dual_clip=ls.dual_clip, entropy_coef=ls.entropy_coef)
    loss.backward()
    hf_grads = {canonical_hf_name(n): p.grad for n, p in model.named_parameters()}
    assert all(g is not None for g in hf_grads.values())

    d_old = _max_diff([logp[j, : t.response_len].detach() for j, t in enumerate(mb)],
                      [reference["old"][i] for i in idx])
    print(f"old_logp vs transformers {d_old:.1e}")
    assert d_old <= ATOL
    rel, name = _worst_grad(_merged_grads([reference], 0), hf_grads)
    print(f"TP1 vs transformers: worst relative gradient difference {rel:.1e} ({name})")
    assert rel <= GRAD_RTOL_HF, f"gradient of {name} differs from transformers' by {rel:.3e} (relative)"


def test_papo_second_view_grad_equals_transformers_gradient(tiny_model_dir, trajs, reference):
    """PAPO with algo.papo.second_view_grad, first optimizer step (θ = π_old = the model's weights): the TP1
    gradient equals transformers' gradient of L_pg + (−γ·Σ k3 + η·Σ(−p)) / N, k3 written out from the spec
    with BOTH views' log-probs (the original and the seeded masked view) carrying their graph."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_vppo.algo import ALGORITHMS
    from megatron_vppo.algo.loss import vppo_policy_loss
    from megatron_vppo.config import AlgoConfig, PapoConfig
    from megatron_vppo.data.processor import VLProcessor
    from megatron_vppo.models.qwen2_5_vl.weights import canonical_hf_name
    from megatron_vppo.train.loop import second_views
    from megatron_vppo.train.rl_batch import responses_to_matrix

    got = reference["perception"]["papo_grad"]
    idx = got["minibatches"][0]
    mb = [trajs[i] for i in idx]
    cfg = AlgoConfig(name="papo", papo=PapoConfig(second_view_grad=True))
    algo = ALGORITHMS["papo"]
    ls = algo.settings(cfg)
    views = second_views(mb, VLProcessor.from_pretrained(tiny_model_dir), RUN_SEED, STEP, idx[0], algo.view(cfg))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.train()
    batch, masked = hf_batch(tiny_model_dir, mb), hf_batch(tiny_model_dir, mb, pixel_values=views)
    logp = hf_response_logp(hf_forward(model, batch), batch, mb)
    logq = hf_response_logp(hf_forward(model, masked), masked, mb)
    mask = responses_to_matrix([torch.ones(t.response_len) for t in mb], dtype=torch.float32)[0]
    adv = torch.tensor([got["per_traj"][i].advantage for i in idx], dtype=torch.float32)
    pg, _ = vppo_policy_loss(logp, logp.detach(), adv, mask, None, clip_low=ls.clip_low, clip_high=ls.clip_high,
                             dual_clip=ls.dual_clip, entropy_coef=ls.entropy_coef)
    d = torch.clamp(logq - logp, -20.0, 20.0)  # spec: d = clamp(q − p, ±20), k3 = e^d − d − 1 clamped to ±10
    k3 = torch.clamp(torch.exp(d) - d - 1.0, -10.0, 10.0)
    term = (-ls.extra["gamma"] * (k3 * mask).sum() + ls.extra["eta"] * (-logp * mask).sum()) / mask.sum()
    assert float((k3 * mask).sum()) > 0, "the masked view should move the log-probs"
    (pg + term).backward()
    hf_grads = {canonical_hf_name(n): p.grad for n, p in model.named_parameters()}
    rel, name = _worst_grad(got["grads"][0], hf_grads)
    print(f"papo second_view_grad, TP1 vs transformers: worst relative gradient difference {rel:.1e} ({name})")
    assert rel <= GRAD_RTOL_HF, f"gradient of {name} differs from transformers' by {rel:.3e} (relative)"


# ------------------------------------------------------------------- packed (thd) micro-batches

# name: (world, tp, pp, train.max_tokens_per_micro_batch). The batch's trajectories hold 121-149 tokens:
# 1 gives every trajectory its own micro-batch, 10_000 packs a whole shard into one, 300 packs two and
# one per micro-batch, 260 gives DP2's two ranks different micro-batch counts (topped up with an empty one).
PACKED_LAYOUTS = {
    "packed-TP1-budget1": (1, 1, 1, 1),
    "packed-TP2": (2, 2, 1, 10_000),
    "packed-PP2": (2, 1, 2, 300),
    "packed-DP2": (2, 1, 1, 260),
    "packed-TP2xPP2": (4, 2, 2, 300),
    "packed-TP2-SP": (2, 2, 1, 300),  # sequence parallel splits each packed sequence over the TP ranks
}


def _packed_worker(rank, world, model_dir, trajs, pgpo_trajs, tp, pp, budget, sp, papo_grad=False):
    cfg = run_config(4)
    cfg.train.max_tokens_per_micro_batch = budget
    if not sp:
        trainer, proxy = build_trainer(model_dir, tp, pp, cfg)
        out = train_side_step(trainer, proxy, trajs)
        out["grads"] = None if out["grads"] is None else list(out["grads"])
        names = PERCEPTION + ((PAPO_GRAD,) if papo_grad else ())  # pgpo: the packed blind view
        out["perception"] = perception_steps(trainer, proxy, trajs, names, pgpo_trajs)
        return out
    # build_trainer with sequence parallel on
    from megatron_vppo.config import ParallelConfig
    from megatron_vppo.data.processor import VLProcessor
    from megatron_vppo.models import spec_for_hf_config
    from megatron_vppo.train.build import build_policy
    from megatron_vppo.train.loop import Trainer

    cfg.parallel = ParallelConfig(tp=tp, pp=pp, sp=True)
    cfg.model.path = str(model_dir)
    cfg.model.arch = spec_for_hf_config(model_dir).name
    pol = build_policy(cfg, model_dir, total_steps=1)
    proxy = GradCapture(pol.optimizer, pol.model_chunks, pol.adapter, pol.dims.tp_group)
    trainer = Trainer(cfg=cfg, processor=VLProcessor.from_pretrained(model_dir), model_chunks=pol.model_chunks,
                      optimizer=proxy, scheduler=pol.scheduler, engine=None, grader=None, train_batches=None,
                      val_prompts=[], hf_config=pol.hf_config, adapter=pol.adapter,
                      vocab_size=pol.arch.vocab_size, dims=pol.dims, step=STEP)
    return train_side_step(trainer, proxy, trajs)


@pytest.mark.parametrize("name", list(PACKED_LAYOUTS))
def test_packed_layout_matches_padded_single_process(name, tiny_model_dir, trajs, pgpo_trajs, reference):
    """Packed (thd) micro-batches under a token budget give the padded TP1 run's old/aug log-probs,
    dependency, α, TGF mask, loss and gradients, at every layout."""
    from megatron_vppo.train.rl_batch import pack_by_tokens, shard_by_tokens

    world, tp, pp, budget = PACKED_LAYOUTS[name]
    lengths = [t.num_tokens for t in trajs]
    bins = pack_by_tokens(lengths, budget)
    assert len(bins) == {1: 7, 10_000: 1, 300: 4, 260: 5}[budget]  # the cases the table promises
    if name == "packed-DP2":  # first mini-batch: rank 0 gets [0, 1] (2 micro-batches), rank 1 [2, 3] (1)
        counts = [len(pack_by_tokens([lengths[i] for i in shard_by_tokens([0, 1, 2, 3], lengths[:4], r, 2)],
                                     budget)) for r in range(2)]
        assert counts[0] != counts[1], counts
    results = run_distributed(_packed_worker, world, str(tiny_model_dir), trajs, pgpo_trajs, tp, pp, budget,
                              name.endswith("SP"), name in PAPO_GRAD_LAYOUTS)
    check_same(results, reference, name)
    if "perception" in results[0]:
        check_same_perception(results, reference, name)
