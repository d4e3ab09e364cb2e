"""Build a Trainer from a RunConfig: process groups, model (HF weights or resume), optimizer, engine,
data, logger. Kept apart from loop.py so the loop reads top to bottom without set-up noise."""
from __future__ import annotations

import logging
import os
import socket
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from megatron_vppo.config import RunConfig
from megatron_vppo.data.dataset import DataError
from megatron_vppo.distributed import ParallelDims, cpu_world_group
from megatron_vppo.rollout import ENGINES
from megatron_vppo.train.engine_sync import sync_engine_weights
from megatron_vppo.train.checkpointer import Checkpointer
from megatron_vppo.train.loop import Trainer
from megatron_vppo.train.rollout_step import encode_prompts
from megatron_vppo.train.startup import StartPlan, check_paths, check_structure, start_run

log = logging.getLogger("megatron_vppo.train")


def _optimizer_steps(cfg: RunConfig) -> int:
    per_step = -(-cfg.train.prompts_per_step // cfg.train.mini_batch_prompts) * cfg.train.ppo_epochs
    return max(1, per_step * cfg.train.total_steps)


def _single_process_rendezvous() -> None:
    """Outside torchrun (one process, no WORLD_SIZE), rendezvous on a free local port instead of the
    fixed default, so two single-process runs on one machine do not collide."""
    if "WORLD_SIZE" in os.environ or "MASTER_PORT" in os.environ:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def build_engine(cfg: RunConfig, model_dir: Path, dims: ParallelDims):
    """This rank's part of its rollout engine, or None (collective: call it on every rank).

    One registry lookup: `rollout.ENGINES[rollout.engine].from_config` builds it (each engine module
    says where its parts live and what they need)."""
    return ENGINES[cfg.rollout.engine].from_config(cfg, model_dir, dims)


@dataclass
class Policy:
    """The trained model as every pass sees it: DDP-wrapped chunks with their optimizer."""
    model_chunks: list
    optimizer: object
    scheduler: object
    adapter: object
    hf_config: dict
    arch: object
    dims: ParallelDims  # this rank's place in the layout, made once here


def build_policy(cfg: RunConfig, model_dir, total_steps: int | None = None, *,
                 overlap: bool | None = None) -> Policy:
    """Process groups, this rank's model chunks with the HF weights, DDP + Megatron Adam + LR schedule
    hooked into Megatron's schedules. The trainer, the benchmarks and the tests all build it here.
    `overlap`: DDP communication overlap (None: on with CUDA, as the trainer runs; tests force it)."""
    from megatron_vppo.checkpoint.hf_load import load_hf_weights
    from megatron_vppo.distributed import init_distributed, with_engines
    from megatron_vppo.models import MODELS, check_hf_config
    from megatron_vppo.rollout import engine_tp_for
    from megatron_vppo.train.optimizer import attach_to_model_config, build_optimizer

    spec = MODELS[cfg.model.arch]
    hf_config = spec.load_hf_config(model_dir)
    check_hf_config(spec, hf_config, f"model.path {model_dir}")
    arch = spec.text_arch(hf_config)
    dims = init_distributed(cfg.parallel, **spec.layout_dims(hf_config), seed=cfg.train.seed)
    # The rollout placement, independent of the training layout: an engine per engine_tp ranks.
    dims = with_engines(dims, engine_tp_for(cfg.rollout.engine, cfg.rollout.engine_tp, dims.tp))
    # no random init: load_hf_weights writes every parameter (it refuses a chunk it cannot fill)
    chunks = spec.build_chunks(hf_config, cfg.model, cfg.parallel, dims, init_weights=False)
    adapter = spec.weight_adapter(hf_config, dims.tp, cfg.model.vocab_pad_multiple)
    load_hf_weights(chunks, model_dir, adapter, dims=dims)
    for chunk in chunks:
        # J's denominator is the global valid-token count: Megatron divides summed grads by it.
        chunk.config.calculate_per_token_loss = True
    steps = _optimizer_steps(cfg) if total_steps is None else total_steps
    ddp_chunks, optimizer, scheduler = build_optimizer(chunks, cfg.optim, cfg.model.dtype, steps, overlap=overlap)
    attach_to_model_config(ddp_chunks, optimizer)
    return Policy(ddp_chunks, optimizer, scheduler, adapter, hf_config, arch, dims)


def build_trainer(cfg: RunConfig) -> Trainer:
    """`build_run` without the checkpointer (benchmarks and tests that step the trainer themselves)."""
    return build_run(cfg)[0]


def build_run(cfg: RunConfig, start: StartPlan | None = None) -> tuple[Trainer, Checkpointer]:
    """Everything a run needs: the trainer (resumed from the newest checkpoint that verifies, when
    `train.resume` asks for it) with its engine in sync, and the checkpointer that saves it. `start`:
    what `start_run` (train/startup.py) returned (run here when None: every check that needs no model)."""
    from megatron_vppo.checkpoint.dist_checkpoint import load_checkpoint, read_meta
    from megatron_vppo.data.dataset import PromptBatches, PromptDataset
    from megatron_vppo.data.processor import VLProcessor
    from megatron_vppo.reward.grade import Grader
    from megatron_vppo.train.metrics_log import MetricsLogger
    from megatron_vppo.train.resume import check_resume_config

    start = start if start is not None else start_run(cfg)
    if start.complete is not None:
        raise ValueError(f"{cfg.train.output_dir}: the run is complete ({start.complete.name}); nothing to build")
    model_dir = start.model_dir
    _single_process_rendezvous()
    policy = build_policy(cfg, model_dir)
    ddp_chunks, optimizer, scheduler = policy.model_chunks, policy.optimizer, policy.scheduler
    hf_config, adapter, arch = policy.hf_config, policy.adapter, policy.arch
    processor = VLProcessor.from_pretrained(model_dir, min_pixels=cfg.data.min_pixels,
                                            max_pixels=cfg.data.max_pixels)

    def count_tokens(problem, images):
        return int(processor.encode(problem, images)["input_ids"].numel())

    keys = {"problem_key": cfg.data.problem_key, "images_key": cfg.data.images_key, "answer_key": cfg.data.answer_key}
    train_ds = PromptDataset(cfg.data.train, count_prompt_tokens=count_tokens, **keys,
                             max_prompt_length=cfg.rollout.max_prompt_length if cfg.data.filter_overlong_prompts else None)
    batches = PromptBatches(train_ds, cfg.train.prompts_per_step, seed=cfg.train.seed, shuffle=cfg.data.shuffle)
    val_prompts = []
    if cfg.data.val:
        val_ds = PromptDataset(cfg.data.val, **keys)
        rows = [val_ds.get(i) for i in range(len(val_ds))]
        skipped = Counter(reason for rec, reason in rows if rec is None)
        if skipped:
            log.warning("data.val %s: skipped %d bad row(s) %s", cfg.data.val, sum(skipped.values()), dict(skipped))
        if len(rows) == sum(skipped.values()):
            raise DataError(f"data.val {cfg.data.val}: no usable rows (skipped {dict(skipped)}); fix the file, "
                            f"or set data.val='' to train without validation")
        val_prompts = encode_prompts(processor, [rec for rec, _ in rows if rec is not None])

    grader = Grader(cfg.reward.method, cfg.reward.timeout_s, extraction=cfg.reward.extraction)
    trainer = Trainer(cfg=cfg, processor=processor, model_chunks=ddp_chunks, optimizer=optimizer,
                      scheduler=scheduler, engine=None, grader=grader, train_batches=batches,
                      val_prompts=val_prompts, hf_config=hf_config, adapter=adapter,
                      vocab_size=arch.vocab_size, dims=policy.dims)

    # The newest checkpoint that verifies (checksums), newer ones that do not are skipped and logged.
    checkpointer = Checkpointer.from_config(cfg, policy.dims)
    resume = checkpointer.select_resume(cfg.train.resume)
    if resume is not None:
        check_structure(resume, model_dir)  # select_resume may have walked back past the start-up's candidate
        check_resume_config(read_meta(resume).get("config"), cfg, resume, dist.get_rank())
        # Weights, optimizer, scheduler and RNG states from the checkpoint; the step and the data
        # position from its train_state, so the next batch is the one the stopped run would have drawn.
        loaded = load_checkpoint(resume, ddp_chunks, optimizer, scheduler, verify=False,
                                 load_optimizer=cfg.train.load_optimizer, dims=policy.dims)
        trainer.step = loaded.step
        if "data" in loaded.train_state and cfg.data.resume_position:
            batches.load_state_dict(loaded.train_state["data"])
        else:
            log.warning("%s: the data order restarts from the beginning (%s)", resume,
                        "data.resume_position=false" if cfg.data.resume_position is False else "no data position saved")
        # Bad rows already met (and logged) before the checkpoint are not news after it.
        trainer.state["data_log"] = {"epoch": batches.epoch, "skipped": dict(batches.pass_stats.skipped)}
        log.info("resumed from %s at step %d (optimizer %s, rng %s)", resume, trainer.step,
                 "restored" if loaded.optimizer_loaded else "fresh",
                 "restored" if loaded.rng_restored else "fresh")

    group = cpu_world_group()  # created now, on every rank: idle ranks wait for rollouts on it
    trainer.engine = build_engine(cfg, model_dir, policy.dims)
    dist.barrier(group=group)  # an engine start takes minutes: the other ranks wait in gloo, not NCCL
    # the engine starts from the trainer's weights (resume included)
    sync_engine_weights(ddp_chunks, adapter, trainer.engine, engine_cls=ENGINES[cfg.rollout.engine],
                        bucket_bytes=cfg.rollout.bucket_bytes, dims=policy.dims, step=trainer.step)

    rank = dist.get_rank()
    trainer.logger = MetricsLogger(cfg.train.output_dir, rank, resume_step=trainer.step if resume else None)
    if rank == 0:
        Path(cfg.train.output_dir).mkdir(parents=True, exist_ok=True)
    return trainer, checkpointer


def teardown(trainer: Trainer) -> None:
    """Close the logger (rank 0 plots the run), the grader and the engine, then the process groups."""
    from megatron_vppo.distributed import destroy_distributed
    from megatron_vppo.train.startup import end_run

    if trainer.logger is not None:
        trainer.logger.close()
        if dist.get_rank() == 0:
            from megatron_vppo.train.metrics_log import plot_metrics

            path = Path(trainer.cfg.train.output_dir) / "metrics.jsonl"
            if path.exists():
                try:
                    from megatron_vppo.algo.registry import get_algorithm

                    plot_metrics(path, Path(trainer.cfg.train.output_dir) / "metrics.png",
                                 extra_panels=get_algorithm(trainer.cfg.algo.name).panels)
                except Exception as e:  # a plot must never fail a finished run
                    log.warning("could not plot metrics: %s", e)
    trainer.grader.close()
    if trainer.engine is not None:
        trainer.engine.shutdown()
    destroy_distributed()
    end_run(trainer.cfg)


__all__ = ["build_engine", "build_run", "build_trainer", "check_paths", "teardown"]
