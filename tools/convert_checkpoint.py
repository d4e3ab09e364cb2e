"""Convert between a Hugging Face Qwen2.5-VL directory and a Megatron distributed checkpoint.

    python tools/convert_checkpoint.py hf-to-mcore --hf DIR --out DIR --tp N --pp M
    python tools/convert_checkpoint.py mcore-to-hf --ckpt DIR --out DIR [--tp N --pp M] [--hf-config DIR]

Without torchrun the tool starts the N*M processes (gloo on CPU, NCCL on GPUs) itself; under
`torchrun --nproc-per-node K` it uses the launched ones (K must be a multiple of N*M).

hf-to-mcore loads the HF weights into a TP/PP-sharded model and saves it with Megatron-Core
dist_checkpointing (torch_dist, global coordinates, so it loads at any other TP/PP), plus the HF
config and tokenizer / processor files, so the checkpoint is self-contained (layout in
`megatron_vppo.checkpoint.model_checkpoint`). mcore-to-hf loads a checkpoint at the given layout (default 1x1)
and writes the HF directory through the same weight stream that feeds the rollout engine.
Both outputs are written into a temporary directory and renamed into place at the end.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def hf_to_mcore(hf: str, out: str, tp: int, pp: int, overwrite: bool = False) -> None:
    """Per-rank body of `hf-to-mcore` (call on every rank of a tp*pp*dp world)."""
    from megatron_vppo.checkpoint.model_checkpoint import load_model, model_dims, read_model_config, save_model_checkpoint
    from megatron_vppo.config import ParallelConfig
    from megatron_vppo.distributed import init_distributed

    cfg = read_model_config(hf)
    parallel = ParallelConfig(tp=tp, pp=pp)
    dims = init_distributed(parallel, **model_dims(cfg))
    m = load_model(hf, parallel, dims=dims)
    save_model_checkpoint(m.chunks, out, cfg, hf_files=hf, overwrite=overwrite, source=str(Path(hf).resolve()),
                          dims=dims)


def mcore_to_hf(ckpt: str, out: str, tp: int = 1, pp: int = 1, hf_config: str | None = None,
                overwrite: bool = False) -> None:
    """Per-rank body of `mcore-to-hf`."""
    from megatron_vppo.checkpoint.model_checkpoint import load_model, model_dims, read_model_config
    from megatron_vppo.config import ParallelConfig
    from megatron_vppo.distributed import init_distributed
    from megatron_vppo.sync.hf_writer import export_hf_checkpoint

    cfg = read_model_config(ckpt, hf_config)
    parallel = ParallelConfig(tp=tp, pp=pp)
    dims = init_distributed(parallel, **model_dims(cfg))
    m = load_model(ckpt, parallel, hf_files=hf_config, dims=dims)
    export_hf_checkpoint(m.chunks, m.adapter, out, cfg, m.hf_files, overwrite=overwrite, dims=dims)


def _run(args) -> None:
    if args.cmd == "hf-to-mcore":
        hf_to_mcore(args.hf, args.out, args.tp, args.pp, args.overwrite)
    else:
        mcore_to_hf(args.ckpt, args.out, args.tp, args.pp, args.hf_config, args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"convert_checkpoint.py {args.cmd}: wrote {written(args.out)}", flush=True)


def written(out: str) -> str:
    """'DIR (N files, X MiB)': what a converter wrote, for its last line."""
    files = [f for f in Path(out).rglob("*") if f.is_file()]
    size = sum(f.stat().st_size for f in files)
    return f"{out} ({len(files)} files, {size / 2**20:.1f} MiB)"


def _user_errors():
    from megatron_vppo.checkpoint.dist_checkpoint import CheckpointError
    from megatron_vppo.parallel_layout import LayoutError
    from megatron_vppo.sync.plan import ExportError

    return (ExportError, CheckpointError, LayoutError, FileNotFoundError, FileExistsError, KeyError, ValueError)


def _rank_main(args) -> int:
    """Run one rank; a user-facing error is printed once (rank 0) without a traceback."""
    return run_rank(_run, args, f"convert_checkpoint.py {args.cmd}", _user_errors())


def run_rank(fn, args, prog: str, user_errors: tuple) -> int:
    """fn(args) on this rank; user errors print once (rank 0) as `prog: error: ...`, exit code 1."""
    from megatron_vppo.console import quiet_third_party_warnings
    from megatron_vppo.distributed import destroy_distributed

    quiet_third_party_warnings()  # torch's ShardedTensor FutureWarning from every save / load, per rank

    rank = int(os.environ.get("RANK", "0"))
    try:
        fn(args)
        return 0
    except user_errors as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        if rank == 0:
            print(f"{prog}: error: {msg}", file=sys.stderr, flush=True)
        return 1
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        if rank == 0:
            where = e.filename or getattr(args, "out", "")
            print(f"{prog}: error: no space left on the disk of {where} ({e.strerror}); free space there or "
                  f"choose another --out", file=sys.stderr, flush=True)
        return 1
    finally:
        destroy_distributed()


def _spawned(local_rank: int, rank_main, args, world: int, port: int) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    code = rank_main(args)
    if code:
        sys.exit(code)


def _local_store(world: int):
    """A rendezvous store bound to a port the kernel picks and held by this launcher, as torchrun's
    agent does (the ranks connect to it as clients). Choosing a free port and binding it later in rank 0
    races: another process can take it in between, and ranks then meet the wrong store."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port), TORCHELASTIC_USE_AGENT_STORE="True")
    return store


def launch(rank_main, args, world: int) -> int:
    """Run `rank_main(args) -> exit code` on every rank: the torchrun ranks when launched by torchrun,
    this process when world == 1, else `world` spawned processes (gloo on CPU, NCCL on GPUs)."""
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:  # torchrun
        return rank_main(args)
    store = _local_store(world)  # noqa: F841 — serves the ranks' rendezvous until they are done
    if world == 1:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        return rank_main(args)
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        mp.start_processes(_spawned, args=(rank_main, args, world, store.port), nprocs=world, join=True,
                           start_method="spawn")
    except mp.ProcessExitedException:
        return 1  # rank 0 already printed the reason
    return 0


def _check_before_launch(args) -> None:
    """Fail on bad inputs in the launcher, before any process or process group starts."""
    from megatron_vppo.checkpoint.model_checkpoint import model_dims, read_model_config
    from megatron_vppo.config import ParallelConfig
    from megatron_vppo.distributed import layout_from_config
    from megatron_vppo.parallel_layout import validate_layout

    src = args.hf if args.cmd == "hf-to-mcore" else args.ckpt
    cfg = read_model_config(src, getattr(args, "hf_config", None))
    world = int(os.environ.get("WORLD_SIZE", args.tp * args.pp))
    layout = layout_from_config(ParallelConfig(tp=args.tp, pp=args.pp), world)
    validate_layout(layout, world_size=world, **model_dims(cfg), te_available=False)
    if Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f"{args.out} already exists; choose another --out or pass --overwrite")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF directory -> Megatron distributed checkpoint")
    a.add_argument("--hf", required=True, help="Hugging Face Qwen2.5-VL directory")
    b = sub.add_parser("mcore-to-hf", help="Megatron checkpoint -> HF directory")
    b.add_argument("--ckpt", required=True, help="checkpoint from hf-to-mcore, or a trainer step_NNNNNNN dir")
    b.add_argument("--hf-config", default=None,
                   help="HF directory with config.json / tokenizer files (for trainer checkpoints)")
    for s in (a, b):
        s.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
        s.add_argument("--tp", type=int, default=1, help="tensor-parallel size to load/save at")
        s.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to load/save at")
        s.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        _check_before_launch(args)
    except _user_errors() as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"convert_checkpoint.py {args.cmd}: error: {msg}", file=sys.stderr)
        return 2
    return launch(_rank_main, args, args.tp * args.pp)


if __name__ == "__main__":
    sys.exit(main())
