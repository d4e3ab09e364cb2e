"""train/checkpointer.py: when a run saves (no process group, no model: the schedule alone)."""
from __future__ import annotations

from pathlib import Path

from megatron_vppo.config import RunConfig
from megatron_vppo.distributed import ParallelDims
from megatron_vppo.train.checkpointer import Checkpointer, checkpoint_dir


def test_schedule_saves_every_k_steps_and_at_the_last():
    cfg = RunConfig()
    cfg.train.output_dir, cfg.train.save_every, cfg.train.total_steps = "/tmp/run", 4, 10
    c = Checkpointer.from_config(cfg, ParallelDims.single())
    assert c.directory == Path("/tmp/run/checkpoints") == checkpoint_dir("/tmp/run")
    assert [s for s in range(1, 11) if c.due(s)] == [4, 8, 10]
    cfg.train.save_every = 0  # no schedule: the last step only
    assert [s for s in range(1, 11) if Checkpointer.from_config(cfg, ParallelDims.single()).due(s)] == [10]


def test_a_step_not_due_is_not_saved_and_a_saved_step_not_twice():
    cfg = RunConfig()
    cfg.train.save_every, cfg.train.total_steps = 5, 10

    class _Trainer:  # maybe_save must decide before touching the model
        step = 3

    c = Checkpointer.from_config(cfg, ParallelDims.single())
    assert c.maybe_save(_Trainer()) is None
    c.last_saved = _Trainer.step
    assert c.maybe_save(_Trainer(), force=True) is None
