"""SGLang engines: the CPU-testable translation layer, the trainer side of the weight-update
group over real gloo processes, and GPU-only end-to-end checks (skipped without CUDA + sglang)."""
import importlib.util
import json

import pytest
import torch

from megatron_vppo.sync.buckets import iter_buckets, pack_bucket
from megatron_vppo.rollout.engine import RolloutRequest, SamplingParams, sample_seed
from megatron_vppo.rollout.sglang_engine import (
    expand_requests,
    group_outputs,
    parse_sglang_output,
    to_sglang_sampling_params,
)
from megatron_vppo.rollout.sglang_weights import as_buckets, bucket_payloads

HAVE_SGLANG_GPU = torch.cuda.is_available() and importlib.util.find_spec("sglang") is not None


def test_sampling_param_mapping():
    sp = SamplingParams(temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=33, stop_token_ids=[5, 9], seed=3)
    d = to_sglang_sampling_params(sp)
    assert d == {
        "temperature": 0.7, "top_p": 0.9, "top_k": -1, "max_new_tokens": 33, "stop_token_ids": [5, 9],
        "skip_special_tokens": False, "no_stop_trim": True,
    }
    assert to_sglang_sampling_params(SamplingParams(top_k=20))["top_k"] == 20
    assert "sampling_seed" in to_sglang_sampling_params(sp, seed=2**40 + 5, use_sampling_seed=True)
    assert 0 <= to_sglang_sampling_params(sp, seed=2**40 + 5, use_sampling_seed=True)["sampling_seed"] < 2**31


def test_expand_requests_order_images_and_seeds():
    pv, grid = torch.randn(24, 1176), torch.tensor([[1, 4, 6]])
    reqs = [RolloutRequest([1, 2, 3], pv, grid), RolloutRequest([4, 5]), RolloutRequest([6], seed=42)]
    sp = SamplingParams(seed=9)
    kw = expand_requests(reqs, 2, sp, use_sampling_seed=True)
    assert kw["input_ids"] == [[1, 2, 3], [1, 2, 3], [4, 5], [4, 5], [6], [6]]
    assert kw["return_logprob"] is True
    assert kw["image_data"][1][0]["format"] == "processor_output"
    assert kw["image_data"][0][0]["pixel_values"] is pv and kw["image_data"][2] == []  # a list: see io_struct
    seeds = [p["sampling_seed"] for p in kw["sampling_params"]]
    assert seeds[4] == sample_seed(9, 42, 0) & 0x7FFFFFFF and seeds[2] == sample_seed(9, 1, 0) & 0x7FFFFFFF
    assert len(set(seeds)) == 6
    assert "image_data" not in expand_requests(reqs[1:], 1, sp)


def _result(ids, lps, fin="stop"):
    return {
        "text": "x",
        "output_ids": ids,
        "meta_info": {
            "finish_reason": {"type": fin, "matched": ids[-1]} if fin == "stop" else {"type": fin, "length": len(ids)},
            "output_token_logprobs": [(lp, t, None) for lp, t in zip(lps, ids)],
        },
    }


def test_parse_and_group_outputs():
    flat = [_result([1, 2], [-0.1, -0.2]), _result([3], [-0.3], "length"), _result([4], [-1.0]), _result([5, 6], [-2.0, -3.0], "length")]
    grouped = group_outputs(flat, 2, 2)
    assert [[o.token_ids for o in s] for s in grouped] == [[[1, 2], [3]], [[4], [5, 6]]]
    assert grouped[0][1].finish_reason == "length" and grouped[1][1].log_probs == [-2.0, -3.0]
    with pytest.raises(RuntimeError, match="abort"):
        parse_sglang_output(_result([1], [-0.1], "abort"))
    with pytest.raises(RuntimeError, match="results"):
        group_outputs(flat[:3], 2, 2)


def test_flattened_bucket_payload_layout():
    """SGLang 0.5.23 rebuilds each tensor as flat_uint8[start_idx:end_idx].view(dtype).reshape(shape)
    (tests/test_sglang_contract.py runs its own code on these payloads)."""
    src = [("a", torch.randn(3, 4)), ("b", torch.randn(5).to(torch.bfloat16)), ("c", torch.randn(2, 2)), ("d", torch.tensor(1.0))]
    payloads = bucket_payloads(pack_bucket(src))
    assert len(payloads) == 2  # one flattened tensor per dtype
    rebuilt = {}
    for p in payloads:
        flat = p["flattened_tensor"]
        assert flat.dtype == torch.uint8 and flat.dim() == 1
        for m in p["metadata"]:
            assert m["end_idx"] - m["start_idx"] == m["numel"] == m["shape"].numel() * m["dtype"].itemsize
            rebuilt[m["name"]] = flat[m["start_idx"] : m["end_idx"]].view(m["dtype"]).reshape(m["shape"])
    for n, t in src:
        assert torch.equal(rebuilt[n], t)


@pytest.mark.parametrize("bound", [64, None])
def test_loose_pairs_and_buckets_become_buckets_in_order(bound):
    pairs = [(f"t{i}", torch.full((4,), float(i))) for i in range(6)]
    stream = pairs[:2] + list(iter_buckets(pairs[2:4], None)) + pairs[4:]
    names = [n for b in as_buckets(iter(stream), bound) for n in b.names]
    assert names == [n for n, _ in pairs]


def _groups_worker(rank, world_size):
    import torch.distributed as dist

    from megatron_vppo.config import ParallelConfig
    from megatron_vppo.distributed import all_gather_world, destroy_distributed, init_distributed, with_engines
    from megatron_vppo.rollout.sglang_weights import engine_groups

    base = init_distributed(ParallelConfig(tp=2, pp=2), num_attention_heads=4, num_query_groups=2, num_layers=2)
    try:
        out = {}
        for etp in (2, 1, 4):  # the training layout (TP2xPP2) does not decide where engines sit
            dims = with_engines(base, etp)
            group, src = engine_groups(dims)
            members = dist.get_process_group_ranks(group) if group is not None else None
            gathered = all_gather_world([rank] if dims.engine_rank else [])
            out[etp] = {"src": src, "members": members, "engine": dims.engine_rank, "gathered": gathered}
        return out
    finally:
        destroy_distributed()


def test_engine_groups_put_an_engine_tp_rank_on_every_rank():
    """Every rank hosts an engine TP rank: engine_tp consecutive ranks share one gloo group led by the
    engine's entry rank, at any engine_tp dividing the world, whatever the training layout (one launch)."""
    from dist_helpers import run_distributed

    world = 4
    got = run_distributed(_groups_worker, world, timeout=300)
    for etp in (2, 1, 4):
        engines = list(range(0, world, etp))
        for r in range(world):
            g = got[r][etp]
            assert g["gathered"] == engines  # every rank receives every engine rank's list, in rank order
            lead = r - r % etp
            assert g["src"] == lead and g["engine"] == (r == lead)
            assert g["members"] == (None if etp == 1 else list(range(lead, lead + etp)))


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.skipif(not HAVE_SGLANG_GPU, reason="needs CUDA and sglang 0.5.x (CUDA build); not installable on CPU")
def test_sglang_engine_matches_hf_engine(tiny_model_dir):
    from megatron_vppo.rollout.hf_engine import HFRolloutEngine
    from megatron_vppo.rollout.sglang_engine import SGLangRolloutEngine

    eng = SGLangRolloutEngine.launch(str(tiny_model_dir), dtype="float32", mem_fraction_static=0.3, disable_cuda_graph=True)
    try:
        hf = HFRolloutEngine.from_pretrained(tiny_model_dir, device="cuda")
        from conftest import make_test_images
        from megatron_vppo.data.processor import VLProcessor

        enc = VLProcessor.from_pretrained(tiny_model_dir).encode("How many shapes?", [make_test_images()[0]])
        image_pad = int(json.loads((tiny_model_dir / "config.json").read_text())["image_token_id"])
        reqs = [RolloutRequest([10, 11, 12, 13]), RolloutRequest([20, 21]),
                RolloutRequest(enc["input_ids"].tolist(), enc["pixel_values"], enc["image_grid_thw"])]
        # banned tokens: the engine re-scores SGLang's log-probs onto the full vocabulary (docs/sglang.md)
        outs = eng.generate(reqs, 2, SamplingParams(temperature=1.0, max_new_tokens=8, banned_token_ids=(image_pad,)))
        items = [(r, o.token_ids) for r, s in zip(reqs, outs) for o in s]
        ref = hf.score(items)
        for (r, _), o, lp in zip(items, [o for s in outs for o in s], ref):
            assert image_pad not in o.token_ids and 0 < len(o.token_ids) <= 8
            assert len(o.log_probs) == len(lp) == len(o.token_ids)  # lengths first: zip would hide a short list
            assert max(abs(a - b) for a, b in zip(o.log_probs, lp)) < 1e-3
        # weight update through flattened buckets, then generation on the new weights
        from safetensors.torch import load_file

        # checkpoint spelling (model.layers.*, visual.*), as the trainer's export produces
        sd = {n: t + 0.01 for n, t in load_file(str(tiny_model_dir / "model.safetensors")).items()}
        eng.update_weights(iter_buckets(((n, t.cuda()) for n, t in sd.items()), 1 << 20))
        assert eng.weight_version == 1
        eng.release_memory()
        eng.resume_memory()
        with pytest.raises(RuntimeError, match="weights were dropped"):  # no CPU backup: reload first
            eng.generate(reqs, 1, SamplingParams(max_new_tokens=2))
        eng.update_weights(iter_buckets(((n, t.cuda()) for n, t in sd.items()), 1 << 20))
        hf.update_weights(sd.items())
        outs = eng.generate(reqs, 1, SamplingParams(temperature=1.0, max_new_tokens=8))
        ref = hf.score([(r, s[0].token_ids) for r, s in zip(reqs, outs)])
        assert len(outs) == len(ref) == len(reqs)
        for s, lp in zip(outs, ref):
            assert len(s[0].log_probs) == len(lp) == len(s[0].token_ids)
            assert max(abs(a - b) for a, b in zip(s[0].log_probs, lp)) < 1e-3
    finally:
        eng.shutdown()
