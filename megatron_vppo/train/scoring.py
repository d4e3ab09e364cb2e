"""Per-token log-probs of given responses under the trainer's Megatron model (no grad).

What `tools/score.py` runs, and what the trainer calls to re-score rollouts (the consistency gate):
encoded samples -> `Trajectory`s -> padded (or, with a token budget, packed thd) micro-batches through
Megatron's pipeline schedule (`train.passes.dependency_pass` with the original view only), where the
last stage reduces the vocab-parallel logits to sampled-token log-probs (`algo.vocab_parallel`) — so
TP, PP and DP all work and nothing of vocabulary size leaves the last stage. Data parallel ranks score contiguous shards;
results come back in input order on every rank.
"""
from __future__ import annotations

from typing import Sequence

import torch

from megatron_vppo.distributed import ParallelDims, gather_data_parallel
from megatron_vppo.train.rl_batch import Trajectory, padded_length


def to_trajectory(sample: dict, group: int = 0) -> Trajectory:
    """A `VLProcessor.encode(problem, images, response)` result -> Trajectory."""
    start = int(sample["response_start"])
    if start < 1:
        raise ValueError("a sample needs at least one prompt token before its response")
    return Trajectory(
        group=group,
        input_ids=torch.as_tensor(sample["input_ids"], dtype=torch.long).reshape(-1),
        response_start=start,
        pixel_values=sample.get("pixel_values"),
        image_grid_thw=sample.get("image_grid_thw"),
    )


@torch.no_grad()
def score_trajectories(
    model_chunks,
    trajs: Sequence[Trajectory],
    *,
    vocab_size: int,
    pad_id: int,
    micro_batch_size: int = 1,
    temperature: float = 1.0,
    seq_len: int | None = None,
    shard_data: bool = True,
    max_tokens_per_micro_batch: int | None = None,
    dims: ParallelDims,
) -> list[torch.Tensor]:
    """log softmax(logits / temperature)[response token] for every response token of every trajectory.

    Collective over the model's ranks. `trajs` is the same list on every rank; with `shard_data`
    each data-parallel rank scores its contiguous shard and the results are gathered, so every rank
    returns the full list in input order (fp32 tensors, one value per response token). `seq_len`
    (default: the longest sample rounded up to a multiple of 8·TP) fixes the micro-batch length
    the pipeline needs. `max_tokens_per_micro_batch` packs the samples (thd, no padding) into
    micro-batches of at most that many tokens instead, data-parallel shards balanced by tokens.
    `dims`: this rank's layout (`init_distributed`'s result; `ParallelDims.single()` in one process)."""
    from megatron_vppo.train.passes import PassShape, data_parallel_shard, dependency_pass

    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size} must be >= 1")
    if not trajs:
        return []
    longest = max(int(t.input_ids.numel()) for t in trajs)
    if seq_len is None:
        seq_len = padded_length(trajs, dims.tp)
    elif seq_len < longest:
        raise ValueError(f"seq_len={seq_len} is shorter than the longest sample ({longest} tokens)")
    shape = PassShape(micro_batch_size=micro_batch_size, seq_len=seq_len, pad_id=pad_id,
                      vocab_size=vocab_size, temperature=temperature, max_tokens=max_tokens_per_micro_batch)
    rank, world = (dims.dp_rank, dims.dp) if shard_data else (0, 1)
    mine = [trajs[i] for i in data_parallel_shard(list(range(len(trajs))), list(trajs), max_tokens_per_micro_batch,
                                                  rank, world)]
    res = dependency_pass(dims, list(model_chunks), mine, shape, None)
    out = [r.old.float() for r in res[: len(mine)]]
    if shard_data and world > 1:
        out = gather_data_parallel(dims, out)
    return out


def score_samples(model_chunks, samples: Sequence[dict], *, vocab_size: int, pad_id: int,
                  micro_batch_size: int = 1, temperature: float = 1.0,
                  max_tokens_per_micro_batch: int | None = None, dims: ParallelDims) -> list[dict]:
    """Encoded samples -> [{"input_ids", "response_start", "log_probs"}] (lists; tools/score.py's
    output lines), in input order on every rank."""
    trajs = [to_trajectory(s, i) for i, s in enumerate(samples)]
    logps = score_trajectories(model_chunks, trajs, vocab_size=vocab_size, pad_id=pad_id,
                               micro_batch_size=micro_batch_size, temperature=temperature,
                               max_tokens_per_micro_batch=max_tokens_per_micro_batch, dims=dims)
    return [
        {"input_ids": t.input_ids.tolist(), "response_start": t.response_start, "log_probs": lp.tolist()}
        for t, lp in zip(trajs, logps)
    ]
