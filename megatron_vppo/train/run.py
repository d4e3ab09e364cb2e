"""The outer driver: build the run, step it to `train.total_steps`, validate, log, checkpoint, tear down.

Kept apart from train/loop.py (one step) and train/build.py (set-up), and importing both, so neither of
those imports the other.
"""
from __future__ import annotations

import logging
import time

import torch.distributed as dist

from megatron_vppo.config import RunConfig
from megatron_vppo.train.build import build_run, teardown
from megatron_vppo.train.loop import rl_step, validate

log = logging.getLogger("megatron_vppo.train")


def train(cfg: RunConfig) -> dict:
    """Run the configured number of steps; returns the last step's metrics."""
    from megatron_vppo.train.metrics_log import format_step_summary
    from megatron_vppo.train.progress import progress

    trainer, checkpointer = build_run(cfg)
    last: dict = {}
    total = cfg.train.total_steps
    try:
        if trainer.step == 0 and cfg.train.val_every > 0:
            last = validate(trainer)
            if trainer.logger:
                trainer.logger.log(0, last)
        bar = progress(total=total, desc="rl steps", unit="step", leave=True)
        bar.update(min(trainer.step, total))
        while trainer.step < total:
            trainer.step += 1
            t0 = time.perf_counter()
            metrics = rl_step(trainer)
            if cfg.train.val_every > 0 and (trainer.step % cfg.train.val_every == 0 or trainer.step == total):
                metrics.update(validate(trainer))
            metrics["time/step_s"] = time.perf_counter() - t0
            if trainer.logger:
                trainer.logger.log(trainer.step, metrics)
            if dist.get_rank() == 0:
                log.info(format_step_summary(trainer.step, total, metrics))
            bar.update(1)
            last = metrics
            checkpointer.maybe_save(trainer, force=trainer.step == total)
        bar.close()
    finally:
        teardown(trainer)
    return last
