"""tas_scope=official follows the micro-batches the policy update really runs (issue 20 item 8): with
packing, the token-balanced DP shards and first-fit-decreasing bins, not count-based chunks. The
expected scopes below are worked out by hand from those rules (docs: train/rl_batch.py)."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from megatron_vppo.algo.tas import tas_alpha_official
from megatron_vppo.config import RunConfig
from megatron_vppo.distributed import ParallelDims
from megatron_vppo.train.loop import official_scopes

LENGTHS = [90, 20, 60, 30, 10, 10, 10, 80]
MINIBATCHES = [[0, 1, 2, 3], [4, 5, 6, 7]]


def _scopes(max_tokens):
    cfg = RunConfig()
    cfg.train.micro_batch_size, cfg.train.max_tokens_per_micro_batch = 2, max_tokens
    trajs = [SimpleNamespace(num_tokens=n) for n in LENGTHS]
    return official_scopes(cfg, ParallelDims(dp=2), MINIBATCHES, trajs)


def test_packed_scopes_are_the_packed_micro_batches():
    # mini-batch 0 (200 tokens): the half-way cut is after 90 tokens -> [0] | [1, 2, 3]; rank 1's bins of
    # 100 tokens, longest first: 60+30, then 20. Mini-batch 1 (110 tokens): [4, 5, 6] | [7].
    mbs, micro = _scopes(100)
    assert mbs == [[0], [1, 2, 3], [4, 5, 6], [7]]
    assert micro == [[0], [2, 3], [1], [4, 5, 6], [7]]
    # padded: count-based shards and chunks of micro_batch_size
    mbs, micro = _scopes(None)
    assert mbs == [[0, 1], [2, 3], [4, 5], [6, 7]] and micro == mbs


def test_packed_scopes_change_alpha_where_the_micro_batches_differ():
    """min/max and μ are per device shard and micro-batch, so the packed scopes give other α than count-based ones."""
    seq = torch.tensor([0.1, 0.9, 0.3, 0.5, 0.2, 0.4, 0.6, 0.8], dtype=torch.float64)
    valid = torch.ones(8, dtype=torch.bool)
    packed = tas_alpha_official(seq, valid, 0.9, *_scopes(100))
    padded = tas_alpha_official(seq, valid, 0.9, *_scopes(None))
    assert not torch.allclose(packed, padded)
