"""Core attention for Megatron's local layer spec that understands packed (`thd`) sequences.

Megatron-Core's local `DotProductAttention` refuses `PackedSeqParams`; only Transformer Engine handles
them. This module is a drop-in `core_attention` for a `ModuleSpec` that does: with `thd` packing it
builds a block-diagonal mask from `cu_seqlens` (causal inside each segment when the mask type is
causal) and calls `F.scaled_dot_product_attention` on this TP rank's heads; without packing it honours
Megatron's boolean `attention_mask` (True = masked out) or a causal mask. The vision tower's window /
full attention and the language model's packed batches both use it. The [t, t] mask costs t² bools:
fine on CPU and for tests; GPU runs use Transformer Engine's attention instead.
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


def block_diagonal_mask(
    cu_q: torch.Tensor,
    cu_kv: torch.Tensor,
    causal: bool,
    cu_q_padded: torch.Tensor | None = None,
    cu_kv_padded: torch.Tensor | None = None,
) -> torch.Tensor:
    """[tq, tk] bool, True where query i may attend key j: same segment, key inside the segment's real
    length, and (causal) key position <= query position within the segment.

    `cu_*_padded` (when given) are the segments' storage offsets; `cu_*` their real lengths."""
    off_q = cu_q if cu_q_padded is None else cu_q_padded
    off_kv = cu_kv if cu_kv_padded is None else cu_kv_padded
    pos_q = torch.arange(int(off_q[-1]), device=off_q.device)
    pos_k = torch.arange(int(off_kv[-1]), device=off_kv.device)
    seg_q = torch.bucketize(pos_q, off_q[1:].long(), right=True)
    seg_k = torch.bucketize(pos_k, off_kv[1:].long(), right=True)
    rel_q = pos_q - off_q.long()[seg_q]
    rel_k = pos_k - off_kv.long()[seg_k]
    len_k = (cu_kv[1:] - cu_kv[:-1]).long()[seg_k]
    allowed = (seg_q[:, None] == seg_k[None, :]) & (rel_k < len_k)[None, :]
    if causal:
        allowed &= rel_k[None, :] <= rel_q[:, None]
    # A padding query row with nothing to attend would give NaN; let it see its segment instead.
    empty = ~allowed.any(dim=-1, keepdim=True)
    return allowed | (empty & (seg_q[:, None] == seg_k[None, :]))


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
        thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if thd:
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        if self.heads_per_rank != self.groups_per_rank:
            rep = self.heads_per_rank // self.groups_per_rank
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)

        mask, is_causal = None, False
        if thd:
            p = packed_seq_params
            mask = block_diagonal_mask(
                p.cu_seqlens_q, p.cu_seqlens_kv, causal, p.cu_seqlens_q_padded, p.cu_seqlens_kv_padded
            )
        elif attention_mask is not None:
            mask = ~attention_mask.bool()  # Megatron: True = masked out; SDPA: True = attend
        elif causal:
            is_causal = True

        dropout_p = self.dropout_p if self.training else 0.0
        if dropout_p > 0.0 and not self.config.sequence_parallel:
            rng = tensor_parallel.get_cuda_rng_tracker().fork()
        else:
            rng = contextlib.nullcontext()
        with rng:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=self.softmax_scale
            )
        out = out.permute(2, 0, 1, 3)  # [s, b, h, d]
        if thd:
            return out.reshape(out.size(0), -1)
        return out.reshape(out.size(0), out.size(1), -1)

