"""Step time of one optimizer step of the VPPO trainer, from FLOPs and communication volume.

Per trajectory the trainer runs: the paired no-grad pass (2 forwards: original and perturbed view —
VPPO adds one of them), then forward + backward for the update (3 forwards' FLOPs), plus one more
forward when layers are fully recomputed. A forward costs 2 x (GEMM params) FLOPs per token, plus
causal attention (2 s^2 q per layer, QK^T and AV at half by causality), the logits GEMM, and the
vision tower on the first stage (2 x params per patch, window attention over 64-patch windows, full
attention in `fullatt` blocks).

Time = pipeline time of m micro-batches (slowest stage x m + the fill/drain bubble of the others,
divided by VPP) with compute at `mfu` of the GPU's dense peak, plus exposed communication: TP
all-reduces (or all-gather + reduce-scatter with SP, same bytes), pipeline p2p, and the DP gradient
reduce-scatter + parameter all-gather of the distributed optimizer. Rollout time is not modelled.
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_vppo.parallel_layout import Layout
from megatron_vppo.tuning.memory import Precision, Workload, stage_params
from megatron_vppo.tuning.model_spec import ModelShape


@dataclass(frozen=True)
class GpuType:
    name: str
    bf16_tflops: float  # dense peak
    fp8_tflops: float  # dense peak (0 = no FP8 tensor cores)
    mfu: float  # fraction of peak the GEMM-bound compute reaches (before bubble and communication)
    fp8_mfu: float  # FP8 GEMMs reach a lower fraction of their (2x) peak
    intra_node_gbs: float  # NVLink, per-GPU bus bandwidth a collective sees, GB/s
    inter_node_gbs: float  # per-GPU network bandwidth (IB/RoCE), GB/s
    gpus_per_node: int = 8


# Assumptions (vendor dense peaks; bus bandwidth ~80 % of the link's one-direction rate).
GPU_TYPES = {
    "h100": GpuType("h100", 989.0, 1979.0, 0.45, 0.32, 360.0, 40.0),
    "h800": GpuType("h800", 989.0, 1979.0, 0.45, 0.32, 160.0, 40.0),  # NVLink 400 GB/s bidirectional
    "h200": GpuType("h200", 989.0, 1979.0, 0.47, 0.33, 360.0, 40.0),
    "a100": GpuType("a100", 312.0, 0.0, 0.50, 0.0, 240.0, 20.0),
    "a800": GpuType("a800", 312.0, 0.0, 0.50, 0.0, 160.0, 20.0),
    "l40s": GpuType("l40s", 362.0, 733.0, 0.40, 0.30, 25.0, 20.0),  # PCIe, no NVLink
}


@dataclass
class ThroughputEstimate:
    step_time_s: float
    tokens_per_s_per_gpu: float
    compute_s: float  # pipeline time incl. bubble, without communication
    bubble_s: float
    tp_comm_s: float
    pp_comm_s: float
    dp_comm_s: float
    flops_per_token: float  # model FLOPs (all passes) per trained token
    achieved_mfu: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def forward_flops(spec: ModelShape, wl: Workload) -> dict:
    """FLOPs of one forward of one trajectory: LM layers, logits head, vision tower."""
    s = wl.seq_len
    ls, _ = spec.lm_layer_params()
    layer = 2 * ls * s + 2 * s * s * spec.q_width  # GEMMs + causal attention
    head = 2 * s * spec.hidden * spec.vocab
    vision = 0.0
    if wl.with_vision and wl.images_per_sample:
        p = spec.patches_per_image(wl.max_pixels)
        bs, _ = spec.vision_block_params()
        vh = spec.vision_hidden
        win = (spec.window_size // spec.patch) ** 2
        full = spec.vision_full_attn_blocks
        attn = (spec.vision_depth - full) * 4 * p * min(win, p) * vh + full * 4 * p * p * vh
        m2 = spec.merge**2
        merger = 2 * ((m2 * vh) ** 2 + m2 * vh * spec.vision_out_hidden) * (p // m2) * (1 + spec.deepstack)
        patch_embed = 2 * spec.in_channels * spec.temporal_patch * spec.patch**2 * vh * p
        vision = (spec.vision_depth * 2 * bs * p + attn + merger + patch_embed) * wl.images_per_sample
    return {"layer": layer, "layers": layer * spec.layers, "head": head, "vision": vision}


def passes(recompute: str, nograd_pass: bool = True) -> float:
    """Forward-equivalents per trajectory: train fwd+bwd = 3, recompute +1, no-grad views 2."""
    return 3 + (1 if recompute == "full" else 0) + (2 if nograd_pass else 0)


def estimate_throughput(
    spec: ModelShape,
    layout: Layout,
    wl: Workload,
    *,
    gpu: GpuType = GPU_TYPES["h100"],
    prec: Precision = Precision(),
    recompute: str = "none",
    dp_exposed: float = 0.5,
) -> ThroughputEstimate:
    """`dp_exposed`: share of DP gradient/param traffic not hidden behind backward (Megatron overlaps
    grad reduce-scatter with backward and param all-gather with the next forward)."""
    t, pp, cp, dp = layout.tp, layout.pp, layout.cp, layout.dp
    vpp = layout.vpp or 1
    mb = wl.micro_batch
    m = max(1, wl.global_batch // (mb * dp))
    f = forward_flops(spec, wl)
    k = passes(recompute, wl.nograd_pass)
    use_fp8 = prec.fp8 and gpu.fp8_tflops > 0
    flops_rate = (gpu.fp8_tflops * gpu.fp8_mfu if use_fp8 else gpu.bf16_tflops * gpu.mfu) * 1e12
    shard = t * cp  # a stage's work is split over its TP x CP ranks

    # Per-micro-batch compute time of each stage.
    layers_per_stage = spec.layers // pp
    stage_t = []
    for st in range(pp):
        fl = f["layer"] * layers_per_stage
        if st == pp - 1:
            fl += f["head"]
        if st == 0:
            fl += f["vision"]
        stage_t.append(mb * k * fl / shard / flops_rate)
    t_max, t_avg = max(stage_t), sum(stage_t) / pp
    compute = m * t_max + (pp - 1) * t_avg / vpp
    bubble = compute - m * t_avg

    # Tensor parallel: 2 collectives per layer per pass over the hidden activations (ring: 2(t-1)/t).
    e = prec.act_bytes
    tokens = wl.seq_len * mb / cp
    fwd_bwd_passes = k  # every forward-equivalent pass moves the same activation bytes once
    intra = gpu.intra_node_gbs * 1e9
    inter = gpu.inter_node_gbs * 1e9
    tp_bw = intra if t <= gpu.gpus_per_node else inter
    tp_bytes = 0.0
    if t > 1:
        ring = 2 * (t - 1) / t
        tp_bytes = fwd_bwd_passes * 2 * layers_per_stage * tokens * spec.hidden * e * ring
        if wl.with_vision:
            p = spec.patches_per_image(wl.max_pixels) * wl.images_per_sample
            tp_bytes += fwd_bwd_passes * 2 * spec.vision_depth * p * spec.vision_hidden * e * ring / pp
    tp_comm = m * tp_bytes / tp_bw
    # CP: K/V ring exchange per layer and pass, half of it exposed.
    if cp > 1:
        cp_bytes = fwd_bwd_passes * layers_per_stage * 2 * tokens * spec.kv_width / t * e * (cp - 1)
        tp_comm += 0.5 * m * cp_bytes / (intra if t * cp <= gpu.gpus_per_node else inter)

    # Pipeline p2p: one activation tensor per micro-batch and pass across each stage boundary.
    pp_comm = 0.0
    if pp > 1:
        neighbour_bw = intra if t * cp * dp < gpu.gpus_per_node else inter
        tsp = t if layout.sp else 1
        # Interleaving sends every micro-batch across vpp times as many chunk boundaries.
        pp_comm = m * fwd_bwd_passes * vpp * tokens * spec.hidden / tsp * e / neighbour_bw

    # Data parallel, once per optimizer step, on the most loaded stage.
    dp_comm = 0.0
    if dp > 1:
        params = max(sum(stage_params(spec, layout, st, with_vision=wl.with_vision).values()) for st in range(pp))
        frac = (dp - 1) / dp
        if prec.distributed_optimizer:
            nbytes = params * (prec.grad_bytes + prec.param_bytes) * frac  # RS grads + AG params
        else:
            nbytes = params * prec.grad_bytes * 2 * frac  # all-reduce
        dp_bw = intra if t * cp * dp <= gpu.gpus_per_node else inter
        dp_comm = dp_exposed * nbytes / dp_bw

    step = compute + tp_comm + pp_comm + dp_comm
    n_gpus = layout.world_size
    tokens_step = wl.global_batch * wl.seq_len
    model_flops = k * (f["layers"] + f["head"] + f["vision"]) * wl.global_batch
    peak = (gpu.fp8_tflops if use_fp8 else gpu.bf16_tflops) * 1e12
    return ThroughputEstimate(
        step_time_s=step,
        tokens_per_s_per_gpu=tokens_step / step / n_gpus,
        compute_s=compute,
        bubble_s=bubble,
        tp_comm_s=tp_comm,
        pp_comm_s=pp_comm,
        dp_comm_s=dp_comm,
        flops_per_token=model_flops / tokens_step,
        achieved_mfu=model_flops / step / n_gpus / peak,
    )

