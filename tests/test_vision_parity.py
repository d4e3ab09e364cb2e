"""The Megatron vision tower equals transformers' Qwen2.5-VL vision tower (output, input and param
gradients) at TP1 and TP2 on two images of different sizes, one with several attention windows; the
HF <-> Megatron weight adapter is a bit-exact round trip; packed attention equals per-segment SDPA."""
import json

import pytest
import torch
import torch.nn.functional as F

from dist_helpers import run_distributed

TOL_OUT = 1e-5
TOL_GRAD_REL = 1e-4


# ---------------------------------------------------------------- inputs and the HF oracle


def _images():
    """Random RGB images: 224x280 (WxH; 10x8 merged tokens -> 3x2 windows of 112 px) and 84x56."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (280, 224, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (56, 84, 3), dtype=np.uint8)),
    ]


def _pixels(vcfg: dict):
    from transformers import Qwen2VLImageProcessorPil

    proc = Qwen2VLImageProcessorPil(
        patch_size=vcfg["patch_size"], temporal_patch_size=vcfg["temporal_patch_size"],
        merge_size=vcfg["spatial_merge_size"], size={"shortest_edge": 56 * 56, "longest_edge": 1024 * 1024},
    )
    enc = proc(images=_images(), return_tensors="pt")
    return enc["pixel_values"].float(), enc["image_grid_thw"]


def _hf_run(visual, pixels, grid, out_weight):
    """HF output, d(loss)/d(pixels) and d(loss)/d(params) with loss = <out, out_weight>."""
    visual.zero_grad(set_to_none=True)
    px = pixels.clone().requires_grad_(True)
    out = visual(px, grid_thw=grid).pooler_output
    (out * out_weight).sum().backward()
    grads = {k: p.grad.detach().clone() for k, p in visual.named_parameters()}
    return out.detach(), px.grad.detach(), grads


@pytest.fixture(scope="module")
def tiny_vision(tiny_model_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    vcfg = json.loads((tiny_model_dir / "config.json").read_text())["vision_config"]
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    return vcfg, model.model.visual


def _standalone_vision(**over):
    """A bare HF vision tower with a config the tiny model does not cover (seeded, non-trivial init)."""
    from transformers import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    from megatron_vppo.models.qwen2_5_vl.tiny import init_tiny_weights

    vcfg = dict(depth=3, hidden_size=32, num_heads=2, intermediate_size=63, hidden_act="silu", in_channels=3,
                patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                fullatt_block_indexes=[1], out_hidden_size=48)
    vcfg.update(over)
    torch.manual_seed(0)
    cfg = Qwen2_5_VLVisionConfig(**vcfg)
    cfg._attn_implementation = "sdpa"
    visual = Qwen2_5_VisionTransformerPretrainedModel(cfg).float().eval()
    init_tiny_weights(visual, seed=1)
    return json.loads(cfg.to_json_string()), visual


# ---------------------------------------------------------------- the Megatron side (per rank)


def _vision_worker(rank, world_size, vcfg, hf_state, pixels, grid, out_weight):
    from megatron.core import parallel_state as ps

    from megatron_vppo.config import ParallelConfig
    from megatron_vppo.distributed import init_distributed
    from megatron_vppo.models.qwen2_5_vl.vision import Qwen25VisionModel
    from megatron_vppo.models.qwen2_5_vl.vision_weights import (
        vision_hf_to_mcore,
        vision_mcore_shapes,
        vision_mcore_to_hf,
    )

    tp = world_size
    # The LM runs SP at tp>1; the tower must ignore it (and the LM's shape keys such as num_layers).
    init_distributed(ParallelConfig(tp=tp, sp=tp > 1), num_attention_heads=vcfg["num_heads"],
                     num_query_groups=vcfg["num_heads"], num_layers=vcfg["depth"], vision_num_heads=vcfg["num_heads"])
    base = dict(tensor_model_parallel_size=tp, sequence_parallel=tp > 1, num_layers=99, hidden_size=8,
                params_dtype=torch.float32, use_cpu_initialization=True, gradient_accumulation_fusion=False,
                bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False)
    model = Qwen25VisionModel(vcfg, base)
    tp_rank = ps.get_tensor_model_parallel_rank()

    full = vision_hf_to_mcore(hf_state, vcfg, tp)
    assert {k: tuple(v.shape) for k, v in full.items()} == vision_mcore_shapes(vcfg, tp)
    params = dict(model.named_parameters())
    assert set(params) == set(full), set(params) ^ set(full)
    with torch.no_grad():
        for name, p in params.items():
            t = full[name]
            if getattr(p, "tensor_model_parallel", False):
                t = t.chunk(tp, dim=p.partition_dim)[tp_rank]
            p.copy_(t)

    with pytest.raises(ValueError, match="patch rows"):
        model(pixels[:-4], grid)
    # Distributed-checkpoint view: every parameter, global shapes = the full layout above.
    ssd = model.sharded_state_dict(prefix="vision.")
    keys = {k[len("vision."):] for k in ssd if not k.endswith("_extra_state")}
    assert keys == set(full), keys ^ set(full)
    for k, v in ssd.items():
        if hasattr(v, "global_shape") and not k.endswith("_extra_state"):
            assert tuple(v.global_shape) == tuple(full[k[len("vision."):]].shape), k

    px = pixels.clone().requires_grad_(True)
    out = model(px, grid)
    (out * out_weight).sum().backward()

    grads = {}
    group = ps.get_tensor_model_parallel_group()
    for name, p in params.items():
        g = p.grad.detach()
        if getattr(p, "tensor_model_parallel", False) and tp > 1:
            parts = [torch.empty_like(g) for _ in range(tp)]
            torch.distributed.all_gather(parts, g.contiguous(), group=group)
            g = torch.cat(parts, dim=p.partition_dim)
        grads[name] = g
    return dict(out=out.detach(), pixel_grad=px.grad.detach(), grads=vision_mcore_to_hf(grads, vcfg, tp))


def _compare(vcfg, visual, tp, check_grads):
    pixels, grid = _pixels(vcfg)
    n_out = int((grid.prod(-1) // vcfg["spatial_merge_size"] ** 2).sum())
    out_weight = torch.randn(n_out, vcfg["out_hidden_size"], generator=torch.Generator().manual_seed(3))
    ref_out, ref_px_grad, ref_grads = _hf_run(visual, pixels, grid, out_weight)
    hf_state = {k: v.detach().clone() for k, v in visual.state_dict().items()}

    results = run_distributed(_vision_worker, tp, vcfg, hf_state, pixels, grid, out_weight)
    for r, res in enumerate(results):
        assert res["out"].shape == ref_out.shape
        diff = (res["out"] - ref_out).abs().max().item()
        assert diff <= TOL_OUT, f"rank {r}: vision output differs from HF by {diff:.3e}"
        if not check_grads:
            continue
        rel = (res["pixel_grad"] - ref_px_grad).abs().max() / ref_px_grad.abs().max()
        assert rel <= TOL_GRAD_REL, f"rank {r}: pixel grad rel diff {rel:.3e}"
        assert set(res["grads"]) == set(ref_grads)
        for k, g in ref_grads.items():
            rel = ((res["grads"][k] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item()
            assert rel <= TOL_GRAD_REL, f"rank {r}: grad of {k} rel diff {rel:.3e}"
    return grid


# ---------------------------------------------------------------- tests


def test_window_setup_is_exercised(tiny_vision):
    """The inputs really have two sizes and several windows (else window attention goes untested)."""
    from megatron_vppo.models.qwen2_5_vl.vision import window_index

    vcfg, _ = tiny_vision
    _, grid = _pixels(vcfg)
    assert grid.tolist() == [[1, 20, 16], [1, 4, 6]]
    _, cu = window_index(grid, vcfg["spatial_merge_size"], vcfg["window_size"], vcfg["patch_size"])
    assert len(cu) - 1 == 6 + 1


def test_window_index_matches_hf():
    from transformers.vision_utils import get_vision_window_index

    from megatron_vppo.models.qwen2_5_vl.vision import window_index

    grid = torch.tensor([[1, 20, 16], [2, 8, 12], [1, 4, 6], [1, 16, 16]])
    idx, cu = window_index(grid, 2, 112, 14)
    ref_idx, ref_cu = get_vision_window_index(grid, spatial_merge_size=2, window_size=112, patch_size=14)
    assert torch.equal(idx, ref_idx) and torch.equal(cu, ref_cu)


def test_rotary_matches_hf(tiny_vision):
    """2-D rotary angles (before the window permutation) equal HF's axial vision rotary."""
    from transformers.vision_utils import get_vision_position_ids

    from megatron_vppo.models.qwen2_5_vl.vision import patch_positions, rope_theta, rotary_freqs

    vcfg, visual = tiny_vision
    grid = torch.tensor([[1, 20, 16], [2, 4, 6]])
    pos = patch_positions(grid, vcfg["spatial_merge_size"])
    assert torch.equal(pos, get_vision_position_ids(grid, vcfg["spatial_merge_size"]))
    head_dim = vcfg["hidden_size"] // vcfg["num_heads"]
    freqs = rotary_freqs(pos, head_dim, rope_theta(vcfg))
    cos, sin = visual.rotary_pos_emb(torch.zeros(1), pos)
    assert freqs.shape == cos.shape == (len(pos), head_dim)
    assert (freqs.cos() - cos).abs().max() <= 1e-6 and (freqs.sin() - sin).abs().max() <= 1e-6


def test_vision_parity_tp1(tiny_vision):
    vcfg, visual = tiny_vision
    _compare(vcfg, visual, tp=1, check_grads=False)


def test_vision_parity_and_grads_tp2(tiny_vision):
    vcfg, visual = tiny_vision
    _compare(vcfg, visual, tp=2, check_grads=True)


def test_vision_padded_mlp_tp2():
    """intermediate_size 63 is not divisible by tp=2: the zero-padded MLP is still exact, grads too."""
    vcfg, visual = _standalone_vision()
    _compare(vcfg, visual, tp=2, check_grads=True)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_weight_round_trip_bit_exact(tp):
    from megatron_vppo.models.qwen2_5_vl.vision_weights import vision_hf_to_mcore, vision_mcore_to_hf

    vcfg, visual = _standalone_vision(num_heads=4, intermediate_size=66)
    hf = {k: v.detach().clone() for k, v in visual.state_dict().items()}
    back = vision_mcore_to_hf(vision_hf_to_mcore(hf, vcfg, tp), vcfg, tp)
    assert set(back) == set(hf)
    for k in hf:
        assert back[k].dtype == hf[k].dtype and torch.equal(back[k], hf[k]), k


def test_weight_round_trip_real_widths_tp8():
    """Qwen2.5-VL-7B's vision widths (one block): 3420 is not divisible by 8, so fc1/fc2 are padded."""
    from megatron_vppo.models.qwen2_5_vl.vision_weights import vision_hf_to_mcore, vision_mcore_to_hf

    vcfg, visual = _standalone_vision(depth=1, hidden_size=1280, num_heads=16, intermediate_size=3420,
                                      out_hidden_size=3584, fullatt_block_indexes=[0])
    vcfg["in_chans"] = vcfg.pop("in_channels")  # the released checkpoints' spelling
    hf = {k: v.detach().clone() for k, v in visual.state_dict().items()}
    mc = vision_hf_to_mcore(hf, vcfg, 8)
    assert mc["blocks.0.mlp.linear_fc1.weight"].shape == (2 * 3424, 1280)
    assert mc["blocks.0.mlp.linear_fc2.weight"].shape == (1280, 3424)
    assert not mc["blocks.0.mlp.linear_fc2.weight"][:, 3420:].any()
    back = vision_mcore_to_hf(mc, vcfg, 8)
    assert all(torch.equal(back[k], hf[k]) for k in hf)


def test_weight_layout_qkv_and_gate_up():
    """Megatron layout from first principles: per-head [q;k;v]; fc1 on rank r = [gate_r; up_r]."""
    from megatron_vppo.models.qwen2_5_vl.vision_weights import vision_hf_to_mcore

    vcfg, visual = _standalone_vision(intermediate_size=64)
    hf = {k: v.detach().clone() for k, v in visual.state_dict().items()}
    mc = vision_hf_to_mcore(hf, vcfg, tp=2)
    d, hd = 32, 16
    q, k, v = hf["blocks.0.attn.qkv.weight"].split(d)
    qkv = mc["blocks.0.self_attention.linear_qkv.weight"]
    assert torch.equal(qkv[0:hd], q[0:hd]) and torch.equal(qkv[hd:2 * hd], k[0:hd])
    assert torch.equal(qkv[2 * hd:3 * hd], v[0:hd]) and torch.equal(qkv[3 * hd:4 * hd], q[hd:])
    rank1 = mc["blocks.0.mlp.linear_fc1.weight"].chunk(2)[1]
    assert torch.equal(rank1[:32], hf["blocks.0.mlp.gate_proj.weight"][32:])
    assert torch.equal(rank1[32:], hf["blocks.0.mlp.up_proj.weight"][32:])


def test_weight_errors_name_the_tensor():
    from megatron_vppo.models.qwen2_5_vl.vision_weights import vision_hf_to_mcore, vision_mcore_to_hf

    vcfg, visual = _standalone_vision()
    hf = {k: v.detach().clone() for k, v in visual.state_dict().items()}
    missing = dict(hf)
    del missing["blocks.1.attn.qkv.bias"]
    with pytest.raises(KeyError, match=r"blocks\.1\.attn\.qkv\.bias"):
        vision_hf_to_mcore(missing, vcfg, 1)
    bad = dict(hf, **{"merger.mlp.0.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match=r"merger\.mlp\.0\.weight"):
        vision_hf_to_mcore(bad, vcfg, 1)
    mc = vision_hf_to_mcore(hf, vcfg, 2)
    del mc["blocks.0.mlp.linear_fc1.bias"]
    with pytest.raises(KeyError, match=r"blocks\.0\.mlp\.linear_fc1\.bias"):
        vision_mcore_to_hf(mc, vcfg, 2)
    with pytest.raises(ValueError, match="num_heads"):
        vision_hf_to_mcore(hf, vcfg, 4)


class _OneRank:
    def size(self):
        return 1


class _PG:
    tp = _OneRank()


@pytest.mark.parametrize("causal", [False, True])
def test_packed_attention_matches_per_segment_sdpa(causal):
    """thd with 3 segments, GQA (4 heads, 2 groups): equals SDPA run on each segment alone."""
    from megatron.core.packed_seq_params import PackedSeqParams

    attn = _packed_attn(causal)
    g = torch.Generator().manual_seed(0)
    lens = [5, 1, 7]
    t = sum(lens)
    q, k, v = (torch.randn(t, h, 8, generator=g) for h in (4, 2, 2))
    cu = F.pad(torch.tensor(lens).cumsum(0), (1, 0)).int()
    out = attn(q, k, v, None, packed_seq_params=PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu))
    assert out.shape == (t, 32)
    ref = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs = q[a:b].transpose(0, 1)
        ks, vs = (x[a:b].transpose(0, 1).repeat_interleave(2, dim=0) for x in (k, v))
        ref.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal).transpose(0, 1).reshape(b - a, -1))
    assert (out - torch.cat(ref)).abs().max() <= 1e-6


def _packed_attn(causal):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_vppo.models.common.packed_attention import PackedSeqAttention

    cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                            use_cpu_initialization=True, attention_dropout=0.0)
    mask_type = AttnMaskType.causal if causal else AttnMaskType.no_mask
    return PackedSeqAttention(cfg, 1, mask_type, "self", pg_collection=_PG()).eval()


@pytest.mark.parametrize("causal", [False, True])
def test_packed_attention_padded_storage(causal):
    """cu_seqlens_padded: real rows equal SDPA over each segment's real tokens; pad rows stay finite."""
    from megatron.core.packed_seq_params import PackedSeqParams

    attn = _packed_attn(causal)
    g = torch.Generator().manual_seed(1)
    real, stored = [3, 1, 6], [4, 4, 8]
    t = sum(stored)
    q, k, v = (torch.randn(t, h, 8, generator=g) for h in (4, 2, 2))
    cu = F.pad(torch.tensor(real).cumsum(0), (1, 0)).int()
    cu_pad = F.pad(torch.tensor(stored).cumsum(0), (1, 0)).int()
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                          cu_seqlens_q_padded=cu_pad, cu_seqlens_kv_padded=cu_pad)
    out = attn(q, k, v, None, packed_seq_params=psp)
    assert out.shape == (t, 32) and torch.isfinite(out).all()
    for a, n in zip(cu_pad[:-1].tolist(), real):
        qs = q[a:a + n].transpose(0, 1)
        ks, vs = (x[a:a + n].transpose(0, 1).repeat_interleave(2, dim=0) for x in (k, v))
        ref = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal).transpose(0, 1).reshape(n, -1)
        assert (out[a:a + n] - ref).abs().max() <= 1e-6


def test_packed_attention_cost_follows_segments_not_tokens(monkeypatch):
    """Many short windows (the vision tower's case) must not build a tokens x tokens score matrix:
    with 200 windows of 16 tokens that would be 3200² entries per head instead of 200·16²."""
    from megatron.core.packed_seq_params import PackedSeqParams

    attn = _packed_attn(causal=False)
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append(q.shape[-2] * k.shape[-2] * q.shape[0])
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    n, w = 200, 16
    q, k, v = (torch.randn(n * w, h, 8) for h in (4, 2, 2))
    cu = torch.arange(0, n * w + 1, w, dtype=torch.int32)
    attn(q, k, v, None, packed_seq_params=PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu))
    assert seen and max(seen) <= n * w * w
