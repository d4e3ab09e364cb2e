"""Byte-bounded weight buckets: many (HF name, tensor) pairs packed into one contiguous buffer
per dtype, plus the metadata that cuts them back out.

Why: moving thousands of small tensors one by one (IPC handles, NCCL broadcasts, HTTP calls)
costs a round trip each; a few large flat buffers cost a few. The bound keeps peak extra memory
predictable (a tensor larger than the bound travels alone). Pure functions over tensors; the
SGLang engine maps a `Bucket` onto its `FlattenedTensorBucket` payloads, the in-process engine
unpacks it directly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Union

import torch

from megatron_vppo.config import DEFAULT_BUCKET_BYTES


@dataclass(frozen=True)
class TensorMeta:
    """Where one tensor lives inside its dtype's buffer (offsets in elements, not bytes)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    numel: int


@dataclass
class Bucket:
    """One contiguous 1-D buffer per dtype; `metas` keeps the stream order of the tensors."""

    buffers: dict[torch.dtype, torch.Tensor]
    metas: list[TensorMeta]

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.metas]

    def __len__(self) -> int:
        return len(self.metas)


NamedTensor = tuple[str, torch.Tensor]
WeightStream = Iterable[Union[NamedTensor, Bucket]]


def tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def pack_bucket(named_tensors: Iterable[NamedTensor]) -> Bucket:
    """Copy the tensors into one flat buffer per dtype (on the first tensor's device).

    Each tensor is copied exactly once, straight into its slice of a buffer sized up front (no
    per-tensor flatten or concatenation copies, non-contiguous sources included)."""
    items: list[NamedTensor] = []
    sizes: dict[torch.dtype, int] = {}
    metas: list[TensorMeta] = []
    device = None
    for name, t in named_tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"weight {name!r} is a {type(t).__name__}, expected a torch.Tensor")
        device = t.device if device is None else device
        off = sizes.get(t.dtype, 0)
        metas.append(TensorMeta(name, tuple(t.shape), t.dtype, off, t.numel()))
        items.append((name, t))
        sizes[t.dtype] = off + t.numel()
    if not metas:
        raise ValueError("cannot pack an empty bucket")
    buffers = {dt: torch.empty(n, dtype=dt, device=device) for dt, n in sizes.items()}
    with torch.no_grad():
        for m, (_, t) in zip(metas, items):
            buffers[m.dtype][m.offset : m.offset + m.numel].view(m.shape).copy_(t.detach())
    return Bucket(buffers=buffers, metas=metas)


def unpack_bucket(bucket: Bucket) -> list[NamedTensor]:
    """(name, tensor) in stream order; the tensors are views into the bucket's buffers."""
    out = []
    for m in bucket.metas:
        buf = bucket.buffers.get(m.dtype)
        if buf is None or m.offset + m.numel > buf.numel():
            raise ValueError(
                f"bucket metadata for {m.name!r} ({m.dtype}, offset {m.offset}, numel {m.numel}) "
                "does not fit its buffer; the bucket is corrupt or was built by another packer"
            )
        out.append((m.name, buf[m.offset : m.offset + m.numel].view(m.shape)))
    return out


def iter_buckets(
    named_tensors: Iterable[NamedTensor], bucket_bytes: int | None = DEFAULT_BUCKET_BYTES
) -> Iterator[Bucket]:
    """Group a stream into buckets of at most `bucket_bytes` (None or <= 0: one bucket for all).

    Greedy in stream order, so the receiving side sees tensors in the order they were produced.
    A tensor larger than the bound gets a bucket of its own rather than an error.
    """
    bound = bucket_bytes if bucket_bytes and bucket_bytes > 0 else None
    pending: list[NamedTensor] = []
    size = 0
    for name, t in named_tensors:
        n = tensor_nbytes(t)
        if pending and bound is not None and size + n > bound:
            yield pack_bucket(pending)
            pending, size = [], 0
        pending.append((name, t))
        size += n
    if pending:
        yield pack_bucket(pending)


def iter_named_tensors(stream: WeightStream) -> Iterator[NamedTensor]:
    """Flatten a stream whose items are (name, tensor) pairs or `Bucket`s (mixed is fine)."""
    for item in stream:
        if isinstance(item, Bucket):
            yield from unpack_bucket(item)
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            yield item
        else:
            raise TypeError(
                f"weight stream item of type {type(item).__name__} is neither a (name, tensor) pair "
                "nor a sync.buckets.Bucket"
            )


def plan_manifest(expected, resolve) -> tuple[tuple, dict[str, tuple]]:
    """An update's manifest [(name, shape, dtype)] -> (hashable manifest, {name: (resolve(name, shape, dtype),
    shape, dtype)}); `resolve` maps a name to the engine's storage and raises when it does not fit.
    Engines check the whole manifest this way before they copy anything."""
    expected = tuple((name, tuple(shape), dtype) for name, shape, dtype in expected)
    plan: dict[str, tuple] = {}
    for name, shape, dtype in expected:
        if name in plan:
            raise ValueError(f"the update's manifest lists {name!r} twice")
        plan[name] = (resolve(name, shape, dtype), torch.Size(shape), dtype)
    return expected, plan
