"""Core attention for Megatron's local layer spec that understands packed (`thd`) sequences.

Megatron-Core's local `DotProductAttention` refuses `PackedSeqParams`; only Transformer Engine handles
them. This module is a drop-in `core_attention` for a `ModuleSpec` that does: with `thd` packing it
runs the `cu_seqlens` segments, bucketed by length, as padded batches through
`F.scaled_dot_product_attention` with a block-diagonal mask (causal inside each segment when the mask
type is causal), so cost follows Σ segment², not tokens²;
without packing it honours Megatron's boolean `attention_mask` (True = masked out) or a causal mask.
The vision tower's window / full attention (on GPU too) and the language model's local layers use it.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

_CAUSAL = (AttnMaskType.causal, AttnMaskType.padding_causal)


def segment_rows(starts: torch.Tensor, sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [n, L], valid [n, L]), L the largest size: `x[rows]` turns packed [t, ...] into padded
    [n, L, ...]; past its end a segment repeats its last row, which `valid` (and the mask) drop."""
    pos = torch.arange(int(sizes.max()), device=sizes.device)
    valid = pos[None, :] < sizes[:, None]
    return starts[:, None] + torch.minimum(pos[None, :], (sizes - 1).clamp(min=0)[:, None]), valid


def segment_mask(real_kv: torch.Tensor, size_kv: torch.Tensor, len_q: int, len_kv: int, causal: bool):
    """[n, 1, Lq, Lk] bool, True where query i of a segment may attend its key j: j below the
    segment's real key count and, if causal, j <= i.

    A query row with nothing to attend (a segment of real length 0) would give NaN; it sees its
    segment's stored keys instead."""
    k = torch.arange(len_kv, device=real_kv.device)
    allowed = (k[None, :] < real_kv[:, None])[:, None, :].expand(-1, len_q, -1)
    if causal:
        q = torch.arange(len_q, device=real_kv.device)
        allowed = allowed & (k[None, :] <= q[:, None])
    empty = ~allowed.any(dim=-1, keepdim=True)
    return (allowed | (empty & (k[None, :] < size_kv[:, None])[:, None, :]))[:, None]


class PackedSeqAttention(MegatronModule):
    """`core_attention` with DotProductAttention's constructor; supports `thd` via `cu_seqlens`."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("PackedSeqAttention has no context parallelism; use Transformer Engine for cp > 1")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.tp_group = pg_collection.tp
        tp = self.tp_group.size()
        self.attn_mask_type = attn_mask_type
        self.heads_per_rank = divide(config.num_attention_heads, tp)
        self.groups_per_rank = divide(config.num_query_groups, tp)
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        """q/k/v: [t, heads, d] (thd) or [s, b, heads, d] -> [t, heads*d] or [s, b, heads*d]."""
        if attention_bias is not None:
            raise ValueError("PackedSeqAttention does not take an attention_bias")
        causal = (attn_mask_type or self.attn_mask_type) in _CAUSAL
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            return self._packed(query, key, value, packed_seq_params, causal)
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        mask, is_causal = None, False
        if attention_mask is not None:
            mask = ~attention_mask.bool()  # Megatron: True = masked out; SDPA: True = attend
        elif causal:
            is_causal = True
        out = self._sdpa(q, k, v, mask, is_causal).permute(2, 0, 1, 3)  # [s, b, h, d]
        return out.reshape(out.size(0), out.size(1), -1)

    def _packed(self, query, key, value, p: PackedSeqParams, causal: bool) -> torch.Tensor:
        """[t, heads, d] -> [t, heads*d]. Segments of similar length (the same power-of-two bucket) run
        as one padded batch [n, heads, L, d] under a block-diagonal (causal) mask: work follows
        Σ segment², not t², and a few SDPA calls cover thousands of vision windows or a packed
        micro-batch of very different response lengths alike."""
        off_q = p.cu_seqlens_q if p.cu_seqlens_q_padded is None else p.cu_seqlens_q_padded
        off_kv = p.cu_seqlens_kv if p.cu_seqlens_kv_padded is None else p.cu_seqlens_kv_padded
        keep = off_q[1:] > off_q[:-1]  # a segment without stored queries has no output rows

        def starts_sizes(off):
            off = off.long()
            return off[:-1][keep], (off[1:] - off[:-1])[keep]

        start_q, size_q = starts_sizes(off_q)
        start_kv, size_kv = starts_sizes(off_kv)
        real_kv = starts_sizes(p.cu_seqlens_kv)[1]
        bucket = torch.ceil(torch.log2(torch.maximum(size_q, size_kv).clamp(min=1).double())).long()
        out = query.new_zeros(query.shape[0], query.shape[1], query.shape[2])
        for b in torch.unique(bucket).tolist():
            sel = bucket == b
            rows_q, valid_q = segment_rows(start_q[sel], size_q[sel])
            rows_kv, _ = segment_rows(start_kv[sel], size_kv[sel])
            mask = segment_mask(real_kv[sel], size_kv[sel], rows_q.shape[1], rows_kv.shape[1], causal)
            q, k, v = (x[r].transpose(1, 2) for x, r in ((query, rows_q), (key, rows_kv), (value, rows_kv)))
            res = self._sdpa(q, k, v, mask, False).transpose(1, 2)  # [n, L, h, d]
            out = out.index_put((rows_q[valid_q],), res[valid_q])
        return out.reshape(out.size(0), -1)

    def _sdpa(self, q, k, v, mask, is_causal) -> torch.Tensor:
        """SDPA on [b, heads, s, d] with this rank's KV groups repeated to its query heads."""
        if self.heads_per_rank != self.groups_per_rank:
            rep = self.heads_per_rank // self.groups_per_rank
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        dropout_p = self.dropout_p if self.training else 0.0
        if dropout_p > 0.0 and not self.config.sequence_parallel:
            rng = tensor_parallel.get_cuda_rng_tracker().fork()
        else:
            rng = contextlib.nullcontext()
        with rng:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=self.softmax_scale
            )
        return out

