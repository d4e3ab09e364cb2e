"""The run's checkpoint directory and the decision when to save into it.

`Checkpointer` is made once by train/build.py (which also asks it for the checkpoint to resume from)
and used by the driver (train/run.py) after every step. Saving itself is the checkpoint/dist_checkpoint/ package.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron_vppo.distributed import ParallelDims

if TYPE_CHECKING:
    from megatron_vppo.config import RunConfig
    from megatron_vppo.train.loop import Trainer


def checkpoint_dir(output_dir) -> Path:
    """Where a run under `train.output_dir` keeps its step_NNNNNNN checkpoints."""
    return Path(output_dir) / "checkpoints"


@dataclass
class Checkpointer:
    """Owns `<train.output_dir>/checkpoints`: picks the checkpoint to resume from and saves every
    `save_every` steps (0: never on a schedule), at the last step, and whenever forced (the driver
    forces a save when a signal stops it between steps).

    Every checkpoint's meta.json records the model's structure (`checkpoint/model_structure.py`,
    compared before a resume loads it) and its parent: the checkpoint this line of training continued
    from (the one resumed from, then each save's predecessor; None for a fresh run's first)."""

    directory: Path
    save_every: int
    total_steps: int
    keep_last: int
    dims: ParallelDims  # this rank's layout, the ParallelDims from init_distributed (recorded in meta.json)
    config: dict = field(default_factory=dict, repr=False)  # snapshot recorded in meta.json
    last_saved: int | None = None
    structure: dict | None = None  # the configured model's, recorded in meta.json
    parent: str | None = None  # the checkpoint the next save continues from (its lineage)

    @classmethod
    def from_config(cls, cfg: "RunConfig", dims: ParallelDims) -> "Checkpointer":
        from megatron_vppo.config import to_dict

        from megatron_vppo.checkpoint.model_structure import model_structure

        t = cfg.train
        return cls(checkpoint_dir(t.output_dir), t.save_every, t.total_steps, t.keep_last, dims, to_dict(cfg),
                   structure=model_structure(cfg.model.path) if cfg.model.path and
                   (Path(cfg.model.path) / "config.json").is_file() else None)

    def due(self, step: int) -> bool:
        """A save is due after `step`: on the schedule or at the last step."""
        return (self.save_every > 0 and step % self.save_every == 0) or step == self.total_steps

    def select_resume(self, resume: str) -> Path | None:
        """`train.resume` -> the checkpoint to load (collective: verification hashes files on every rank)."""
        from megatron_vppo.checkpoint.dist_checkpoint import select_resume

        chosen = select_resume(resume, self.directory)
        self.parent = chosen.name if chosen is not None else None
        return chosen

    def maybe_save(self, trainer: "Trainer", *, force: bool = False) -> Path | None:
        """Save the trainer's state after its current step when due (or `force`); collective. Returns
        the checkpoint written, None when none was due. A step already saved is not saved twice."""
        step = trainer.step
        if not (force or self.due(step)) or self.last_saved == step:
            return None
        from megatron_vppo.checkpoint.dist_checkpoint import save_checkpoint
        from megatron_vppo.train.nonfinite import check_finite
        from megatron_vppo.distributed import force_param_sync

        force_param_sync(trainer.model_chunks)  # the saved weights must be the stepped ones on every DP shard
        check_finite(trainer.model_chunks, trainer.optimizer, what="checkpoint save", step=step)
        path = save_checkpoint(self.directory, step, trainer.model_chunks, trainer.optimizer, trainer.scheduler,
                               train_state=self.train_state(trainer), config=self.config,
                               keep_last=self.keep_last, dims=self.dims,
                               extra_meta={"model": self.structure, "parent": self.parent})
        self.last_saved, self.parent = step, path.name
        return path

    @staticmethod
    def train_state(trainer: "Trainer") -> dict[str, Any]:
        """What besides weights/optimizer/scheduler a resume needs: the data-loader position."""
        return {"data": trainer.train_batches.state_dict()}
