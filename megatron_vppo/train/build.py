"""Build a Trainer from a RunConfig: process groups, model (HF weights or resume), optimizer, engine,
data, logger. Kept apart from loop.py so the loop reads top to bottom without set-up noise."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_vppo.config import RunConfig, to_dict
from megatron_vppo.train.loop import Trainer, sync_engine_weights
from megatron_vppo.train.rollout_step import encode_prompts, is_engine_rank

log = logging.getLogger("megatron_vppo.train")


def _ckpt_dir(cfg: RunConfig) -> Path:
    return Path(cfg.train.output_dir) / "checkpoints"


def _optimizer_steps(cfg: RunConfig) -> int:
    per_step = -(-cfg.train.prompts_per_step // cfg.train.mini_batch_prompts) * cfg.train.ppo_epochs
    return max(1, per_step * cfg.train.total_steps)


def build_trainer(cfg: RunConfig) -> Trainer:
    from megatron_vppo.checkpoint.dist_checkpoint import load_checkpoint, resolve_resume
    from megatron_vppo.checkpoint.hf_load import load_hf_weights
    from megatron_vppo.data.dataset import PromptBatches, PromptDataset
    from megatron_vppo.data.processor import VLProcessor
    from megatron_vppo.distributed import init_distributed
    from megatron_vppo.models.qwen2_5_vl.config import load_hf_config, text_arch
    from megatron_vppo.models.qwen2_5_vl.model import build_model_chunks
    from megatron_vppo.models.qwen2_5_vl.weights import Qwen25VLWeights
    from megatron_vppo.reward.grade import Grader
    from megatron_vppo.train.metrics_log import MetricsLogger
    from megatron_vppo.train.optimizer import attach_to_model_config, build_optimizer

    model_dir = Path(cfg.model.path)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"model.path={cfg.model.path!r} has no config.json; point it at an HF Qwen2.5-VL directory "
            f"(tools/convert_checkpoint.py mcore-to-hf turns a Megatron checkpoint into one)")
    for key in ("train",):
        if not getattr(cfg.data, key):
            raise ValueError(f"data.{key} is empty; set it to a parquet/jsonl/arrow file or saved dataset dir")
    hf_config = load_hf_config(model_dir)
    arch = text_arch(hf_config)
    vision_heads = (hf_config.get("vision_config") or {}).get("num_heads")
    init_distributed(cfg.parallel, num_attention_heads=arch.num_attention_heads,
                     num_query_groups=arch.num_key_value_heads, num_layers=arch.num_layers,
                     vision_num_heads=vision_heads, seed=cfg.train.seed)

    processor = VLProcessor.from_pretrained(model_dir, min_pixels=cfg.data.min_pixels,
                                            max_pixels=cfg.data.max_pixels)
    chunks = build_model_chunks(hf_config, cfg.model, cfg.parallel)
    tp = ps.get_tensor_model_parallel_world_size()
    adapter = Qwen25VLWeights(hf_config, tp, cfg.model.vocab_pad_multiple)
    load_hf_weights(chunks, model_dir, adapter)
    for chunk in chunks:
        # J's denominator is the global valid-token count: Megatron divides summed grads by it.
        chunk.config.calculate_per_token_loss = True
    ddp_chunks, optimizer, scheduler = build_optimizer(chunks, cfg.optim, cfg.model.dtype, _optimizer_steps(cfg))
    attach_to_model_config(ddp_chunks, optimizer)

    def count_tokens(problem, images):
        return int(processor.encode(problem, images)["input_ids"].numel())

    train_ds = PromptDataset(cfg.data.train, count_prompt_tokens=count_tokens,
                             max_prompt_length=cfg.rollout.max_prompt_length if cfg.data.filter_overlong_prompts else None)
    batches = PromptBatches(train_ds, cfg.train.prompts_per_step, seed=cfg.train.seed, shuffle=cfg.data.shuffle)
    val_prompts = []
    if cfg.data.val:
        val_ds = PromptDataset(cfg.data.val)
        val_prompts = encode_prompts(processor, [r for r in (val_ds.get(i)[0] for i in range(len(val_ds))) if r])

    trainer = Trainer(cfg=cfg, processor=processor, model_chunks=ddp_chunks, optimizer=optimizer,
                      scheduler=scheduler, engine=None, grader=Grader(), train_batches=batches,
                      val_prompts=val_prompts, hf_config=hf_config, adapter=adapter,
                      vocab_size=arch.vocab_size)

    resume = resolve_resume(cfg.train.resume, _ckpt_dir(cfg))
    if resume is not None:
        loaded = load_checkpoint(resume, ddp_chunks, optimizer, scheduler)
        trainer.step = loaded.step
        if "data" in loaded.train_state:
            batches.load_state_dict(loaded.train_state["data"])
        log.info("resumed from %s at step %d", resume, trainer.step)

    if is_engine_rank():
        from megatron_vppo.rollout.hf_engine import HFRolloutEngine

        if cfg.rollout.engine == "sglang":
            from megatron_vppo.rollout.sglang_engine import SGLangRolloutEngine

            trainer.engine = SGLangRolloutEngine.from_config(cfg, str(model_dir))
        else:
            trainer.engine = HFRolloutEngine.from_pretrained(model_dir)
    sync_engine_weights(trainer)  # the engine starts from the trainer's weights (resume included)

    rank = dist.get_rank()
    trainer.logger = MetricsLogger(cfg.train.output_dir, rank, resume_step=trainer.step if resume else None)
    if rank == 0:
        Path(cfg.train.output_dir).mkdir(parents=True, exist_ok=True)
    return trainer


def maybe_save(trainer: Trainer, force: bool = False) -> None:
    from megatron_vppo.checkpoint.dist_checkpoint import save_checkpoint

    cfg = trainer.cfg
    due = cfg.train.save_every > 0 and trainer.step % cfg.train.save_every == 0
    if not (due or force or trainer.step == cfg.train.total_steps):
        return
    save_checkpoint(_ckpt_dir(cfg), trainer.step, trainer.model_chunks, trainer.optimizer, trainer.scheduler,
                    train_state={"data": trainer.train_batches.state_dict()}, config=to_dict(cfg),
                    keep_last=cfg.train.keep_last)


def teardown(trainer: Trainer) -> None:
    if trainer.logger is not None:
        trainer.logger.close()
        if dist.get_rank() == 0:
            from megatron_vppo.train.metrics_log import plot_metrics

            path = Path(trainer.cfg.train.output_dir) / "metrics.jsonl"
            if path.exists():
                try:
                    plot_metrics(path, Path(trainer.cfg.train.output_dir) / "metrics.png")
                except Exception as e:  # a plot must never fail a finished run
                    log.warning("could not plot metrics: %s", e)
    trainer.grader.close()


__all__ = ["build_trainer", "maybe_save", "teardown", "torch"]
