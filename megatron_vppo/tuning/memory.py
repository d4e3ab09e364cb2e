"""Per-GPU memory of one VPPO trainer layout, counted from first principles.

Every term is (number of elements) x (bytes per element); nothing is fitted to measurements.

Static (whole run):
  weights    params on the stage x param bytes (+ FP8 weight caches)
  grads      params x grad bytes (Megatron DDP's contiguous buffer; fp32 here, `grad_reduce_in_fp32`)
  optimizer  Adam m, v (fp32) + fp32 master copy when params are 16-bit, sharded over DP (x CP) by the
             distributed optimizer
Dynamic, the larger of two phases:
  train      saved activations of the micro-batches a pipeline stage holds in flight (1F1B), the vision
             tower's on the first stage, and on the last stage one micro-batch of logits plus the loss's
             fp32 copies and (without gradient-accumulation fusion) the output layer's weight-grad temp
  no-grad    the paired VPPO pass: 2 views x micro-batch x seq x V/TP logits plus the fp32 log-softmax
             temporaries, reduced to per-token scalars at once (design decision 3)
Plus framework overhead (CUDA context, NCCL/cuBLAS workspaces, allocator slack).
Rollout (every GPU: the colocated SGLang engines sit on every rank, one per `rollout.engine_tp`
consecutive GPUs, so world / engine_tp engines generate; each releases everything while the trainer
runs): static + fixed overhead + the engine's share of the GPU (`rollout.engine_gpu_share`), which must
hold the engine's weights (HF model / engine_tp) and KV cache for at least one full-length sequence,
+ SGLang's runtime outside that share (SGLang sizes only weights + KV from `mem_fraction_static`; its
process's CUDA context, decode CUDA graphs and forward workspace come on top: SGLANG_RUNTIME_GIB)
+ the weight sync's buffer (one flattened bucket of `rollout.bucket_bytes` per GPU while it is read).

Saved-activation counts per decoder layer and token (elements; h hidden, q = heads*head_dim,
kv = kv_heads*head_dim, f ffn width, t = TP, t_sp = t with sequence parallel else 1):
  norms      2 x norm_saved x h / t_sp        (TE LayerNormLinear keeps input + ln_out: 2;
                                               torch RMSNorm + separate linear keeps input, x*rstd, out: 3)
  attention  (2q + 2kv) / t                   (flash/TE keeps q, k, v, out + a per-head LSE;
                                               the local path repeats K/V to every head first: 4q / t)
  MLP        mlp_saved_f x f / t              (fused SwiGLU keeps fc1 out 2f + fc2 in f: 3;
                                               unfused chunk/silu/mul keeps 5f)
  RoPE       rope_saved x head_dim per position (unfused RoPE keeps cos and sin for q and k: 4)
With full recomputation a layer keeps only its input (h / t_sp) and one layer is rebuilt during backward.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from megatron_vppo.config import DataConfig
from megatron_vppo.parallel_layout import Layout
from megatron_vppo.tuning.model_spec import ModelShape

GIB = 2**30
# SGLang 0.5.23 memory outside mem_fraction_static, per engine GPU: the scheduler process's CUDA context
# and NCCL/cuBLAS workspaces (~0.5-1 GiB), decode CUDA graphs up to cuda_graph_max_bs (~1-2 GiB at 32B
# widths) and a prefill chunk's activations (~1 GiB). An estimate from those parts, not a measurement
# (no GPU here): the middle of the 2-5 GiB range issue 18 read from SGLang's sources.
SGLANG_RUNTIME_GIB = 3.0
# rollout.bucket_bytes' default (megatron_vppo.sync.buckets.DEFAULT_BUCKET_BYTES; tests/test_tuning.py
# keeps them equal): the flattened bucket each GPU holds while the engine reads it during a weight sync.
SYNC_BUCKET_BYTES = 512 * 1024 * 1024
# fp32 [tokens, V/TP] temporaries the exact-KL dependency estimator adds to the no-grad pass (both views'
# log-softmax and the KL terms; an upper bound worked out from the code, not measured).
EXACT_KL_FP32_TEMPORARIES = 4


@dataclass(frozen=True)
class Kernels:
    """What the layer implementation keeps for backward — where GPU (Transformer Engine) and CPU
    (Megatron-Core local spec + unfused torch ops) differ. Two presets: KERNELS['te'], KERNELS['local']."""

    name: str
    norm_saved: float  # h-wide tensors per RMSNorm incl. the normalized output the next GEMM keeps
    gqa_expanded_kv: bool  # K/V repeated to all query heads before attention and saved that wide
    mlp_saved_f: float  # ffn-wide tensors the SwiGLU MLP keeps
    rope_saved: float  # head_dim-wide tensors per position kept by RoPE (cos/sin for q and k)
    grad_accum_fusion: bool  # wgrad accumulates into main_grad; False: weight-sized temp per GEMM
    deallocate_pipeline_outputs: bool  # Megatron frees a stage's sent output (GPU); CPU keeps it
    fixed_overhead_gib: float  # CUDA context + NCCL + cuBLAS/TE workspaces; 0 for CPU (measured baseline)
    fragmentation: float  # caching-allocator slack as a fraction of dynamic memory
    attention_lse: bool = True  # flash-style attention keeps a fp32 log-sum-exp per head and token


KERNELS = {
    # GPU: TE fused LayerNorm+Linear, flash attention with native GQA, fused SwiGLU. RoPE stays unfused
    # (the project sets apply_rope_fusion=False for 3-D M-RoPE) and so does the wgrad accumulation: the
    # model config sets gradient_accumulation_fusion=False (tests/test_tuning.py keeps the two equal).
    "te": Kernels(
        name="te",
        norm_saved=2,
        gqa_expanded_kv=False,
        mlp_saved_f=3,
        rope_saved=4,
        grad_accum_fusion=False,
        deallocate_pipeline_outputs=True,
        fixed_overhead_gib=2.5,
        fragmentation=0.08,
    ),
    # CPU: torch.nn.RMSNorm (keeps x and x*rstd) + separate linear (keeps the output), SDPA after
    # repeat_interleave of K/V, SwiGLU as chunk/silu/mul (5f), no gradient-accumulation fusion.
    # Overheads are 0: the measurement subtracts a warmed-up runtime baseline.
    "local": Kernels(
        name="local",
        norm_saved=3,
        gqa_expanded_kv=True,
        mlp_saved_f=5,
        rope_saved=4,
        grad_accum_fusion=False,
        deallocate_pipeline_outputs=False,
        fixed_overhead_gib=0.0,
        fragmentation=0.0,
    ),
}


@dataclass(frozen=True)
class Precision:
    param_bytes: int = 2  # bf16 weights (Float16Module); 4 for fp32
    act_bytes: int = 2  # activations in the compute dtype
    grad_bytes: int = 4  # DDP grad buffer (project: grad_reduce_in_fp32=True)
    distributed_optimizer: bool = True
    fp8: bool = False  # TE FP8: GEMM inputs kept in 1 byte, fp8 weight + transpose caches

    @staticmethod
    def fp32() -> "Precision":
        return Precision(param_bytes=4, act_bytes=4, grad_bytes=4)

    @property
    def optimizer_bytes(self) -> int:
        """Adam m, v in fp32, plus an fp32 master copy for 16-bit params."""
        return 8 + (4 if self.param_bytes < 4 else 0)


@dataclass(frozen=True)
class Workload:
    seq_len: int = 4096 + 2048  # prompt + response (spec §7, 7B)
    micro_batch: int = 1
    global_batch: int = 128 * 8  # trajectories per optimizer step (mini-batch 128 prompts x G=8)
    images_per_sample: int = 1
    max_pixels: int = DataConfig.max_pixels
    # Extra fp32 [tokens, V/TP] tensors of the no-grad pass beyond the one working copy of the vocab-parallel
    # log-prob: 0 for the sampled_k3 dependency; the exact-KL estimator's count is set by the CLI.
    nograd_fp32_temporaries: int = 0
    with_vision: bool = True
    nograd_pass: bool = True  # VPPO's paired no-grad pass (False: a plain training step)


@dataclass
class StageMemory:
    """Bytes on one pipeline rank (the most loaded rank of that stage)."""

    stage: int
    params: int
    weights: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0  # LM saved activations of all in-flight micro-batches
    vision_act: float = 0.0  # vision tower's saved activations (first stage)
    logits: float = 0.0  # last stage: logits + loss copies + output-layer temps of one micro-batch
    transient: float = 0.0  # gradients alive while back-propagating one layer (+ a recomputed layer)
    nograd: float = 0.0  # dynamic peak of the paired no-grad pass
    overhead: float = 0.0
    fixed_overhead: float = 0.0  # the part of `overhead` also present while the engine generates
    rollout: float = 0.0  # the engine's share of the GPU while it generates (stage 0)
    engine_weights: float = 0.0  # the engine's weights inside that share
    min_kv: float = 0.0  # KV cache of one full-length sequence on one engine rank
    engine_runtime: float = 0.0  # SGLang's memory outside its share (context, CUDA graphs, workspace)
    sync_buffers: float = 0.0  # the weight sync's bucket on this GPU

    @property
    def static(self) -> float:
        return self.weights + self.grads + self.optimizer

    @property
    def kv_cache(self) -> float:
        return self.rollout - self.engine_weights

    @property
    def rollout_fits(self) -> bool:
        return self.rollout == 0 or self.kv_cache >= self.min_kv

    @property
    def train_phase(self) -> float:
        return self.static + max(self.train_dynamic, self.nograd) + self.overhead

    @property
    def rollout_phase(self) -> float:
        if not self.rollout:
            return 0.0
        return self.static + self.fixed_overhead + self.rollout + self.engine_runtime + self.sync_buffers

    @property
    def bwd_peak(self) -> float:
        """What backward needs on top of the saved activations: the loss/logits phase on the last
        stage or one layer's gradient working set, whichever is larger (they do not overlap)."""
        return max(self.logits, self.transient)

    @property
    def train_dynamic(self) -> float:
        return self.activations + self.vision_act + self.bwd_peak

    @property
    def peak_phase(self) -> str:
        if self.rollout_phase > self.train_phase:
            return "rollout"
        return "train" if self.train_dynamic >= self.nograd else "nograd"

    @property
    def total(self) -> float:
        return max(self.train_phase, self.rollout_phase)

    def as_gib(self) -> dict:
        keys = ("weights", "grads", "optimizer", "activations", "vision_act", "logits", "transient",
                "bwd_peak", "nograd", "overhead", "rollout", "engine_weights", "kv_cache", "min_kv",
                "engine_runtime", "sync_buffers")
        out = {k: getattr(self, k) / GIB for k in keys}
        out.update(stage=self.stage, params=self.params, total=self.total / GIB, peak_phase=self.peak_phase)
        return out


@dataclass
class MemoryEstimate:
    layout: Layout
    recompute: str
    stages: list[StageMemory] = field(default_factory=list)

    @property
    def worst(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total)

    @property
    def total_gib(self) -> float:
        return self.worst.total / GIB


def engine_rank_bytes(spec: ModelShape, tp: int, prec: Precision, seq_len: int) -> tuple[float, float]:
    """(weights, KV cache of one `seq_len` sequence) on one rank of a TP-`tp` SGLang engine: the HF
    model in the trainer's parameter dtype (bf16 under FP8 training), K and V per layer for the KV
    heads this rank holds (replicated when tp > KV heads)."""
    e = 4 if prec.param_bytes == 4 else 2
    kv_heads = max(1, spec.kv_heads // tp)
    return spec.total_params() * e / tp, seq_len * spec.layers * 2 * kv_heads * spec.hd * e


def padded_vocab(vocab: int, tp: int, multiple: int = 128) -> int:
    step = multiple * tp
    return -(-vocab // step) * step


def _stage_layers(spec: ModelShape, layout: Layout) -> int:
    return spec.layers // layout.pp


def stage_params(spec: ModelShape, layout: Layout, stage: int, vocab_multiple: int = 128,
                 with_vision: bool = True) -> dict:
    """Parameters one rank of `stage` holds, split by part (TP-sharded parts divided by tp)."""
    t = layout.tp
    ls, lr = spec.lm_layer_params()
    n = _stage_layers(spec, layout)
    v_pad = padded_vocab(spec.vocab, t, vocab_multiple)
    first, last = stage == 0, stage == layout.pp - 1
    parts = {"layers": n * (ls // t + lr)}
    parts["embedding"] = v_pad * spec.hidden // t if first else 0
    # Untied: a separate output layer. Tied with pp > 1: Megatron keeps a copy on the last stage.
    needs_output = last and (not spec.tie or layout.pp > 1)
    parts["output"] = v_pad * spec.hidden // t if needs_output else 0
    parts["final_norm"] = spec.hidden if last else 0
    if first and with_vision:
        vs, vr = spec.vision_params()
        parts["vision"] = vs // t + vr
    else:
        parts["vision"] = 0
    return parts


def gemm_params(spec: ModelShape, layout: Layout, stage: int, with_vision: bool = True) -> int:
    """Params that feed GEMMs (FP8 caches them); the embedding lookup and norms excluded."""
    parts = stage_params(spec, layout, stage, with_vision=with_vision)
    ls, _ = spec.lm_layer_params()
    return _stage_layers(spec, layout) * ls // layout.tp + parts["output"] + (
        spec.vision_params()[0] // layout.tp if stage == 0 and with_vision else 0
    )


def layer_saved_bytes_per_token(
    spec: ModelShape, layout: Layout, k: Kernels, prec: Precision, recompute: str
) -> float:
    """Bytes one decoder layer keeps for backward, per token (this rank's share)."""
    t, cp = layout.tp, layout.cp
    tsp = t if layout.sp else 1
    e = prec.act_bytes
    h, q, kv, f = spec.hidden, spec.q_width, spec.kv_width, spec.intermediate
    if recompute == "full":
        return h / tsp * e / cp
    gemm_in = 1 if prec.fp8 else e  # TE keeps FP8 copies of GEMM inputs under FP8
    norm_in = 2 * h / tsp * e  # the two norms' inputs
    norm_rest = 2 * (k.norm_saved - 1) * h / tsp * gemm_in  # normalized outputs (GEMM inputs) etc.
    kv_w = q if k.gqa_expanded_kv else kv
    attn = (2 * q + 2 * kv_w) / t * e
    if k.attention_lse:
        attn += spec.heads / t * 4
    fc1_out = 2 * spec.intermediate / t * e  # SwiGLU input (gate | up)
    mlp = fc1_out + (k.mlp_saved_f - 2) * f / t * (gemm_in if k.mlp_saved_f == 3 else e)
    return (norm_in + norm_rest + attn + mlp) / cp


def layer_bwd_transient_bytes_per_token(spec: ModelShape, layout: Layout, prec: Precision) -> float:
    """Gradient tensors alive while back-propagating one layer: dgrad of fc1's output (2f), of the
    SwiGLU product (f), and two hidden-wide residual grads."""
    t, e = layout.tp, prec.act_bytes
    return (3 * spec.intermediate / t + 2 * spec.hidden) * e / layout.cp


def _rope_bytes_per_position(spec: ModelShape, k: Kernels, prec: Precision, recompute: str) -> float:
    return 0.0 if recompute == "full" else k.rope_saved * spec.hd * prec.act_bytes


def vision_act_bytes_per_sample(spec: ModelShape, layout: Layout, k: Kernels, prec: Precision,
                                wl: Workload, recompute: str) -> float:
    """Saved activations of the vision tower for one sample's images (first stage; no SP, no CP)."""
    if not wl.with_vision:
        return 0.0
    t, e = layout.tp, prec.act_bytes
    patches = spec.patches_per_image(wl.max_pixels) * wl.images_per_sample
    vh, vi = spec.vision_hidden, spec.vision_intermediate
    pixels_in = spec.in_channels * spec.temporal_patch * spec.patch**2 * e  # Conv3d input
    if recompute == "full":
        per_block = vh * e
    else:
        per_block = (2 * vh + 2 * (k.norm_saved - 1) * vh) * e + 4 * vh / t * e + k.mlp_saved_f * vi / t * e
        per_block += k.rope_saved * (vh // spec.vision_heads) * e
    merger = (k.norm_saved * vh + 2 * spec.merge**2 * vh / t) * e  # ln_q, GELU in, fc2 in (per patch)
    merger *= 1 + spec.deepstack  # each DeepStack merger keeps as much as the final one
    return patches * (spec.vision_depth * per_block + pixels_in + merger)


def inflight_microbatches(layout: Layout, stage: int, m: int) -> float:
    """Micro-batches whose activations a rank of `stage` holds at once under 1F1B (in units of the
    stage's whole layer count; interleaving counts model chunks: Megatron's warmup formula)."""
    pp, vpp = layout.pp, layout.vpp or 1
    if pp == 1:
        return 1.0
    if vpp == 1:
        return float(min(pp - stage, m))
    warmup = (pp - stage - 1) * 2 + (vpp - 1) * pp
    return min(warmup + 1, m * vpp) / vpp


def estimate_memory(
    spec: ModelShape,
    layout: Layout,
    wl: Workload,
    *,
    prec: Precision = Precision(),
    kernels: Kernels = KERNELS["te"],
    recompute: str = "none",
    gpu_mem_gib: float = 80.0,
    rollout_share: float = 0.0,
    vocab_multiple: int = 128,
    engine_tp: int | None = None,
) -> MemoryEstimate:
    """`rollout_share`: the colocated engine's share of each GPU while it generates (0: no colocated
    engine), on every GPU of every stage; `engine_tp`: its TP size (`rollout.engine_tp`; None: the
    trainer's TP)."""
    if recompute not in ("none", "full"):
        raise ValueError(f"recompute={recompute!r}: use 'none' or 'full'")
    t, pp, cp, dp = layout.tp, layout.pp, layout.cp, layout.dp
    mb = wl.micro_batch
    m = max(1, wl.global_batch // (mb * dp))
    tokens = wl.seq_len * mb  # per micro-batch
    v_local = padded_vocab(spec.vocab, t, vocab_multiple) // t
    tsp = t if layout.sp else 1
    e = prec.act_bytes
    n_layers = _stage_layers(spec, layout)
    per_layer = layer_saved_bytes_per_token(spec, layout, kernels, prec, recompute) * tokens
    per_layer += _rope_bytes_per_position(spec, kernels, prec, recompute) * wl.seq_len / cp
    full_layer = layer_saved_bytes_per_token(spec, layout, kernels, prec, "none") * tokens
    transient = layer_bwd_transient_bytes_per_token(spec, layout, prec) * tokens
    if recompute == "full":
        transient += full_layer  # the layer being recomputed
    est = MemoryEstimate(layout=layout, recompute=recompute)
    opt_shard = (dp * cp) if prec.distributed_optimizer else 1
    for stage in range(pp):
        first, last = stage == 0, stage == pp - 1
        parts = stage_params(spec, layout, stage, vocab_multiple, wl.with_vision)
        n_params = sum(parts.values())
        sm = StageMemory(stage=stage, params=n_params)
        sm.weights = n_params * prec.param_bytes
        if prec.fp8:
            sm.weights += 2 * gemm_params(spec, layout, stage, wl.with_vision)  # fp8 weight + its transpose
        sm.grads = n_params * prec.grad_bytes
        sm.optimizer = n_params * prec.optimizer_bytes / opt_shard

        inflight = inflight_microbatches(layout, stage, m)
        act = inflight * n_layers * per_layer
        # Under PP a stage sends [hidden; DeepStack features] (1 + deepstack rows per token), and a
        # receiving stage keeps that input until its backward.
        carried = 1 + (spec.deepstack if pp > 1 else 0)
        if not last and not kernels.deallocate_pipeline_outputs:
            act += inflight * carried * tokens * spec.hidden / tsp * e / cp  # the stage's kept output tensor
        if not first and carried > 1:
            act += inflight * (carried - 1) * tokens * spec.hidden / tsp * e / cp  # received DeepStack rows
        sm.activations = act
        sm.transient = transient
        if first:
            sm.vision_act = min(pp, m) * mb * vision_act_bytes_per_sample(spec, layout, kernels, prec, wl, recompute)

        if last:
            # Final norm + output-layer input, kept for backward.
            sm.activations += inflight * kernels.norm_saved * spec.hidden / tsp * e * tokens / cp
            # Logits of one micro-batch: the loss keeps them (act dtype) and works on one private fp32
            # copy (the vocab-parallel log-prob recomputes the softmax in backward rather than keeping
            # it; the entropy bonus comes from log-probs); the gradient is cast back to act dtype for
            # the output GEMM's backward.
            logit_bytes = e + 4 + (e if e != 4 else 0)
            logits = tokens * v_local * logit_bytes / cp
            wgrad = 0 if kernels.grad_accum_fusion else v_local * spec.hidden * prec.param_bytes
            dgrad = tokens * spec.hidden * e / cp
            sm.logits = logits + wgrad + dgrad
        if last and wl.nograd_pass:
            # Both views' logits (act dtype) + the fp32 working copy of the log-prob reduction.
            nograd_bytes = e + 4 * (1 + wl.nograd_fp32_temporaries)
            # + the final norm's input and output (full h) that stay alive while the logits exist.
            sm.nograd = 2 * mb * wl.seq_len * (v_local * nograd_bytes + 2 * spec.hidden * e) / cp
        dynamic = max(sm.train_dynamic, sm.nograd)
        sm.fixed_overhead = kernels.fixed_overhead_gib * GIB
        sm.overhead = sm.fixed_overhead + kernels.fragmentation * dynamic
        if rollout_share > 0:  # an engine TP rank on every GPU, whatever the stage
            sm.rollout = rollout_share * gpu_mem_gib * GIB
            sm.engine_weights, sm.min_kv = engine_rank_bytes(spec, engine_tp or t, prec, wl.seq_len)
            sm.engine_runtime, sm.sync_buffers = SGLANG_RUNTIME_GIB * GIB, SYNC_BUCKET_BYTES
        est.stages.append(sm)
    return est
