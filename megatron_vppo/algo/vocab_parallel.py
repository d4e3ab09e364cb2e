"""Reductions over tensor-parallel-sharded logits [..., V/TP] (design decision 2).

Each rank holds the global vocabulary columns [rank·V/TP, (rank+1)·V/TP). Max, log-sum-exp and the
target/expectation sums are all-reduced over `group`; nothing of full-vocabulary size is ever built on a
rank. All math is fp32 (or fp64 if the logits are fp64). Temperature divides the logits before the
softmax. Columns at global index >= `vocab_size` (padding added for divisibility) are masked to -inf.
`group` None or of size 1 means the logits are the whole vocabulary.

The backward passes are written out (as Megatron's vocab_parallel_cross_entropy does) and recompute the
softmax from the saved input logits and log-sum-exp instead of keeping a [tokens, V/TP] fp32 buffer.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _tp(group) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_reduce(t: Tensor, op, group) -> Tensor:
    if _tp(group)[1] > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _scaled(logits: Tensor, temperature: float, vocab_size: int | None, group) -> Tensor:
    """fp32 logits / T with padded columns at -inf; [N, V/TP]."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(dtype) / temperature
    if vocab_size is not None:
        rank, _ = _tp(group)
        local_v = logits.shape[-1]
        first_pad = vocab_size - rank * local_v  # local column where padding starts
        if first_pad < local_v:
            z[..., max(first_pad, 0):] = float("-inf")
    return z


def _log_normaliser(z: Tensor, group, overwrite: bool = False) -> Tensor:
    """Global log-sum-exp over the sharded last dim: [N]. `overwrite` lets it reuse z's memory."""
    m = z.max(dim=-1).values
    _all_reduce(m, dist.ReduceOp.MAX, group)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # a shard that is all padding
    shifted = z.sub_(m.unsqueeze(-1)) if overwrite else z - m.unsqueeze(-1)
    sumexp = shifted.exp_().sum(-1)
    _all_reduce(sumexp, dist.ReduceOp.SUM, group)
    return m + torch.log(sumexp)


def _flat(logits: Tensor) -> Tensor:
    if logits.dim() < 1:
        raise ValueError("logits must have a vocabulary dimension")
    return logits.reshape(-1, logits.shape[-1])


def _target_local(target: Tensor, local_v: int, group) -> tuple[Tensor, Tensor]:
    rank, _ = _tp(group)
    start = rank * local_v
    in_range = (target >= start) & (target < start + local_v)
    local = torch.where(in_range, target - start, torch.zeros_like(target))
    return in_range, local


class _VocabParallelLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, temperature, vocab_size, group):
        z = _scaled(logits, temperature, vocab_size, group)
        in_range, local = _target_local(target, z.shape[-1], group)
        picked = z.gather(-1, local.unsqueeze(-1)).squeeze(-1)
        picked = torch.where(in_range, picked, torch.zeros_like(picked))
        _all_reduce(picked, dist.ReduceOp.SUM, group)
        lse = _log_normaliser(z, group, overwrite=True)  # z is a private copy; done with it
        ctx.save_for_backward(logits, target, lse)
        ctx.temperature, ctx.vocab_size, ctx.group = temperature, vocab_size, group
        return picked - lse

    @staticmethod
    def backward(ctx, grad_out):
        logits, target, lse = ctx.saved_tensors
        z = _scaled(logits, ctx.temperature, ctx.vocab_size, ctx.group)
        g = grad_out.to(z.dtype)
        # d logp / d z_j = 1[j = target] - p_j ; chain through z = logits / T.
        grad = z.sub_(lse.unsqueeze(-1)).exp_().mul_(-g.unsqueeze(-1))  # in place on the private copy
        in_range, local = _target_local(target, z.shape[-1], ctx.group)
        grad.scatter_add_(-1, local.unsqueeze(-1), torch.where(in_range, g, torch.zeros_like(g)).unsqueeze(-1))
        grad.div_(ctx.temperature)
        return grad.to(logits.dtype), None, None, None, None


class _VocabParallelEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, temperature, vocab_size, group):
        z = _scaled(logits, temperature, vocab_size, group)
        lse = _log_normaliser(z, group)
        p = torch.exp(z - lse.unsqueeze(-1))
        ez = torch.where(p > 0, p * z, torch.zeros_like(z)).sum(-1)  # E_p[z]; skips -inf padding
        _all_reduce(ez, dist.ReduceOp.SUM, group)
        ctx.save_for_backward(logits, lse, ez)
        ctx.temperature, ctx.vocab_size, ctx.group = temperature, vocab_size, group
        return lse - ez

    @staticmethod
    def backward(ctx, grad_out):
        logits, lse, ez = ctx.saved_tensors
        z = _scaled(logits, ctx.temperature, ctx.vocab_size, ctx.group)
        p = torch.exp(z - lse.unsqueeze(-1))
        # dH/dz_j = -p_j (z_j - E_p[z])
        grad = torch.where(p > 0, p * (z - ez.unsqueeze(-1)), torch.zeros_like(z))
        grad.mul_(-grad_out.to(z.dtype).unsqueeze(-1) / ctx.temperature)
        return grad.to(logits.dtype), None, None, None


def vocab_parallel_log_prob(logits: Tensor, target: Tensor, group=None, temperature: float = 1.0,
                            vocab_size: int | None = None) -> Tensor:
    """log softmax(logits / T)[target] with a correct backward; `target` holds GLOBAL vocab ids.

    logits [..., V/TP] (any float dtype), target [...] -> fp32 (fp64 for fp64 logits) [...].
    Targets must be real ids (< vocab_size): an id no rank holds would silently give -lse.
    """
    if target.shape != logits.shape[:-1]:
        raise ValueError(f"target shape {tuple(target.shape)} must equal logits shape without the vocab "
                         f"dim {tuple(logits.shape[:-1])}")
    out = _VocabParallelLogProb.apply(_flat(logits), target.reshape(-1).long(), float(temperature),
                                      vocab_size, group)
    return out.reshape(target.shape)


def vocab_parallel_entropy(logits: Tensor, group=None, temperature: float = 1.0,
                           vocab_size: int | None = None) -> Tensor:
    """Entropy of softmax(logits / T) per token, with backward; [..., V/TP] -> [...]."""
    out = _VocabParallelEntropy.apply(_flat(logits), float(temperature), vocab_size, group)
    return out.reshape(logits.shape[:-1])


@torch.no_grad()
def vocab_parallel_kl(logits_p: Tensor, logits_q: Tensor, group=None, temperature: float = 1.0,
                      vocab_size: int | None = None) -> Tensor:
    """Exact KL(p ‖ q) per token between two sharded logit sets of the same shape (forward only).

    For VPPO's exact_kl estimator: p = original image, q = perturbed image.
    """
    if logits_p.shape != logits_q.shape:
        raise ValueError(f"logits_p {tuple(logits_p.shape)} and logits_q {tuple(logits_q.shape)} must match")
    # In place on the two private fp32 copies: at V/TP columns per token every extra buffer counts.
    zp = _scaled(_flat(logits_p), temperature, vocab_size, group)
    zq = _scaled(_flat(logits_q), temperature, vocab_size, group)
    logp = zp.sub_(_log_normaliser(zp, group).unsqueeze(-1))
    diff = zq.sub_(_log_normaliser(zq, group).unsqueeze(-1)).neg_().add_(logp)  # log p - log q
    p = logp.exp_()
    # p = 0 on padded columns, where diff is -inf + inf = nan.
    kl = torch.where(p > 0, diff.mul_(p), 0.0).sum(-1)
    _all_reduce(kl, dist.ReduceOp.SUM, group)
    return kl.reshape(logits_p.shape[:-1])
