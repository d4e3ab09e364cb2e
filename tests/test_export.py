"""The HF-layout export stream (megatron_vppo.checkpoint.export) from a TP/PP-sharded model.

Oracle: the safetensors state dict the model was loaded from. The stream must reproduce it bit for
bit — names, shapes, dtypes, values — at TP2×PP2 and TP2, with buckets of 1 KiB, 1 MiB and unbounded,
for tied and untied embeddings, and at every destination rank that asked for it.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from dist_helpers import run_distributed

BUCKETS = (1024, 1024 * 1024, None)


def _load(hf_dir, tp, pp):
    from megatron_vppo.checkpoint.export import load_model, model_dims, read_model_config
    from megatron_vppo.config import ParallelConfig
    from megatron_vppo.distributed import init_distributed

    parallel = ParallelConfig(tp=tp, pp=pp)
    init_distributed(parallel, **model_dims(read_model_config(hf_dir)))
    return load_model(hf_dir, parallel)


def _export_worker(rank, world, hf_dir, tp, pp):
    from megatron_vppo.checkpoint.export import drain, export_hf_buckets, export_hf_weights
    from megatron_vppo.rollout.buckets import iter_named_tensors

    m = _load(hf_dir, tp, pp)
    out = {"buckets": {}}
    for b in BUCKETS:
        buckets = list(export_hf_buckets(m.chunks, m.adapter, b))
        out["buckets"][b] = (
            [x.nbytes for x in buckets],
            [(n, t.clone()) for n, t in iter_named_tensors(buckets)],
        )
    # every rank receives with dst="all"; dst="replica" feeds the replica's first rank only
    out["all"] = {n: t.clone() for n, t in export_hf_weights(m.chunks, m.adapter, dst="all")}
    out["replica_count"] = drain(export_hf_weights(m.chunks, m.adapter, dst="replica"))
    return out


def _check_equal(got: list, ref: dict, what: str):
    names = [n for n, _ in got]
    assert len(names) == len(set(names)), f"{what}: duplicate names"
    assert set(names) == set(ref), f"{what}: missing {set(ref) - set(names)}, extra {set(names) - set(ref)}"
    for n, t in got:
        assert t.dtype == ref[n].dtype and t.shape == ref[n].shape, (what, n)
        assert torch.equal(t, ref[n]), f"{what}: {n} differs"


@pytest.mark.parametrize("tp,pp,tied", [(2, 2, False), (2, 1, False), (2, 2, True)])
def test_export_stream_equals_loaded_hf_state(tiny_model_dir, tiny_model_dir_tied, tp, pp, tied):
    hf_dir = tiny_model_dir_tied if tied else tiny_model_dir
    ref = load_file(str(hf_dir / "model.safetensors"))
    assert ("lm_head.weight" in ref) != tied
    results = run_distributed(_export_worker, tp * pp, str(hf_dir), tp, pp)

    rank0 = results[0]
    streams = {b: rank0["buckets"][b][1] for b in BUCKETS}
    for b, got in streams.items():
        _check_equal(got, ref, f"tp{tp} pp{pp} bucket={b}")
    # same order for every bucket size
    orders = {tuple(n for n, _ in got) for got in streams.values()}
    assert len(orders) == 1
    sizes_1k, sizes_1m, sizes_inf = (rank0["buckets"][b][0] for b in BUCKETS)
    assert len(sizes_inf) == 1 and len(sizes_1k) > len(sizes_1m) >= 1
    largest = max(t.numel() * t.element_size() for t in ref.values())
    assert all(s <= max(1024, largest) for s in sizes_1k)

    for r, res in enumerate(results):
        _check_equal(list(res["all"].items()), ref, f"dst=all rank {r}")
        if r != 0:
            assert all(not res["buckets"][b][1] for b in BUCKETS), "non-destination ranks yield nothing"
        assert res["replica_count"] == (len(ref) if r == 0 else 0)
