"""CPU seconds per test, counting every process a test starts (torchrun ranks, forkserver children, vLLM
engine cores): a pytest plugin, and a summary of what it wrote. On a shared machine wall time says little;
a test's CPU seconds do not depend on the load.

    PYTHONPATH=$PWD:bench OMP_NUM_THREADS=1 .venv/bin/python -m pytest -n 2 --dist loadfile -p pytest_cpu_times tests
    .venv/bin/python bench/pytest_cpu_times.py [DIR]      # the heaviest tests and files, per-worker totals

Each pytest process (each xdist worker) moves itself into a cgroup-v1 cpuacct group of its own (root and
/sys/fs/cgroup/cpuacct needed; without them the plugin does nothing); its children inherit the group. One
JSON line per test (id, worker, start / end time, wall and CPU seconds, load average) goes to
$PYTEST_CPU_TIMES_DIR (default /tmp/pytest_cpu_times)/<worker>.jsonl.
"""
from __future__ import annotations

import collections
import glob
import json
import os
import sys
import time

import pytest

CGROUP = "/sys/fs/cgroup/cpuacct"
OUT = os.environ.get("PYTEST_CPU_TIMES_DIR", "/tmp/pytest_cpu_times")
_state: dict = {}


def _usage() -> float:
    with open(_state["cg"] + "/cpuacct.usage") as f:
        return int(f.read()) / 1e9


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER") is None and getattr(config.option, "numprocesses", None):
        return  # the xdist controller runs no tests
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    cg = f"{CGROUP}/pytest_{os.getpid()}_{worker}"
    try:
        os.makedirs(cg, exist_ok=True)
        with open(cg + "/tasks", "w") as f:
            f.write(str(os.getpid()))
    except OSError:
        return
    os.makedirs(OUT, exist_ok=True)
    _state.update(cg=cg, worker=worker, file=open(f"{OUT}/{worker}.jsonl", "a"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if "cg" not in _state:
        yield
        return
    t0, c0 = time.time(), _usage()
    yield
    t1, c1 = time.time(), _usage()
    _state["file"].write(json.dumps({"id": item.nodeid, "w": _state["worker"], "t0": t0, "t1": t1, "wall": t1 - t0,
                                     "cpu": c1 - c0, "load": os.getloadavg()[0]}) + "\n")
    _state["file"].flush()


def pytest_unconfigure(config):
    """Back to the parent group, and the group removed (once its last child has exited)."""
    if "cg" not in _state:
        return
    _state["file"].close()
    try:
        with open(CGROUP + "/tasks", "w") as f:
            f.write(str(os.getpid()))
        os.rmdir(_state["cg"])
    except OSError:
        pass  # a child still in it: the group stays (empty groups can be removed with rmdir later)


def summary(out: str = OUT, top: int = 25) -> None:
    rows = [json.loads(line) for path in glob.glob(f"{out}/*.jsonl") for line in open(path)]
    files, workers = collections.Counter(), collections.defaultdict(lambda: [0.0, 0.0, float("inf"), 0.0])
    for r in rows:
        files[r["id"].split("::")[0]] += r["cpu"]
        w = workers[r["w"]]
        w[0] += r["cpu"]
        w[1] += r["wall"]
        w[2], w[3] = min(w[2], r["t0"]), max(w[3], r["t1"])
    print(f"{len(rows)} tests, {sum(files.values()):.0f} CPU-s")
    first = min(v[2] for v in workers.values()) if workers else 0.0
    for name, (cpu, wall, start, end) in sorted(workers.items()):
        print(f"  {name}: {cpu:.0f} CPU-s in {wall:.0f} s of tests, from +{start - first:.0f} to +{end - first:.0f} s")
    print("heaviest tests (CPU-s, wall s):")
    for r in sorted(rows, key=lambda r: -r["cpu"])[:top]:
        print(f"  {r['cpu']:7.1f} {r['wall']:7.1f}  {r['id']}")
    print("files (CPU-s):")
    for name, cpu in files.most_common(top):
        print(f"  {cpu:7.1f}  {name}")


if __name__ == "__main__":
    summary(*sys.argv[1:2])
