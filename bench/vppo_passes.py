"""What VPPO's extra perturbed-view forward costs on the trainer side (issue 3's benchmarks).

    python bench/vppo_passes.py pass    # (a) paired no-grad pass vs original-only pass, same batch
    python bench/vppo_passes.py step    # (b) train-side step (pass + shaping + update + optimizer), VPPO vs DAPO
    python bench/vppo_passes.py memory  # (c) peak memory of the no-grad pass, TP2 vs TP1, vocab 152064
    python bench/vppo_passes.py all

(a) and (b) time both variants side by side in one process on one batch, alternating which runs first,
and report the median of the per-repeat ratios (and the median times). They call the trainer's own
functions: `passes.dependency_pass` for (a); `loop.score_step_batch` -> `loop.shape_step` ->
`loop.update_policy` for (b), with the model and Megatron optimizer built as train/build.py does.
(c) runs the paired no-grad pass in a fresh process group per TP size and reads each rank's peak
resident memory over the pass (Linux: VmHWM after resetting it through /proc/self/clear_refs), minus
the resident memory just before it.

The model is a random Qwen2.5-VL at a size chosen so the language model's matmuls, not Python,
dominate on a CPU (see --hidden/--layers); the memory run uses the real Qwen2.5 vocabulary (152064
rows) so logits dominate. Results print as one JSON line per measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

RUN_SEED, STEP = 7, 1


# ------------------------------------------------------------------------------ model + batch


def make_model(out: Path, *, tokenizer: str, hidden: int, layers: int, vision_hidden: int,
               vision_depth: int) -> Path:
    """Random Qwen2.5-VL (4 query heads / 2 KV groups; vision 2 heads, so TP2 works)."""
    from megatron_vppo.models import MODELS

    make_tiny_model = MODELS["qwen2_5_vl"].make_tiny_model  # the model this benchmark measures

    if (out / "config.json").exists():
        return out
    half = hidden // 4 // 2  # head_dim / 2 split over the three M-RoPE sections
    section = [half - 2 * (half // 3), half // 3, half // 3]
    return make_tiny_model(
        out, seed=0, tokenizer=tokenizer,
        text_config={"hidden_size": hidden, "intermediate_size": 4 * hidden, "num_hidden_layers": layers,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": section}},
        vision_config={"hidden_size": vision_hidden, "intermediate_size": 2 * vision_hidden,
                       "depth": vision_depth, "fullatt_block_indexes": [vision_depth - 1]},
    )


def make_trajectories(model_dir: Path, n: int, response_len, seed: int = 0):
    """n trajectories: image prompts of two sizes and a text-only one, random response tokens.
    `response_len` is a length, or a function of the numpy generator drawing one per trajectory."""
    import numpy as np
    from PIL import Image

    from megatron_vppo.data.processor import VLProcessor
    from megatron_vppo.train.rl_batch import Trajectory

    proc = VLProcessor.from_pretrained(model_dir)
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((112, 168), (168, 112))]
    special = set(proc.tokenizer.all_special_ids) | {proc.image_token_id, proc.video_token_id}
    vocab = [i for i in range(min(len(proc.tokenizer), 5000)) if i not in special]
    prompts = [("How many shapes are in <image>?", [images[0]]), ("<image> What colour is it?", [images[1]]),
               ("What is 4 + 3?", [])]
    trajs = []
    for i in range(n):
        problem, imgs = prompts[i % 3]
        length = response_len(rng) if callable(response_len) else response_len
        resp = [vocab[j] for j in rng.integers(0, len(vocab), length)]
        enc = proc.encode(problem, imgs, response=resp)
        trajs.append(Trajectory(group=i % 3, input_ids=enc["input_ids"], response_start=enc["response_start"],
                                pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"],
                                reward=float((i // 3) % 2)))
    return trajs


def build_trainer(model_dir: Path, tp: int, micro_batch_size: int, n_traj: int):
    """Process groups, model, HF weights, DDP + Megatron Adam + scheduler: the trainer's build_policy."""
    from megatron_vppo.config import ParallelConfig, RunConfig
    from megatron_vppo.data.processor import VLProcessor
    from megatron_vppo.train.build import build_policy
    from megatron_vppo.train.loop import Trainer

    cfg = RunConfig()
    cfg.parallel = ParallelConfig(tp=tp)
    cfg.model.path = str(model_dir)
    cfg.train.seed = RUN_SEED
    cfg.train.micro_batch_size = micro_batch_size
    cfg.train.mini_batch_prompts = n_traj  # one optimizer step per RL step
    cfg.rollout.group_size = 1
    pol = build_policy(cfg, model_dir, total_steps=1000)
    return Trainer(cfg=cfg, processor=VLProcessor.from_pretrained(model_dir), model_chunks=pol.model_chunks,
                   optimizer=pol.optimizer, scheduler=pol.scheduler, engine=None, grader=None,
                   train_batches=None, val_prompts=[], hf_config=pol.hf_config, adapter=pol.adapter,
                   vocab_size=pol.arch.vocab_size, dims=pol.dims, step=STEP)


def _pass_inputs(trainer, trajs):
    from megatron_vppo.train import loop

    views = loop.perturbed_views(trajs, trainer.processor, RUN_SEED, STEP, 0, trainer.cfg.vppo.perturb_prob)
    return loop._pass_shape(trainer, trajs), views


def _timed(fn) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)  # GPU: time the kernels too
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def side_by_side(a, b, repeats: int) -> dict:
    """Median times of a and b and the median of per-repeat ratios a/b; the order alternates."""
    a(), b()  # warm-up
    ta, tb, ratios = [], [], []
    for r in range(repeats):
        if r % 2 == 0:
            x, y = _timed(a), _timed(b)
        else:
            y, x = _timed(b), _timed(a)
        ta.append(x)
        tb.append(y)
        ratios.append(x / y)
    return {"median_a_s": statistics.median(ta), "median_b_s": statistics.median(tb),
            "median_ratio": statistics.median(ratios), "ratios": [round(r, 4) for r in ratios]}


# ------------------------------------------------------------------------------ the three runs


def bench_pass(model_dir, trajs, args) -> dict:
    from megatron_vppo.train import passes

    trainer = build_trainer(model_dir, 1, args.micro_batch_size, len(trajs))
    shape, views = _pass_inputs(trainer, trajs)
    out = side_by_side(lambda: passes.dependency_pass(trainer.model_chunks, trajs, shape, views),
                       lambda: passes.dependency_pass(trainer.model_chunks, trajs, shape, None), args.repeats)
    return {"bench": "paired no-grad pass / original-only pass", **out}


def bench_step(model_dir, trajs, args) -> dict:
    from megatron_vppo.config import VPPOConfig
    from megatron_vppo.train import loop

    trainer = build_trainer(model_dir, 1, args.micro_batch_size, len(trajs))

    def step(algorithm):
        def run():
            trainer.cfg.vppo = VPPOConfig(algorithm=algorithm)
            scored = loop.score_step_batch(trainer, trajs)
            per_traj, minibatches, _ = loop.shape_step(trainer, trajs, scored)
            loop.update_policy(trainer, trajs, per_traj, minibatches)
        return run

    out = side_by_side(step("vppo"), step("dapo"), args.repeats)
    return {"bench": "train-side step VPPO / DAPO", **out}


def _status_kib() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1)) for k in ("VmRSS", "VmHWM")}


def _memory_worker(rank, world, port, model_dir, trajs, args, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from megatron_vppo.distributed import destroy_distributed
    from megatron_vppo.train import passes

    trainer = build_trainer(model_dir, world, args.micro_batch_size, len(trajs))
    shape, views = _pass_inputs(trainer, trajs)
    passes.dependency_pass(trainer.model_chunks, trajs, shape, views)  # warm-up (allocator, caches)
    peaks = []
    for _ in range(args.memory_repeats):
        torch.distributed.barrier()
        before = _status_kib()["VmRSS"]
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS high-water mark
        passes.dependency_pass(trainer.model_chunks, trajs, shape, views)
        peaks.append(_status_kib()["VmHWM"] - before)
    rows = 2 * shape.micro_batch_size
    padded_v = trainer.model_chunks[0].module.padded_vocab_size
    queue.put((rank, {"peak_delta_mib": statistics.median(peaks) / 1024,
                      "logits_mib": rows * shape.seq_len * padded_v // world * 4 / 2**20}))
    destroy_distributed()


def bench_memory(model_dir, trajs, args) -> dict:
    import torch.multiprocessing as mp

    from megatron_vppo.models import spec_for_hf_config

    spec = spec_for_hf_config(model_dir)
    out = {"bench": "no-grad paired pass peak memory, TP2 / TP1",
           "vocab": spec.text_arch(spec.load_hf_config(model_dir)).vocab_size}
    ctx = mp.get_context("spawn")
    for tp in (1, 2):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        q = ctx.Queue()
        procs = [ctx.Process(target=_memory_worker, args=(r, tp, port, model_dir, trajs, args, q)) for r in range(tp)]
        for p in procs:
            p.start()
        res = dict(q.get(timeout=1800) for _ in procs)
        for p in procs:
            p.join()
        out[f"tp{tp}_per_rank_peak_mib"] = round(max(r["peak_delta_mib"] for r in res.values()), 1)
        out[f"tp{tp}_logits_mib"] = round(res[0]["logits_mib"], 1)
    out["ratio_tp2_over_tp1"] = round(out["tp2_per_rank_peak_mib"] / out["tp1_per_rank_peak_mib"], 3)
    return out


def _single_process_env():
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["pass", "step", "memory", "all"])
    ap.add_argument("--repeats", type=int, default=7, help="timed repeats per variant (median reported)")
    ap.add_argument("--memory-repeats", type=int, default=3)
    ap.add_argument("--trajectories", type=int, default=8)
    ap.add_argument("--response-len", type=int, default=96)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vision-hidden", type=int, default=128)
    ap.add_argument("--vision-depth", type=int, default=2)
    ap.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "bench_vppo_passes"))
    args = ap.parse_args(argv)

    work = Path(args.work_dir)
    meta = {"machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, "
                       f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}",
            "cuda": torch.cuda.is_available()}
    if args.what in ("pass", "step", "all"):
        model = make_model(work / f"h{args.hidden}_l{args.layers}", tokenizer="bpe", hidden=args.hidden,
                           layers=args.layers, vision_hidden=args.vision_hidden, vision_depth=args.vision_depth)
        trajs = make_trajectories(model, args.trajectories, args.response_len)
        _single_process_env()
        batch = {"seq_tokens": max(int(t.input_ids.numel()) for t in trajs), "trajectories": len(trajs),
                 "hidden": args.hidden, "layers": args.layers}
        for what, fn in (("pass", bench_pass), ("step", bench_step)):
            if args.what in (what, "all"):
                print(json.dumps({**fn(model, trajs, args), **meta, **batch}), flush=True)
    if args.what in ("memory", "all"):
        model = make_model(work / "qwen_vocab", tokenizer="qwen", hidden=64, layers=2, vision_hidden=32,
                           vision_depth=2)
        trajs = make_trajectories(model, args.trajectories, args.response_len)
        print(json.dumps({**bench_memory(model, trajs, args), **meta}), flush=True)


if __name__ == "__main__":
    main()
