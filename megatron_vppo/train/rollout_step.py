"""Rollout side of one RL step: prompts -> engine samples -> rewards -> Trajectories on every rank.

One engine per data-parallel replica lives on the replica's first model-parallel rank (`is_engine_rank`).
Each replica samples its share of the prompts; rewards are graded where the text is; then every rank
receives every trajectory (token ids and scalars are small), so group statistics, dynamic sampling
and TAS are computed identically on all ranks — the reason results do not depend on the layout.
Sampling seeds come from (run seed, step, prompt index), never from which rank sampled.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_vppo.rollout.engine import RolloutRequest, SamplingParams
from megatron_vppo.train.rl_batch import Trajectory, shard


def is_engine_rank() -> bool:
    return ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0


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


_CPU_GROUP: list = []


def cpu_world_group():
    """A gloo group over every rank (None when the default group is gloo already). Ranks with no
    engine wait here while the engine ranks generate — for minutes — in a socket wait, not in an
    NCCL collective that spins on the GPU and runs into NCCL's timeout. Created collectively on first
    use: call it once on every rank at start-up (train/build.py does)."""
    if not _CPU_GROUP or _CPU_GROUP[0][0] is not dist.group.WORLD:
        from megatron_vppo.rollout.sglang_weights import GLOO_TIMEOUT

        group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=GLOO_TIMEOUT)
        _CPU_GROUP[:] = [(dist.group.WORLD, group)]
    return _CPU_GROUP[0][1]


def all_gather_world(items: list) -> list:
    """Every rank's list, concatenated in rank order (non-engine ranks contribute []); over gloo."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return items
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items, group=cpu_world_group())
    return [x for p in parts for x in p]


def generate_and_grade(engine, tokenizer, grader, prompts: list[EncodedPrompt], ids: list[int], *, n: int,
                       sampling: SamplingParams, seed_parts: tuple[int, ...]) -> list[dict]:
    """`n` graded samples for each prompt in `ids`:
    [{"prompt": i, "outputs": [(token_ids, log_probs, finish_reason, reward), ...], "grader_errors": e,
      "grader_error": an error's text or None}, ...] — the error counts travel with the groups, so
    every rank sees the same totals."""
    if not ids:
        return []
    reqs = [RolloutRequest(prompts[i].prompt_ids, prompts[i].pixel_values, prompts[i].image_grid_thw,
                           seed=derived_seed(*seed_parts, i), images=prompts[i].images or None)  # raw: vllm
            for i in ids]
    groups = []
    for i, samples in zip(ids, engine.generate(reqs, n, sampling)):
        texts = [tokenizer.decode(o.token_ids, skip_special_tokens=True) for o in samples]
        errors_before = grader.errors
        rewards = grader.batch_score(texts, [prompts[i].answer] * len(samples))
        groups.append({"prompt": i, "outputs": [(o.token_ids, o.log_probs, o.finish_reason, r)
                                                for o, r in zip(samples, rewards)],
                       "grader_errors": grader.errors - errors_before,
                       "grader_error": grader.last_error if grader.errors > errors_before else None})
    return groups


def sample_groups(engine, tokenizer, grader, prompts: list[EncodedPrompt], *, n: int,
                  sampling: SamplingParams, seed_parts: tuple[int, ...]) -> list[dict]:
    """`generate_and_grade` with each data-parallel replica's engine taking its shard of the prompts;
    every rank gets all groups, in prompt order."""
    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    ids = shard(list(range(len(prompts))), dp_rank, dp)
    mine = generate_and_grade(engine, tokenizer, grader, prompts, ids, n=n, sampling=sampling,
                              seed_parts=seed_parts) if is_engine_rank() else []
    return sorted(all_gather_world(mine), key=lambda g: g["prompt"])


def grading_errors(groups: list[dict], max_rate: float, where: str) -> dict:
    """Grader exceptions over these groups as metrics; GraderFailure when their share passes `max_rate`."""
    from megatron_vppo.reward.grade import check_error_rate

    errors = sum(g.get("grader_errors", 0) for g in groups)
    graded = sum(len(g["outputs"]) for g in groups)
    example = next((g["grader_error"] for g in groups if g.get("grader_error")), None)
    rate = check_error_rate(errors, graded, max_rate, where, example)
    return {"reward/grader_errors": errors, "reward/grader_error_rate": rate}


def to_trajectories(prompts: list[EncodedPrompt], groups: list[dict]) -> list[Trajectory]:
    trajs = []
    for g_index, g in enumerate(groups):
        p = prompts[g["prompt"]]
        for token_ids, log_probs, finish, reward in g["outputs"]:
            ids = torch.tensor(p.prompt_ids + list(token_ids), dtype=torch.long)
            trajs.append(Trajectory(
                group=g_index, input_ids=ids, response_start=len(p.prompt_ids),
                pixel_source=p, image_grid_thw=p.image_grid_thw, reward=float(reward),
                rollout_log_probs=torch.tensor(log_probs, dtype=torch.float32),
                extra={"finish_reason": finish, "prompt_index": p.index, "images": p.images},
            ))
    return trajs
