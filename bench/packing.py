"""Packed (thd) vs padded micro-batches on one skewed RL step batch, same model, one run.

    python bench/packing.py [--trajectories 32] [--max-tokens 4096] [--repeats 3]

The batch: prompts with one of two images or text only (every third), response lengths drawn
log-uniform from 16 to 1024 tokens (long-tailed: most short, a few long). Both layouts go through the
trainer's own passes (`passes.dependency_pass` paired with the perturbed view, `passes.policy_update_pass`
forward + backward), timed side by side in one process, alternating which runs first; ratios are the
median of the per-repeat ratios packed / padded.

* real-token fraction: real tokens / tokens the micro-batches compute (padded: micro_batch_size rows
  of the step's longest trajectory, as `loop._pass_shape`; packed: first-fit-decreasing bins of
  `--max-tokens`, each rounded up to a multiple of 8);
* max_abs_diff: largest |packed - padded| over the per-token old/aug log-probs and exact KL;
  loss_rel_diff: |packed - padded| / |padded| of the update's summed loss numerator;
* nograd_peak_over_logits: in a fresh process whose allocations above 64 KiB are mmapped (freed
  memory leaves the RSS at once), the peak resident memory while the last stage reduces one packed
  paired micro-batch's logits to per-token scores (`passes._token_scores_loss`: log-probs of both
  views and the exact KL), over the logits tensor's bytes. That run uses the real Qwen2.5 vocabulary
  (151,665 rows) on a narrow model, so the logits dominate as they do at scale. The same process also
  reports the rise over a whole paired pass (activations and the output layer included) over the
  largest micro-batch's logits, packed and padded (micro-batch 1): Megatron's GPTModel returns
  `logits.transpose(0, 1).contiguous()`, a full copy for a padded [b > 1] batch and a free view for a
  packed [1, T] one.

The last line printed is one JSON object with every number.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from vppo_passes import (RUN_SEED, STEP, _single_process_env, make_model, make_trajectories,  # noqa: E402
                         side_by_side)


def make_skewed_trajectories(model_dir: Path, n: int, seed: int = 0):
    """n trajectories: image prompts of two sizes and a text-only one; responses 16..1024 tokens, log-uniform."""
    return make_trajectories(model_dir, n, lambda rng: int(round(16 * math.exp(rng.uniform(0, math.log(1024 / 16))))),
                             seed)


def _build(model_dir: Path, micro_batch_size: int, n_traj: int):
    from vppo_passes import build_trainer

    return build_trainer(model_dir, 1, micro_batch_size, n_traj)


def _shapes(trainer, trajs, max_tokens):
    from dataclasses import replace

    from megatron_vppo.train import loop

    padded = loop._pass_shape(trainer, trajs)
    return padded, replace(padded, max_tokens=max_tokens)


def _computed_tokens(trainer, trajs, shape) -> int:
    from megatron_vppo.train import passes

    mbs, _ = passes._micro_batches(trainer.dims, trainer.model_chunks, trajs, shape)
    return sum(int(mb.input_ids.numel()) for mb in mbs)


def bench_time(model_dir: Path, args) -> dict:
    from megatron_vppo.train import loop, passes
    from megatron_vppo.train.records import ShapedTrajectory

    trajs = make_skewed_trajectories(model_dir, args.trajectories)
    trainer = _build(model_dir, args.micro_batch_size, len(trajs))
    padded, packed = _shapes(trainer, trajs, args.max_tokens)
    views = loop.perturbed_views(trajs, trainer.processor, RUN_SEED, STEP, 0, trainer.cfg.algo.perturb_prob)
    real = sum(t.num_tokens for t in trajs)
    out = {"trajectories": len(trajs), "real_tokens": real,
           "response_len_min": min(t.response_len for t in trajs),
           "response_len_max": max(t.response_len for t in trajs),
           "response_len_median": sorted(t.response_len for t in trajs)[len(trajs) // 2],
           "text_only": sum(not t.has_image for t in trajs)}
    out["real_token_fraction_padded"] = real / _computed_tokens(trainer, trajs, padded)
    out["real_token_fraction_packed"] = real / _computed_tokens(trainer, trajs, packed)

    def dep(shape):
        return lambda: passes.dependency_pass(trainer.dims, trainer.model_chunks, trajs, shape, views, exact_kl=True)

    res_pad, res_pack = dep(padded)(), dep(packed)()
    diff = max(float((getattr(a, k) - getattr(b, k)).abs().max()) for a, b in zip(res_pad, res_pack)
               for k in ("old", "aug", "kl"))
    t = side_by_side(dep(packed), dep(padded), args.repeats)
    out.update(nograd_time_ratio_packed_over_padded=t["median_ratio"], nograd_padded_s=t["median_b_s"],
               nograd_packed_s=t["median_a_s"])

    algo = loop.algorithm_of(trainer.cfg)
    ls = algo.settings(trainer.cfg.algo)
    g = torch.Generator().manual_seed(0)
    per_traj = [ShapedTrajectory(old_logp=r.old, tgf_mask=(torch.rand(len(r.old), generator=g) < 0.6).float(),
                                 advantage=float(torch.randn((), generator=g))) for r in res_pad]

    def upd(shape):
        def run():
            for c in trainer.model_chunks:
                c.zero_grad_buffer()
            return passes.policy_update_pass(trainer.dims, trainer.model_chunks, trajs, shape, algo, ls, per_traj)
        return run

    loss_pad, loss_pack = upd(padded)()["loss"], upd(packed)()["loss"]
    out["loss_rel_diff"] = abs(loss_pad - loss_pack) / max(abs(loss_pad), 1e-12)
    t = side_by_side(upd(packed), upd(padded), args.repeats)
    out.update(update_time_ratio_packed_over_padded=t["median_ratio"], update_padded_s=t["median_b_s"],
               update_packed_s=t["median_a_s"], max_abs_diff=diff)
    return out


# ------------------------------------------------------------------------------ logits memory


def _rss(key: str) -> int:
    return int(re.search(key + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def memory_child(model_dir: Path, args) -> None:
    """Runs in its own process (MALLOC_MMAP_THRESHOLD_ set): peak of the last stage's reduction, and of
    the whole paired pass, over the logits tensor."""
    from dataclasses import replace

    from megatron_vppo.train import loop, passes

    _single_process_env()
    trajs = make_skewed_trajectories(model_dir, args.trajectories)
    trainer = _build(model_dir, args.micro_batch_size, len(trajs))
    trajs = [t for t in trajs if t.num_tokens <= args.memory_max_tokens]
    padded, packed = _shapes(trainer, trajs, args.memory_max_tokens)
    padded = replace(padded, micro_batch_size=1)  # [2, longest, V]: about the packed micro-batch's size
    views = loop.perturbed_views(trajs, trainer.processor, RUN_SEED, STEP, 0, trainer.cfg.algo.perturb_prob)
    seen, sizes = [], []
    real = passes._token_scores_loss
    reset_inside = [True]

    def measured(*args):  # _token_scores_loss(dims, shape, <pass flags>..., mb, logits)
        logits = args[-1]
        size = logits.numel() * logits.element_size()
        sizes.append(size)
        if not reset_inside[0]:
            return real(*args)
        before = _rss("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
        res = real(*args)
        seen.append(((size + _rss("VmHWM") - before) / size, size))
        return res

    def whole_pass(shape) -> float:
        sizes.clear()
        before = _rss("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        passes.dependency_pass(trainer.dims, trainer.model_chunks, trajs, shape, views, exact_kl=True)
        return (_rss("VmHWM") - before) / max(sizes)

    passes.dependency_pass(trainer.dims, trainer.model_chunks, trajs[:2], packed, views[:2], exact_kl=True)  # warm-up
    passes._token_scores_loss = measured
    passes.dependency_pass(trainer.dims, trainer.model_chunks, trajs, packed, views, exact_kl=True)
    worst = max(seen)
    reset_inside[0] = False
    pass_packed, pass_padded = whole_pass(packed), whole_pass(padded)
    print(json.dumps({"nograd_peak_over_logits": worst[0], "logits_mib": worst[1] / 2**20,
                      "nograd_pass_peak_over_logits_packed": pass_packed,
                      "nograd_pass_peak_over_logits_padded_mbs1": pass_padded}), flush=True)


def bench_memory(model_dir: Path, args) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, __file__, "--memory-child", "--model-dir", str(model_dir),
           "--trajectories", str(args.trajectories), "--memory-max-tokens", str(args.memory_max_tokens),
           "--micro-batch-size", str(args.micro_batch_size)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trajectories", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=4096, help="token budget per packed micro-batch (per view)")
    ap.add_argument("--micro-batch-size", type=int, default=4, help="rows per padded micro-batch")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per layout (median of ratios)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--memory-max-tokens", type=int, default=512,
                    help="token budget of the memory run's packed micro-batches (real Qwen vocabulary)")
    ap.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "bench_packing"))
    ap.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        memory_child(Path(args.model_dir), args)
        return
    work = Path(args.work_dir)
    model = make_model(work / f"h{args.hidden}_l{args.layers}", tokenizer="bpe", hidden=args.hidden,
                       layers=args.layers, vision_hidden=128, vision_depth=2)
    qwen = make_model(work / "qwen_vocab", tokenizer="qwen", hidden=64, layers=2, vision_hidden=32, vision_depth=2)
    _single_process_env()
    out = {"machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, "
                      f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}",
           "hidden": args.hidden, "layers": args.layers, "max_tokens_per_micro_batch": args.max_tokens,
           "micro_batch_size_padded": args.micro_batch_size, "repeats": args.repeats}
    out.update(bench_time(model, args))
    out.update(bench_memory(qwen, args))
    print(json.dumps({k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in out.items()}), flush=True)


if __name__ == "__main__":
    main()
