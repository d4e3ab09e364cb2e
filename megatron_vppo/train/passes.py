"""The two trainer-side passes of one RL step, run through Megatron's pipeline schedule.

* `dependency_pass` (no grad): every micro-batch carries the original AND the perturbed view of the
  same trajectories side by side, so the first stage runs the vision tower on both and the last stage
  reduces both vocab-parallel logit sets to per-token old_logp, aug_logp (and the exact KL) at once —
  one schedule, one flush; nothing of vocabulary size leaves the last stage.
* `policy_update_pass` (grad): the masked dual-clip loss. The loss function returns the *numerator*
  of J and the local valid-token count; with `calculate_per_token_loss` Megatron sums gradients over
  micro-batches and data-parallel ranks and divides by the all-reduced count in
  `finalize_model_grads`, so the gradient is exactly that of J on the whole mini-batch.

Both take this data-parallel rank's trajectories and return per-trajectory results in the same order,
on every rank (broadcast from the last pipeline stage).

Micro-batches are padded ([micro_batch_size, seq_len]) or, with a token budget (`PassShape.max_tokens`,
the run's `train.max_tokens_per_micro_batch`), packed thd sequences formed first-fit decreasing
(`rl_batch.pack_by_tokens`); both views of a trajectory stay in the same micro-batch either way. The
number of micro-batches is all-reduced (max) over the data-parallel group and topped up with empty
ones, so every rank runs the same schedule and reaches the gradient all-reduce together.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_vppo.algo.loss import vppo_policy_loss
from megatron_vppo.algo.vocab_parallel import vocab_parallel_entropy, vocab_parallel_kl, vocab_parallel_log_prob
from megatron_vppo.train.rl_batch import (
    SEQ_MULTIPLE,
    MicroBatch,
    Trajectory,
    chunks,
    collate,
    collate_packed,
    ensure_positions,
    pack_by_tokens,
    round_up,
    shard,
    shard_by_tokens,
    stack_views,
)


@dataclass(frozen=True)
class PassShape:
    """Micro-batch geometry. Padded: [micro_batch_size, seq_len] (Megatron's pipeline p2p needs one
    tensor shape per schedule). Packed (`max_tokens` set): trajectories packed up to `max_tokens` tokens
    per view, each micro-batch one thd sequence (under pipeline parallelism all of one pass the same
    length)."""
    micro_batch_size: int
    seq_len: int
    pad_id: int
    vocab_size: int  # true vocabulary; padded logit columns are masked
    temperature: float = 1.0
    max_tokens: int | None = None  # token budget per micro-batch (per view): packed thd micro-batches


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def _dp_max(n: int, device) -> int:
    """The largest `n` over the data-parallel group (every rank must run as many micro-batches)."""
    if ps.get_data_parallel_world_size() == 1:
        return n
    t = torch.tensor([n], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ps.get_data_parallel_group())
    return int(t.item())


def micro_batch_groups(trajs: list[Trajectory], shape: PassShape, multiple_of: int = 1,
                       device="cpu") -> list[list[int]]:
    """Indices of `trajs` per micro-batch: chunks of micro_batch_size, or first-fit-decreasing bins of
    `max_tokens`. At least one; topped up with empty groups to the data-parallel maximum and then to
    a multiple of `multiple_of` (the interleaved schedule needs a multiple of the pipeline size)."""
    idx = list(range(len(trajs)))
    if shape.max_tokens is None:
        groups = chunks(idx, shape.micro_batch_size)
    else:
        groups = pack_by_tokens([t.num_tokens for t in trajs], shape.max_tokens)
    groups = groups or [[]]
    groups += [[]] * (_dp_max(len(groups), device) - len(groups))
    groups += [[]] * (-len(groups) % multiple_of)
    return groups


def _micro_batches(model_chunks, trajs: list[Trajectory], shape: PassShape, views=None,
                   multiple_of: int = 1) -> tuple[list[MicroBatch], list[list[int]]]:
    """The pass's micro-batches (and the trajectory indices of each). Empty groups become all-filler
    micro-batches that contribute nothing."""
    model = _unwrap(model_chunks[0])
    ensure_positions(trajs, model.arch)  # once per trajectory per step: the trajectories carry them
    groups = micro_batch_groups(trajs, shape, multiple_of, next(model_chunks[0].parameters()).device)
    tp = ps.get_tensor_model_parallel_world_size()
    lengths = [round_up(max(sum(trajs[i].num_tokens for i in g), 1), SEQ_MULTIPLE * tp) for g in groups]
    if ps.get_pipeline_model_parallel_world_size() > 1:  # p2p between stages needs one shape per schedule
        lengths = [max(lengths)] * len(groups)
    # Only a chunk with the vision tower (first stage) reads pixels: other stages never process or move them.
    with_pixels = any(getattr(_unwrap(m), "vision_model", None) is not None for m in model_chunks)
    out = []
    for idx, length in zip(groups, lengths):
        part = [trajs[i] for i in idx]

        def make(override=None):
            if shape.max_tokens is None:
                return collate(part, rows=shape.micro_batch_size, seq_len=shape.seq_len, pad_id=shape.pad_id,
                               pixel_values_override=override, with_pixels=with_pixels)
            return collate_packed(part, seq_len=length, pad_id=shape.pad_id, pixel_values_override=override,
                                  with_pixels=with_pixels)

        mb = make()
        if views is not None:
            mb = stack_views(mb, make([views[i] for i in idx]))
        out.append(mb)
    return out, groups


def _forward_step(loss_fn, data_iterator, model):
    # Micro-batches are collated on the host; the model (and so the loss) lives on the accelerator.
    mb: MicroBatch = next(data_iterator).to(next(model.parameters()).device)
    logits = model(
        input_ids=mb.input_ids,
        position_ids=mb.position_ids,
        attention_mask=mb.attention_mask,
        pixel_values=mb.pixel_values,
        image_grid_thw=mb.image_grid_thw,
        packed_seq_params=mb.packed_seq_params(),
    )
    return logits, partial(loss_fn, mb)


def _run_schedule(model_chunks, micro_batches, loss_fn, forward_only: bool):
    iters = [iter(micro_batches) for _ in model_chunks]
    rows, seq_len = micro_batches[0].input_ids.shape  # the p2p shape (one per schedule when pp > 1)
    return get_forward_backward_func()(
        forward_step_func=partial(_forward_step, loss_fn),
        data_iterator=iters if len(iters) > 1 else iters[0],
        model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
        num_microbatches=len(micro_batches),
        seq_length=seq_len,
        micro_batch_size=rows,
        forward_only=forward_only,
    )


def _schedule_multiple(model_chunks) -> int:
    return ps.get_pipeline_model_parallel_world_size() if len(model_chunks) > 1 else 1


def _from_last_stage(obj):
    """Send the last pipeline stage's python object to every stage of this pipeline."""
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(),
                               group=ps.get_pipeline_model_parallel_group())
    return box[0]


def data_parallel_shard(indices: list[int], trajs: list[Trajectory], max_tokens: int | None, rank: int,
                        world: int) -> list[int]:
    """Data-parallel rank `rank`'s contiguous part of `indices`: balanced by count (padded micro-batches)
    or, with a token budget, by tokens (what packed micro-batches cost)."""
    if max_tokens is None:
        return shard(indices, rank, world)
    return shard_by_tokens(indices, [trajs[i].num_tokens for i in indices], rank, world)


def gather_data_parallel(items: list) -> list:
    """Concatenate every data-parallel rank's list in rank order (the order `shard` split them in)."""
    world = ps.get_data_parallel_world_size()
    if world == 1:
        return items
    out = [None] * world
    dist.all_gather_object(out, items, group=ps.get_data_parallel_group())
    return [x for part in out for x in part]


# ----------------------------------------------------------------------------- dependency pass


def _token_scores_loss(shape: PassShape, paired: bool, exact_kl: bool, mb: MicroBatch, logits: torch.Tensor):
    """Sampled-token log-probs (paired: of both views, and the exact KL) at label positions, [b, s]
    each. Left on the device, so the schedule is not stalled; `dependency_pass` copies them afterwards."""
    tp_group = ps.get_tensor_model_parallel_group()
    logp = vocab_parallel_log_prob(logits, mb.labels, tp_group, shape.temperature, shape.vocab_size)
    if not paired:
        return logits.new_zeros(()), {"old": logp}
    old, aug = mb.split_views(logp)
    res = {"old": old, "aug": aug}
    if exact_kl:
        res["kl"] = vocab_parallel_kl(*mb.split_views(logits), tp_group, shape.temperature, shape.vocab_size)
    return logits.new_zeros(()), res


@torch.no_grad()
def dependency_pass(model_chunks, trajs: list[Trajectory], shape: PassShape,
                    perturbed_pixels: list | None, *, exact_kl: bool = False) -> list[dict]:
    """Per trajectory {"old": [n], "aug": [n], ("kl": [n])} for this rank's `trajs`, host tensors.

    `perturbed_pixels` None runs the original view only (DAPO/GRPO): {"old": [n]}.
    """
    for m in model_chunks:
        m.eval()
    paired = perturbed_pixels is not None
    mbs, groups = _micro_batches(model_chunks, trajs, shape, views=perturbed_pixels,
                                 multiple_of=_schedule_multiple(model_chunks))
    stored = _run_schedule(model_chunks, mbs, partial(_token_scores_loss, shape, paired, exact_kl),
                           forward_only=True)
    results = None
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        results = [None] * len(trajs)
        for mb, idx, res in zip(mbs, groups, stored):  # the last stage stores micro-batches in order
            # One copy to the host per micro-batch. Host tensors also matter for correctness: the results
            # travel to other ranks pickled, and a pickled GPU tensor is rebuilt on the sender's device.
            per_key = {k: mb.from_positions(v.cpu()) for k, v in res.items()}
            for i, row in zip(idx, zip(*per_key.values())):
                results[i] = dict(zip(per_key, row))
    return _from_last_stage(results)


# ----------------------------------------------------------------------------- policy update


@dataclass(frozen=True)
class LossSettings:
    clip_low: float
    clip_high: float
    dual_clip: float
    entropy_coef: float


def _policy_loss(shape: PassShape, ls: LossSettings, mb: MicroBatch, logits: torch.Tensor):
    tp_group = ps.get_tensor_model_parallel_group()
    logp = vocab_parallel_log_prob(logits, mb.labels, tp_group, shape.temperature, shape.vocab_size)
    numerator, metrics = vppo_policy_loss(
        logp,
        mb.per_token["old_logp"],
        mb.per_token["advantage"],
        mb.loss_mask,
        mb.per_token["tgf_mask"],
        is_weights=mb.per_token["is_weight"],
        clip_low=ls.clip_low,
        clip_high=ls.clip_high,
        dual_clip=ls.dual_clip,
        entropy_coef=ls.entropy_coef,
        num_tokens=1,  # numerator only: Megatron divides by the global count (module docstring)
    )
    with torch.no_grad():  # full-vocabulary entropy, reduced over the TP group (a metric only)
        ent = vocab_parallel_entropy(logits.detach(), tp_group, shape.temperature, shape.vocab_size)
    count = mb.loss_mask.sum().to(torch.int)
    # Tensors, not floats: a float() here would stall the host once per metric per micro-batch.
    sums = dict(metrics, entropy=(ent * mb.loss_mask).sum(), loss=numerator.detach())
    return numerator, count, sums


def policy_update_pass(model_chunks, trajs: list[Trajectory], shape: PassShape, ls: LossSettings,
                       per_traj: list[dict]) -> dict[str, float]:
    """Forward+backward over this rank's share of one mini-batch; gradients land in the DDP buffers.

    per_traj[i] holds "old_logp" [n], "tgf_mask" [n], "is_weight" [n] (rollout correction;
    absent = ones) and the scalar "advantage" (shaped Â).
    Returns summed metrics (numerators; the caller divides by the global token count).
    """
    for m in model_chunks:
        m.train()
    mbs, groups = _micro_batches(model_chunks, trajs, shape, multiple_of=_schedule_multiple(model_chunks))
    for mb, idx in zip(mbs, groups):
        rows = [per_traj[i] for i in idx]
        mb.per_token["old_logp"] = mb.to_positions([r["old_logp"] for r in rows])
        mb.per_token["tgf_mask"] = mb.to_positions([r["tgf_mask"] for r in rows])
        mb.per_token["is_weight"] = mb.to_positions([r.get("is_weight", torch.ones_like(r["old_logp"])) for r in rows])
        # Â of each trajectory at its response positions (the loss reads it only under loss_mask).
        mb.per_token["advantage"] = mb.to_positions([torch.full((len(r["old_logp"]),), float(r["advantage"]))
                                                     for r in rows])
    stored = _run_schedule(model_chunks, mbs, partial(_policy_loss, shape, ls), forward_only=False)
    totals: dict[str, float] = {}
    if stored:
        keys = sorted(stored[0])
        summed = torch.stack([torch.stack([res[k].double() for k in keys]) for res in stored]).sum(0)
        totals = dict(zip(keys, summed.tolist()))  # one device-to-host copy per mini-batch
    return _from_last_stage(totals)
