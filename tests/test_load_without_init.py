"""Chunks built without Megatron's random init (`init_weights=False`, as the trainer and `load_model`
build them) are fully written by the HF load: every parameter, including the vocabulary padding and the
vision tower, ends up equal to a randomly initialised build loaded the same way (issue 18 item 5), with
the same tensor-parallel marks. Qwen2.5-VL and Qwen3-VL (DeepStack mergers, learned vision position
table, QK-norm) share one TP2 launch."""
import math

from dist_helpers import run_distributed


def _worker(rank, world, model_dirs):
    """Per model directory: (parameter count, TP-sharded count, mismatches)."""
    from megatron_vppo.checkpoint.model_checkpoint import model_dims, read_model_config
    from megatron_vppo.config import ParallelConfig
    from megatron_vppo.distributed import init_distributed

    cfgs = [read_model_config(d) for d in model_dirs]
    dims = init_distributed(ParallelConfig(tp=2), **model_dims(cfgs[0]))
    return [_compare(d, cfg, dims) for d, cfg in zip(model_dirs, cfgs)]


def _compare(model_dir, cfg, dims):
    import torch

    from megatron_vppo.checkpoint.hf_load import load_hf_weights
    from megatron_vppo.checkpoint.model_checkpoint import build_model
    from megatron_vppo.config import ParallelConfig

    par = ParallelConfig(tp=2)
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


def test_load_writes_every_parameter_so_init_can_be_skipped(tiny_model_dir, tmp_path):
    from megatron_vppo.models import MODELS

    qwen3 = MODELS["qwen3_vl"].make_tiny_model(tmp_path / "tiny_qwen3_vl", seed=0)
    for per_model in run_distributed(_worker, 2, [str(tiny_model_dir), str(qwen3)]):
        for name, (n, sharded, bad) in zip(("qwen2_5_vl", "qwen3_vl"), per_model):
            assert n > 20 and sharded > 10 and bad == [], f"{name}: differs from an initialised build: {bad[:5]}"
