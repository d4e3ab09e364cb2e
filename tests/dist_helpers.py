"""Run a function on N real gloo processes from a test and get every rank's return value back.

    results = run_distributed(fn, 2, arg1, arg2)   # fn(rank, world_size, arg1, arg2) on each rank

`fn` must be a module-level function (it is pickled by reference). Each child gets RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT (a free port) and OMP_NUM_THREADS=1 in its
environment; it starts no process group itself — `megatron_vppo.distributed.init_distributed` does that
from the env. A child's exception is re-raised in the parent with the child's traceback; the other ranks
are then killed (they would otherwise block in a collective). Return values travel as `torch.save`
bytes, so tensors work.

Children are forked from a forkserver that has already imported torch / megatron.core / transformers,
so a spawn costs milliseconds instead of a 3 s import per rank, without forking the (threaded) pytest
process itself.
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback

_PRELOAD = [
    "torch",
    "megatron.core",
    "megatron.core.models.gpt",
    "megatron.core.pipeline_parallel",
    "transformers",
]
_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        _CTX = ctx
    return _CTX


# Ports handed out for a later bind (a TCPStore, a torchrun --master-port / --rdzv-endpoint) come from a
# block of their own per pytest-xdist worker, below the kernel's ephemeral range (32768+ by default). A
# port that `bind(("", 0))` picked and released can be handed to any other process's bind(0) or
# connect() before its owner binds it again; then a rank of one test can join another test's store.
# Nothing ever picks these ports by itself, and two workers never share a block.
_PORT_BASE, _PORT_BLOCK = 12000, 1000
_port_seq = None


def _worker_index() -> int:
    """0 for a plain pytest run, N for pytest-xdist worker gwN."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    digits = "".join(ch for ch in name if ch.isdigit())
    return int(digits) % 16 if digits else 0


def free_port() -> int:
    """A local TCP port that is free now and that no other test of this run is handed."""
    global _port_seq
    import random

    base = _PORT_BASE + _worker_index() * _PORT_BLOCK
    if _port_seq is None:  # a random start: two pytest runs on one machine rarely walk the same ports
        _port_seq = random.Random(os.getpid() ^ time.time_ns()).randrange(_PORT_BLOCK)
    for _ in range(_PORT_BLOCK):
        _port_seq = (_port_seq + 1) % _PORT_BLOCK
        port = base + _port_seq
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {base}..{base + _PORT_BLOCK - 1}")


def _child(fn, rank, world_size, port, args, out_q, env):
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),  # one node, as torchrun sets it (vLLM's CPU platform sets it to 1
        MASTER_ADDR="127.0.0.1",           # in a process that ran an in-process engine: never inherit that)
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
    )
    import warnings

    import torch

    torch.set_num_threads(1)
    # Megatron's "no Apex / no Transformer Engine" notices, once per rank, drown the test output.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    try:
        result = fn(rank, world_size, *args)
        buf = io.BytesIO()
        torch.save(result, buf)
        out_q.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 — everything goes back to the parent
        out_q.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            from megatron_vppo.distributed import destroy_distributed

            destroy_distributed()
        except Exception:
            pass


class DistributedTestError(RuntimeError):
    pass


def run_distributed(fn, world_size: int, *args, timeout: float = 600.0, env: dict | None = None):
    """Run fn(rank, world_size, *args) on `world_size` gloo processes; return results by rank."""
    import torch

    ctx = _context()
    port = free_port()
    out_q = ctx.Queue()
    child_env = {k: v for k, v in (env or {}).items()}
    procs = [
        ctx.Process(target=_child, args=(fn, r, world_size, port, args, out_q, child_env), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size:
            try:
                rank, status, payload = out_q.get(timeout=0.5)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise DistributedTestError(f"distributed run timed out after {timeout:.0f}s")
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead:
                    # Give a queued error message a moment to arrive before reporting a bare crash.
                    try:
                        rank, status, payload = out_q.get(timeout=2.0)
                    except queue.Empty:
                        raise DistributedTestError(
                            f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}"
                        ) from None
                else:
                    continue
            if status == "error":
                raise DistributedTestError(f"rank {rank} failed:\n{payload}")
            results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=0 if len(results) < world_size else 30)
            if p.is_alive():
                p.kill()
                p.join()
    return [results[r] for r in range(world_size)]

