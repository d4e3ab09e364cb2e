"""Qwen2.5-VL pieces against transformers: M-RoPE ids, config mapping, weight adapter, loader
errors, and the language model on text-only / left-padded / tied / 5.x-named checkpoints."""
import shutil

import pytest
import torch
from dist_helpers import run_distributed
from safetensors.torch import load_file, save_file

from megatron_vppo.models.qwen2_5_vl.config import (
    lm_transformer_config,
    padded_vocab_size,
    text_arch,
)
from megatron_vppo.models.qwen2_5_vl.rope_index import get_rope_index, rope_index_for
from megatron_vppo.models.qwen2_5_vl.weights import Qwen25VLWeights, canonical_hf_name, hf_name_v5


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


# ---------------------------------------------------------------- M-RoPE position ids


def _seq(arch, parts):
    """Build one id list from ("t", n) text runs and ("i", (t, h, w)) images."""
    ids, grids = [], []
    for kind, x in parts:
        if kind == "t":
            ids += [(7 * len(ids) + 3) % 300 + 5 for _ in range(x)]
        else:
            ids += [arch.vision_start_token_id] + [arch.image_token_id] * (x[0] * x[1] * x[2] // 4) + [
                arch.vision_start_token_id + 1
            ]
            grids.append(list(x))
    return ids, grids


def _batch(arch, rows, pad_id, left=False):
    seqs, grids = zip(*[_seq(arch, r) for r in rows])
    s = max(len(x) for x in seqs)
    ids = torch.full((len(rows), s), pad_id)
    mask = torch.zeros((len(rows), s), dtype=torch.long)
    for i, x in enumerate(seqs):
        sl = slice(s - len(x), s) if left else slice(0, len(x))
        ids[i, sl] = torch.tensor(x)
        mask[i, sl] = 1
    g = [x for gs in grids for x in gs]
    return ids, mask, (torch.tensor(g) if g else None)


@pytest.mark.parametrize("left", [False, True])
def test_rope_index_equals_hf(tiny_model_dir, hf_model, left):
    arch = text_arch(tiny_model_dir)
    rows = [
        [("t", 5), ("i", (1, 4, 6)), ("t", 7)],
        [("t", 3), ("i", (1, 8, 4)), ("t", 2), ("i", (1, 2, 2)), ("t", 4)],
        [("t", 11)],
        [("i", (1, 6, 6)), ("t", 2)],
    ]
    ids, mask, grid = _batch(arch, rows, pad_id=arch.vision_start_token_id - 9, left=left)
    mm = (ids == arch.image_token_id).int()
    for m in (mask, None) if not left else (mask,):
        ref_pos, ref_delta = hf_model.model.get_rope_index(
            ids, mm_token_type_ids=mm, image_grid_thw=grid, attention_mask=m
        )
        pos, delta = rope_index_for(arch, ids, grid, m)
        assert torch.equal(pos, ref_pos)
        assert torch.equal(delta.view(-1), ref_delta.view(-1).long())


def test_rope_index_errors(tiny_model_dir):
    arch = text_arch(tiny_model_dir)
    ids, mask, grid = _batch(arch, [[("t", 2), ("i", (1, 4, 4)), ("t", 2)]], pad_id=0)
    with pytest.raises(ValueError, match="needs 4 <\\|image_pad\\|> tokens, found a run of 4|grid_thw"):
        rope_index_for(arch, ids, torch.tensor([[1, 4, 4], [1, 2, 2]]), mask)
    with pytest.raises(ValueError, match="needs 6 <\\|image_pad\\|> tokens, found a run of 4"):
        rope_index_for(arch, ids, torch.tensor([[1, 4, 6]]), mask)
    with pytest.raises(ValueError, match="more <\\|image_pad\\|> runs"):
        get_rope_index(ids, None, mask, image_token_id=arch.image_token_id)


# ---------------------------------------------------------------- config mapping


QWEN25_VL_7B_V4 = {  # the layout of the released 7B config.json (transformers 4.x, flat)
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "max_position_embeddings": 128000,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "vocab_size": 152064,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_config": {"depth": 32, "hidden_size": 1280, "num_heads": 16, "intermediate_size": 3420,
                      "out_hidden_size": 3584, "spatial_merge_size": 2, "tokens_per_second": 2},
}


def test_config_mapping(tiny_model_dir):
    from megatron_vppo.config import ModelConfig, ParallelConfig

    c = lm_transformer_config(tiny_model_dir, ModelConfig(), ParallelConfig(tp=1))
    assert (c.num_layers, c.hidden_size, c.ffn_hidden_size) == (2, 64, 128)
    assert (c.num_attention_heads, c.num_query_groups, c.kv_channels) == (4, 2, 16)
    assert c.add_qkv_bias and not c.add_bias_linear and c.gated_linear_unit
    assert c.normalization == "RMSNorm" and c.layernorm_epsilon == 1e-6
    assert c.activation_func is torch.nn.functional.silu
    assert c.mrope_section == [2, 3, 3] and c.use_cpu_initialization
    assert not (c.gradient_accumulation_fusion or c.masked_softmax_fusion or c.bias_dropout_fusion)
    assert c.params_dtype == torch.float32 and c.transformer_impl == "local"
    b = lm_transformer_config(tiny_model_dir, ModelConfig(dtype="bf16"))
    assert b.params_dtype == torch.bfloat16 and b.bf16
    with pytest.raises(ValueError, match="fp8"):
        lm_transformer_config(tiny_model_dir, ModelConfig(fp8="hybrid", transformer_impl="local"))

    a = text_arch(QWEN25_VL_7B_V4)  # 4.x flat spelling
    assert (a.hidden_size, a.num_layers, a.num_key_value_heads, a.head_dim) == (3584, 28, 4, 128)
    assert a.mrope_section == (16, 24, 24) and a.rope_theta == 1e6 and not a.tie_word_embeddings
    assert padded_vocab_size(152064, 128, 8) == 152576 and padded_vocab_size(457, 128, 2) == 512


# ---------------------------------------------------------------- weight adapter


@pytest.mark.parametrize("tp", [1, 2])
def test_adapter_round_trip_bit_exact(tiny_model_dir, tp):
    hf = load_file(str(tiny_model_dir / "model.safetensors"))
    ad = Qwen25VLWeights(tiny_model_dir, tp=tp)
    for state in (hf, {hf_name_v5(k): v for k, v in hf.items()}):  # both spellings in
        mc = ad.hf_to_mcore(state)
        assert mc["language_model.embedding.word_embeddings.weight"].shape[0] == 512
        back = ad.mcore_to_hf(mc)
        assert sorted(back) == sorted(hf)
        for k, v in hf.items():
            assert torch.equal(back[k], v), k
    v5 = ad.mcore_to_hf(mc, spelling="v5")
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in v5 and "model.visual.merger.ln_q.weight" in v5
    assert all(canonical_hf_name(k) in hf for k in v5)


def test_adapter_layouts_match_megatron_sharding(tiny_model_dir):
    """Per-group QKV and [gate_r; up_r] chunks are what a TP rank's fused linear holds."""
    hf = load_file(str(tiny_model_dir / "model.safetensors"))
    ad = Qwen25VLWeights(tiny_model_dir, tp=2)
    mc = ad.hf_to_mcore(hf)
    p = "model.layers.1."
    qkv = mc["language_model.decoder.layers.1.self_attention.linear_qkv.weight"]
    rank1 = qkv.chunk(2)[1]  # rank 1 holds query group 1: q heads 2,3, then k head 1, v head 1
    q, k, v = hf[p + "self_attn.q_proj.weight"], hf[p + "self_attn.k_proj.weight"], hf[p + "self_attn.v_proj.weight"]
    assert torch.equal(rank1, torch.cat([q[32:64], k[16:32], v[16:32]]))
    fc1 = mc["language_model.decoder.layers.1.mlp.linear_fc1.weight"].chunk(2)[1]
    assert torch.equal(fc1, torch.cat([hf[p + "mlp.gate_proj.weight"][64:], hf[p + "mlp.up_proj.weight"][64:]]))


def test_tied_adapter(tiny_model_dir_tied):
    hf = load_file(str(tiny_model_dir_tied / "model.safetensors"))
    ad = Qwen25VLWeights(tiny_model_dir_tied, tp=1)
    assert ad.arch.tie_word_embeddings
    mc = ad.hf_to_mcore(hf)
    assert "language_model.output_layer.weight" not in mc
    grp = ad.groups(["language_model.output_layer.weight"])[0]  # last stage under PP
    assert grp.hf_names == ["model.embed_tokens.weight"]
    back = ad.mcore_to_hf(mc)
    assert {k for k in hf if k != "lm_head.weight"} == set(back)


# ---------------------------------------------------------------- distributed: LM parity + errors


def _text_batch(model_dir, left):
    from megatron_vppo.data.processor import VLProcessor, collate

    proc = VLProcessor.from_pretrained(model_dir)
    samples = [proc.encode("What is 12 + 30?", [], response="12 + 30 = 42 \\boxed{42}"),
               proc.encode("Name a colour.", [], response="red")]
    b = collate(samples, proc.pad_token_id)
    if left:  # move every row's padding to the front
        for i in range(b["input_ids"].shape[0]):
            n = int(b["attention_mask"][i].sum())
            b["input_ids"][i] = torch.roll(b["input_ids"][i], -n + b["input_ids"].shape[1] - 0)
            b["attention_mask"][i] = torch.roll(b["attention_mask"][i], b["input_ids"].shape[1] - n)
    if b["input_ids"].shape[1] % 2:
        b["input_ids"] = torch.nn.functional.pad(b["input_ids"], (0, 1), value=proc.pad_token_id)
        b["attention_mask"] = torch.nn.functional.pad(b["attention_mask"], (0, 1))
    return b


def _hf_logits(model_dir, batch):
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    pos, _ = hf.model.get_rope_index(
        batch["input_ids"], mm_token_type_ids=torch.zeros_like(batch["input_ids"]).int(),
        image_grid_thw=None, attention_mask=batch["attention_mask"],
    )
    with torch.no_grad():
        return hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=pos).logits


def _lm_forward(model_dir, batch, tp, pp, with_vision=True):
    """Logits via Megatron's schedule at (tp, pp); TP-gathered on the last stage, else None."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_vppo.checkpoint.hf_load import load_hf_weights
    from megatron_vppo.config import ParallelConfig
    from megatron_vppo.distributed import init_distributed
    from megatron_vppo.models.qwen2_5_vl.config import load_hf_config
    from megatron_vppo.models.qwen2_5_vl.model import build_model_chunks

    cfg = load_hf_config(model_dir)
    par = ParallelConfig(tp=tp, pp=pp)
    dims = init_distributed(par, num_attention_heads=4, num_query_groups=2, num_layers=2)
    chunks = build_model_chunks(cfg, None, par, dims=dims, with_vision=with_vision)
    load_hf_weights(chunks, model_dir, Qwen25VLWeights(cfg, tp=tp), dims=dims)
    out = {}

    def step(it, model):
        mb = next(it)
        logits = model(mb["input_ids"], attention_mask=mb["attention_mask"])

        def loss_func(x):
            parts = [torch.empty_like(x) for _ in range(tp)]
            torch.distributed.all_gather(parts, x.contiguous(), group=ps.get_tensor_model_parallel_group())
            out["logits"] = torch.cat(parts, -1)
            return x.sum() * 0, {}

        return logits, loss_func

    b, s = batch["input_ids"].shape
    get_forward_backward_func()(forward_step_func=step, data_iterator=iter([batch]), model=chunks,
                                num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=True)
    return out.get("logits")


def _lm_worker(rank, world, jobs):
    return [_lm_forward(*job) for job in jobs]


def test_language_model_parity_text_left_pad_tied_v5(tiny_model_dir, tiny_model_dir_tied, tmp_path):
    """Text-only batches at TP2 (right and left padded, 5.x-named checkpoint) and a tied model at PP2."""
    v5_dir = tmp_path / "v5"
    shutil.copytree(tiny_model_dir, v5_dir)
    sd = load_file(str(v5_dir / "model.safetensors"))
    save_file({hf_name_v5(k): v for k, v in sd.items()}, str(v5_dir / "model.safetensors"))
    right, left = _text_batch(tiny_model_dir, False), _text_batch(tiny_model_dir, True)
    assert not torch.equal(left["attention_mask"][:, 0], torch.ones(2, dtype=torch.long))
    jobs = [
        (str(tiny_model_dir), right, 2, 1, False),
        (str(tiny_model_dir), left, 2, 1),
        (str(v5_dir), right, 2, 1),
        (str(tiny_model_dir_tied), right, 1, 2),
    ]
    res = run_distributed(_lm_worker, 2, jobs)
    refs = [_hf_logits(tiny_model_dir, right), _hf_logits(tiny_model_dir, left),
            _hf_logits(tiny_model_dir, right), _hf_logits(tiny_model_dir_tied, right)]
    for j, ref in enumerate(refs):
        got = [r[j] for r in res if r[j] is not None]
        assert got, f"job {j}: no logits"
        mask = jobs[j][1]["attention_mask"].bool()
        V = ref.shape[-1]
        for g in got:
            assert g.shape[-1] == 512 and torch.all(g[..., V:] == 0)  # vocab padding: zero columns
            d = (g[..., :V] - ref)[mask].abs().max().item()
            print(f"LM job {j}: max abs diff {d:.2e}")
            assert d <= 1e-4, f"job {j}: logits differ from transformers by {d:.3e}"


def _error_worker(rank, world, model_dir, bad_dirs, batch):
    from megatron_vppo.checkpoint.hf_load import load_hf_weights
    from megatron_vppo.config import ParallelConfig
    from megatron_vppo.distributed import init_distributed
    from megatron_vppo.models.qwen2_5_vl.config import load_hf_config
    from megatron_vppo.models.qwen2_5_vl.model import build_model_chunks

    cfg = load_hf_config(model_dir)
    dims = init_distributed(ParallelConfig(tp=1), num_attention_heads=4, num_query_groups=2, num_layers=2)
    chunks = build_model_chunks(cfg, dims=dims)
    msgs = []
    for d in bad_dirs:
        try:
            load_hf_weights(chunks, d, Qwen25VLWeights(cfg, tp=1), dims=dims)
            msgs.append("no error")
        except (KeyError, ValueError) as e:
            msgs.append(f"{type(e).__name__}: {e}")
    # An image whose pad-token count does not match its grid.
    ids = batch["input_ids"].clone()
    first_pad = int((ids[0] == chunks[0].arch.image_token_id).nonzero()[0, 0])
    ids[0, first_pad] = 5
    try:
        chunks[0](ids, attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
                  image_grid_thw=batch["image_grid_thw"], position_ids=torch.zeros(3, *ids.shape, dtype=torch.long))
        msgs.append("no error")
    except ValueError as e:
        msgs.append(f"ValueError: {e}")
    return msgs


def test_loader_and_model_errors(tiny_model_dir, tmp_path):
    from conftest import make_test_images

    from megatron_vppo.data.processor import VLProcessor, collate

    sd = load_file(str(tiny_model_dir / "model.safetensors"))
    missing, misshaped = tmp_path / "missing", tmp_path / "misshaped"
    for d in (missing, misshaped):
        d.mkdir()
        shutil.copy(tiny_model_dir / "config.json", d / "config.json")
    save_file({k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"},
              str(missing / "model.safetensors"))
    bad = dict(sd)
    bad["model.layers.0.self_attn.o_proj.weight"] = bad["model.layers.0.self_attn.o_proj.weight"][:, :32].clone()
    save_file(bad, str(misshaped / "model.safetensors"))
    proc = VLProcessor.from_pretrained(tiny_model_dir)
    batch = collate([proc.encode("<image> count", make_test_images()[:1])], proc.pad_token_id)
    (m_missing, m_shape, m_img), = run_distributed(
        _error_worker, 1, str(tiny_model_dir), [str(missing), str(misshaped)], batch
    )
    assert "KeyError" in m_missing and "model.layers.1.mlp.up_proj.weight" in m_missing
    assert "ValueError" in m_shape and "linear_proj" in m_shape
    assert "image token mismatch" in m_img and "5 <|image_pad|>" in m_img


# ---------------------------------------------------------------- layer specs


def test_local_spec_and_te_refusal_on_cpu(tiny_model_dir):
    from megatron_vppo.config import ModelConfig
    from megatron_vppo.models.common.layer_specs import lm_layer_spec, te_available
    from megatron_vppo.models.common.packed_attention import PackedSeqAttention

    spec = lm_layer_spec(lm_transformer_config(tiny_model_dir, ModelConfig(transformer_impl="local")))
    assert spec.submodules.self_attention.submodules.core_attention is PackedSeqAttention
    if not te_available():
        with pytest.raises(ValueError, match="Transformer Engine"):
            lm_transformer_config(tiny_model_dir, ModelConfig(transformer_impl="transformer_engine"))
        assert lm_transformer_config(tiny_model_dir, ModelConfig()).transformer_impl == "local"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Transformer Engine layers and FP8 need a GPU")
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
def test_te_spec_and_fp8_recipe(tiny_model_dir, recipe):
    pytest.importorskip("transformer_engine")
    from megatron_vppo.config import ModelConfig
    from megatron.core.fp8_utils import get_fp8_recipe

    from megatron_vppo.models.common.layer_specs import lm_layer_spec

    c = lm_transformer_config(
        tiny_model_dir, ModelConfig(transformer_impl="transformer_engine", fp8="hybrid", fp8_recipe=recipe)
    )
    assert c.transformer_impl == "transformer_engine" and c.fp8 == "hybrid"
    assert str(getattr(c.fp8_recipe, "value", c.fp8_recipe)) == recipe  # the config's recipe reaches Megatron
    assert lm_layer_spec(c) is not None
    fp8_recipe = get_fp8_recipe(c)
    import transformer_engine.pytorch as te
    from transformer_engine.common.recipe import DelayedScaling, Float8CurrentScaling, Format

    assert isinstance(fp8_recipe, {"delayed": DelayedScaling, "tensorwise": Float8CurrentScaling}[recipe])
    assert fp8_recipe.fp8_format == Format.HYBRID
    # one TE forward under that recipe (FP8 GEMM dims: multiples of 16), close to the bf16 product
    torch.manual_seed(0)
    lin = te.Linear(64, 128, bias=False, params_dtype=torch.bfloat16, device="cuda")
    x = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)
    with te.fp8_autocast(enabled=True, fp8_recipe=fp8_recipe):
        y = lin(x)
    assert lin.fp8 and isinstance(lin.fp8_meta["recipe"], type(fp8_recipe))  # it ran in FP8, this recipe
    ref = x.float() @ lin.weight.float().t()
    assert torch.isfinite(y).all() and (y.float() - ref).norm() / ref.norm() < 0.1
