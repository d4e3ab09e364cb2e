"""HF <-> Megatron tensor layouts the Qwen-VL families share: pure functions on FULL tensors, each the
bit-exact inverse of its partner (a permutation plus zero padding).

* LM QKV: HF [Q; K; V] -> per query group [q heads of the group; k; v] (TP splits whole groups).
* fused gate/up: Megatron's fc1 on TP rank r is [gate_r; up_r], so the full tensor is
  [gate_0; up_0; gate_1; ...] (it depends on tp).
* vision QKV: HF [Q; K; V] over all heads -> per head [q_h; k_h; v_h] (num_query_groups = heads).
* zero padding of rows (vocabulary, vision MLP width) so every TP size divides them.
"""
from __future__ import annotations

import torch


def pad_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """`t` with zero rows appended up to `n` rows."""
    return t if t.size(0) == n else torch.cat([t, t.new_zeros((n - t.size(0), *t.shape[1:]))])


def gqa_qkv_to_mcore(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_groups: int) -> torch.Tensor:
    rest = q.shape[1:]
    parts = [q.reshape(num_groups, -1, *rest), k.reshape(num_groups, -1, *rest), v.reshape(num_groups, -1, *rest)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def gqa_qkv_to_hf(qkv: torch.Tensor, num_groups: int, q_per_group: int, head_dim: int):
    rest = qkv.shape[1:]
    x = qkv.reshape(num_groups, (q_per_group + 2) * head_dim, *rest)
    q, k, v = x.split([q_per_group * head_dim, head_dim, head_dim], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def fc1_to_mcore(gate: torch.Tensor, up: torch.Tensor, tp: int) -> torch.Tensor:
    g, u = gate.chunk(tp), up.chunk(tp)
    return torch.cat([x for r in range(tp) for x in (g[r], u[r])])


def fc1_to_hf(fc1: torch.Tensor, tp: int) -> tuple[torch.Tensor, torch.Tensor]:
    f = fc1.shape[0] // 2
    per = fc1.reshape(tp, 2, f // tp, *fc1.shape[1:])
    return per[:, 0].reshape(f, *fc1.shape[1:]), per[:, 1].reshape(f, *fc1.shape[1:])


def heads_qkv_to_mcore(t: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """Vision QKV weight or bias: [3·H·d, ...] stacked [Q; K; V] -> per head [q_h; k_h; v_h]."""
    return t.reshape(3, heads, head_dim, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def heads_qkv_to_hf(t: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    return t.reshape(heads, 3, head_dim, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
