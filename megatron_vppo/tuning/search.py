"""Enumerate the layouts N GPUs can run, estimate each, rank the ones that fit by tokens/s/GPU.

Legality comes from `parallel_layout.validate_layout` (the trainer's own rules). On top of it the
batch must split into whole micro-batches per DP rank (and, with interleaving, into groups of `pp`
micro-batches, as Megatron's interleaved schedule requires); CP would need the sequence split into
2*cp chunks (TE's load-balanced causal CP). Those are workload rules, kept here.

No CP layouts are offered: the trainer refuses cp > 1 until packed sequences split each sequence over
the CP ranks (`validate_layout`). The memory and throughput models still take a `Layout.cp`.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

from megatron_vppo.parallel_layout import Layout, LayoutError, divisors, validate_layout
from megatron_vppo.tuning.memory import GIB, KERNELS, Kernels, MemoryEstimate, Precision, Workload, estimate_memory
from megatron_vppo.tuning.model_spec import ModelShape
from megatron_vppo.tuning.throughput import GPU_TYPES, GpuType, ThroughputEstimate, estimate_throughput


class TuningError(ValueError):
    """A request no layout can satisfy, or bad sizes; the message says why and what to change."""


@dataclass
class Candidate:
    layout: Layout
    recompute: str
    memory: MemoryEstimate
    throughput: ThroughputEstimate
    gpu_mem_gib: float
    micro_batches: int

    @property
    def mem_gib(self) -> float:
        return self.memory.total_gib

    @property
    def fits(self) -> bool:
        """Both phases fit, and the engine's share holds its weights plus one full-length sequence."""
        return self.mem_gib <= self.gpu_mem_gib and all(s.rollout_fits for s in self.memory.stages)

    def as_dict(self) -> dict:
        lay = self.layout
        worst = self.memory.worst.as_gib()
        return dict(
            tp=lay.tp,
            pp=lay.pp,
            vpp=lay.vpp or 1,
            sp=lay.sp,
            cp=lay.cp,
            dp=lay.dp,
            recompute=self.recompute,
            micro_batches=self.micro_batches,
            fits=self.fits,
            mem_gib=round(self.mem_gib, 3),
            tokens_per_s_per_gpu=round(self.throughput.tokens_per_s_per_gpu, 2),
            step_time_s=round(self.throughput.step_time_s, 3),
            worst_stage=worst["stage"],
            breakdown_gib={k: round(v, 3) for k, v in worst.items() if isinstance(v, float)} | {
                "peak_phase": worst["peak_phase"]
            },
            stages_gib=[round(s.total / GIB, 3) for s in self.memory.stages],
            time_s={k: round(v, 4) for k, v in self.throughput.as_dict().items() if k.endswith("_s")},
            achieved_mfu=round(self.throughput.achieved_mfu, 4),
            # rollout engines: one per engine_tp (the trainer's TP) GPUs, on every GPU of every stage
            engine_tp=lay.tp,
            engines=(lay.tp * lay.pp * lay.cp * lay.dp) // lay.tp if any(s.rollout for s in self.memory.stages) else 0,
        )


def check_request(n_gpus: int, gpu_mem_gib: float, wl: Workload, rollout_share: float) -> None:
    bad = []
    for name, v in (
        ("--gpus", n_gpus),
        ("--gpu-mem-gib", gpu_mem_gib),
        ("--seq-len", wl.seq_len),
        ("--micro-batch", wl.micro_batch),
        ("--global-batch", wl.global_batch),
    ):
        if isinstance(v, bool) or not v > 0:
            bad.append(f"{name}={v!r} must be positive")
    if wl.images_per_sample < 0 or wl.max_pixels <= 0:
        bad.append(f"images per sample ({wl.images_per_sample}) must be >= 0 and max pixels ({wl.max_pixels}) > 0")
    if not 0.0 <= rollout_share < 1.0:
        bad.append(f"--rollout-share={rollout_share} must be in [0, 1)")
    if bad:
        raise TuningError("; ".join(bad))
    if wl.global_batch % wl.micro_batch:
        raise TuningError(
            f"--global-batch {wl.global_batch} is not a multiple of --micro-batch {wl.micro_batch}"
        )


def workload_rule(layout: Layout, wl: Workload) -> str | None:
    """The first batch/sequence rule `layout` breaks for this workload, or None."""
    per_dp = wl.micro_batch * layout.dp
    if wl.global_batch % per_dp:
        return f"global batch not divisible by micro_batch*dp={per_dp}"
    m = wl.global_batch // per_dp
    if (layout.vpp or 1) > 1 and m % layout.pp:
        return f"interleaved pipeline needs micro-batches ({m}) divisible by pp={layout.pp}"
    if layout.cp > 1 and wl.seq_len % (2 * layout.cp):
        return f"seq_len not divisible by 2*cp={2 * layout.cp}"
    return None


def enumerate_layouts(spec: ModelShape, n_gpus: int, wl: Workload) -> tuple[list[Layout], Counter]:
    """All legal layouts for exactly `n_gpus` (cp = 1: see the module doc); also a count of why the
    others were rejected."""
    out: list[Layout] = []
    why: Counter = Counter()
    for tp in divisors(n_gpus):
        for pp in divisors(n_gpus // tp):
            dp = n_gpus // (tp * pp)
            vpps = [None]
            if pp > 1 and spec.layers % pp == 0:
                vpps += [v for v in divisors(spec.layers // pp) if v > 1]
            for vpp in vpps:
                for sp in (False, True) if tp > 1 else (False,):
                    lay = Layout(tp=tp, pp=pp, vpp=vpp, dp=dp, sp=sp)
                    try:
                        validate_layout(
                            lay,
                            world_size=n_gpus,
                            num_attention_heads=spec.heads,
                            num_query_groups=spec.kv_heads,
                            num_layers=spec.layers,
                            vision_num_heads=spec.vision_heads if wl.with_vision else None,
                        )
                    except LayoutError as e:
                        why[str(e).split(";")[0]] += 1
                        continue
                    rule = workload_rule(lay, wl)
                    if rule:
                        why[rule] += 1
                        continue
                    out.append(lay)
    return out, why


def evaluate(
    spec: ModelShape,
    layout: Layout,
    wl: Workload,
    *,
    gpu_mem_gib: float,
    recompute: str,
    prec: Precision,
    kernels: Kernels,
    gpu: GpuType,
    rollout_share: float,
) -> Candidate:
    choices = ["none", "full"] if recompute == "auto" else [recompute]
    cand = None
    for rc in choices:
        mem = estimate_memory(
            spec, layout, wl, prec=prec, kernels=kernels, recompute=rc,
            gpu_mem_gib=gpu_mem_gib, rollout_share=rollout_share,
        )
        thr = estimate_throughput(spec, layout, wl, gpu=gpu, prec=prec, recompute=rc)
        m = wl.global_batch // (wl.micro_batch * layout.dp)
        cand = Candidate(layout, rc, mem, thr, gpu_mem_gib, m)
        if cand.fits:
            break
    return cand


def tune(
    spec: ModelShape,
    n_gpus: int,
    gpu_mem_gib: float,
    wl: Workload = Workload(),
    *,
    recompute: str = "auto",
    prec: Precision = Precision(),
    kernels: Kernels = KERNELS["te"],
    gpu: GpuType = GPU_TYPES["h100"],
    rollout_share: float = 0.0,
) -> list[Candidate]:
    """Every legal layout for `n_gpus`, fitting ones first by tokens/s/GPU, then the rest by memory."""
    check_request(n_gpus, gpu_mem_gib, wl, rollout_share)
    if recompute not in ("auto", "none", "full"):
        raise TuningError(f"--recompute {recompute!r}: use auto, none or full")
    layouts, why = enumerate_layouts(spec, n_gpus, wl)
    if not layouts:
        reasons = "; ".join(f"{r} ({n}x)" for r, n in why.most_common(4))
        raise TuningError(
            f"no parallel layout of {spec.name} can use exactly {n_gpus} GPUs with global batch "
            f"{wl.global_batch} and micro-batch {wl.micro_batch}: {reasons}. Use a GPU count whose "
            f"data-parallel part divides the batch (e.g. a power of two), or change --global-batch"
        )
    cands = [
        evaluate(spec, lay, wl, gpu_mem_gib=gpu_mem_gib, recompute=recompute, prec=prec, kernels=kernels,
                 gpu=gpu, rollout_share=rollout_share)
        for lay in layouts
    ]
    fit = sorted((c for c in cands if c.fits), key=lambda c: (-c.throughput.tokens_per_s_per_gpu, c.mem_gib))
    rest = sorted((c for c in cands if not c.fits), key=lambda c: c.mem_gib)
    return fit + rest


# --rollout-share values tried for the no-fit hint (rollout.engine_gpu_share takes (0, 0.95)).
HINT_SHARES = tuple(round(0.05 * i, 2) for i in range(1, 19))
HINT_GPU_FACTORS = (2, 4, 8)


def describe_layout(c: Candidate) -> str:
    lay = c.layout
    vpp = f" vpp {lay.vpp}" if (lay.vpp or 1) > 1 else ""
    return (f"tp {lay.tp} pp {lay.pp}{vpp}{' sp' if lay.sp else ''} dp {lay.dp}, recompute {c.recompute}: "
            f"{c.mem_gib:.1f} GiB, {c.throughput.tokens_per_s_per_gpu:.0f} tok/s/GPU")


def failing_constraint(c: Candidate) -> str:
    """The first memory constraint `c` breaks, with its numbers: the training phase, the rollout phase
    (stage 0 while the colocated engine generates), or an engine share too small for its weights + one
    sequence."""
    m = c.gpu_mem_gib
    g = GIB
    train = max(c.memory.stages, key=lambda s: s.train_phase)
    if train.train_phase / g > m:
        dyn = max(train.train_dynamic, train.nograd) / g
        return (f"the training phase needs {train.train_phase / g:.1f} GiB on pipeline stage {train.stage} "
                f"(weights+grads+optimizer {train.static / g:.1f}, activations / no-grad peak {dyn:.1f}, "
                f"overhead {train.overhead / g:.1f}) > {m:g} GiB")
    s0 = c.memory.stages[0]
    if s0.rollout_phase / g > m:
        return (f"the rollout phase needs {s0.rollout_phase / g:.1f} GiB on stage 0 (weights+grads+optimizer "
                f"{s0.static / g:.1f} stay resident, overhead {s0.fixed_overhead / g:.1f}, and the engine's share "
                f"{s0.rollout / g:.1f} = --rollout-share x {m:g} GiB) > {m:g} GiB")
    if not s0.rollout_fits:
        return (f"the engine's share ({s0.rollout / g:.1f} GiB) cannot hold its weights ({s0.engine_weights / g:.1f} "
                f"GiB) plus one full-length sequence's KV cache ({s0.min_kv / g:.1f} GiB)")
    return f"it needs {c.mem_gib:.1f} GiB > {m:g} GiB"


@dataclass
class NoFitHint:
    """Why no layout fits and what would: the closest layout's first failing constraint, the
    --rollout-share values that fit on these GPUs (best layout at each), and the smallest GPU count
    (2x, 4x, 8x) that fits at this share."""
    closest: Candidate
    constraint: str
    shares: list[tuple[float, Candidate]]
    gpus: tuple[int, Candidate] | None
    rollout_share: float
    n_gpus: int

    def text(self) -> str:
        lines = [f"No layout fits. The closest ({describe_layout(self.closest)}) fails first on: {self.constraint}."]
        if self.shares:
            vals = [s for s, _ in self.shares]
            share, best = max(self.shares, key=lambda sc: sc[1].throughput.tokens_per_s_per_gpu)
            steps = [HINT_SHARES.index(s) for s in vals]
            if len(vals) == 1:
                span = f"{vals[0]:g}"
            elif steps == list(range(steps[0], steps[-1] + 1)):
                span = f"{vals[0]:g} to {vals[-1]:g}"
            else:
                span = ", ".join(f"{s:g}" for s in vals)
            lines.append(f"Fits on {self.n_gpus} GPUs: --rollout-share {span} (fastest at {share:g}: "
                         f"{describe_layout(best)}).")
        elif self.rollout_share > 0:
            lines.append(f"No --rollout-share in [{HINT_SHARES[0]:g}, {HINT_SHARES[-1]:g}] fits on {self.n_gpus} GPUs.")
        if self.gpus is not None:
            n, best = self.gpus
            lines.append(f"Fits on {n} GPUs at --rollout-share {self.rollout_share:g} ({describe_layout(best)}).")
        if not self.shares and self.gpus is None:
            lines.append(f"Nothing fits up to {self.n_gpus * HINT_GPU_FACTORS[-1]} GPUs either: try --fp8, a shorter "
                         "--seq-len or --recompute full.")
        return "\n".join(lines)


def explain_no_fit(cands: list[Candidate], spec: ModelSpec, n_gpus: int, gpu_mem_gib: float, wl: Workload = Workload(),
                   *, rollout_share: float = 0.0, **tune_kw) -> NoFitHint:
    """For a `tune` result where nothing fits (`tune_kw`: its recompute / prec / kernels / gpu)."""
    closest = min(cands, key=lambda c: c.mem_gib)
    shares = []
    if rollout_share > 0:
        for share in HINT_SHARES:
            fit = [c for c in tune(spec, n_gpus, gpu_mem_gib, wl, rollout_share=share, **tune_kw) if c.fits]
            if fit:
                shares.append((share, fit[0]))
    gpus = None
    for factor in HINT_GPU_FACTORS:
        try:
            fit = [c for c in tune(spec, n_gpus * factor, gpu_mem_gib, wl, rollout_share=rollout_share, **tune_kw)
                   if c.fits]
        except TuningError:  # no legal layout at that count
            continue
        if fit:
            gpus = (n_gpus * factor, fit[0])
            break
    return NoFitHint(closest, failing_constraint(closest), shares, gpus, rollout_share, n_gpus)


def precision_for(dtype: str = "bf16", fp8: bool = False, distributed_optimizer: bool = True) -> Precision:
    if dtype not in ("bf16", "fp16", "fp32"):
        raise TuningError(f"--dtype {dtype!r}: use bf16, fp16 or fp32")
    b = 4 if dtype == "fp32" else 2
    if fp8 and b == 4:
        raise TuningError("--fp8 trains with bf16 weights; drop --dtype fp32")
    return replace(Precision(), param_bytes=b, act_bytes=b, fp8=fp8, distributed_optimizer=distributed_optimizer)
