"""tas_scope global across a 2-rank gloo data-parallel group equals the single-process α on the whole batch."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dist_helpers import free_port

from megatron_vppo.algo.tas import tas_alpha_global
from megatron_vppo.algo.vppo import compute_shaping
from megatron_vppo.config import AlgoConfig

B, T = 10, 7


def _batch():
    g = torch.Generator().manual_seed(11)
    lengths = torch.tensor([0, 0, 0, 7, 3, 5, 1, 7, 6, 2])  # rank 0's share has no valid trajectory
    mask = (torch.arange(T) < lengths[:, None]).long()
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    aug = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.6
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return mask, old, aug, adv


def _cases():
    """(seq_dep, valid, split) cases; split = first row of rank 1."""
    g = torch.Generator().manual_seed(7)
    s = torch.rand(B, generator=g, dtype=torch.float64)
    v = torch.rand(B, generator=g) > 0.25
    flat = torch.full((B,), 0.25, dtype=torch.float64)
    one_valid = torch.zeros(B, dtype=torch.bool)
    one_valid[8] = True
    return [(s, v, 4), (s, v, 1), (s, torch.ones(B, dtype=torch.bool), 9), (flat, v, 5), (s, one_valid, 5)]


def _worker(rank, world, port):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        group = dist.new_group([0, 1])
        for s, v, split in _cases():
            rows = slice(0, split) if rank == 0 else slice(split, B)
            expect = tas_alpha_global(s, v, 0.9)[rows]
            got = tas_alpha_global(s[rows], v[rows], 0.9, group=group)
            torch.testing.assert_close(got, expect, atol=1e-12, rtol=0)
        # The trainer-facing composition: α, Â and the global metrics match a single process.
        mask, old, aug, adv = _batch()
        cfg = AlgoConfig()
        whole = compute_shaping(old, aug, mask, adv, cfg)
        rows = slice(0, 3) if rank == 0 else slice(3, B)
        part = compute_shaping(old[rows], aug[rows], mask[rows], adv[rows], cfg, group=group)
        torch.testing.assert_close(part.alpha, whole.alpha[rows], atol=1e-12, rtol=0)
        torch.testing.assert_close(part.shaped_advantages, whole.shaped_advantages[rows], atol=1e-12, rtol=0)
        for key in ("dependency/mean", "tgf/kept_token_frac", "tas/alpha_mean", "tas/alpha_min", "tas/alpha_max"):
            assert part.metrics[key] == pytest.approx(whole.metrics[key], abs=1e-12), key
    finally:
        dist.destroy_process_group()


def test_tas_global_dp2_equals_single_process():
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, free_port()), nprocs=2, join=True)
