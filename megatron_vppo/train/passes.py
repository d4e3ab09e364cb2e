"""The two trainer-side passes of one RL step, run through Megatron's pipeline schedule.

* `dependency_pass` (no grad): every micro-batch carries the original AND the perturbed view of the
  same trajectories side by side, so the first stage runs the vision tower on both and the last stage
  reduces both vocab-parallel logit sets to per-token old_logp, aug_logp (and the exact KL) at once —
  one schedule, one flush; nothing of vocabulary size leaves the last stage.
* `policy_update_pass` (grad): the algorithm's loss (`algo.ALGORITHMS[name].loss`). It returns the
  *numerator* of J and the local count of its denominator unit (valid tokens; trajectories for GSPO);
  with `calculate_per_token_loss` Megatron sums gradients over micro-batches and data-parallel ranks and
  divides by the all-reduced count in `finalize_model_grads`, so the gradient is exactly that of J on
  the whole mini-batch.

Both take the rank's `ParallelDims` and this data-parallel rank's trajectories, and return
per-trajectory results in the same order, on every rank (broadcast from the last pipeline stage).

Micro-batches are padded ([micro_batch_size, seq_len]) or, with a token budget (`PassShape.max_tokens`,
the run's `train.max_tokens_per_micro_batch`), packed thd sequences formed first-fit decreasing
(`rl_batch.pack_by_tokens`); both views of a trajectory stay in the same micro-batch either way. The
number of micro-batches is all-reduced (max) over the data-parallel group and topped up with empty
ones, so every rank runs the same schedule and reaches the gradient all-reduce together.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_vppo.algo.registry import Algorithm, LossInputs, LossSettings
from megatron_vppo.algo.vocab_parallel import (
    vocab_parallel_entropy,
    vocab_parallel_jsd_entropies,
    vocab_parallel_kl,
    vocab_parallel_log_prob,
)
from megatron_vppo.distributed import ParallelDims, from_last_stage, max_over_data_parallel
from megatron_vppo.train.records import ShapedTrajectory, TokenScores
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


def micro_batch_groups(dims: ParallelDims, trajs: list[Trajectory], shape: PassShape,
                       multiple_of: int = 1) -> list[list[int]]:
    """Indices of `trajs` per micro-batch: chunks of micro_batch_size, or first-fit-decreasing bins of
    `max_tokens`. At least one; topped up with empty groups to the data-parallel maximum and then to
    a multiple of `multiple_of` (the interleaved schedule needs a multiple of the pipeline size)."""
    idx = list(range(len(trajs)))
    if shape.max_tokens is None:
        groups = chunks(idx, shape.micro_batch_size)
    else:
        groups = pack_by_tokens([t.num_tokens for t in trajs], shape.max_tokens)
    groups = groups or [[]]
    groups += [[]] * (max_over_data_parallel(dims, len(groups)) - len(groups))  # every rank runs as many
    groups += [[]] * (-len(groups) % multiple_of)
    return groups


def blind_view(mb: MicroBatch, image_token_id: int, pad_id: int) -> MicroBatch:
    """PGPO's blind view: no token attends to the prompt's image pads; every other token keeps its id, its
    M-RoPE position and (responses never hold image pads) its place.

    Padded: the same ids, pixels and positions, with the attention mask 0 on the image pads. Packed (thd,
    where attention takes no per-key mask): each trajectory's segment [o, o + n) becomes two, its k image
    pads moved out as a segment of k pad tokens at [o, o + k) (nothing outside that segment sees it), then
    the trajectory's other tokens, in order and with their own positions, at [o + k, o + n). Its response
    ends the segment, so it keeps its columns and `from_positions` reads both views alike; the view holds
    no image, so the vision tower runs for the original view only."""
    if not mb.packed:
        mask = mb.attention_mask * (mb.input_ids != image_token_id).to(mb.attention_mask.dtype)
        return replace(mb, attention_mask=mask)
    ids, pos, labels = mb.input_ids.clone(), mb.position_ids.clone(), mb.labels.clone()
    bounds = mb.cu_seqlens.tolist()
    cuts = []
    for a, e in zip(bounds, bounds[1:]):
        img = mb.input_ids[0, a:e] == image_token_id
        k = int(img.sum())
        if not k:
            continue
        ids[0, a:a + k] = pad_id
        ids[0, a + k:e] = mb.input_ids[0, a:e][~img]
        pos[:, 0, a:a + k] = torch.arange(k)
        pos[:, 0, a + k:e] = mb.position_ids[:, 0, a:e][:, ~img]
        labels[0, a:e] = 0  # a segment's last token has no label
        labels[0, a + k:e - 1] = ids[0, a + k + 1:e]
        cuts.append(a + k)
    cu = torch.tensor(sorted(set(bounds) | set(cuts)), dtype=mb.cu_seqlens.dtype)
    return replace(mb, input_ids=ids, labels=labels, position_ids=pos, cu_seqlens=cu, pixel_values=None,
                   image_grid_thw=None)


def _micro_batches(dims: ParallelDims, model_chunks, trajs: list[Trajectory], shape: PassShape, views=None,
                   multiple_of: int = 1, blind: bool = False) -> tuple[list[MicroBatch], list[list[int]]]:
    """The pass's micro-batches (and the trajectory indices of each). Empty groups become all-filler
    micro-batches that contribute nothing. `views`: the second view's pixels per trajectory; `blind`:
    the second view is the blind view (`blind_view`)."""
    model = _unwrap(model_chunks[0])
    if (blind and shape.max_tokens is None
            and getattr(model.config, "transformer_impl", "local") == "transformer_engine"):
        raise ValueError("algo.pgpo.view=blind on padded micro-batches masks attention on image pads per key, which "
                         "the Transformer Engine layers do not take; set train.max_tokens_per_micro_batch (packed "
                         "micro-batches need no mask), model.transformer_impl=local or algo.pgpo.view=patches")
    ensure_positions(trajs, model.arch)  # once per trajectory per step: the trajectories carry them
    groups = micro_batch_groups(dims, trajs, shape, multiple_of)
    lengths = [round_up(max(sum(trajs[i].num_tokens for i in g), 1), SEQ_MULTIPLE * dims.tp) for g in groups]
    if dims.pp > 1:  # p2p between stages needs one shape per schedule
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
        if blind:
            mb = stack_views(mb, blind_view(make(), model.arch.image_token_id, shape.pad_id))
        elif views is not None:
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
    seq_len = _unwrap(model_chunks[0]).pipeline_seq_length(seq_len)  # a model may carry side features
    return get_forward_backward_func()(
        forward_step_func=partial(_forward_step, loss_fn),
        data_iterator=iters if len(iters) > 1 else iters[0],
        model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
        num_microbatches=len(micro_batches),
        seq_length=seq_len,
        micro_batch_size=rows,
        forward_only=forward_only,
    )


def _schedule_multiple(dims: ParallelDims, model_chunks) -> int:
    return dims.pp if len(model_chunks) > 1 else 1


def data_parallel_shard(indices: list[int], trajs: list[Trajectory], max_tokens: int | None, rank: int,
                        world: int) -> list[int]:
    """Data-parallel rank `rank`'s contiguous part of `indices`: balanced by count (padded micro-batches)
    or, with a token budget, by tokens (what packed micro-batches cost)."""
    if max_tokens is None:
        return shard(indices, rank, world)
    return shard_by_tokens(indices, [trajs[i].num_tokens for i in indices], rank, world)


# ----------------------------------------------------------------------------- dependency pass


def _token_scores_loss(dims: ParallelDims, shape: PassShape, paired: bool, exact_kl: bool, divergence: bool,
                       fp64: bool, mb: MicroBatch, logits: torch.Tensor):
    """Sampled-token log-probs (paired: of both views, and the exact KL) at label positions, [b, s]
    each. Left on the device, so the schedule is not stalled; `dependency_pass` copies them afterwards."""
    tp_group = dims.tp_group
    logp = vocab_parallel_log_prob(logits, mb.labels, tp_group, shape.temperature, shape.vocab_size,
                                   dtype=torch.float64 if fp64 else None)
    if not paired:
        return logits.new_zeros(()), {"old": logp}
    old, aug = mb.split_views(logp)
    res = {"old": old, "aug": aug}
    if exact_kl:
        res["kl"] = vocab_parallel_kl(*mb.split_views(logits), tp_group, shape.temperature, shape.vocab_size)
    if divergence:  # VEPO: JSD and both entropies, reduced over the TP group like the exact KL
        res["jsd"], res["ent_old"], res["ent_aug"] = vocab_parallel_jsd_entropies(
            *mb.split_views(logits), tp_group, shape.temperature, shape.vocab_size)
    return logits.new_zeros(()), res


@torch.no_grad()
def dependency_pass(dims: ParallelDims, model_chunks, trajs: list[Trajectory], shape: PassShape,
                    perturbed_pixels: list | None, *, exact_kl: bool = False, divergence: bool = False,
                    blind: bool = False, fp64: bool = False) -> list[TokenScores]:
    """Per trajectory TokenScores(old [n], aug [n], kl [n] | None, ...) for this rank's `trajs`, host tensors.

    `perturbed_pixels` None (and not `blind`) runs the original view only (algorithms without the
    perturbed view): aug None. `blind`: the second view is PGPO's blind view (no pixels change).
    `divergence`: also the per-token JSD and both entropies (VEPO). `fp64`: log-probs in fp64 (PGPO).
    """
    for m in model_chunks:
        m.eval()
    paired = perturbed_pixels is not None or blind
    mbs, groups = _micro_batches(dims, model_chunks, trajs, shape, views=None if blind else perturbed_pixels,
                                 multiple_of=_schedule_multiple(dims, model_chunks), blind=blind)
    stored = _run_schedule(model_chunks, mbs,
                           partial(_token_scores_loss, dims, shape, paired, exact_kl and paired, divergence and paired, fp64),
                           forward_only=True)
    results = None
    if dims.last_stage:
        results = [None] * len(trajs)
        for mb, idx, res in zip(mbs, groups, stored):  # the last stage stores micro-batches in order
            # One copy to the host per micro-batch. Host tensors also matter for correctness: the results
            # travel to other ranks pickled, and a pickled GPU tensor is rebuilt on the sender's device.
            per_key = {k: mb.from_positions(v.cpu()) for k, v in res.items()}
            for i, row in zip(idx, zip(*per_key.values())):
                results[i] = TokenScores(**dict(zip(per_key, row)))
    return from_last_stage(dims, results)


# ----------------------------------------------------------------------------- policy update


# Metric sums of a policy pass that are per token whatever the algorithm's denominator unit.
TOKEN_METRICS = ("entropy",)


def _policy_loss(dims: ParallelDims, shape: PassShape, algo: Algorithm, ls: LossSettings, mb: MicroBatch,
                 logits: torch.Tensor):
    tp_group = dims.tp_group
    logp = vocab_parallel_log_prob(logits, mb.labels, tp_group, shape.temperature, shape.vocab_size)
    mask, aug = mb.loss_mask, mb.per_token.get("aug_logp")
    if mb.views == 2:  # the second view rode along with gradient (PAPO's second_view_grad): its log-probs
        logp, aug = mb.split_views(logp)  # keep their graph into the loss
        mask, logits = mb.split_views(mask)[0], mb.split_views(logits)[0]
    inputs = LossInputs(old_logp=mb.per_token["old_logp"], advantage=mb.per_token["advantage"], mask=mask,
                        tgf_mask=mb.per_token["tgf_mask"], is_weight=mb.per_token["is_weight"],
                        seq_id=mb.per_token["seq_id"], aug_logp=aug)
    # numerator only: Megatron divides by the global count of the loss's unit (module docstring)
    numerator, count, metrics = algo.loss(logp, inputs, ls)
    with torch.no_grad():  # full-vocabulary entropy, reduced over the TP group (a metric only)
        ent = vocab_parallel_entropy(logits.detach(), tp_group, shape.temperature, shape.vocab_size)
    # Tensors, not floats: a float() here would stall the host once per metric per micro-batch.
    sums = dict(metrics, entropy=(ent * mask).sum(), loss=numerator.detach(), units=count.detach(),
                tokens=mask.sum())
    return numerator, count, sums


def policy_update_pass(dims: ParallelDims, model_chunks, trajs: list[Trajectory], shape: PassShape,
                       algo: Algorithm, ls: LossSettings, per_traj: list[ShapedTrajectory],
                       views: list | None = None) -> dict[str, float]:
    """Forward+backward over this rank's share of one mini-batch; gradients land in the DDP buffers.
    `views` (PAPO's second_view_grad): the second view's pixels per trajectory, stacked beside the original
    in every micro-batch of the same schedule, so its log-probs reach the loss with their graph.

    Returns summed metrics: numerators, plus "units" (the loss's denominator count: tokens, or
    trajectories for a sequence-level loss) and "tokens" (valid tokens, the denominator of TOKEN_METRICS).
    """
    for m in model_chunks:
        m.train()
    mbs, groups = _micro_batches(dims, model_chunks, trajs, shape, views=views,
                                 multiple_of=_schedule_multiple(dims, model_chunks))
    for mb, idx in zip(mbs, groups):
        rows = [per_traj[i] for i in idx]
        mb.per_token["old_logp"] = mb.to_positions([r.old_logp for r in rows])
        mb.per_token["tgf_mask"] = mb.to_positions([r.tgf_mask for r in rows])
        mb.per_token["is_weight"] = mb.to_positions([torch.ones_like(r.old_logp) if r.is_weight is None
                                                     else r.is_weight for r in rows])
        # Â of each trajectory at its response positions (the loss reads it only under loss_mask), times
        # the per-token weight where the shaping gives one (PGPO)
        mb.per_token["advantage"] = mb.to_positions([torch.full((len(r.old_logp),), float(r.advantage))
                                                     * (1.0 if r.token_weight is None else r.token_weight.double())
                                                     for r in rows])
        if algo.loss_reads_aug and views is None:  # the second view's π_old at each response position (PAPO)
            mb.per_token["aug_logp"] = mb.to_positions([r.aug_logp for r in rows])
        # which trajectory each position belongs to (sequence-level losses group tokens by it)
        mb.per_token["seq_id"] = mb.to_positions([torch.full((len(r.old_logp),), float(j))
                                                  for j, r in enumerate(rows)])
    stored = _run_schedule(model_chunks, mbs, partial(_policy_loss, dims, shape, algo, ls), forward_only=False)
    totals: dict[str, float] = {}
    if stored:
        keys = sorted(stored[0])
        summed = torch.stack([torch.stack([res[k].double() for k in keys]) for res in stored]).sum(0)
        totals = dict(zip(keys, summed.tolist()))  # one device-to-host copy per mini-batch
    return from_last_stage(dims, totals)
