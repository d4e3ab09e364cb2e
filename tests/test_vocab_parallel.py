"""Vocab-parallel log-prob / entropy / KL on TP-sharded logits vs a full-softmax single-process oracle.

Two real gloo processes hold half the (padded) vocabulary each."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dist_helpers import free_port

from megatron_vppo.algo.vocab_parallel import vocab_parallel_entropy, vocab_parallel_kl, vocab_parallel_log_prob

N, V_TRUE, V_PAD, TEMP = 9, 10, 12, 0.7


def _inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    logits_p = torch.randn(N, V_PAD, generator=g, dtype=torch.float64) * 3
    logits_q = logits_p + torch.randn(N, V_PAD, generator=g, dtype=torch.float64)
    logits_p[:, V_TRUE:] = 1e4  # padded columns hold junk that must be ignored
    target = torch.randint(0, V_TRUE, (N,), generator=g)
    target[0], target[1] = 0, V_TRUE - 1  # first column of shard 0, last real column of shard 1
    w = torch.randn(N, generator=g, dtype=torch.float64)
    return logits_p.to(dtype), logits_q.to(dtype), target, w.to(dtype)


def _oracle(logits_p, logits_q, target, w, vocab):
    """Full-vocabulary reference in float64 with autograd; returns values and grads wrt padded logits."""
    lp = logits_p.double().clone().requires_grad_()
    lq = logits_q.double()
    z = lp[:, :vocab] / TEMP
    logsm = torch.log_softmax(z, -1)
    logp = logsm.gather(-1, target[:, None]).squeeze(-1)
    (g_logp,) = torch.autograd.grad((logp * w.double()).sum(), lp, retain_graph=True)
    ent = -(logsm.exp() * logsm).sum(-1)
    (g_ent,) = torch.autograd.grad((ent * w.double()).sum(), lp)
    logq = torch.log_softmax(lq[:, :vocab] / TEMP, -1)
    kl = (logsm.exp() * (logsm - logq)).sum(-1)
    return logp.detach(), g_logp, ent.detach(), g_ent, kl.detach()


def _check(logits_p, logits_q, target, w, group, rank, world, vocab_size, atol):
    local_v = logits_p.shape[-1] // world
    cols = slice(rank * local_v, (rank + 1) * local_v)
    exp_logp, exp_glogp, exp_ent, exp_gent, exp_kl = _oracle(logits_p, logits_q, target, w, vocab_size or V_PAD)
    shard = logits_p[:, cols].clone().requires_grad_()
    logp = vocab_parallel_log_prob(shard, target, group, TEMP, vocab_size)
    (logp * w).sum().backward()
    torch.testing.assert_close(logp.double(), exp_logp, atol=atol, rtol=atol)
    torch.testing.assert_close(shard.grad.double(), exp_glogp[:, cols], atol=atol, rtol=atol)
    shard.grad = None
    ent = vocab_parallel_entropy(shard, group, TEMP, vocab_size)
    (ent * w).sum().backward()
    torch.testing.assert_close(ent.double(), exp_ent, atol=atol, rtol=atol)
    torch.testing.assert_close(shard.grad.double(), exp_gent[:, cols], atol=atol, rtol=atol)
    kl = vocab_parallel_kl(shard.detach(), logits_q[:, cols], group, TEMP, vocab_size)
    torch.testing.assert_close(kl.double(), exp_kl, atol=atol, rtol=atol)


def _worker(rank, world, port):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        group = dist.new_group(list(range(world)))
        p, q, t, w = _inputs(torch.float64)
        _check(p, q, t, w, group, rank, world, V_TRUE, 1e-10)   # padded vocab, fp64
        p2 = p.clone()
        p2[:, V_TRUE:] = torch.randn(N, V_PAD - V_TRUE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        _check(p2, q, t, w, group, rank, world, None, 1e-10)   # no padding: all 12 columns are real
        p32, q32, _, w32 = _inputs(torch.float32)
        _check(p32, q32, t, w32, group, rank, world, V_TRUE, 1e-5)  # fp32 path
        # batched [B, T, V/TP] input shape
        local = p32[:, rank * 6:(rank + 1) * 6].reshape(3, 3, 6)
        flat = vocab_parallel_log_prob(p32[:, rank * 6:(rank + 1) * 6], t, group, TEMP, V_TRUE)
        torch.testing.assert_close(vocab_parallel_log_prob(local, t.reshape(3, 3), group, TEMP, V_TRUE),
                                   flat.reshape(3, 3))
    finally:
        dist.destroy_process_group()


def test_tp2_matches_full_softmax():
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, free_port()), nprocs=2, join=True)


def test_single_process_group_none():
    p, q, t, w = _inputs(torch.float64)
    _check(p, q, t, w, None, 0, 1, V_TRUE, 1e-10)
    bf = p.to(torch.bfloat16)
    lp = vocab_parallel_log_prob(bf, t, None, TEMP, V_TRUE)
    assert lp.dtype == torch.float32  # fp32 math even for bf16 logits
    ref = torch.log_softmax(bf.float()[:, :V_TRUE] / TEMP, -1).gather(-1, t[:, None]).squeeze(-1)
    torch.testing.assert_close(lp, ref)
    # dtype=float64 (PGPO's no-grad pass): fp64 math and result from fp32 logits, and its gradient
    p32 = p.float().requires_grad_(True)
    lp64 = vocab_parallel_log_prob(p32, t, None, TEMP, V_TRUE, dtype=torch.float64)
    ref64 = torch.log_softmax(p32.detach().double()[:, :V_TRUE] / TEMP, -1).gather(-1, t[:, None]).squeeze(-1)
    assert lp64.dtype == torch.float64
    torch.testing.assert_close(lp64, ref64, rtol=0, atol=1e-12)
    lp64.sum().backward()
    p64 = p.float().double().requires_grad_(True)
    torch.log_softmax(p64[:, :V_TRUE] / TEMP, -1).gather(-1, t[:, None]).sum().backward()
    torch.testing.assert_close(p32.grad[:, :V_TRUE].double(), p64.grad[:, :V_TRUE], rtol=0, atol=1e-6)


def test_bad_target_shape():
    with pytest.raises(ValueError, match="target shape"):
        vocab_parallel_log_prob(torch.zeros(3, 4), torch.zeros(4, dtype=torch.long))


def test_chunking_does_not_change_values_or_gradients(monkeypatch):
    """Many small chunks vs one chunk (the whole tensor at once): same values and gradients, bf16 too."""
    import megatron_vppo.algo.vocab_parallel as vp

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 40, generator=g) * 4
    other = logits + torch.randn(64, 40, generator=g)
    target = torch.randint(0, 37, (64,), generator=g)
    w = torch.randn(64, generator=g)

    def run(dtype):
        x = logits.to(dtype).requires_grad_()
        lp = vocab_parallel_log_prob(x, target, None, TEMP, 37)
        (gl,) = torch.autograd.grad((lp * w).sum(), x)
        ent = vocab_parallel_entropy(x, None, TEMP, 37)
        (ge,) = torch.autograd.grad((ent * w).sum(), x)
        kl = vocab_parallel_kl(x.detach(), other.to(dtype), None, TEMP, 37)
        return lp, gl, ent, ge, kl

    for dtype in (torch.float32, torch.bfloat16):
        assert vp.chunk_rows(64, 40, logits.element_size()) < 64  # the default splits this tensor
        chunked = run(dtype)
        monkeypatch.setattr(vp, "CHUNK_FRACTION", 64.0)  # one chunk
        whole = run(dtype)
        monkeypatch.undo()
        for a, b in zip(chunked, whole):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        assert chunked[1].dtype == dtype and float(chunked[1][:, 37:].abs().max()) == 0.0


_PEAK_SCRIPT = r"""
import json, re, sys
from pathlib import Path
import torch
from megatron_vppo.algo.vocab_parallel import vocab_parallel_kl, vocab_parallel_log_prob

def rss(key):
    return int(re.search(key + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024

dtype = getattr(torch, sys.argv[1])
rows, cols, vocab = 1024, 16384, 16000
logits = (torch.randn(rows, cols) * 3).to(dtype)
target = torch.randint(0, vocab, (rows,))
with torch.no_grad():  # warm-up on a small tensor: first-call code and thread pools are not logits memory
    vocab_parallel_log_prob(logits[:8], target[:8], None, 0.7, vocab)
    vocab_parallel_kl(logits[:4], logits[4:8], None, 0.7, vocab)
before = rss("VmRSS")
Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
with torch.no_grad():  # what the paired no-grad pass does with the [2b, s, V/TP] logits
    lp = vocab_parallel_log_prob(logits, target, None, 0.7, vocab)
    kl = vocab_parallel_kl(logits[: rows // 2], logits[rows // 2 :], None, 0.7, vocab)
extra = rss("VmHWM") - before
print(json.dumps({"logits": logits.numel() * logits.element_size(), "extra": extra}))
"""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_no_grad_peak_is_at_most_1_25x_logits(dtype):
    """Peak resident memory of the paired pass's reductions, in a fresh process whose allocations
    above 64 KiB are all mmapped (so freed memory leaves the RSS and the high-water mark is the peak
    of live memory): logits + temporaries <= 1.25x the logits (a full fp32 copy would be >= 2x)."""
    import json
    import subprocess
    import sys

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, dtype], env=env, capture_output=True, text=True,
                         check=True, timeout=300)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = (r["logits"] + r["extra"]) / r["logits"]
    print(f"{dtype}: no-grad peak / logits = {ratio:.3f}")
    assert ratio <= 1.25
