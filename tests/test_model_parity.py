"""The Megatron Qwen2.5-VL equals transformers' on the same weights, at every parallel layout.

Batch: two images of different sizes (grids [1,4,6] and [1,8,4]) and one text-only sample, right
padded. Each layout runs on real gloo processes through Megatron's `get_forward_backward_func`
(the trainer's path); vocab-parallel logits are gathered over TP only here, to compare.
Oracle: `Qwen2_5_VLForConditionalGeneration` in fp32 with explicit M-RoPE position ids.
"""
import pytest
import torch
import torch.nn.functional as F
from conftest import make_test_images
from dist_helpers import run_distributed

LOGIT_ATOL = 1e-4
GRAD_RTOL = 1e-4


def make_batch(model_dir, seq_multiple=2):
    from megatron_vppo.data.processor import VLProcessor, collate

    proc = VLProcessor.from_pretrained(model_dir)
    a, b = make_test_images()
    samples = [
        proc.encode("How many shapes are in <image>?", [a], response="There are 2 shapes. \\boxed{2}"),
        proc.encode("<image> What colour is the triangle?", [b], response="green \\boxed{green}"),
        proc.encode("What is 4 + 3?", [], response="4 + 3 = 7, so \\boxed{7}"),
    ]
    batch = collate(samples, proc.pad_token_id)
    pad = -batch["input_ids"].shape[1] % seq_multiple
    if pad:
        batch["input_ids"] = F.pad(batch["input_ids"], (0, pad), value=proc.pad_token_id)
        batch["attention_mask"] = F.pad(batch["attention_mask"], (0, pad))
        batch["mm_token_type_ids"] = F.pad(batch["mm_token_type_ids"], (0, pad))
    batch["lengths"] = batch["attention_mask"].sum(-1)
    # Fixed per-token weights for a gradient check that touches every response token differently.
    g = torch.Generator().manual_seed(3)
    batch["token_weights"] = torch.rand(batch["input_ids"].shape, generator=g)
    return batch


def response_mask(batch):
    """[b, s] True at positions whose NEXT token is a response token."""
    b, s = batch["input_ids"].shape
    pos = torch.arange(s)[None]
    start = batch["response_start"][:, None]
    return (pos >= start - 1) & (pos < batch["lengths"][:, None] - 1)


def next_token_logprobs_full(logits, input_ids):
    """Reference: [b, s, V] -> log p(input_ids[:, t+1] | ≤ t) at [b, s] (last column 0)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    tgt = F.pad(input_ids[:, 1:], (0, 1))
    return logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)


def weighted_objective(logp, batch):
    """A scalar that weights every response token's log-prob differently."""
    m = response_mask(batch).float()
    return -(logp * batch["token_weights"] * m).sum() / m.sum()


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """HF logits, response log-probs and parameter gradients on the batch."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    batch = make_batch(tiny_model_dir)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    pos, _ = hf.model.get_rope_index(
        batch["input_ids"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"],
    )
    out = hf(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=pos,
        pixel_values=batch["pixel_values"],
        image_grid_thw=batch["image_grid_thw"],
    )
    logp = next_token_logprobs_full(out.logits, batch["input_ids"])
    weighted_objective(logp, batch).backward()
    from megatron_vppo.models.qwen2_5_vl.weights import canonical_hf_name

    grads = {
        canonical_hf_name(n): p.grad.detach().clone() for n, p in hf.named_parameters() if p.grad is not None
    }
    assert len(grads) == len(list(hf.parameters()))
    return dict(batch=batch, logits=out.logits.detach(), logp=logp.detach(), grads=grads)


# ---------------------------------------------------------------- worker (runs on every rank)


def _vocab_parallel_logprobs(logits, input_ids, vocab_size):
    """Sharded logits [b, s, Vp/tp] -> next-token log-probs [b, s], padding columns masked."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    local = logits.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * local
    col = torch.arange(start, start + local)
    logits = logits.masked_fill(col >= vocab_size, float("-inf"))
    tgt = F.pad(input_ids[:, 1:], (0, 1))
    # Megatron's cross entropy takes [s, b, v] and returns -log p [s, b].
    nll = vocab_parallel_cross_entropy(logits.transpose(0, 1).contiguous().float(), tgt.t().contiguous())
    return -nll.t()


def _gather_tp(t):
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(tp)]
    torch.distributed.all_gather(parts, t.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def run_layout(model_dir, batch, tp, pp, sp, want_grads):
    """Build + load the model at (tp, pp, sp), run one micro-batch through Megatron's schedule.
    Returns {"logits", "logp"} from the last stage (else None) and full grads {name: tensor}."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_vppo.checkpoint.hf_load import gather_full_state, load_hf_weights
    from megatron_vppo.config import ParallelConfig
    from megatron_vppo.distributed import init_distributed
    from megatron_vppo.models.qwen2_5_vl.config import load_hf_config, text_arch
    from megatron_vppo.models.qwen2_5_vl.model import build_model_chunks
    from megatron_vppo.models.qwen2_5_vl.weights import Qwen25VLWeights

    cfg = load_hf_config(model_dir)
    arch = text_arch(cfg)
    par = ParallelConfig(tp=tp, pp=pp, sp=sp)
    dims = init_distributed(
        par,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_key_value_heads,
        num_layers=arch.num_layers,
        vision_num_heads=cfg["vision_config"]["num_heads"],
        seed=11,
    )
    chunks = build_model_chunks(cfg, None, par, dims=dims)
    adapter = Qwen25VLWeights(cfg, tp=tp)
    load_hf_weights(chunks, model_dir, adapter, dims=dims)
    for c in chunks:
        c.train(want_grads)
        c.zero_grad(set_to_none=True)

    captured = {}

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        out = model(
            mb["input_ids"],
            attention_mask=mb["attention_mask"],
            pixel_values=mb["pixel_values"],
            image_grid_thw=mb["image_grid_thw"],
        )

        def loss_func(logits):
            logp = _vocab_parallel_logprobs(logits, mb["input_ids"], arch.vocab_size)
            captured["logits"] = _gather_tp(logits.detach())[..., : arch.vocab_size]
            captured["logp"] = logp.detach()
            loss = weighted_objective(logp, mb)
            return loss, {"loss": loss.detach()}

        return out, loss_func

    b, s = batch["input_ids"].shape
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([batch]),
        model=chunks,
        num_microbatches=1,
        seq_length=s,
        micro_batch_size=b,
        forward_only=not want_grads,
    )
    result = {"logits": captured.get("logits"), "logp": captured.get("logp"), "grads": None}
    if want_grads and sp:
        # What DDP's finalize_model_grads does under SP: norm weights saw only this rank's tokens.
        for c in chunks:
            for p in c.parameters():
                if getattr(p, "sequence_parallel", False) and p.grad is not None:
                    torch.distributed.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
    if want_grads:
        result["grads"] = gather_full_state(chunks, adapter, grads=True, tp_group=dims.tp_group)
    result["params"] = gather_full_state(chunks, adapter, tp_group=dims.tp_group) if want_grads else None
    result["pp_rank"] = ps.get_pipeline_model_parallel_rank()
    result["tp_rank"] = ps.get_tensor_model_parallel_rank()
    return result


def _worker(rank, world, model_dir, batch, layouts):
    return [run_layout(model_dir, batch, *layout) for layout in layouts]


# ---------------------------------------------------------------- checks (parent)


def _check_forward(res, ref, tag):
    mask = ref["batch"]["attention_mask"].bool()
    rmask = response_mask(ref["batch"])
    last = [r for r in res if r["logits"] is not None]
    assert last, f"{tag}: no rank returned logits"
    for r in last:
        d_logits = (r["logits"] - ref["logits"])[mask].abs().max().item()
        d_logp = (r["logp"] - ref["logp"])[rmask].abs().max().item()
        print(f"{tag}: logits max abs diff {d_logits:.2e}, response log-probs {d_logp:.2e}")
        assert d_logits <= LOGIT_ATOL, f"{tag}: logits max abs diff {d_logits:.3e}"
        assert d_logp <= LOGIT_ATOL, f"{tag}: response log-prob max abs diff {d_logp:.3e}"


def _check_grads(res, ref, model_dir, tp, tag):
    from megatron_vppo.models.qwen2_5_vl.weights import Qwen25VLWeights

    merged = {}
    for r in res:
        merged.update(r["grads"])
    hf_grads = Qwen25VLWeights(model_dir, tp=tp).mcore_to_hf(merged)
    missing = sorted(set(ref["grads"]) - set(hf_grads))
    assert not missing, f"{tag}: no Megatron gradient for {missing[:4]}"
    worst = (0.0, "")
    for name, g_ref in ref["grads"].items():
        g = hf_grads[name]
        assert g.shape == g_ref.shape, f"{tag}: {name} grad shape {tuple(g.shape)} vs {tuple(g_ref.shape)}"
        scale = g_ref.abs().max().item()
        rel = (g - g_ref).abs().max().item() / max(scale, 1e-12)
        worst = max(worst, (rel, name))
    print(f"{tag}: worst relative grad error {worst[0]:.2e} ({worst[1]})")
    assert worst[0] <= GRAD_RTOL, f"{tag}: worst relative grad error {worst[0]:.3e} at {worst[1]}"


def test_tp1_logits_and_grads(tiny_model_dir, reference):
    res = run_distributed(_worker, 1, str(tiny_model_dir), reference["batch"], [(1, 1, False, True)])
    res = [r[0] for r in res]
    _check_forward(res, reference, "TP1")
    _check_grads(res, reference, tiny_model_dir, 1, "TP1")


def test_two_rank_layouts_logits(tiny_model_dir, reference):
    """TP2, TP2+SP (with gradients) and PP2 on the same two processes (groups rebuilt per layout)."""
    layouts = [(2, 1, False, False), (2, 1, True, True), (1, 2, False, False)]
    res = run_distributed(_worker, 2, str(tiny_model_dir), reference["batch"], layouts)
    for i, (tp, pp, sp, grads) in enumerate(layouts):
        tag = f"TP{tp}xPP{pp}{'+SP' if sp else ''}"
        _check_forward([r[i] for r in res], reference, tag)
        if grads:
            _check_grads([r[i] for r in res], reference, tiny_model_dir, tp, tag)


def test_tp2_pp2_logits_and_grads(tiny_model_dir, reference):
    res = run_distributed(_worker, 4, str(tiny_model_dir), reference["batch"], [(2, 2, False, True)])
    res = [r[0] for r in res]
    assert sorted((r["tp_rank"], r["pp_rank"]) for r in res) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    _check_forward(res, reference, "TP2xPP2")
    _check_grads(res, reference, tiny_model_dir, 2, "TP2xPP2")

    # HF -> Megatron (TP2xPP2 shards) -> HF reproduces every tensor bit for bit.
    from safetensors.torch import load_file

    from megatron_vppo.models.qwen2_5_vl.weights import Qwen25VLWeights

    merged = {}
    for r in res:
        merged.update(r["params"])
    back = Qwen25VLWeights(tiny_model_dir, tp=2).mcore_to_hf(merged)
    orig = load_file(str(tiny_model_dir / "model.safetensors"))
    assert sorted(back) == sorted(orig)
    for k, v in orig.items():
        assert torch.equal(back[k], v), f"{k} changed in the HF -> Megatron -> HF round trip"


def _vpp_worker(rank, world, model_dir, batch):
    """PP2 x VPP2 (interleaved schedule, 2 chunks per rank): logits of two micro-batches."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_vppo.checkpoint.hf_load import global_param_names, load_hf_weights
    from megatron_vppo.config import ParallelConfig
    from megatron_vppo.distributed import init_distributed
    from megatron_vppo.models.qwen2_5_vl.config import load_hf_config
    from megatron_vppo.models.qwen2_5_vl.model import build_model_chunks
    from megatron_vppo.models.qwen2_5_vl.weights import Qwen25VLWeights

    cfg = load_hf_config(model_dir)
    par = ParallelConfig(pp=2, vpp=2)
    dims = init_distributed(par, num_attention_heads=4, num_query_groups=2, num_layers=4, vision_num_heads=2)
    chunks = build_model_chunks(cfg, None, par, dims=dims)
    load_hf_weights(chunks, model_dir, Qwen25VLWeights(cfg, tp=1), dims=dims)
    layers = [sorted({n.split(".")[3] for n in global_param_names(c) if ".layers." in n}) for c in chunks]
    out = []

    def step(it, model):
        mb = next(it)
        logits = model(mb["input_ids"], attention_mask=mb["attention_mask"], pixel_values=mb["pixel_values"],
                       image_grid_thw=mb["image_grid_thw"])
        return logits, lambda x: (x.sum() * 0, out.append(x.detach()) or {})

    b, s = batch["input_ids"].shape
    get_forward_backward_func()(
        forward_step_func=step, data_iterator=[iter([batch, batch]), iter([batch, batch])], model=chunks,
        num_microbatches=2, seq_length=s, micro_batch_size=b, forward_only=True,
    )
    return {"layers": layers, "logits": out}


def test_pp2_vpp2_interleaved_logits(tiny_model_dir_4layers):
    """Global layer numbering under virtual pipeline: rank r chunk v holds layer 2v + r."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model_dir = tiny_model_dir_4layers
    batch = make_batch(model_dir)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    pos, _ = hf.model.get_rope_index(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                                     image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"])
    with torch.no_grad():
        ref = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=pos,
                 pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"]).logits
    res = run_distributed(_vpp_worker, 2, str(model_dir), batch)
    assert res[0]["layers"] == [["0"], ["2"]] and res[1]["layers"] == [["1"], ["3"]]
    assert not res[0]["logits"] and len(res[1]["logits"]) == 2
    mask = batch["attention_mask"].bool()
    for lg in res[1]["logits"]:
        d = (lg[..., : ref.shape[-1]] - ref)[mask].abs().max().item()
        print(f"PP2xVPP2: logits max abs diff {d:.2e}")
        assert d <= LOGIT_ATOL
