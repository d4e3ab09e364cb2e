"""Rollout side of one RL step: prompts -> engine samples -> rewards -> Trajectories on every rank.

One engine per data-parallel replica lives on the replica's first model-parallel rank (`is_engine_rank`).
Each replica samples its share of the prompts; rewards are graded where the text is; then every rank
receives every trajectory (token ids and scalars are small), so group statistics, dynamic sampling
and TAS are computed identically on all ranks — the reason results do not depend on the layout.
Sampling seeds come from (run seed, step, prompt index), never from which rank sampled.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

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
    """A dataset record after the processor: what the engine and the trainer both need."""
    prompt_ids: list[int]
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    answer: str
    index: int  # dataset row, for logs
    images: list | None = None  # the PIL images, for the `image` perturbation mode


def encode_prompts(processor, records: list[dict]) -> list[EncodedPrompt]:
    out = []
    for rec in records:
        enc = processor.encode(rec["problem"], rec["images"])
        out.append(EncodedPrompt(enc["input_ids"].tolist(), enc["pixel_values"], enc["image_grid_thw"],
                                 rec["answer"], int(rec.get("index", -1)), list(rec["images"] or [])))
    return out


def all_gather_world(items: list) -> list:
    """Every rank's list, concatenated in rank order (non-engine ranks contribute [])."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return items
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [x for p in parts for x in p]


def generate_and_grade(engine, tokenizer, grader, prompts: list[EncodedPrompt], ids: list[int], *, n: int,
                       sampling: SamplingParams, seed_parts: tuple[int, ...]) -> list[dict]:
    """`n` graded samples for each prompt in `ids`:
    [{"prompt": i, "outputs": [(token_ids, log_probs, finish_reason, reward), ...]}, ...]."""
    if not ids:
        return []
    reqs = [RolloutRequest(prompts[i].prompt_ids, prompts[i].pixel_values, prompts[i].image_grid_thw,
                           seed=derived_seed(*seed_parts, i), images=prompts[i].images or None)  # raw: vllm
            for i in ids]
    groups = []
    for i, samples in zip(ids, engine.generate(reqs, n, sampling)):
        texts = [tokenizer.decode(o.token_ids, skip_special_tokens=True) for o in samples]
        rewards = grader.batch_score(texts, [prompts[i].answer] * len(samples))
        groups.append({"prompt": i, "outputs": [(o.token_ids, o.log_probs, o.finish_reason, r)
                                                for o, r in zip(samples, rewards)]})
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


def to_trajectories(prompts: list[EncodedPrompt], groups: list[dict]) -> list[Trajectory]:
    trajs = []
    for g_index, g in enumerate(groups):
        p = prompts[g["prompt"]]
        for token_ids, log_probs, finish, reward in g["outputs"]:
            ids = torch.tensor(p.prompt_ids + list(token_ids), dtype=torch.long)
            trajs.append(Trajectory(
                group=g_index, input_ids=ids, response_start=len(p.prompt_ids),
                pixel_values=p.pixel_values, image_grid_thw=p.image_grid_thw, reward=float(reward),
                rollout_log_probs=torch.tensor(log_probs, dtype=torch.float32),
                extra={"finish_reason": finish, "prompt_index": p.index, "images": p.images},
            ))
    return trajs
