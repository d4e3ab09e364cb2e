"""A new algorithm, engine and model are each one definition plus one registry line (docs/ENGINEERING.md,
"Adding a model, an algorithm, an engine"): this file registers all three from here alone — CISPO's loss,
an engine wrapping the in-process HF engine, and the tiny Qwen2.5-VL under a second name — and runs two
trainer steps with them (one single-rank process)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from dist_helpers import run_distributed

ALGO, ENGINE, ARCH = "cispo", "wrapped_hf", "qwen2_5_vl_alias"
CISPO_CLIP_HIGH = 0.28  # the upper bound of the (stop-gradient) importance weight


def cispo_loss(logp, x, ls):
    """CISPO (MiniMax-M1): clip the importance weight, not the update — every token keeps its gradient,
    weighted by the detached, upper-clipped ratio. Token-mean: the denominator unit is a valid token."""
    ratio = torch.exp((logp - x.old_logp).clamp(max=20.0)).detach()
    weight = ratio.clamp(max=1.0 + ls.clip_high) * x.is_weight
    mask = x.mask.to(logp.dtype)
    numerator = -(weight * x.advantage * logp * mask).sum()
    clipped = ((ratio > 1.0 + ls.clip_high).to(logp.dtype) * mask).sum()
    return numerator, x.mask.sum().to(torch.int), {"cispo_clipped_frac": clipped}


class WrappedHFEngine:
    """The HF engine behind a counting wrapper: every protocol call goes through here."""

    in_process = True
    takes_pixel_values = True
    reads = frozenset()

    def __init__(self, inner):
        self.inner = inner
        self.weight_version = 0
        self.calls = {"generate": 0, "update_weights": 0}

    @staticmethod
    def check_engine_args(args: dict) -> None:
        from megatron_vppo.rollout.engine_args import refuse_engine_args

        refuse_engine_args(ENGINE, args)

    @classmethod
    def from_config(cls, cfg, model_dir, dims):
        from megatron_vppo.rollout.hf_engine import HFRolloutEngine

        inner = HFRolloutEngine.from_config(cfg, model_dir, dims)
        return None if inner is None else cls(inner)

    @classmethod
    def standalone(cls, model_dir, **kwargs):
        from megatron_vppo.rollout.hf_engine import HFRolloutEngine

        return cls(HFRolloutEngine.standalone(model_dir, **kwargs))

    def generate(self, requests, n, sampling):
        self.calls["generate"] += 1
        return self.inner.generate(requests, n, sampling)

    def score(self, items, temperature=1.0):
        return self.inner.score(items, temperature)

    def update_weights(self, stream, *, mode=None, expected=None):
        self.inner.update_weights(stream, mode=mode, expected=expected)
        self.calls["update_weights"] += 1
        self.weight_version = self.inner.weight_version

    def release_memory(self):
        self.inner.release_memory()

    def resume_memory(self):
        self.inner.resume_memory()

    def shutdown(self):
        self.inner.shutdown()


BUILT = []  # model names the alias spec built chunks for


def _register():
    """The three registry lines (what a new file's author adds to algo/registry.py, rollout/__init__.py,
    models/__init__.py)."""
    from megatron_vppo.algo.registry import ALGORITHMS, Algorithm, no_shaping
    from megatron_vppo.models import MODELS
    from megatron_vppo.rollout import ENGINES

    ALGORITHMS[ALGO] = Algorithm(ALGO, dynamic_sampling=False, needs_perturbed_view=False, shaping=no_shaping,
                                 loss=cispo_loss, reads=frozenset({"clip_high", "rollout_correction"}),
                                 clip_defaults=(0.2, CISPO_CLIP_HIGH))
    ENGINES.register(ENGINE, WrappedHFEngine)
    base = MODELS["qwen2_5_vl"]

    class AliasSpec(type(base)):  # the same model under another name; records what it builds
        def build_chunks(self, *args, **kwargs):
            BUILT.append(ARCH)
            return super().build_chunks(*args, **kwargs)

    MODELS.register(ARCH, dataclasses.replace(AliasSpec(), name=ARCH))


def _worker(rank, world, config_path, out_dir):
    from megatron_vppo.run_config import load_config
    from megatron_vppo.sync.stream import export_hf_weights
    from megatron_vppo.train.build import build_trainer, teardown
    from megatron_vppo.train.loop import rl_step

    _register()
    cfg = load_config(config_path, [f"algo.name={ALGO}", f"rollout.engine={ENGINE}", f"model.arch={ARCH}",
                                    f"train.output_dir={out_dir}", "train.val_every=0", "train.save_every=0"])
    trainer = build_trainer(cfg)
    try:
        assert isinstance(trainer.engine, WrappedHFEngine) and BUILT == [ARCH]
        before = [p.detach().clone() for c in trainer.model_chunks for p in c.parameters()]
        steps = []
        for step in (1, 2):
            trainer.step = step
            steps.append(rl_step(trainer))
        change = max(float((p.detach() - b).abs().max())
                     for p, b in zip((p for c in trainer.model_chunks for p in c.parameters()), before))
        # the engine holds what the trainer exports after step 2 (its weight sync went through the wrapper)
        exported = {n: t.clone() for n, t in export_hf_weights(trainer.model_chunks, trainer.adapter, dst="all",
                                                                dims=trainer.dims)}
        inner = trainer.engine.inner
        held = dict(inner.model.named_parameters(remove_duplicate=False))
        sync_err = max(float((held[inner.spec.engine_param_name(n)] - t).abs().max()) for n, t in exported.items())
        return {"steps": steps, "change": change, "calls": dict(trainer.engine.calls), "sync_err": sync_err,
                "weight_version": trainer.engine.weight_version}
    finally:
        teardown(trainer)


@pytest.fixture(scope="module")
def extension_run(tiny_model_dir, tmp_path_factory):
    from pathlib import Path

    from megatron_vppo.train.demo import warm_start
    from test_trainer_e2e import CONFIG, PIXELS, _write_data

    root = tmp_path_factory.mktemp("extension")
    clean, _, _ = _write_data(root / "data")
    # a little supervised warm start, so some answers are right and the advantages are not all zero
    model = warm_start(Path(tiny_model_dir), clean, root / "model_sft", steps=60, batch_size=8, lr=2e-3, seed=0)
    config = root / "run.yaml"
    config.write_text(CONFIG.format(model=model, train=clean, val="''", min_px=PIXELS[0], max_px=PIXELS[1], steps=2))
    return run_distributed(_worker, 1, str(config), str(root / "run"), timeout=600)[0]


def test_registered_algorithm_engine_and_model_run_two_trainer_steps(extension_run):
    steps = extension_run["steps"]
    assert len(steps) == 2
    for m in steps:
        assert 0.0 <= m["actor/cispo_clipped_frac"] <= 1.0  # the toy loss's own metric: it ran
        assert torch.isfinite(torch.tensor(m["actor/loss"]))
    assert extension_run["change"] > 0  # its gradient reached the weights
    calls = extension_run["calls"]
    assert calls["generate"] >= 2 and calls["update_weights"] == 3  # start + one sync per step
    assert extension_run["weight_version"] == 3
    assert extension_run["sync_err"] == 0.0  # the wrapped engine holds the trainer's step-2 weights
