"""Rollout side of one RL step: prompts -> engine samples -> rewards -> Trajectories on every rank.

Engines sit on every rank, independent of the training layout: one per `rollout.engine_tp` consecutive
ranks, its entry point on the first (`dims.engine_rank`), so world_size / engine_tp engines generate.
Each engine samples a contiguous share of the prompts (`shard(.., dims.engine_index, dims.num_engines)`);
rewards are graded where the text is; then every rank receives every group (token ids and scalars are
small: one all-gather over gloo, `all_gather_world`) and sorts them by prompt, so group statistics,
dynamic sampling and TAS are computed identically on all ranks — the reason results do not depend on
the layout. Sampling seeds come from (run seed, step, prompt index[, sample index]), never from which
engine sampled or what else was in its batch (engine.py `sample_seed`).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from megatron_vppo.distributed import ParallelDims, all_gather_world
from megatron_vppo.rollout.engine import RolloutRequest, SamplingParams
from megatron_vppo.train.records import Sample, SampledGroup
from megatron_vppo.train.rl_batch import Trajectory, shard


def derived_seed(*parts: int) -> int:
    h = hashlib.blake2b("/".join(str(int(p)) for p in parts).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") >> 1


@dataclass
class EncodedPrompt:
    """A dataset record after the processor: what the engine and the trainer both need.

    Token ids and grids are made on every rank (cheap); the pixels only on first access, once (every
    trajectory of the prompt shares this object): on the engine ranks that generate for the prompt
    and the first pipeline stage that embeds it — not on ranks that never look at an image."""
    prompt_ids: list[int]
    image_grid_thw: torch.Tensor | None
    answer: str
    index: int  # dataset row, for logs
    images: list | None = None  # the PIL images (pixels on demand; the `image` perturbation mode)
    processor: object = field(default=None, repr=False)
    _pixels: torch.Tensor | None = field(default=None, repr=False)

    @property
    def pixel_values(self) -> torch.Tensor | None:
        if self._pixels is None and self.images:
            self._pixels, grid = self.processor.process_images(self.images)
            if not torch.equal(grid, self.image_grid_thw):  # the geometry used for the tokens must hold
                raise RuntimeError(f"image processor grids {grid.tolist()} differ from the prompt's "
                                   f"{self.image_grid_thw.tolist()}")
        return self._pixels


def encode_prompts(processor, records: list[dict]) -> list[EncodedPrompt]:
    out = []
    for rec in records:
        enc = processor.encode(rec["problem"], rec["images"], pixels=False)
        out.append(EncodedPrompt(enc["input_ids"].tolist(), enc["image_grid_thw"], rec["answer"],
                                 int(rec.get("index", -1)), list(rec["images"] or []), processor))
    return out


def generate_and_grade(engine, tokenizer, grader, prompts: list[EncodedPrompt], ids: list[int], *, n: int,
                       sampling: SamplingParams, seed_parts: tuple[int, ...]) -> list[SampledGroup]:
    """`n` graded samples for each prompt in `ids`, one `SampledGroup` per prompt (its grader errors
    travel with it, so every rank sees the same totals)."""
    if not ids:
        return []
    reqs = [RolloutRequest(prompts[i].prompt_ids, prompts[i].pixel_values, prompts[i].image_grid_thw,
                           seed=derived_seed(*seed_parts, i), images=prompts[i].images or None)  # raw: vllm
            for i in ids]
    groups = []
    for i, samples in zip(ids, engine.generate(reqs, n, sampling)):
        texts = [tokenizer.decode(o.token_ids, skip_special_tokens=True) for o in samples]
        errors_before, timeouts_before = grader.errors, grader.timeouts
        rewards = grader.batch_score(texts, [prompts[i].answer] * len(samples))
        groups.append(SampledGroup(
            prompt=i, samples=[Sample(list(o.token_ids), list(o.log_probs), o.finish_reason, float(r))
                               for o, r in zip(samples, rewards)],
            grader_errors=grader.errors - errors_before,
            grader_error=grader.last_error if grader.errors > errors_before else None,
            grader_timeouts=grader.timeouts - timeouts_before,
            grader_timeout=grader.last_timeout if grader.timeouts > timeouts_before else None))
    return groups


def sample_groups(dims: ParallelDims, engine, tokenizer, grader, prompts: list[EncodedPrompt], *, n: int,
                  sampling: SamplingParams, seed_parts: tuple[int, ...]) -> list[SampledGroup]:
    """`generate_and_grade` with each engine taking its shard of the prompts; every rank gets all
    groups, in prompt order."""
    ids = shard(list(range(len(prompts))), dims.engine_index, dims.num_engines)
    mine = generate_and_grade(engine, tokenizer, grader, prompts, ids, n=n, sampling=sampling,
                              seed_parts=seed_parts) if dims.engine_rank else []
    return sorted(all_gather_world(mine), key=lambda g: g.prompt)


def grading_errors(groups: list[SampledGroup], max_rate: float, where: str) -> dict:
    """Grader failures (errors and timeouts) over these groups as metrics; GraderFailure when their share
    passes `max_rate`."""
    from megatron_vppo.reward.grade import check_error_rate

    errors = sum(g.grader_errors for g in groups)
    timeouts = sum(g.grader_timeouts for g in groups)
    graded = sum(len(g.samples) for g in groups)
    example = next((g.grader_error for g in groups if g.grader_error), None)
    timeout_example = next((g.grader_timeout for g in groups if g.grader_timeout), None)
    rate = check_error_rate(errors, graded, max_rate, where, example, timeouts, timeout_example)
    return {"reward/grader_errors": errors, "reward/grader_timeouts": timeouts, "reward/grader_error_rate": rate}


def to_trajectories(prompts: list[EncodedPrompt], groups: list[SampledGroup]) -> list[Trajectory]:
    trajs = []
    for g_index, g in enumerate(groups):
        p = prompts[g.prompt]
        for s in g.samples:
            ids = torch.tensor(p.prompt_ids + list(s.token_ids), dtype=torch.long)
            trajs.append(Trajectory(
                group=g_index, input_ids=ids, response_start=len(p.prompt_ids),
                pixel_source=p, image_grid_thw=p.image_grid_thw, reward=float(s.reward),
                rollout_log_probs=torch.tensor(s.log_probs, dtype=torch.float32),
                extra={"finish_reason": s.finish_reason, "prompt_index": p.index, "images": p.images},
            ))
    return trajs
