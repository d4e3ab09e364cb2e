"""The RL loop, top to bottom (spec §1): rollout -> reward -> dynamic sampling -> no-grad passes ->
shaping (VPPO: TAS/TGF) -> mini-batch updates -> weight sync -> validation -> metrics and checkpoint.

Every rank runs this file (SPMD under torchrun). Trajectories and per-token results are shared with
every rank, so the shaping is computed once per step from the whole batch, identically everywhere.
What differs between algorithms is read from `algo.ALGORITHMS[cfg.algo.name]` (`algorithm_of`), never
branched on by name here.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist

from megatron_vppo.algo.advantages import dynamic_sampling_keep, grpo_advantages
from megatron_vppo.algo.dependency import sampled_k3
from megatron_vppo.algo.registry import Algorithm, get_algorithm
from megatron_vppo.algo.rollout_correction import mismatch_metrics, rollout_weights
from megatron_vppo.config import RunConfig
from megatron_vppo.data.perturb import make_generator, perturb_pixel_values, perturbed_images_at_grid
from megatron_vppo.distributed import ParallelDims, all_gather_world, gather_data_parallel, sum_over_data_parallel
from megatron_vppo.megatron_cpu import without_device_redirect
from megatron_vppo.rollout import ENGINES
from megatron_vppo.rollout.engine import RolloutRequest, SamplingParams
from megatron_vppo.train.engine_sync import sync_engine_weights
from megatron_vppo.train import passes
from megatron_vppo.train.nonfinite import check_finite, guarded_step
from megatron_vppo.train.optimizer import current_lr
from megatron_vppo.train.records import ShapedTrajectory, TokenScores
from megatron_vppo.train.rl_batch import chunks, pack_by_tokens, padded_length, responses_to_matrix, shard
from megatron_vppo.train.rollout_step import encode_prompts, grading_errors, sample_groups, to_trajectories

log = logging.getLogger("megatron_vppo.train")


@dataclass
class Trainer:
    """Everything a step needs, built once by `build_trainer`."""
    cfg: RunConfig
    processor: object
    model_chunks: list  # DDP-wrapped chunks
    optimizer: object
    scheduler: object
    engine: object | None  # rollout engine on engine ranks, None elsewhere
    grader: object
    train_batches: object
    val_prompts: list
    hf_config: dict
    adapter: object  # the model's HF <-> Megatron weight adapter
    vocab_size: int
    dims: ParallelDims = None  # build_policy makes it
    logger: object | None = None
    step: int = 0
    state: dict = field(default_factory=dict)


def algorithm_of(cfg: RunConfig) -> Algorithm:
    """The configured algorithm's declaration (algo/registry.py): dynamic sampling, perturbed view,
    shaping, loss, and the loss settings resolved from `algo.*`."""
    return get_algorithm(cfg.algo.name)


def _pass_shape(trainer: Trainer, trajs) -> passes.PassShape:
    return passes.PassShape(
        micro_batch_size=trainer.cfg.train.micro_batch_size,
        seq_len=padded_length(trajs, trainer.dims.tp),
        pad_id=trainer.processor.pad_token_id,
        vocab_size=trainer.vocab_size,
        temperature=trainer.cfg.rollout.temperature,
        max_tokens=trainer.cfg.train.max_tokens_per_micro_batch,
    )


def _sampling(cfg: RunConfig, processor, temperature: float, seed: int) -> SamplingParams:
    return SamplingParams(temperature=temperature, top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k,
                          max_new_tokens=cfg.rollout.max_response_length,
                          stop_token_ids=(processor.eos_token_id,), seed=seed,
                          banned_token_ids=processor.multimodal_token_ids)


# ---------------------------------------------------------------------------------------- rollout


def collect_step_batch(trainer: Trainer) -> tuple[list, dict]:
    """Rollout + reward + dynamic sampling, retried up to `max_dynamic_sampling_retries` times."""
    cfg = trainer.cfg
    use_ds = algorithm_of(cfg).dynamic_sampling
    want = cfg.train.prompts_per_step
    kept_groups, prompts_all, metrics = [], [], {"rollout/groups_sampled": 0, "rollout/groups_dropped": 0}
    rewards_seen, groups_seen = [], []
    for attempt in range(cfg.rollout.max_dynamic_sampling_retries + 1):
        records = next(trainer.train_batches)
        prompts = encode_prompts(trainer.processor, records)
        groups = sample_groups(
            trainer.dims, trainer.engine, trainer.processor.tokenizer, trainer.grader, prompts,
            n=cfg.rollout.group_size,
            sampling=_sampling(cfg, trainer.processor, cfg.rollout.temperature, cfg.train.seed),
            seed_parts=(cfg.train.seed, trainer.step, attempt),
        )
        metrics["rollout/groups_sampled"] += len(groups)
        groups_seen.extend(groups)
        rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float64)
        rewards_seen.append(rewards.flatten())
        if use_ds:
            gid = torch.arange(len(groups)).repeat_interleave(cfg.rollout.group_size)
            kept_ids = sorted({int(gid[i]) for i in dynamic_sampling_keep(rewards.flatten(), gid).tolist()})
        else:
            kept_ids = list(range(len(groups)))
        metrics["rollout/groups_dropped"] += len(groups) - len(kept_ids)
        base = len(prompts_all)
        prompts_all.extend(prompts)
        kept_groups.extend(replace(groups[i], prompt=base + groups[i].prompt) for i in kept_ids)
        if len(kept_groups) >= want:
            break
    kept_groups = kept_groups[:want]
    all_r = torch.cat(rewards_seen)
    metrics["reward/mean"] = float(all_r.mean())
    metrics.update(grading_errors(groups_seen, cfg.reward.max_error_rate, f"step {trainer.step}"))
    metrics["rollout/attempts"] = attempt + 1
    metrics["rollout/engines"] = trainer.dims.num_engines  # world_size / rollout.engine_tp generate
    metrics.update(data_metrics(trainer.train_batches, trainer.step, trainer.state.setdefault("data_log", {})))
    return to_trajectories(prompts_all, kept_groups), metrics


def data_metrics(batches, step: int, logged: dict) -> dict:
    """Where the data stands and which bad rows it skipped, per reason, in the current pass.

    Skips new since the last call are also logged (`logged` remembers what was): a bad row is never
    dropped silently. The counts are part of the data position (checkpointed), so a resumed run logs
    the same numbers."""
    stats = batches.pass_stats
    before = logged.get("skipped", {}) if logged.get("epoch") == batches.epoch else {}
    new = {k: v - before.get(k, 0) for k, v in stats.skipped.items() if v > before.get(k, 0)}
    if new:
        log.warning("step %d: skipped %d bad data row(s) %s; this data pass so far: %s", step,
                    sum(new.values()), new, stats.summary())
    logged.update(epoch=batches.epoch, skipped=dict(stats.skipped))
    out = {"data/epoch": batches.epoch, "data/rows_seen": stats.seen, "data/rows_skipped": stats.n_skipped}
    out.update({f"data/skipped/{reason}": n for reason, n in sorted(stats.skipped.items())})
    return out


# ------------------------------------------------------------------------------------- the step


def perturbed_views(trajs, processor, run_seed: int, step: int, offset: int, prob: float,
                    mode: str = "pixel", *, with_images: bool = False):
    """Spec §2: a fresh mask per trajectory, seeded by (run seed, step, trajectory index).

    `pixel`: blacken whole 14x14 patches in pixel_values (exact, no image round trip).
    `image`: blacken 14x14 cells of the image at the processor's resized size, then re-run the
    processor (the reference trainer's way); the resize is then the identity, so shapes are unchanged.
    `with_images`: (views, perturbed PIL images per trajectory, None where there are none) — what an
    engine that preprocesses raw images (vLLM) scores.
    """
    with without_device_redirect():  # our own tensor code: the CPU adapter's per-call dispatch is overhead
        return _perturbed_views(trajs, processor, run_seed, step, offset, prob, mode, with_images)


def _perturbed_views(trajs, processor, run_seed, step, offset, prob, mode, with_images):
    ip = processor.image_processor
    views, pils = [], []
    for i, t in enumerate(trajs):
        gen = make_generator(run_seed, step, offset + i)
        if mode == "pixel" or not t.has_image:
            views.append(perturb_pixel_values(t.pixels(), t.image_grid_thw, gen, ip.image_mean,
                                              ip.image_std, prob, geometry=processor.geometry))
            pils.append(None)
            continue
        images = t.extra.get("images")
        if not images:
            raise ValueError("perturbation mode 'image' needs the trajectory's PIL images "
                             "(Trajectory.extra['images']); use algo.perturbation=pixel otherwise")
        pils.append(perturbed_images_at_grid(images, t.image_grid_thw, gen, prob, cell=processor.geometry.patch_size))
        views.append(processor.process_images(pils[-1])[0])
    return (views, pils) if with_images else views


def score_step_batch(trainer: Trainer, trajs) -> list[TokenScores]:
    """Per-token π_old (and, when the algorithm needs the perturbed view, aug / kl) of every
    trajectory, on every rank, from the source `train.old_logp_source` names."""
    if trainer.cfg.train.old_logp_source == "engine":
        return engine_score_step_batch(trainer, trajs)
    return trainer_score_step_batch(trainer, trajs)


def noisy_view(traj, run_seed: int, step: int, key: int, std: float):
    """VEPO's view: Gaussian noise of std `std` added to the processor's normalised pixel_values
    (unclipped), drawn from the generator of (run seed, step, key). None / text-only: unchanged."""
    pixels = traj.pixels()
    if pixels is None or not traj.has_image:
        return pixels
    noise = torch.randn(pixels.shape, generator=make_generator(run_seed, step, key), dtype=torch.float32)
    return pixels + (noise * std).to(pixels.dtype).to(pixels.device)


def second_views(trajs, processor, run_seed: int, step: int, offset: int, view, *, with_images: bool = False):
    """The second view (`algo.registry.ViewSpec`) of each trajectory: blackened patches (as VPPO's
    `perturbed_views`) or pixel noise, seeded per trajectory (global index `offset + i`) or, for a
    per-prompt view, per prompt group (key −1 − group: every rollout of a prompt sees the same view)."""
    if view.kind == "patches" and not view.per_prompt:
        return perturbed_views(trajs, processor, run_seed, step, offset, view.prob, view.mode, with_images=with_images)
    views, pils = [], []
    for i, t in enumerate(trajs):
        key = -1 - t.group if view.per_prompt else offset + i
        if view.kind == "noise":
            views.append(noisy_view(t, run_seed, step, key, view.noise_std))
            pils.append(None)
        elif view.kind == "patches":
            v, p = perturbed_views([t], processor, run_seed, step, key, view.prob, view.mode, with_images=True)
            views.append(v[0])
            pils.append(p[0])
        else:
            raise ValueError(f"second view kind {view.kind!r} has no pixels to make")
    return (views, pils) if with_images else views


def _perturbed_views_of(trainer: Trainer, trajs, idx: list[int], with_images: bool = False):
    """Second views of trajs[idx] (contiguous indices), seeded by trajectory index (or prompt): both π_old
    sources and every sharding perturb exactly the same patches."""
    cfg = trainer.cfg
    return second_views([trajs[i] for i in idx], trainer.processor, cfg.train.seed, trainer.step,
                        idx[0] if idx else 0, algorithm_of(cfg).view(cfg.algo), with_images=with_images)


def trainer_score_step_batch(trainer: Trainer, trajs) -> list[TokenScores]:
    """The (paired, when the algorithm needs the perturbed view) no-grad pass on this DP rank's shard;
    every rank gets all trajectories' results."""
    cfg, dims = trainer.cfg, trainer.dims
    algo = algorithm_of(cfg)
    paired = algo.needs_perturbed_view
    blind = paired and algo.view(cfg.algo).kind == "blind"
    idx = passes.data_parallel_shard(list(range(len(trajs))), trajs, cfg.train.max_tokens_per_micro_batch,
                                     dims.dp_rank, dims.dp)
    mine = [trajs[i] for i in idx]
    views = None
    if paired and (blind or not dims.first_stage):
        views = [None] * len(mine)  # paired, but only the first stage embeds (and so perturbs) images
    elif paired:
        views = _perturbed_views_of(trainer, trajs, idx)
    res = passes.dependency_pass(dims, trainer.model_chunks, mine, _pass_shape(trainer, trajs), views,
                                 exact_kl=paired and cfg.algo.dependency_estimator == "exact_kl",
                                 divergence=algo.divergence, blind=blind, fp64=algo.fp64_scores)
    return gather_data_parallel(dims, res)


def engine_score_step_batch(trainer: Trainer, trajs) -> list[TokenScores]:
    """π_old from the rollout engine: its sampling log-probs for the original view, and for vppo one
    engine prefill of each image trajectory's perturbed view. No trainer forward at all.

    A text-only trajectory has nothing to perturb: its aug is its old, exactly (dependency 0), as in the
    trainer's pass. Each engine scores its shard (`dims.engine_index` of `dims.num_engines`); every rank
    gets all results."""
    dims = trainer.dims
    res = [TokenScores(old=t.rollout_log_probs.float()) for t in trajs]
    if not algorithm_of(trainer.cfg).needs_perturbed_view:
        return res
    idx = shard(list(range(len(trajs))), dims.engine_index, dims.num_engines)
    scored = []
    if dims.engine_rank:
        views, pils = _perturbed_views_of(trainer, trajs, idx, with_images=True)
        todo = [(i, v, p) for i, v, p in zip(idx, views, pils) if trajs[i].has_image]
        items = [(RolloutRequest(trajs[i].input_ids[: trajs[i].response_start].tolist(), v, trajs[i].image_grid_thw,
                                 images=p), trajs[i].input_ids[trajs[i].response_start:].tolist())
                 for i, v, p in todo]  # images (the `image` mode's PIL view): for engines that take raw images
        lps = trainer.engine.score(items, temperature=trainer.cfg.rollout.temperature) if items else []
        scored = [(i, lp) for (i, _, _), lp in zip(todo, lps)]
    for i, lp in all_gather_world(scored):
        res[i].aug = torch.tensor(lp, dtype=torch.float32)
    for r in res:
        if r.aug is None:
            r.aug = r.old
    return res


def minibatch_index_lists(cfg: RunConfig, n_traj: int) -> list[list[int]]:
    per = cfg.train.mini_batch_prompts * cfg.rollout.group_size
    return chunks(list(range(n_traj)), per)


def official_scopes(cfg: RunConfig, dims: ParallelDims, minibatches: list[list[int]], trajs: list
                    ) -> tuple[list, list]:
    """tas_scope official: min/max per (DP rank, mini-batch), μ per micro-batch — the reference's
    per-device statistics, over the shards and micro-batches `update_policy` really runs: count-based
    chunks of micro_batch_size, or, packed (`train.max_tokens_per_micro_batch`), the token-balanced DP
    shards and first-fit-decreasing bins of `passes.micro_batch_groups`."""
    dp, max_tokens = dims.dp, cfg.train.max_tokens_per_micro_batch
    mbs, micro = [], []
    for mb in minibatches:
        for r in range(dp):
            part = passes.data_parallel_shard(mb, trajs, max_tokens, r, dp)
            if not part:
                continue
            mbs.append(part)
            if max_tokens is None:
                micro.extend(chunks(part, cfg.train.micro_batch_size))
            else:
                micro.extend([part[i] for i in g] for g in pack_by_tokens([trajs[i].num_tokens for i in part],
                                                                          max_tokens))
    return mbs, micro


def _matrix(values: list) -> torch.Tensor | None:
    return None if values[0] is None else responses_to_matrix(values)[0]


def shape_step(trainer: Trainer, trajs, scored: list[TokenScores]):
    """GRPO advantages, then the algorithm's shaping (vppo: dependency -> TAS α -> Â and the TGF mask);
    returns (ShapedTrajectory per trajectory, mini-batch index lists, metrics)."""
    cfg = trainer.cfg
    rewards = torch.tensor([t.reward for t in trajs], dtype=torch.float64)
    gid = torch.tensor([t.group for t in trajs])
    adv = grpo_advantages(rewards, gid)
    old, mask = responses_to_matrix([r.old for r in scored])
    aug = _matrix([r.aug for r in scored])
    kl = _matrix([r.kl for r in scored])
    divergence = None
    if scored[0].jsd is not None:  # VEPO's full-vocabulary scores
        divergence = tuple(_matrix([getattr(r, k) for r in scored]) for k in ("jsd", "ent_old", "ent_aug"))
    minibatches = minibatch_index_lists(cfg, len(trajs))
    algo = algorithm_of(cfg)
    official = "tas_scope" in algo.reads and cfg.algo.tas_scope == "official"
    mbs, micro = official_scopes(cfg, trainer.dims, minibatches, trajs) if official else (None, None)
    shaping = algo.shaping(old, aug, mask, adv, cfg.algo, kl=kl, minibatches=mbs, microbatches=micro,
                           divergence=divergence)
    weights, metrics = rollout_correction(cfg, trajs, old, mask)
    per_traj = []
    for i, t in enumerate(trajs):
        n = t.response_len
        per_traj.append(ShapedTrajectory(old_logp=old[i, :n].float(), tgf_mask=shaping.tgf_mask[i, :n].float(),
                                         is_weight=weights[i, :n].float(),
                                         advantage=float(shaping.shaped_advantages[i]),
                                         token_weight=None if shaping.token_weights is None
                                         else shaping.token_weights[i, :n].double(),
                                         aug_logp=aug[i, :n].float() if algo.loss_reads_aug else None))
    metrics.update(shaping.metrics)
    metrics["advantage/abs_mean"] = float(adv.abs().mean())
    if kl is not None and aug is not None:  # how well the single-sample k3 tracks the exact KL
        metrics["dependency/k3_vs_kl_corr"] = _masked_corr(sampled_k3(old, aug, mask), kl, mask)
    return per_traj, minibatches, metrics


def rollout_correction(cfg: RunConfig, trajs, old, mask):
    """([B, T] importance weights π_old / π_rollout, mismatch metrics). Engine mode: π_old is the
    engine's own log-prob, so the weights are 1 and there is no mismatch to report."""
    rc = cfg.algo.rollout_correction
    if cfg.train.old_logp_source == "engine" or any(t.rollout_log_probs is None for t in trajs):
        return mask.clone(), {}
    rollout, _ = responses_to_matrix([t.rollout_log_probs for t in trajs])
    corr = rollout_weights(old, rollout, mask, level=rc.level, mode=rc.mode, cap=rc.cap)
    metrics = mismatch_metrics(old, rollout, mask, corr if rc.level != "none" else None)
    metrics["rollout/logp_abs_diff_max"] = metrics.get("rollout_correction/logp_abs_diff_max", 0.0)
    return corr.weights, metrics


def check_old_logp(trainer: Trainer, trajs, scored: list[TokenScores], shaped: tuple) -> dict:
    """Engine mode, every `train.check_old_logp_every` steps: the trainer's paired pass on the same
    batch, and how well the engine-derived dependency and TGF mask agree with the trainer's."""
    ref = trainer_score_step_batch(trainer, trajs)
    ref_traj = shape_step(trainer, trajs, ref)[0]
    mine = shaped[0]
    old_e, mask = responses_to_matrix([r.old for r in scored])
    old_t, _ = responses_to_matrix([r.old for r in ref])
    out = {"old_logp_check/logp_abs_diff_max": float(((old_e - old_t).abs() * mask).max())}
    if scored[0].aug is not None:
        dep_e = sampled_k3(old_e, _matrix([r.aug for r in scored]), mask)
        dep_t = sampled_k3(old_t, _matrix([r.aug for r in ref]), mask)
        out["old_logp_check/dependency_corr"] = _masked_corr(dep_e, dep_t, mask)
        agree = torch.cat([(a.tgf_mask == b.tgf_mask).float() for a, b in zip(mine, ref_traj)])
        out["old_logp_check/tgf_agreement"] = float(agree.mean())
    return out


def _masked_corr(a, b, mask) -> float:
    m = mask.bool()
    x, y = a[m], b[m]
    if x.numel() < 2:
        return float("nan")
    return float(torch.corrcoef(torch.stack([x, y]))[0, 1])


def update_policy(trainer: Trainer, trajs, per_traj: list[ShapedTrajectory], minibatches) -> dict:
    """One optimizer step per mini-batch (1 PPO epoch by default); returns metrics averaged over the
    loss's denominator unit (tokens; trajectories for a sequence-level loss), entropy per token."""
    cfg, dims = trainer.cfg, trainer.dims
    algo = algorithm_of(cfg)
    ls = algo.settings(cfg.algo)
    shape = _pass_shape(trainer, trajs)
    totals: dict[str, float] = {}
    grad_norms, skipped = [], 0
    guard = trainer.state.setdefault("nonfinite", {})
    for _epoch in range(cfg.train.ppo_epochs):
        for mb in minibatches:
            idx = passes.data_parallel_shard(mb, trajs, cfg.train.max_tokens_per_micro_batch, dims.dp_rank, dims.dp)
            for chunk in trainer.model_chunks:
                chunk.zero_grad_buffer()
            trainer.optimizer.zero_grad()
            views = None
            if ls.extra.get("second_view_grad"):  # PAPO, TRL's variant: the second view forwarded with gradient
                views = (_perturbed_views_of(trainer, trajs, idx) if dims.first_stage
                         else [None] * len(idx))  # only the first stage embeds (and so perturbs) images
            sums = passes.policy_update_pass(dims, trainer.model_chunks, [trajs[i] for i in idx], shape, algo, ls,
                                             [per_traj[i] for i in idx], views=views)
            # Non-finite loss/grad: skipped on every rank; non-finite weights after the update: stop.
            ok, grad_norm, nonfinite = guarded_step(trainer.optimizer, trainer.model_chunks, sums,
                                                    step=trainer.step, state=guard,
                                                    max_in_a_row=cfg.train.max_nonfinite_steps)
            if ok:  # Megatron's protocol: a skipped (fp16 overflow) step does not advance the schedule
                trainer.scheduler.step(increment=1)
            summed = sum_over_data_parallel(dims, sums)  # collective: every rank calls it, skipped or not
            if nonfinite:  # skipped by the guard: its NaN sums stay out of the step's metrics
                skipped += 1
                continue
            grad_norms.append(float(grad_norm) if grad_norm is not None else float("nan"))
            for k, v in summed.items():
                totals[k] = totals.get(k, 0.0) + v
    units = max(totals.pop("units", 0.0), 1.0)  # Σ denominator units (numerators were divided by 1)
    tokens = max(totals.pop("tokens", 0.0), 1.0)
    out = {f"actor/{k}": v / (tokens if k in passes.TOKEN_METRICS else units) for k, v in totals.items()}
    if grad_norms:  # over the step's optimizer steps (mini-batches x epochs), not the last one only
        out["actor/grad_norm"] = sum(grad_norms) / len(grad_norms)
        out["actor/grad_norm_max"] = max(grad_norms)
    out["actor/lr"] = current_lr(trainer.optimizer)
    out["actor/nonfinite_skipped"] = skipped
    out["actor/nonfinite_skipped_total"] = guard.get("skipped_total", 0)
    return out


def _engine_memory(trainer: Trainer, resident: bool) -> None:
    """Colocated engines give accelerator memory back while the trainer runs its passes."""
    if trainer.engine is not None:
        trainer.engine.resume_memory() if resident else trainer.engine.release_memory()


def rl_step(trainer: Trainer) -> dict:
    t0 = time.perf_counter()
    trajs, metrics = collect_step_batch(trainer)
    t1 = time.perf_counter()
    if not trajs:
        log.warning("step %d: every sampled group was filtered out by dynamic sampling; no update",
                    trainer.step)
        metrics["actor/skipped"] = 1.0
        return metrics
    engine_mode = trainer.cfg.train.old_logp_source == "engine"
    if not engine_mode:
        _engine_memory(trainer, resident=False)
    scored = score_step_batch(trainer, trajs)  # engine mode: the engine scores, so it stays resident until here
    if engine_mode:
        _engine_memory(trainer, resident=False)
    shaped = shape_step(trainer, trajs, scored)
    per_traj, minibatches, shaping_metrics = shaped
    every = trainer.cfg.train.check_old_logp_every
    if engine_mode and every > 0 and trainer.step % every == 0:
        metrics.update(check_old_logp(trainer, trajs, scored, shaped))
    t2 = time.perf_counter()
    metrics.update(shaping_metrics)
    metrics.update(update_policy(trainer, trajs, per_traj, minibatches))
    t3 = time.perf_counter()
    _engine_memory(trainer, resident=True)
    sync_engine_weights(trainer.model_chunks, trainer.adapter, trainer.engine,
                        engine_cls=ENGINES[trainer.cfg.rollout.engine],
                        bucket_bytes=trainer.cfg.rollout.bucket_bytes, dims=trainer.dims, step=trainer.step)
    t4 = time.perf_counter()
    lens = torch.tensor([t.response_len for t in trajs], dtype=torch.float64)
    metrics.update({
        "reward/kept_mean": sum(t.reward for t in trajs) / len(trajs),
        "response/len_mean": float(lens.mean()),
        "response/trajectories": len(trajs),
        "time/rollout_s": t1 - t0, "time/passes_s": t2 - t1, "time/update_s": t3 - t2, "time/sync_s": t4 - t3,
    })
    return metrics


# ------------------------------------------------------------------------------ weights, eval


def validate(trainer: Trainer) -> dict:
    """avg@k accuracy at temperature 1.0 over the validation prompts (the paper's protocol).

    Seeds as `megatron-vppo eval --seed <train.seed>` draws them (the same prompts in the same order,
    the same `generate_and_grade`), so a checkpoint's eval reproduces the trainer's number; (seed, -1)
    never collides with a training rollout's (seed, step, attempt)."""
    from megatron_vppo.train.evaluate import accuracy_at_k

    if not trainer.val_prompts:
        return {}
    cfg = trainer.cfg
    groups = sample_groups(trainer.dims, trainer.engine, trainer.processor.tokenizer, trainer.grader, trainer.val_prompts,
                           n=cfg.train.val_k, sampling=_sampling(cfg, trainer.processor, 1.0, cfg.train.seed),
                           seed_parts=(cfg.train.seed, -1))
    errors = grading_errors(groups, cfg.reward.max_error_rate, f"validation at step {trainer.step}")
    out = {"val/accuracy": accuracy_at_k(groups)}
    if errors["reward/grader_errors"]:
        out["val/grader_errors"] = errors["reward/grader_errors"]
    if errors["reward/grader_timeouts"]:
        out["val/grader_timeouts"] = errors["reward/grader_timeouts"]
    return out
