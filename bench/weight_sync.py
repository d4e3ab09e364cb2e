"""Weight-sync throughput on CPU: Megatron model (TP/PP shards) -> HF-layout stream -> rollout engine.

    .venv/bin/python bench/weight_sync.py [--layers 6] [--repeats 3] [--write-docs]

Builds a Qwen2.5-VL of >= 50 MB with `make_tiny_model` (bigger text and vision sizes), loads it into
the Megatron model at TP1, TP2 and PP2 (gloo processes on this machine), and times on rank 0:

* memcpy  — one plain `copy_` of a flat buffer holding the same number of bytes (same run, same rank);
* export  — `export_hf_weights` drained (metadata pre-pass, TP gathers, PP sends, HF conversion);
* export+update — `push_to_engine` into the in-process `HFRolloutEngine` (stage + in-place copy),
  unbucketed and with a bucket-size sweep.

Ratio = memcpy time / measured time (1.0 = as fast as one memcpy of the bytes; target >= 0.5).
Each number is the median of `--repeats` runs. `--write-docs` rewrites the `## Weight sync` section of
docs/benchmarks.md (other sections are left as they are).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MiB = 1024 * 1024
BUCKETS = [("1 MiB", 1 * MiB), ("16 MiB", 16 * MiB), ("64 MiB", 64 * MiB), ("512 MiB (default)", 512 * MiB),
           ("unbounded", None)]
LAYOUTS = [("TP1", 1, 1), ("TP2", 2, 1), ("PP2", 1, 2)]
# glibc: serve allocations up to 32 MiB from the heap and never give freed memory back, so buffers
# allocated per update reuse warm pages instead of page-faulting fresh mmaps.
KEEP_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4294967296",
                   "MALLOC_TOP_PAD_": "268435456"}


def build_model(out: Path, layers: int) -> Path:
    from megatron_vppo.models.qwen2_5_vl.tiny import make_tiny_model

    return make_tiny_model(
        out, seed=0,
        text_config=dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=layers, num_attention_heads=8,
                         num_key_value_heads=4,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]}),
        vision_config=dict(depth=2, hidden_size=256, num_heads=4, intermediate_size=512),
    )


def _median_time(fn, repeats: int, barrier=None) -> float:
    times = []
    for _ in range(repeats):
        if barrier:
            barrier()
        t0 = time.perf_counter()
        fn()
        if barrier:
            barrier()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _worker(rank: int, world: int, port: int, hf_dir: str, tp: int, pp: int, repeats: int, out: str):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from megatron_vppo.checkpoint.export import (drain, export_hf_weights, export_nbytes, load_model, model_dims,
                                                 push_to_engine, read_model_config)
    from megatron_vppo.config import ParallelConfig
    from megatron_vppo.distributed import destroy_distributed, init_distributed
    from megatron_vppo.rollout.hf_engine import HFRolloutEngine

    parallel = ParallelConfig(tp=tp, pp=pp)
    init_distributed(parallel, **model_dims(read_model_config(hf_dir)))
    m = load_model(hf_dir, parallel)
    engine = HFRolloutEngine.from_pretrained(hf_dir) if rank == 0 else None
    nbytes = export_nbytes(m.chunks, m.adapter)
    res = {"bytes": nbytes}

    if rank == 0:
        src = torch.randn(nbytes // 4)
        dst = torch.empty_like(src)
        dst.copy_(src)  # warm the pages
        res["memcpy"] = _median_time(lambda: dst.copy_(src), max(repeats, 5))
        # the same copy into a freshly allocated buffer (first-touch page faults), as a stream consumer
        # that allocates per update pays them
        res["memcpy_fresh"] = _median_time(lambda: torch.empty_like(src).copy_(src), max(repeats, 5))
        del src, dst
    res["export"] = _median_time(lambda: drain(export_hf_weights(m.chunks, m.adapter)), repeats, dist.barrier)
    res["update_unbucketed"] = _median_time(
        lambda: push_to_engine(m.chunks, m.adapter, engine, bucketed=False), repeats, dist.barrier)
    res["update"] = {}
    for label, b in BUCKETS:
        res["update"][label] = _median_time(
            lambda: push_to_engine(m.chunks, m.adapter, engine, bucket_bytes=b), repeats, dist.barrier)
    if rank == 0:
        # the engine ends up holding exactly the exported weights
        ref = dict(export_hf_weights(m.chunks, m.adapter))
        params = dict(engine.model.named_parameters())
        from megatron_vppo.rollout.hf_engine import canonical_param_name

        assert all(torch.equal(params[canonical_param_name(k)], v) for k, v in ref.items())
        Path(out).write_text(json.dumps(res))
    else:
        drain(export_hf_weights(m.chunks, m.adapter))
    destroy_distributed()


def run_layout(hf_dir: Path, tp: int, pp: int, repeats: int, env: dict | None = None) -> dict:
    """One layout in fresh spawned processes (with `env` added to their environment)."""
    import torch.multiprocessing as mp

    saved = dict(os.environ)
    os.environ.update(env or {})

    world = tp * pp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "res.json"
        try:
            mp.start_processes(_worker, args=(world, port, str(hf_dir), tp, pp, repeats, str(out)), nprocs=world,
                               start_method="spawn")
        finally:
            os.environ.clear()
            os.environ.update(saved)
        return json.loads(out.read_text())


def table(results: dict, tuned: dict, layers: int, repeats: int) -> str:
    any_r = next(iter(results.values()))
    mb = any_r["bytes"] / 1e6
    gbps = lambda t: any_r["bytes"] / t / 1e9  # noqa: E731
    lines = [
        "## Weight sync",
        "",
        f"`bench/weight_sync.py` (layers={layers}, median of {repeats}): a Qwen2.5-VL of {mb:.1f} MB (fp32; text "
        "hidden 512, vision hidden 256) exported from the Megatron model as HF-layout tensors and loaded into "
        "the in-process `HFRolloutEngine` on rank 0; gloo processes on one CPU machine "
        f"({os.cpu_count()} cores, shared; {platform.processor() or platform.machine()}). "
        "Ratio = time of one plain `copy_` of the same bytes, measured in the same run on the same rank, "
        "divided by the measured time (target >= 0.5).",
        "",
        "| layout | memcpy GB/s | memcpy into fresh buffer GB/s | export GB/s (ratio) "
        "| export+update, unbucketed GB/s (ratio) | export+update, 512 MiB buckets GB/s (ratio) "
        "| same two, glibc keeps freed memory |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        mc = r["memcpy"]
        u512 = r["update"]["512 MiB (default)"]
        u = r["update_unbucketed"]
        cell = lambda t: f"{gbps(t):.2f} ({mc / t:.2f})"  # noqa: E731
        tuned_cell = "—"
        if name in tuned:
            tr = tuned[name]
            tuned_cell = f"{cell(tr['update_unbucketed'])} / {cell(tr['update']['512 MiB (default)'])}"
        lines.append(f"| {name} | {gbps(mc):.2f} | {gbps(r['memcpy_fresh']):.2f} | {cell(r['export'])} | {cell(u)} "
                     f"| {cell(u512)} | {tuned_cell} |")
    lines += ["", "Bucket-size sweep (export + pack + engine update; ratio to memcpy):", "",
              "| layout | " + " | ".join(label for label, _ in BUCKETS) + " |",
              "|---|" + "---|" * len(BUCKETS)]
    for name, r in results.items():
        mc = r["memcpy"]
        cells = [f"{gbps(r['update'][label]):.2f} GB/s ({mc / r['update'][label]:.2f})" for label, _ in BUCKETS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", READING]
    return "\n".join(lines) + "\n"


READING = """Reading the numbers. The ratio is against the fastest possible copy (warm destination pages), so
1.0 is unreachable by anything that allocates. Export alone at TP1 is views plus the QKV / gate-up
re-layout copies. TP2 and PP2 add gloo transfers (TCP over loopback on CPU: ~1 GB/s class), once per
byte that crosses ranks; on GPUs the same code runs over NCCL. The update adds what the consumer copies:
`pack_bucket` copies every tensor into a fresh bucket buffer, and `HFRolloutEngine.update_weights` stages
a fresh copy of every tensor (all-or-nothing) before copying it into the parameters. Fresh buffers cost
page faults (compare the two memcpy columns), which is why keeping freed memory in glibc's heap
(last column, env `MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296
MALLOC_TOP_PAD_=268435456`) speeds the update up, and why small buckets (reused allocations) beat large
ones. Reaching >= 0.5 needs a consumer that copies once, straight into its parameters."""


def write_section(doc: Path, section: str) -> None:
    """Replace (or append) the `## Weight sync` section, leaving every other section untouched."""
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    pat = re.compile(r"^## Weight sync\n.*?(?=^## |\Z)", re.S | re.M)
    if pat.search(text):
        text = pat.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layouts", default="TP1,TP2,PP2")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    wanted = args.layouts.split(",")
    with tempfile.TemporaryDirectory() as d:
        hf_dir = build_model(Path(d) / "model", args.layers)
        results, tuned = {}, {}
        for name, tp, pp in LAYOUTS:
            if name in wanted:
                results[name] = run_layout(hf_dir, tp, pp, args.repeats)
                print(name, json.dumps(results[name]), flush=True)
                tuned[name] = run_layout(hf_dir, tp, pp, args.repeats, KEEP_MEMORY_ENV)
                print(name, "(glibc keeps memory)", json.dumps(tuned[name]), flush=True)
    section = table(results, tuned, args.layers, args.repeats)
    print(section)
    if args.write_docs:
        write_section(ROOT / "docs" / "benchmarks.md", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
