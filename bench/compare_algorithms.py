"""Compare RL algorithms the way a paper would: each algorithm x seed from the same start.

    python bench/compare_algorithms.py --algorithms vppo,dapo,papo,pgpo,vepo --seeds 3 --out outputs/compare

One tiny model, one synthetic visual task and one supervised warm start (`megatron-vppo demo`'s, built
once under --out) are the common start; every (algorithm, seed) is then a separate `megatron-vppo
train` process on the demo config (examples/configs/demo_cpu.yaml) with `algo.name` and `train.seed`
set. The base config's `algo:` keys an algorithm does not read are left out for it (the registry says
which it reads), so the runs differ in the algorithm and nothing else.

Reported per algorithm: validation accuracy (avg@val_k) at every validated step and at the end — mean
over seeds and a 95 % t interval (none for one seed) — wall time and response tokens per run. Written to
<out>/compare.json and <out>/compare.png; a markdown table goes to stdout.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
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


def algo_section(base: dict, name: str) -> dict:
    """The base config's algo keys that algorithm `name` reads, with name set."""
    from megatron_vppo.algo.registry import get_algorithm

    reads = get_algorithm(name).reads
    return {"name": name, **{k: v for k, v in (base or {}).items() if k != "name" and k in reads}}


def run_one(config: dict, out: Path, env: dict) -> dict:
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    t0 = time.perf_counter()
    with open(out / "train.log", "w") as log:
        rc = subprocess.run([sys.executable, "-m", "megatron_vppo.cli", "train", str(path)], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"compare: run in {out} failed (exit {rc}); see {out / 'train.log'}")
    rows = [json.loads(line) for line in (out / "rl" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    val = {int(r["step"]): float(r["val/accuracy"]) for r in rows if "val/accuracy" in r}
    tokens = sum(float(r.get("response/len_mean", 0.0)) * float(r.get("response/trajectories", 0)) for r in rows)
    return {"val_accuracy": val, "wall_s": wall, "response_tokens": tokens, "steps": max(val) if val else 0}


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
            "wall_s": mean_ci([r["wall_s"] for r in rs])[0], "response_tokens": mean_ci([r["response_tokens"] for r in rs])[0],
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
    lines = ["| algorithm | seeds | val acc start | val acc final (mean ± 95 %) | wall s / run | response tokens / run |",
             "|---|---|---|---|---|---|"]
    for name, r in table.items():
        f = r["final"]
        ci = "n/a (1 seed)" if f["ci95"] is None else f"± {f['ci95']:.3f}"
        start = r["start"]["mean"] if r["start"] else float("nan")
        lines.append(f"| {name} | {r['seeds']} | {start:.3f} | {f['mean']:.3f} {ci} | {r['wall_s']:.0f} | "
                     f"{r['response_tokens']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "examples" / "configs" / "demo_cpu.yaml"))
    ap.add_argument("--algorithms", default="vppo,dapo,papo,pgpo,vepo")
    ap.add_argument("--seeds", type=int, default=3, help="train.seed = 1 .. N")
    ap.add_argument("--out", default="outputs/compare")
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
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runs: dict[str, list[dict]] = {}
    t0 = time.perf_counter()
    for name in names:
        for seed in range(1, args.seeds + 1):
            run_dir = out / "runs" / f"{name}-seed{seed}"
            config = json.loads(json.dumps(base))
            config["algo"] = algo_section(base.get("algo"), name)
            config.setdefault("model", {})["path"] = str(sft)
            config.setdefault("data", {}).update(train=str(data_dir / "train.jsonl"), val=str(data_dir / "validation.jsonl"))
            config.setdefault("train", {}).update(seed=seed, output_dir=str(run_dir / "rl"), resume="never")
            r = run_one(config, run_dir, env)
            r["seed"] = seed
            runs.setdefault(name, []).append(r)
            print(f"compare: {name} seed {seed}: final val {r['val_accuracy'].get(r['steps'], float('nan')):.3f}, "
                  f"{r['wall_s']:.0f}s", flush=True)
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
