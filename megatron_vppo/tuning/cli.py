"""`tools/tune_parallelism.py` / `megatron-vppo tune`: rank the layouts for a VPPO run.

Exit status 0 with a table (or `--json`), 2 with one `error:` line when the request is impossible
(bad sizes, a config missing fields, a GPU count no layout can use).
"""
from __future__ import annotations

import argparse
import json
import sys

from megatron_vppo.config import DataConfig, RolloutConfig
from megatron_vppo.tuning.memory import EXACT_KL_FP32_TEMPORARIES, KERNELS, Workload
from megatron_vppo.tuning.model_spec import ModelSpecError, load_model_spec
from megatron_vppo.tuning.search import TuningError, explain_no_fit, precision_for, tune
from megatron_vppo.tuning.throughput import GPU_TYPES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tune_parallelism",
        description="Estimate per-GPU memory and throughput of every TP/PP/VPP/SP/DP layout for a "
        "Qwen2.5-VL VPPO run; fitting layouts first, fastest first.",
    )
    p.add_argument("--model", required=True, help="HF model directory or config.json (examples/model_configs/)")
    p.add_argument("--gpus", type=int, required=True, help="total GPUs (world size)")
    p.add_argument("--gpu-mem-gib", type=float, required=True, help="memory per GPU, GiB (80 GB card: 79.6)")
    p.add_argument("--gpu-type", default="h100", choices=sorted(GPU_TYPES), help="peak FLOPs / bandwidth preset")
    p.add_argument("--seq-len", type=int, default=4096 + 2048, help="prompt + response tokens (default 6144)")
    p.add_argument("--micro-batch", type=int, default=1, help="trajectories per micro-batch")
    p.add_argument("--global-batch", type=int, default=128 * 8, help="trajectories per optimizer step (default 1024)")
    p.add_argument("--images-per-sample", type=int, default=1)
    p.add_argument("--max-pixels", type=int, default=DataConfig().max_pixels, help="processor max_pixels (data.max_pixels)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--fp8", action="store_true", help="Transformer Engine FP8 GEMMs")
    p.add_argument("--recompute", default="auto", choices=["auto", "none", "full"],
                   help="auto: none where it fits, else full")
    p.add_argument("--rollout-share", type=float, default=RolloutConfig().engine_gpu_share,
                   help="rollout.engine_gpu_share: share of each GPU the colocated SGLang engine uses (weights + KV "
                   "cache) while it generates; released while the trainer runs (0: no colocated engine)")
    p.add_argument("--dependency-estimator", default="sampled_k3", choices=["sampled_k3", "exact_kl"],
                   help="exact_kl keeps both views' full log-softmax in the no-grad pass (~4 more fp32 copies)")
    p.add_argument("--kernels", default="te", choices=sorted(KERNELS),
                   help="activation-storage profile: te (GPU) or local (CPU, Megatron local spec)")
    p.add_argument("--no-distributed-optimizer", action="store_true")
    p.add_argument("--top", type=int, default=15, help="table rows (0 = all)")
    p.add_argument("--json", action="store_true", help="print every layout as a JSON list")
    return p


_COLS = [
    ("#", 3), ("tp", 3), ("pp", 3), ("vpp", 4), ("sp", 3), ("cp", 3), ("dp", 3), ("recomp", 6), ("m", 5),
    ("fits", 4), ("weights", 8), ("grads", 7), ("optim", 7), ("act", 7), ("vision", 7), ("bwd", 7),
    ("nograd", 7), ("ovh", 6), ("rollout", 7), ("kv", 6), ("engines", 7), ("total", 7), ("tok/s/GPU", 10),
    ("step_s", 8),
]


def format_table(rows: list[dict], gpu_mem_gib: float, top: int) -> str:
    head = " ".join(f"{n:>{w}}" for n, w in _COLS)
    lines = [head, "-" * len(head)]
    shown = rows if top <= 0 else rows[:top]
    for i, r in enumerate(shown, 1):
        b = r["breakdown_gib"]
        vals = [
            i, r["tp"], r["pp"], r["vpp"], "y" if r["sp"] else "n", r["cp"], r["dp"], r["recompute"],
            r["micro_batches"], "yes" if r["fits"] else "no",
            f"{b['weights']:.1f}", f"{b['grads']:.1f}", f"{b['optimizer']:.1f}", f"{b['activations']:.1f}",
            f"{b['vision_act']:.1f}", f"{b['bwd_peak']:.1f}", f"{b['nograd']:.1f}", f"{b['overhead']:.1f}",
            f"{b['rollout']:.1f}", f"{b['kv_cache']:.1f}" if b["rollout"] else "-",
            f"{r['engines']}x{r['engine_tp']}" if r["engines"] else "-", f"{r['mem_gib']:.1f}",
            f"{r['tokens_per_s_per_gpu']:.0f}", f"{r['step_time_s']:.1f}",
        ]
        lines.append(" ".join(f"{str(v):>{w}}" for v, (_, w) in zip(vals, _COLS)))
    if top > 0 and len(rows) > top:
        lines.append(f"... {len(rows) - top} more layouts (--top 0 shows all)")
    n_fit = sum(r["fits"] for r in rows)
    lines.append(
        f"{n_fit} of {len(rows)} layouts fit in {gpu_mem_gib:g} GiB. Memory columns are GiB on the most "
        "loaded pipeline rank; total = the larger of training, weights+grads+optim + max(act+vision+bwd, nograd) + ovh, "
        "and rollout (every GPU), weights+grads+optim + fixed ovh + rollout + SGLang runtime + sync bucket; kv = rollout - "
        "the engine's weights, at least one full-length sequence; engines = rollout engines x their TP "
        "(rollout.engine_tp, default the trainer's TP): one engine TP rank on every GPU."
    )
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> tuple[int, str]:
    args = build_parser().parse_args(argv)
    try:
        spec = load_model_spec(args.model)
        wl = Workload(
            seq_len=args.seq_len,
            micro_batch=args.micro_batch,
            global_batch=args.global_batch,
            images_per_sample=args.images_per_sample,
            max_pixels=args.max_pixels,
            nograd_fp32_temporaries=EXACT_KL_FP32_TEMPORARIES if args.dependency_estimator == "exact_kl" else 0,
        )
        prec = precision_for(args.dtype, args.fp8, not args.no_distributed_optimizer)
        tune_kw = dict(recompute=args.recompute, prec=prec, kernels=KERNELS[args.kernels], gpu=GPU_TYPES[args.gpu_type])
        cands = tune(spec, args.gpus, args.gpu_mem_gib, wl, rollout_share=args.rollout_share, **tune_kw)
    except (ModelSpecError, TuningError) as e:
        return 2, f"error: {e}"
    rows = [c.as_dict() for c in cands]
    if args.json:
        return 0, json.dumps(rows, indent=1)
    title = (
        f"{spec.name}: {spec.total_params() / 1e9:.2f}B params, {args.gpus} x {args.gpu_mem_gib:g} GiB "
        f"{args.gpu_type}, seq {wl.seq_len}, micro-batch {wl.micro_batch}, global batch {wl.global_batch}, "
        f"{args.dtype}{' +fp8' if args.fp8 else ''}, rollout share {args.rollout_share:g}"
    )
    text = title + "\n" + format_table(rows, args.gpu_mem_gib, args.top)
    if not any(c.fits for c in cands):  # say which constraint fails first and what would fit
        hint = explain_no_fit(cands, spec, args.gpus, args.gpu_mem_gib, wl, rollout_share=args.rollout_share, **tune_kw)
        text += "\n" + hint.text()
    return 0, text


def main(argv: list[str] | None = None) -> int:
    code, text = run(argv)
    print(text, file=sys.stderr if code else sys.stdout)
    return code
