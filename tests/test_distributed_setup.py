"""Process groups + the CPU adapter: bad layouts fail before any group exists; real gloo groups work."""
import os

import pytest
import torch

from megatron_vppo.config import ParallelConfig
from megatron_vppo.parallel_layout import LayoutError
from dist_helpers import DistributedTestError, run_distributed

MODEL = dict(num_attention_heads=4, num_query_groups=2, num_layers=2)


@pytest.mark.parametrize(
    "parallel, world, match",
    [
        (ParallelConfig(tp=3), 3, "num_attention_heads"),
        (ParallelConfig(tp=4), 4, "num_key_value_heads"),
        (ParallelConfig(pp=3), 3, "num_layers"),
        (ParallelConfig(tp=2), 3, "not divisible"),
        (ParallelConfig(tp=2, dp=2), 2, "world size"),
        (ParallelConfig(sp=True), 1, "sequence_parallel"),
        (ParallelConfig(cp=2), 2, "context parallel is not supported yet.*packed sequences.*parallel\\.cp=1"),
        (ParallelConfig(pp=2, vpp=2), 2, "pp\\*vpp"),
    ],
)
def test_bad_layout_fails_before_process_groups(monkeypatch, parallel, world, match):
    from megatron_vppo.distributed import init_distributed

    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(LayoutError, match=match):
        init_distributed(parallel, **MODEL)
    assert not torch.distributed.is_initialized()


def test_context_parallel_refused_even_with_transformer_engine():
    """Nothing splits sequences over CP ranks yet: cp > 1 is refused on GPUs too, naming what is missing
    (and the TE attention as well where TE is absent)."""
    from megatron_vppo.parallel_layout import Layout, validate_layout

    for te, extra in ((True, False), (False, True)):
        with pytest.raises(LayoutError, match="sequence splitting over CP ranks") as e:
            validate_layout(Layout(cp=2, dp=1), world_size=2, te_available=te, **MODEL)
        assert ("Transformer Engine" in str(e.value)) == extra
    validate_layout(Layout(cp=1, dp=2), world_size=2, te_available=True, **MODEL)


def test_vision_heads_checked():
    from megatron_vppo.distributed import init_distributed

    os.environ["WORLD_SIZE"] = "2"
    try:
        with pytest.raises(LayoutError, match="vision"):
            init_distributed(ParallelConfig(tp=2), **MODEL, vision_num_heads=3)
    finally:
        del os.environ["WORLD_SIZE"]


def _groups_and_adapter(rank, world, tp, pp):
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from megatron_vppo.distributed import init_distributed

    info = init_distributed(ParallelConfig(tp=tp, pp=pp), **MODEL, seed=7)
    out = dict(
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        backend=torch.distributed.get_backend(),
        device=str(info.device),
    )
    # CUDA-assuming calls are redirected to CPU.
    out["zeros_device"] = str(torch.zeros(2, device="cuda").device)
    out["cuda_call_device"] = str(torch.ones(1).cuda().device)
    out["current_device_tensor"] = str(torch.empty(1, device=torch.cuda.current_device()).device)
    out["type_name"] = torch.ones(1).type()
    torch.cuda.synchronize()
    from megatron_vppo.megatron_cpu import apply_cpu_adapter

    out["adapter_idempotent"] = apply_cpu_adapter() and apply_cpu_adapter()
    # RNG tracker: the model-parallel stream differs per TP rank, is reproducible, and leaves the
    # default stream untouched.
    before = torch.get_rng_state()
    with tensor_parallel.get_cuda_rng_tracker().fork():
        out["mp_rand"] = torch.rand(3)
    out["default_unchanged"] = bool(torch.equal(before, torch.get_rng_state()))
    out["default_rand"] = torch.rand(3)
    # A TP collective over gloo.
    t = torch.full((1,), float(rank))
    torch.distributed.all_reduce(t, group=ps.get_tensor_model_parallel_group())
    out["tp_sum"] = t.item()
    return out


def test_tp2_groups_adapter_and_rng():
    res = run_distributed(_groups_and_adapter, 2, 2, 1)
    for r, out in enumerate(res):
        assert out["tp_rank"] == r and out["pp_rank"] == 0 and out["dp_size"] == 1
        assert out["backend"] == "gloo" and out["device"] == "cpu"
        assert out["zeros_device"] == out["cuda_call_device"] == out["current_device_tensor"] == "cpu"
        assert out["type_name"] == "torch.cuda.FloatTensor"
        assert out["default_unchanged"] and out["adapter_idempotent"]
        assert out["tp_sum"] == 1.0
    assert not torch.equal(res[0]["mp_rand"], res[1]["mp_rand"])
    assert torch.equal(res[0]["default_rand"], res[1]["default_rand"])


def test_tp2_pp2_groups():
    res = run_distributed(_groups_and_adapter, 4, 2, 2)
    # Megatron's default order tp-cp-ep-dp-pp: TP varies fastest, PP slowest.
    assert [(o["tp_rank"], o["pp_rank"]) for o in res] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert [o["tp_sum"] for o in res] == [1.0, 1.0, 5.0, 5.0]


def _raise_on_rank1(rank, world):
    if rank == 1:
        raise ValueError("boom from rank 1")
    return rank


def test_helper_propagates_child_errors():
    with pytest.raises(DistributedTestError, match="boom from rank 1"):
        run_distributed(_raise_on_rank1, 2)
