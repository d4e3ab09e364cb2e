"""The outer driver: build the run, step it to `train.total_steps`, validate, log, checkpoint, tear down.

Kept apart from train/loop.py (one step) and train/build.py (set-up), and importing both, so neither of
those imports the other.

Signals. SIGINT / SIGTERM between steps (or during one) let the step finish; then the ranks agree, the
run saves a checkpoint and stops with `RunInterrupted` (exit 130 / 143 from the CLI). A second signal
stops at once, without a save. During a save, the save's own handler holds them
(`checkpoint/dist_checkpoint/signals.py`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import time

import torch.distributed as dist

from megatron_vppo.config import RunConfig
from megatron_vppo.distributed import all_gather_world
from megatron_vppo.errors import SignalStop
from megatron_vppo.stop_signals import on_stop_signals
from megatron_vppo.train.build import build_run, teardown
from megatron_vppo.train.loop import rl_step, validate
from megatron_vppo.train.startup import end_run, start_run

log = logging.getLogger("megatron_vppo.train")


class RunInterrupted(SignalStop):
    """A signal stopped the run between steps; `message` says what was saved."""


@contextlib.contextmanager
def stop_between_steps():
    """SIGINT / SIGTERM -> a stop request recorded in the yielded box (main thread only); a second one
    raises RunInterrupted at once."""
    box: dict = {"signum": None, "step": None}

    def request(signum):
        name = signal.Signals(signum).name
        if box["signum"] is not None:
            raise RunInterrupted(signum, f"second {name}: stopped at once, during step {box['step']}; nothing "
                                         f"saved since the last checkpoint. Continue with train.resume=auto")
        box["signum"] = signum
        os.write(2, f"{name} received: finishing step {box['step']}, then saving a checkpoint and stopping "
                    f"(send it again to stop at once)\n".encode())

    with on_stop_signals(request):
        yield box


def train(cfg: RunConfig) -> dict:
    """Run the configured number of steps; returns the last step's metrics."""
    try:
        start = start_run(cfg)  # every check that needs no model; locks train.output_dir
        if start.complete is not None:
            end_run(cfg)
            return {}
        trainer, checkpointer = build_run(cfg, start)
    except BaseException:
        end_run(cfg)
        raise
    try:
        return _steps(cfg, trainer, checkpointer)
    finally:
        teardown(trainer)


def _steps(cfg: RunConfig, trainer, checkpointer) -> dict:
    from megatron_vppo.train.metrics_log import format_step_summary
    from megatron_vppo.train.progress import progress

    last: dict = {}
    total = cfg.train.total_steps
    with stop_between_steps() as stop:
        stop["step"] = trainer.step + 1
        if trainer.step == 0 and cfg.train.val_every > 0:
            last = validate(trainer)
            if trainer.logger:
                trainer.logger.log(0, last)
        if trainer.step >= total and dist.get_rank() == 0:
            log.warning("resumed at step %d: the run is already complete (train.total_steps=%d); nothing to train. "
                        "To train further, raise train.total_steps", trainer.step, total)
        bar = progress(total=total, desc="rl steps", unit="step", leave=True)
        bar.update(min(trainer.step, total))
        while trainer.step < total:
            trainer.step += 1
            stop["step"] = trainer.step
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
            # one rank's signal stops them all, after this step
            signums = [s for s in all_gather_world([stop["signum"]]) if s is not None]
            path = checkpointer.maybe_save(trainer, force=trainer.step == total or bool(signums))
            if signums and trainer.step < total:
                signum = signums[0]
                where = path or checkpointer.directory / f"step_{trainer.step:07d}"
                raise RunInterrupted(signum, f"{signal.Signals(signum).name}: stopped after step {trainer.step} "
                                             f"of {total}, saved {where}. Continue with train.resume=auto")
        bar.close()
    return last
