"""Compare RL algorithms the way a paper would: each algorithm x seed from the same start.

    python bench/compare_algorithms.py --algorithms vppo,dapo,papo,pgpo,vepo --seeds 3 --out outputs/compare

One tiny model, one synthetic visual task and one supervised warm start (`megatron-vppo demo`'s, built
once under --out) are the common start; every (algorithm, seed) is then one `megatron-vppo train` run
(`train(cfg)`, in a long-lived worker process: --jobs of them side by side) on the demo config
(examples/configs/demo_cpu.yaml) with `algo.name` and `train.seed` set. The base config's keys an
algorithm does not read (`algo:` keys, the dynamic-sampling budget) are left out for it (the registry says which it reads), so the runs differ in the
algorithm and nothing else. A run seeds everything from train.seed and tears down its process groups, so
its metrics equal a fresh `megatron-vppo train` process's (checked: identical metrics.jsonl); the workers
only save the ~15 s of imports and set-up each fresh process pays.

Reported per algorithm: validation accuracy (avg@val_k) at every validated step and at the end — mean
over seeds and a 95 % t interval (none for one seed) — wall time and response tokens per run. Written to
<out>/compare.json and <out>/compare.png; a markdown table goes to stdout.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# two-sided 95 % Student t quantiles by degrees of freedom (n - 1)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def mean_ci(xs: list[float]) -> tuple[float, float | None]:
    """(mean, half-width of the 95 % t interval; None for fewer than 2 values)."""
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, None
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return m, T975.get(n - 1, 1.96) * sd / math.sqrt(n)


def algorithm_config(base: dict, name: str) -> dict:
    """The base config for algorithm `name`: algo.name set, and the keys the registry says it does not
    read (`algo.*` ones, the dynamic-sampling budget for an algorithm without dynamic sampling) left out,
    as `megatron-vppo train` would refuse them."""
    from megatron_vppo.algo.registry import get_algorithm
    from megatron_vppo.run_config import ALGORITHM_KEYS, algorithm_reads

    reads = algorithm_reads(get_algorithm(name))
    config = json.loads(json.dumps(base))
    config["algo"] = {"name": name, **{k: v for k, v in (base.get("algo") or {}).items()
                                       if k != "name" and f"algo.{k}" in reads}}
    for key in ALGORITHM_KEYS - reads:
        section, field = key.split(".", 1)
        if section != "algo":
            (config.get(section) or {}).pop(field, None)
    return config


def _worker_init(threads: int) -> None:
    """Once per worker process: its own rendezvous port (a world of one; two workers, or another job on
    the machine, must not meet on the default port), one intra-op thread, the trainer's console set-up."""
    import socket

    import torch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    torch.set_num_threads(threads)
    from megatron_vppo.console import setup_logging

    setup_logging()


def run_one(config: dict, out: str) -> dict:
    """One (algorithm, seed): `megatron-vppo train`'s `train(cfg)` in this (long-lived) worker process, its
    console (fd 1 and 2) to <out>/train.log. The run seeds everything from train.seed at set-up and tears
    its process groups down at the end, so a run here equals a fresh `megatron-vppo train` process (the
    harness's start-up cost, ~15 s of imports per run, is paid once per worker instead)."""
    import resource
    import traceback

    import yaml

    from megatron_vppo.run_config import load_config
    from megatron_vppo.train.run import train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    cpu0 = sum(getattr(resource.getrusage(w), a) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for a in ("ru_utime", "ru_stime"))
    t0 = time.perf_counter()
    saved = [os.dup(1), os.dup(2)]
    error = None
    with open(out / "train.log", "w") as log:
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
        try:
            train(load_config(str(path), []))
        except BaseException:  # noqa: BLE001 - reported to the parent, which stops the comparison
            traceback.print_exc()
            error = f"compare: run in {out} failed; see {out / 'train.log'}"
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
    wall = time.perf_counter() - t0
    cpu = sum(getattr(resource.getrusage(w), a) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for a in ("ru_utime", "ru_stime")) - cpu0
    if error:
        return {"error": error}
    rows = [json.loads(line) for line in (out / "rl" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    val = {int(r["step"]): float(r["val/accuracy"]) for r in rows if "val/accuracy" in r}
    tokens = sum(float(r.get("response/len_mean", 0.0)) * float(r.get("response/trajectories", 0)) for r in rows)
    return {"val_accuracy": val, "wall_s": wall, "cpu_s": cpu, "response_tokens": tokens,
            "steps": max(val) if val else 0}


def summarise(runs: dict[str, list[dict]]) -> dict:
    table = {}
    for name, rs in runs.items():
        steps = sorted(set.intersection(*(set(r["val_accuracy"]) for r in rs)))
        per_step = {}
        for s in steps:
            m, h = mean_ci([r["val_accuracy"][s] for r in rs])
            per_step[s] = {"mean": m, "ci95": h}
        final = per_step[steps[-1]] if steps else {"mean": float("nan"), "ci95": None}
        table[name] = {
            "seeds": len(rs), "per_step": per_step, "start": per_step[steps[0]] if steps else None, "final": final,
            "wall_s": mean_ci([r["wall_s"] for r in rs])[0], "cpu_s": mean_ci([r["cpu_s"] for r in rs])[0], "response_tokens": mean_ci([r["response_tokens"] for r in rs])[0],
            "runs": rs,
        }
    return table


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    for name, row in table.items():
        steps = sorted(row["per_step"])
        m = [row["per_step"][s]["mean"] for s in steps]
        h = [row["per_step"][s]["ci95"] or 0.0 for s in steps]
        ax.plot(steps, m, marker="o", label=f"{name} (n={row['seeds']})")
        ax.fill_between(steps, [a - b for a, b in zip(m, h)], [a + b for a, b in zip(m, h)], alpha=0.2)
    ax.set_xlabel("RL step")
    ax.set_ylabel("validation accuracy (avg@k)")
    ax.set_title("algorithms from the same start (mean, 95 % interval over seeds)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(table: dict) -> str:
    lines = ["| algorithm | seeds | val acc start | val acc final (mean ± 95 %) | wall s / run | CPU s / run | response tokens / run |",
             "|---|---|---|---|---|---|---|"]
    for name, r in table.items():
        f = r["final"]
        ci = "n/a (1 seed)" if f["ci95"] is None else f"± {f['ci95']:.3f}"
        start = r["start"]["mean"] if r["start"] else float("nan")
        lines.append(f"| {name} | {r['seeds']} | {start:.3f} | {f['mean']:.3f} {ci} | {r['wall_s']:.0f} | "
                     f"{r['cpu_s']:.0f} | {r['response_tokens']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "examples" / "configs" / "demo_cpu.yaml"))
    ap.add_argument("--algorithms", default="vppo,dapo,papo,pgpo,vepo")
    ap.add_argument("--seeds", type=int, default=3, help="train.seed = 1 .. N")
    ap.add_argument("--out", default="outputs/compare")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes running runs side by side (2 on 2 cores)")
    ap.add_argument("--sft-steps", type=int, default=30)
    ap.add_argument("--train-rows", type=int, default=512)
    ap.add_argument("--val-rows", type=int, default=64)
    ap.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. train.total_steps=10")
    args = ap.parse_args(argv)

    import yaml

    from megatron_vppo.algo.registry import get_algorithm
    from megatron_vppo.config import apply_overrides
    from megatron_vppo.run_config import load_config
    from megatron_vppo.data.synthetic_task import write_synthetic_dataset
    from megatron_vppo.models import MODELS
    from megatron_vppo.train.demo import warm_start

    names = [a for a in args.algorithms.split(",") if a]
    for n in names:
        get_algorithm(n)  # an unknown name fails before anything runs
    out = Path(args.out).resolve()
    base = apply_overrides(yaml.safe_load(Path(args.config).read_text()) or {}, list(args.overrides))
    cfg = load_config(None, [f"model.arch={base.get('model', {}).get('arch', 'qwen2_5_vl')}"])
    init_dir = out / "model_init"
    if not (init_dir / "config.json").is_file():
        MODELS[cfg.model.arch].make_tiny_model(init_dir, seed=0)
    data_dir = out / "data"
    if not (data_dir / "validation.jsonl").is_file():
        write_synthetic_dataset(data_dir, args.train_rows, args.val_rows, seed=0)
    sft = warm_start(init_dir, data_dir / "train.jsonl", out / f"model_sft{args.sft_steps}", steps=args.sft_steps,
                     batch_size=16, lr=2e-3, seed=0)
    os.environ.update(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1",
                      TOKENIZERS_PARALLELISM="false")
    os.environ["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    jobs = []
    for name in names:
        for seed in range(1, args.seeds + 1):
            run_dir = out / "runs" / f"{name}-seed{seed}"
            config = algorithm_config(base, name)
            config.setdefault("model", {})["path"] = str(sft)
            config.setdefault("data", {}).update(train=str(data_dir / "train.jsonl"), val=str(data_dir / "validation.jsonl"))
            config.setdefault("train", {}).update(seed=seed, output_dir=str(run_dir / "rl"), resume="never")
            jobs.append((name, seed, config, run_dir))
    runs: dict[str, list[dict]] = {n: [] for n in names}
    t0 = time.perf_counter()
    # long-lived workers (spawned: no forked torch state), each running its share of the runs in turn
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=_worker_init,
                             initargs=(int(os.environ["OMP_NUM_THREADS"]),)) as pool:
        futures = {pool.submit(run_one, config, str(run_dir)): (name, seed) for name, seed, config, run_dir in jobs}
        for fut in as_completed(futures):
            name, seed = futures[fut]
            r = fut.result()
            if "error" in r:
                for f in futures:
                    f.cancel()
                raise SystemExit(r["error"])
            r["seed"] = seed
            runs[name].append(r)
            print(f"compare: {name} seed {seed}: final val {r['val_accuracy'].get(r['steps'], float('nan')):.3f}, "
                  f"{r['wall_s']:.0f} s wall, {r['cpu_s']:.0f} s CPU ({time.perf_counter() - t0:.0f} s so far)",
                  flush=True)
    for rs in runs.values():
        rs.sort(key=lambda r: r["seed"])
    table = summarise(runs)
    result = {"config": str(args.config), "overrides": args.overrides, "seeds": args.seeds,
              "total_wall_s": time.perf_counter() - t0, "algorithms": table}
    (out / "compare.json").write_text(json.dumps(result, indent=1))
    plot(table, out / "compare.png")
    print(markdown(table))
    print(f"compare: {len(names)} algorithms x {args.seeds} seeds in {result['total_wall_s']:.0f}s; "
          f"{out / 'compare.json'}, {out / 'compare.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
