"""The vectorised M-RoPE index against transformers' `Qwen2_5_VLModel.get_rope_index` on random mixed
batches (text-only rows, one image, several images of different sizes, right and left padding), and
per-trajectory positions equal a row of the batched result."""
import random

import pytest
import torch

from megatron_vppo.models.qwen2_5_vl.config import text_arch
from megatron_vppo.models.qwen2_5_vl.rope_index import rope_index_for, trajectory_positions


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def _random_batch(arch, rng, rows, left):
    seqs, grids = [], []
    for _ in range(rows):
        ids, g = [], []
        for _ in range(rng.randint(0, 3)):  # 0..3 images per row
            ids += [rng.randint(5, 300) for _ in range(rng.randint(0, 6))]
            grid = [1, 2 * rng.randint(1, 5), 2 * rng.randint(1, 5)]
            ids += [arch.vision_start_token_id] + [arch.image_token_id] * (grid[1] * grid[2] // 4)
            ids += [arch.vision_start_token_id + 1]
            g.append(grid)
        ids += [rng.randint(5, 300) for _ in range(rng.randint(1, 9))]
        seqs.append(ids)
        grids += g
    s = max(len(x) for x in seqs)
    ids = torch.full((rows, s), 0)
    mask = torch.zeros(rows, s, dtype=torch.long)
    for i, x in enumerate(seqs):
        sl = slice(s - len(x), s) if left else slice(0, len(x))
        ids[i, sl] = torch.tensor(x)
        mask[i, sl] = 1
    return ids, mask, (torch.tensor(grids) if grids else None), seqs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_rope_index_equals_transformers(tiny_model_dir, hf_model, seed):
    arch = text_arch(tiny_model_dir)
    rng = random.Random(seed)
    for left in (False, True):
        ids, mask, grid, seqs = _random_batch(arch, rng, rows=6, left=left)
        ref, ref_delta = hf_model.model.get_rope_index(ids, mm_token_type_ids=(ids == arch.image_token_id).int(),
                                                       image_grid_thw=grid, attention_mask=mask)
        pos, delta = rope_index_for(arch, ids, grid, mask)
        assert torch.equal(pos, ref)
        assert torch.equal(delta.view(-1), ref_delta.view(-1).long())
        # One trajectory at a time (what a packed segment gets) equals its row of the batch.
        used = 0
        for i, x in enumerate(seqs):
            n_img = x.count(arch.vision_start_token_id)
            g = grid[used : used + n_img] if n_img else None
            used += n_img
            one = trajectory_positions(arch, torch.tensor(x), g)
            assert torch.equal(one, ref[:, i][:, mask[i].bool()])
