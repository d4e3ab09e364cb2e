"""Images are processed once per image per step, and only where they are embedded.

* grids (what token expansion and M-RoPE need) come from the image sizes through the image
  processor's own geometry and equal the processor's output, so prompts are encoded without pixels;
* a prompt's pixels are processed on first access and shared by all its trajectories;
* a micro-batch for a stage without the vision tower never touches pixels."""
import numpy as np
import pytest
import torch
from PIL import Image

from megatron_vppo.data.processor import VLProcessor
from megatron_vppo.train.records import Sample, SampledGroup
from megatron_vppo.train.rl_batch import collate, collate_packed, ensure_positions
from megatron_vppo.train.rollout_step import encode_prompts, to_trajectories


@pytest.fixture(scope="module")
def proc(tiny_model_dir):
    return VLProcessor.from_pretrained(tiny_model_dir)


def _img(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", [(84, 56), (56, 112), (13, 9), (333, 41), (1000, 700), (29, 29)])
def test_grid_from_geometry_equals_processor(proc, size):
    im = _img(*size)
    assert torch.equal(proc.image_grids([im]), proc.process_images([im])[1])
    a = proc.encode("Count <image>", [im], response="two")
    b = proc.encode("Count <image>", [im], response="two", pixels=False)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["image_grid_thw"], b["image_grid_thw"])
    assert b["pixel_values"] is None and b["response_start"] == a["response_start"]


def test_pixels_processed_once_per_image_per_step_and_only_where_embedded(proc, tiny_model_dir, monkeypatch):
    from megatron_vppo.models.qwen2_5_vl.config import text_arch

    calls = []
    real = proc.process_images
    monkeypatch.setattr(proc, "process_images", lambda ims: (calls.append(len(ims)), real(ims))[1])
    records = [
        {"problem": "How many shapes in <image>?", "images": [_img(84, 56, 1)], "answer": "2"},
        {"problem": "What is 4 + 3?", "images": [], "answer": "7"},
        {"problem": "<image> vs <image>: which is larger?", "images": [_img(56, 112, 2), _img(112, 56, 3)],
         "answer": "A"},
    ]
    prompts = encode_prompts(proc, records)
    assert calls == [], "encoding a prompt must not process its pixels"
    eos = proc.eos_token_id
    groups = [SampledGroup(p, [Sample([11 + k, 12, eos], [-0.1] * 3, "stop", float(k % 2)) for k in range(4)])
              for p in range(3)]
    trajs = to_trajectories(prompts, groups)
    ensure_positions(trajs, text_arch(tiny_model_dir))
    # A stage without the vision tower: grids only, nothing processed.
    for mb in (collate(trajs, rows=12, seq_len=256, pad_id=0, with_pixels=False),
               collate_packed(trajs, seq_len=4096, pad_id=0, with_pixels=False)):
        assert mb.pixel_values is None and mb.image_grid_thw.shape == (12, 3)
    assert calls == []
    # The embedding stage, twice over (paired pass, then the update): each image processed once.
    for _ in range(2):
        mb = collate_packed(trajs, seq_len=4096, pad_id=0)
    assert sorted(calls) == [1, 2], calls
    expected = torch.cat([real([records[0]["images"][0]])[0]] * 4 + [real(records[2]["images"])[0]] * 4)
    assert torch.equal(mb.pixel_values, expected)
