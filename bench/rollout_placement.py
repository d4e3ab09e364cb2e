"""Rollout time at PP2 with an engine on every rank (2 engines) over one engine (the former placement:
one engine per data-parallel replica, on its PP0 rank), same prompts, same seeds, one run.

    .venv/bin/python bench/rollout_placement.py [--repeats 3] [--prompts 8] [--response-len 32]

Launches itself under torchrun with 2 processes (pipeline stages 0 and 1), builds the real trainer
(`build_trainer`, the demo's warm-started tiny Qwen2.5-VL and synthetic task, HF engine) and times
`rollout_step.sample_groups` — generate, grade, gather on every rank — on the same prompts with the
two placements alternating: `engine_tp=1` (an engine on each rank, prompts split in two) and the
one-engine placement (`ParallelDims.engine_tp=2`: one engine entry point for both ranks, which holds
every prompt). Checks that both return the same groups (token ids, log-probs, rewards) and prints one
JSON line: the median per-repeat ratio `two_over_one` (goal <= 0.6 on 2 cores).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build(work: Path, sft_steps: int, prompts: int, response_len: int, group_size: int):
    from megatron_vppo.run_config import load_config
    from megatron_vppo.data.synthetic_task import write_synthetic_dataset
    from megatron_vppo.distributed import barrier
    from megatron_vppo.models import MODELS
    from megatron_vppo.train.build import build_trainer
    from megatron_vppo.train.demo import DEMO_CONFIG, warm_start

    init, data = work / "model_init", work / "data"
    if int(os.environ["RANK"]) == 0:  # files once, then every rank reads them
        if not (init / "config.json").is_file():
            MODELS["qwen2_5_vl"].make_tiny_model(init, seed=0)
        if not (data / "train.jsonl").is_file():
            write_synthetic_dataset(data, 256, 8, seed=0)
        warm_start(init, data / "train.jsonl", work / f"model_sft{sft_steps}", steps=sft_steps, batch_size=16,
                   lr=2e-3, seed=0)
    cfg = load_config(DEMO_CONFIG, [
        f"model.path={work / f'model_sft{sft_steps}'}", f"data.train={data / 'train.jsonl'}", "data.val=",
        f"train.output_dir={work / ('run_' + os.environ['MASTER_PORT'])}", "train.val_every=0",
        "train.save_every=0", "parallel.pp=2", f"rollout.max_response_length={response_len}",
        f"train.prompts_per_step={prompts}", f"rollout.group_size={group_size}",
    ])
    import torch.distributed as dist

    if not dist.is_initialized():  # the files above exist before any rank loads them
        dist.init_process_group("gloo")
    barrier()
    return build_trainer(cfg)


def worker(args) -> None:
    import torch

    from megatron_vppo.train.build import teardown
    from megatron_vppo.train.loop import _sampling
    from megatron_vppo.train.rollout_step import encode_prompts, sample_groups

    torch.set_num_threads(1)
    trainer = build(Path(args.out), args.sft_steps, args.prompts, args.response_len, args.group_size)
    cfg, dims = trainer.cfg, trainer.dims
    prompts = encode_prompts(trainer.processor, next(trainer.train_batches))
    sampling = _sampling(cfg, trainer.processor, cfg.rollout.temperature, cfg.train.seed)
    placements = {"two": dims, "one": replace(dims, engine_tp=dims.world_size)}
    times = {k: [] for k in placements}
    groups = {}
    try:
        for r in range(args.repeats + 1):  # repeat 0 warms up
            for name in (("two", "one") if r % 2 else ("one", "two")):
                t0 = time.perf_counter()
                groups[name] = sample_groups(placements[name], trainer.engine, trainer.processor.tokenizer,
                                             trainer.grader, prompts, n=cfg.rollout.group_size, sampling=sampling,
                                             seed_parts=(cfg.train.seed, 1, 0))
                if r:
                    times[name].append(time.perf_counter() - t0)
            same = all(a.prompt == b.prompt and [s.token_ids for s in a.samples] == [s.token_ids for s in b.samples]
                       and [s.reward for s in a.samples] == [s.reward for s in b.samples]
                       and max((abs(x - y) for s, t in zip(a.samples, b.samples)
                                for x, y in zip(s.log_probs, t.log_probs)), default=0.0) <= 1e-5
                       for a, b in zip(groups["one"], groups["two"]))
            if not same or len(groups["one"]) != len(groups["two"]):
                raise SystemExit("the two placements sampled different groups")
    finally:
        teardown(trainer)
    if int(os.environ["RANK"]) == 0:
        print(json.dumps({
            "two_over_one": round(statistics.median(a / b for a, b in zip(times["two"], times["one"])), 3),
            "one_engine_s": round(statistics.median(times["one"]), 3),
            "two_engines_s": round(statistics.median(times["two"]), 3),
            "prompts": args.prompts, "group_size": args.group_size, "response_len": args.response_len,
            "repeats": args.repeats, "layout": "pp2 (2 processes)",
            "machine": f"{platform.machine()} {os.cpu_count()} cpus, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}",
        }))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--response-len", type=int, default=32)
    ap.add_argument("--sft-steps", type=int, default=30)
    ap.add_argument("--out", default="/tmp/bench_rollout_placement")
    args = ap.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if "RANK" in os.environ:
        worker(args)
        return 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__,
           *(argv if argv is not None else sys.argv[1:])]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.call(cmd, env=env, cwd=REPO)


if __name__ == "__main__":
    sys.exit(main())
