"""Packing pieces: first-fit-decreasing bins, token-balanced data-parallel shards, packed collation
against the padded one, length-bucketed thd attention on skewed segments (values, gradients, cost),
and packed scoring at DP2 against padded scoring in the same processes."""
import random

import pytest
import torch
import torch.nn.functional as F
from dist_helpers import run_distributed
from test_vision_parity import _packed_attn

from megatron_vppo.train.rl_batch import (
    Trajectory,
    collate,
    collate_packed,
    pack_by_tokens,
    shard_by_tokens,
    stack_views,
)


@pytest.mark.parametrize("seed", range(5))
def test_pack_by_tokens_bins_are_within_budget_and_cover_everything(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(16, 64), rng.randint(64, 1024)]) for _ in range(rng.randint(1, 60))]
    budget = rng.choice([512, 1024, 2048])
    bins = pack_by_tokens(lengths, budget)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    for b in bins:
        assert sum(lengths[i] for i in b) <= budget or len(b) == 1
    # First-fit decreasing never needs more than 11/9 OPT + 1 bins; OPT >= ceil(total / budget).
    assert len(bins) <= 11 / 9 * -(-sum(lengths) // budget) + 1
    with pytest.raises(ValueError, match="max_tokens_per_micro_batch"):
        pack_by_tokens(lengths, 0)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_shard_by_tokens_is_contiguous_and_balanced(world):
    rng = random.Random(world)
    lengths = [rng.randint(16, 1024) for _ in range(37)]
    items = list(range(len(lengths)))
    parts = [shard_by_tokens(items, lengths, r, world) for r in range(world)]
    assert [i for p in parts for i in p] == items  # rank order = input order (gathers stay in order)
    loads = [sum(lengths[i] for i in p) for p in parts]
    assert max(loads) - min(loads) <= 2 * max(lengths)
    assert shard_by_tokens([], [], 0, world) == []


def _traj(n, start, img=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 90, (n,), generator=g)
    return Trajectory(group=0, input_ids=ids, response_start=start,
                      position_ids=torch.arange(n).expand(3, n) + seed,
                      pixel_values=torch.full((4, 3), float(seed)) if img else None,
                      image_grid_thw=torch.tensor([[1, 2, 2]]) if img else None)


def test_packed_collation_carries_what_padded_does():
    trajs = [_traj(7, 3, img=True, seed=1), _traj(4, 2, seed=2), _traj(9, 5, img=True, seed=3)]
    pad = collate(trajs, rows=4, seq_len=16, pad_id=0)
    pk = collate_packed(trajs, seq_len=24, pad_id=0)
    assert pk.cu_seqlens.tolist() == [0, 7, 11, 20, 24] and pk.max_seqlen == 9
    vals = [torch.arange(t.response_len, dtype=torch.float32) + 10 * i for i, t in enumerate(trajs)]
    for mb in (pad, pk):
        got = mb.from_positions(mb.to_positions(vals))
        assert all(torch.equal(a, b) for a, b in zip(got, vals))
        # labels at response positions are the response tokens; loss mask is exactly those positions
        lab = mb.from_positions(mb.labels.float())
        assert all(torch.equal(a, t.input_ids[t.response_start:].float()) for a, t in zip(lab, trajs))
        assert int(mb.loss_mask.sum()) == sum(t.response_len for t in trajs)
        assert torch.equal(mb.pixel_values, pad.pixel_values)
    for t, off in zip(trajs, [0, 7, 11]):
        assert torch.equal(pk.position_ids[:, 0, off : off + t.num_tokens], t.position_ids)
    aug = collate_packed(trajs, seq_len=24, pad_id=0, pixel_values_override=[t.pixel_values + 100 if t.has_image
                                                                              else None for t in trajs])
    two = stack_views(pk, aug)
    assert two.input_ids.shape == (1, 48) and two.cu_seqlens.tolist() == [0, 7, 11, 20, 24, 31, 35, 44, 48]
    first, second = two.split_views(two.labels)
    assert torch.equal(first, pk.labels) and torch.equal(second, pk.labels)
    assert torch.equal(two.pixel_values[8:], pk.pixel_values + 100)
    with pytest.raises(ValueError, match="exceed the packed length"):
        collate_packed(trajs, seq_len=19, pad_id=0)


@pytest.mark.parametrize("causal", [False, True])
def test_packed_attention_on_skewed_segments(causal, monkeypatch):
    """Segments of 3..300 tokens: each equals SDPA over that segment alone (values and gradients),
    and the work is within 4x Σ segment² (a single padded batch would be n · longest²)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    attn = _packed_attn(causal)
    lens = [300, 3, 17, 130, 5, 64, 33, 250]
    t = sum(lens)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(t, h, 8, generator=g).requires_grad_() for h in (4, 2, 2))
    cu = F.pad(torch.tensor(lens).cumsum(0), (1, 0)).int()
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q_, k_, v_, attn_mask=None, **kw):
        seen.append(q_.shape[0] * q_.shape[-2] * k_.shape[-2])
        return sdpa(q_, k_, v_, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    out = attn(q, k, v, None, packed_seq_params=PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu))
    assert sum(seen) <= 4 * sum(n * n for n in lens)
    monkeypatch.undo()
    w = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs = q[a:b].transpose(0, 1)
        ks, vs = (x[a:b].transpose(0, 1).repeat_interleave(2, dim=0) for x in (k, v))
        ref.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal).transpose(0, 1).reshape(b - a, -1))
    ref = torch.cat(ref)
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    assert (out - ref).abs().max() <= 1e-6
    for a, b in zip(grads, ref_grads):
        assert (a - b).abs().max() <= 1e-5


def _score_worker(rank, world, model_dir, trajs):
    from test_vppo_layout_invariance import build_trainer, run_config

    from megatron_vppo.train.scoring import score_trajectories

    trainer, _ = build_trainer(model_dir, 1, 1, run_config(2))
    kw = dict(vocab_size=trainer.vocab_size, pad_id=trainer.processor.pad_token_id, temperature=0.8, dims=trainer.dims)
    padded = score_trajectories(trainer.model_chunks, trajs, micro_batch_size=2, **kw)
    packed = score_trajectories(trainer.model_chunks, trajs, max_tokens_per_micro_batch=300, **kw)
    return padded, packed


def test_packed_scoring_equals_padded_at_dp2(tiny_model_dir):
    """tools/score.py's path: the same log-probs from packed (token-balanced shards, FFD bins) and
    padded micro-batches, every rank holding all of them in input order."""
    from test_vppo_layout_invariance import make_trajectories

    trajs = make_trajectories(tiny_model_dir)[:5]
    for padded, packed in run_distributed(_score_worker, 2, str(tiny_model_dir), trajs):
        assert len(padded) == len(packed) == 5
        for a, b, t in zip(padded, packed, trajs):
            assert a.shape == b.shape == (t.response_len,)
            assert (a - b).abs().max() <= 1e-5
