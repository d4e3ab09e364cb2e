"""Chunks built without Megatron's random init (`init_weights=False`, as the trainer and `load_model`
build them) are fully written by the HF load: every parameter, including the vocabulary padding and the
vision tower, ends up equal to a randomly initialised build loaded the same way (issue 18 item 5)."""
import math

from dist_helpers import run_distributed


def _worker(rank, world, model_dir):
    import torch

    from megatron_vppo.checkpoint.hf_load import load_hf_weights
    from megatron_vppo.checkpoint.model_checkpoint import build_model, model_dims, read_model_config
    from megatron_vppo.config import ParallelConfig

    from megatron_vppo.distributed import init_distributed

    cfg = read_model_config(model_dir)
    par = ParallelConfig(tp=2)
    dims = init_distributed(par, **model_dims(cfg))
    out = {}
    marks = ("tensor_model_parallel", "partition_dim", "partition_stride")
    for init in (True, False):
        chunks, adapter = build_model(cfg, par, dims=dims, init_weights=init)
        assert all(c.config.perform_initialization is init for c in chunks)
        if not init:  # whatever the skipped init left behind, the load must overwrite it
            for c in chunks:
                for p in c.parameters():
                    p.data.fill_(math.nan)
        load_hf_weights(chunks, model_dir, adapter, dims=dims)
        out[init] = {n: (p.detach().clone(), tuple(getattr(p, a, None) for a in marks))
                     for c in chunks for n, p in c.named_parameters()}
    assert out[True].keys() == out[False].keys()
    bad = [n for n in out[True] if not torch.equal(out[True][n][0], out[False][n][0])]
    # Megatron records TP sharding inside the init that is skipped: the marks must be the same
    bad += [f"{n} marks {out[False][n][1]} != {out[True][n][1]}" for n in out[True] if out[True][n][1] != out[False][n][1]]
    sharded = sum(out[True][n][1][0] is True for n in out[True])
    return len(out[True]), sharded, bad


def test_load_writes_every_parameter_so_init_can_be_skipped(tiny_model_dir):
    for n, sharded, bad in run_distributed(_worker, 2, str(tiny_model_dir)):
        assert n > 20 and sharded > 10 and bad == [], f"parameters that differ from an initialised build: {bad[:5]}"
