"""Reductions over tensor-parallel-sharded logits [..., V/TP] (design decision 2).

Each rank holds the global vocabulary columns [rank·V/TP, (rank+1)·V/TP). Max, log-sum-exp and the
target/expectation sums are all-reduced over `group`; nothing of full-vocabulary size is ever built on a
rank. All math is fp32 (or fp64 if the logits are fp64). Temperature divides the logits before the
softmax. Columns at global index >= `vocab_size` (padding added for divisibility) are left out (a
slice, not a masked copy). `group` None or of size 1 means the logits are the whole vocabulary.

Memory: the logits are read in row chunks (`chunk_rows`), each upcast to fp32 on its own, so the
temporaries stay a small fraction of the logits tensor (no full-size fp32 copy; the no-grad peak is
≈ 1.1× the logits). Reductions over the vocabulary run per chunk and all-reduce only [rows] vectors,
once per statistic, so the number of collectives does not grow with the chunk count. The backward
passes (as Megatron's vocab_parallel_cross_entropy) recompute the softmax from the saved input
logits and log-sum-exp, one chunk at a time, straight into the gradient tensor.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

# The fp32 temporaries of one chunk are at most this fraction of the logits tensor's bytes ...
CHUNK_FRACTION = 1 / 32
# ... and at most this many bytes (big tensors: cache-sized chunks, same number of collectives).
CHUNK_MAX_BYTES = 64 << 20


def _tp(group) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_reduce(t: Tensor, op, group) -> Tensor:
    if _tp(group)[1] > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _math_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def chunk_rows(rows: int, cols: int, elem_bytes: int) -> int:
    """Rows per chunk: fp32 temporaries of one chunk <= CHUNK_FRACTION of the logits (>= 1 row)."""
    budget = min(rows * cols * elem_bytes * CHUNK_FRACTION, CHUNK_MAX_BYTES)
    return max(1, int(budget // max(cols * 4, 1)))


def _real_cols(local_v: int, vocab_size: int | None, group) -> int:
    """How many of this rank's columns are real vocabulary (the rest is padding)."""
    if vocab_size is None:
        return local_v
    rank, _ = _tp(group)
    return max(0, min(local_v, vocab_size - rank * local_v))


def _check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")


def _spans(n: int, step: int):
    for a in range(0, n, step):
        yield a, min(a + step, n)


class _Sharded:
    """Flat [N, V/TP] logits seen as real columns, read in fp32 chunks of z = logits / T."""

    def __init__(self, logits: Tensor, temperature: float, vocab_size: int | None, group,
                 dtype: torch.dtype | None = None):
        _check_temperature(temperature)
        self.logits, self.t, self.group = logits, temperature, group
        self.dtype = dtype or _math_dtype(logits)
        self.real = _real_cols(logits.shape[-1], vocab_size, group)
        self.step = chunk_rows(logits.shape[0], logits.shape[-1], logits.element_size())
        if self.dtype == torch.float64:  # chunk_rows sizes fp32 temporaries
            self.step = max(1, self.step // 2)

    def chunks(self):
        """(a, b, z [b-a, real] fp32 private copy) per row chunk."""
        for a, b in _spans(self.logits.shape[0], self.step):
            yield a, b, self.logits[a:b, : self.real].to(self.dtype, copy=True).div_(self.t)

    def log_normaliser(self) -> Tensor:
        """Global log-sum-exp of z over the vocabulary, [N]: a max pass, then a sum-of-exp pass."""
        n = self.logits.shape[0]
        m = torch.full((n,), float("-inf"), dtype=self.dtype, device=self.logits.device)
        if self.real:
            for a, b in _spans(n, self.step):  # max commutes with the positive scale 1/T: no copy
                m[a:b] = self.logits[a:b, : self.real].amax(-1).to(self.dtype) / self.t
        _all_reduce(m, dist.ReduceOp.MAX, self.group)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # a row of only padding
        sumexp = torch.zeros_like(m)
        for a, b, z in self.chunks():
            sumexp[a:b] = z.sub_(m[a:b, None]).exp_().sum(-1)
        _all_reduce(sumexp, dist.ReduceOp.SUM, self.group)
        return m + torch.log(sumexp)

    def expected_z(self, lse: Tensor) -> Tensor:
        """E_p[z] per row, all-reduced."""
        ez = torch.zeros_like(lse)
        for a, b, z in self.chunks():
            p = (z - lse[a:b, None]).exp_()
            ez[a:b] = p.mul_(z).sum(-1)
        return _all_reduce(ez, dist.ReduceOp.SUM, self.group)


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
    def forward(ctx, logits, target, temperature, vocab_size, group, dtype=None):
        sh = _Sharded(logits, temperature, vocab_size, group, dtype)
        in_range, local = _target_local(target, logits.shape[-1], group)
        picked = logits.gather(-1, local.unsqueeze(-1)).squeeze(-1).to(sh.dtype) / temperature
        picked = torch.where(in_range, picked, torch.zeros_like(picked))
        _all_reduce(picked, dist.ReduceOp.SUM, group)
        lse = sh.log_normaliser()
        ctx.save_for_backward(logits, target, lse)
        ctx.temperature, ctx.vocab_size, ctx.group, ctx.dtype = temperature, vocab_size, group, dtype
        return picked - lse

    @staticmethod
    def backward(ctx, grad_out):
        logits, target, lse = ctx.saved_tensors
        sh = _Sharded(logits, ctx.temperature, ctx.vocab_size, ctx.group, ctx.dtype)
        g = grad_out.to(sh.dtype)
        in_range, local = _target_local(target, logits.shape[-1], ctx.group)
        g_target = torch.where(in_range, g, torch.zeros_like(g))
        grad = torch.zeros_like(logits)  # padded columns keep 0
        for a, b, z in sh.chunks():
            # d logp / d z_j = 1[j = target] - p_j ; chain through z = logits / T.
            gz = z.sub_(lse[a:b, None]).exp_().mul_(-g[a:b, None])
            if sh.real < logits.shape[-1]:
                gz = torch.nn.functional.pad(gz, (0, logits.shape[-1] - sh.real))
            gz.scatter_add_(-1, local[a:b, None], g_target[a:b, None])
            grad[a:b] = gz.div_(ctx.temperature)
        return grad, None, None, None, None, None


class _VocabParallelEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, temperature, vocab_size, group):
        sh = _Sharded(logits, temperature, vocab_size, group)
        lse = sh.log_normaliser()
        ez = sh.expected_z(lse)
        ctx.save_for_backward(logits, lse, ez)
        ctx.temperature, ctx.vocab_size, ctx.group = temperature, vocab_size, group
        return lse - ez

    @staticmethod
    def backward(ctx, grad_out):
        logits, lse, ez = ctx.saved_tensors
        sh = _Sharded(logits, ctx.temperature, ctx.vocab_size, ctx.group)
        scale = -grad_out.to(sh.dtype) / ctx.temperature
        grad = torch.zeros_like(logits)
        for a, b, z in sh.chunks():
            # dH/dz_j = -p_j (z_j - E_p[z])
            p = (z - lse[a:b, None]).exp_()
            grad[a:b, : sh.real] = p.mul_(z.sub_(ez[a:b, None])).mul_(scale[a:b, None])
        return grad, None, None, None


def vocab_parallel_log_prob(logits: Tensor, target: Tensor, group=None, temperature: float = 1.0,
                            vocab_size: int | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """log softmax(logits / T)[target] with a correct backward; `target` holds GLOBAL vocab ids.

    logits [..., V/TP] (any float dtype), target [...] -> fp32 (fp64 for fp64 logits) [...], or `dtype`:
    the math and the result in that dtype, one row chunk at a time (fp64: a log-prob near −log V ≈ −12
    keeps more than fp32's 1 ulp ≈ 1e-6, for scores that divide by small differences of log-probs).
    Targets must be real ids (< vocab_size): an id no rank holds would silently give -lse.
    """
    if target.shape != logits.shape[:-1]:
        raise ValueError(f"target shape {tuple(target.shape)} must equal logits shape without the vocab "
                         f"dim {tuple(logits.shape[:-1])}")
    out = _VocabParallelLogProb.apply(_flat(logits), target.reshape(-1).long(), float(temperature),
                                      vocab_size, group, dtype)
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
    sp = _Sharded(_flat(logits_p), temperature, vocab_size, group)
    sq = _Sharded(_flat(logits_q), temperature, vocab_size, group)
    lse_p, lse_q = sp.log_normaliser(), sq.log_normaliser()
    kl = torch.zeros_like(lse_p)
    for (a, b, zp), (_, _, zq) in zip(sp.chunks(), sq.chunks()):
        logp = zp.sub_(lse_p[a:b, None])
        diff = zq.sub_(lse_q[a:b, None]).neg_().add_(logp)  # log p - log q
        kl[a:b] = diff.mul_(logp.exp_()).sum(-1)
    _all_reduce(kl, dist.ReduceOp.SUM, group)
    return kl.reshape(logits_p.shape[:-1])


@torch.no_grad()
def vocab_parallel_jsd_entropies(logits_p: Tensor, logits_q: Tensor, group=None, temperature: float = 1.0,
                                 vocab_size: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(JSD(p, q), H(p), H(q)) per token between two sharded logit sets (forward only), as the exact KL.

    JSD = ½ KL(p‖m) + ½ KL(q‖m), m = ½ (p + q) (VEPO's visual divergence; p = original view, q = the
    noisy view). Each rank sums its columns' terms; one all-reduce of [3, tokens] finishes all three.
    """
    if logits_p.shape != logits_q.shape:
        raise ValueError(f"logits_p {tuple(logits_p.shape)} and logits_q {tuple(logits_q.shape)} must match")
    sp = _Sharded(_flat(logits_p), temperature, vocab_size, group)
    sq = _Sharded(_flat(logits_q), temperature, vocab_size, group)
    lse_p, lse_q = sp.log_normaliser(), sq.log_normaliser()
    out = torch.zeros(3, lse_p.shape[0], dtype=lse_p.dtype, device=lse_p.device)
    log2 = float(torch.log(torch.tensor(2.0, dtype=torch.float64)))
    for (a, b, zp), (_, _, zq) in zip(sp.chunks(), sq.chunks()):
        logp = zp.sub_(lse_p[a:b, None])
        logq = zq.sub_(lse_q[a:b, None])
        logm = torch.logaddexp(logp, logq).sub_(log2)
        p, q = logp.exp(), logq.exp()
        out[0, a:b] = 0.5 * ((p * (logp - logm)).sum(-1) + (q * (logq - logm)).sum(-1))
        out[1, a:b] = -(p * logp).sum(-1)
        out[2, a:b] = -(q * logq).sum(-1)
    _all_reduce(out, dist.ReduceOp.SUM, group)
    shape = logits_p.shape[:-1]
    return out[0].reshape(shape), out[1].reshape(shape), out[2].reshape(shape)
