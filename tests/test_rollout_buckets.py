"""Weight buckets: byte bounds, one buffer per dtype, exact round trip."""
import pytest
import torch

from megatron_vppo.sync.buckets import (
    Bucket,
    iter_buckets,
    iter_named_tensors,
    pack_bucket,
    tensor_nbytes,
    unpack_bucket,
)


def _weights():
    g = torch.Generator().manual_seed(0)
    big = torch.randn(300, 300, generator=g)  # 360 KB: larger than a 1 KiB bound
    return [
        ("model.embed_tokens.weight", torch.randn(17, 8, generator=g)),
        ("model.layers.0.self_attn.q_proj.bias", torch.randn(8, generator=g).to(torch.bfloat16)),
        ("model.layers.0.mlp.up_proj.weight", big),
        ("scalar", torch.tensor(3.5)),
        ("model.layers.0.self_attn.k_proj.weight", torch.randn(6, 4, generator=g).t()),  # non-contiguous
        ("counts", torch.arange(10, dtype=torch.int64)),
        ("model.norm.weight", torch.randn(64, generator=g).to(torch.float16)),
        ("empty", torch.zeros(0, 3)),
    ]


@pytest.mark.parametrize("bound", [1024, 1024 * 1024, None])
def test_round_trip_identical(bound):
    src = _weights()
    buckets = list(iter_buckets(iter(src), bound))
    back = list(iter_named_tensors(buckets))
    assert [n for n, _ in back] == [n for n, _ in src]
    for (n, a), (_, b) in zip(src, back):
        assert a.dtype == b.dtype and a.shape == b.shape, n
        assert torch.equal(a, b), n
    if bound is None:
        assert len(buckets) == 1
    for b in buckets:
        # one contiguous buffer per dtype, and within the bound unless a single tensor exceeds it
        assert all(buf.dim() == 1 and buf.is_contiguous() for buf in b.buffers.values())
        assert len(set(m.dtype for m in b.metas)) == len(b.buffers)
        if bound is not None and len(b) > 1:
            assert b.nbytes <= bound


def test_oversized_tensor_gets_own_bucket_and_order_kept():
    src = _weights()
    buckets = list(iter_buckets(src, 1024))
    big = [b for b in buckets if "model.layers.0.mlp.up_proj.weight" in b.names]
    assert len(big) == 1 and big[0].names == ["model.layers.0.mlp.up_proj.weight"]
    assert [n for b in buckets for n in b.names] == [n for n, _ in src]
    # greedy packing: the small tensors before the big one share a bucket
    assert buckets[0].names == ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.bias"]


def test_bucket_is_a_copy_and_unpack_views_it():
    t = torch.ones(4)
    b = pack_bucket([("a", t)])
    t.add_(1)
    (name, u), = unpack_bucket(b)
    assert torch.equal(u, torch.ones(4))
    u.add_(5)  # a view: writes land in the bucket buffer
    assert torch.equal(b.buffers[torch.float32], torch.full((4,), 6.0))


def test_bytes_and_offsets():
    src = [("a", torch.zeros(3)), ("b", torch.zeros(2, dtype=torch.bfloat16)), ("c", torch.zeros(5))]
    b = pack_bucket(src)
    assert b.nbytes == sum(tensor_nbytes(t) for _, t in src)
    offs = {m.name: (m.offset, m.numel) for m in b.metas}
    assert offs == {"a": (0, 3), "b": (0, 2), "c": (3, 5)}


def test_mixed_stream_and_bad_items():
    src = _weights()
    mixed = [src[0], pack_bucket(src[1:3]), src[3]]
    assert [n for n, _ in iter_named_tensors(mixed)] == [n for n, _ in src[:4]]
    with pytest.raises(TypeError, match="neither"):
        list(iter_named_tensors([torch.zeros(2)]))
    with pytest.raises(ValueError, match="empty"):
        pack_bucket([])
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        pack_bucket([("x", [1, 2])])
    bad = Bucket(buffers={torch.float32: torch.zeros(2)}, metas=pack_bucket([("x", torch.zeros(3))]).metas)
    with pytest.raises(ValueError, match="does not fit"):
        unpack_bucket(bad)
