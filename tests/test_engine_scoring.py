"""Engine scoring (`RolloutEngine.score`, what old_logp_source=engine uses) equals the trainer's scoring.

For every engine that runs on CPU: per-token log-probs of given responses under their prompts, for the
original images and for a perturbed view (the trainer's seeded patch mask), on text-only, one-image and
two-image prompts, against `megatron_vppo.train.scoring.score_trajectories` (what tools/score.py runs)
on the same weights — within 1e-4 in fp32.
"""
from __future__ import annotations

import pytest
import torch
from conftest import make_test_images

from dist_helpers import run_distributed

TOL = 1e-4
ROWS = [
    ("<image>What is red here, and <image> what is green?", [0, 1], "<think>circle then triangle</think> \\boxed{2}"),
    ("Compute 3 + 4.", [], "<think>3+4=7</think> The answer is \\boxed{7}."),
    ("How many shapes?", [1], "\\boxed{3}"),
]


def _samples(model_dir):
    from megatron_vppo.data.processor import VLProcessor

    proc = VLProcessor.from_pretrained(model_dir)
    imgs = make_test_images()
    return proc, [proc.encode(q, [imgs[i] for i in im], response=r) for q, im, r in ROWS]


def _views(proc, samples):
    """The trainer's perturbed views (loop.perturbed_views' pixel mode), seeded per trajectory."""
    from megatron_vppo.data.perturb import make_generator, perturb_pixel_values

    ip = proc.image_processor
    return [perturb_pixel_values(s["pixel_values"], s["image_grid_thw"], make_generator(7, 1, i), ip.image_mean,
                                 ip.image_std, 0.5) for i, s in enumerate(samples)]


def _trainer_worker(rank, world, model_dir):
    """Trainer log-probs (Megatron, TP1) for the original and the perturbed views."""
    from megatron_vppo.checkpoint.model_checkpoint import load_model, model_dims, read_model_config
    from megatron_vppo.config import ParallelConfig
    from megatron_vppo.distributed import init_distributed
    from megatron_vppo.models.qwen2_5_vl.config import text_arch
    from megatron_vppo.train.scoring import score_trajectories, to_trajectory

    cfg = read_model_config(model_dir)
    dims = init_distributed(ParallelConfig(), **model_dims(cfg))
    m = load_model(model_dir, ParallelConfig(), dims=dims)
    proc, samples = _samples(model_dir)
    trajs = [to_trajectory(s, i) for i, s in enumerate(samples)]
    kw = dict(vocab_size=text_arch(cfg).vocab_size, pad_id=proc.pad_token_id, micro_batch_size=2, dims=dims)
    orig = score_trajectories(m.chunks, trajs, **kw)
    for t, v in zip(trajs, _views(proc, samples)):
        t.pixel_values = v
    return orig, score_trajectories(m.chunks, trajs, **kw)


@pytest.fixture(scope="module")
def trainer_logps(tiny_model_dir):
    return run_distributed(_trainer_worker, 1, str(tiny_model_dir))[0]


def _items(samples, views):
    from megatron_vppo.rollout.engine import RolloutRequest

    return [(RolloutRequest(s["input_ids"][: s["response_start"]].tolist(), v, s["image_grid_thw"]),
             s["input_ids"][s["response_start"]:].tolist()) for s, v in zip(samples, views)]


def test_hf_engine_scoring_equals_the_trainer(tiny_model_dir, trainer_logps):
    from megatron_vppo.rollout.hf_engine import HFRolloutEngine

    engine = HFRolloutEngine.from_pretrained(tiny_model_dir)
    proc, samples = _samples(tiny_model_dir)
    views = _views(proc, samples)
    assert any(v is not None and not torch.equal(v, s["pixel_values"]) for v, s in zip(views, samples))
    for mine, ref in zip((engine.score(_items(samples, [s["pixel_values"] for s in samples])),
                          engine.score(_items(samples, views))), trainer_logps):
        assert [len(x) for x in mine] == [len(r) for r in ref]
        for x, r in zip(mine, ref):
            assert (torch.tensor(x) - r).abs().max().item() <= TOL
    # the perturbed view really changes the image rows' log-probs (the check is not vacuous)
    assert (trainer_logps[0][0] - trainer_logps[1][0]).abs().max() > 10 * TOL
