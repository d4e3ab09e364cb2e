"""Spec §2 perturbation: seeded, ~half the cells black, pixel and image modes agree through the real
Qwen2-VL image processor, shapes and grids unchanged, text-only samples untouched."""
import numpy as np
import pytest
import torch
from PIL import Image

from megatron_vppo.data.perturb import (blacken_pixel_values, cell_order, draw_cell_masks, make_generator,
                                        perturb_images, perturb_images_and_process, perturb_pixel_values,
                                        perturb_seed)
from megatron_vppo.models import ImageGeometry

try:  # transformers picks the torchvision backend when present; the PIL one otherwise
    from transformers import Qwen2VLImageProcessorPil as _Processor
except ImportError:  # pragma: no cover
    from transformers import Qwen2VLImageProcessor as _Processor


@pytest.fixture(scope="module")
def processor():
    return _Processor(min_pixels=56 * 56, max_pixels=28 * 28 * 256)


def _images():
    rng = np.random.default_rng(0)
    # sizes are multiples of 28 (already smart-resized), as the caller hands them over
    return [Image.fromarray(rng.integers(1, 256, (112, 168, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(1, 256, (84, 56, 3), dtype=np.uint8))]


def _process(processor):
    return lambda ims: processor(images=ims, return_tensors="pt")


def test_seed_is_deterministic_and_distinct():
    assert perturb_seed(1, 2, 3) == perturb_seed(1, 2, 3)
    assert len({perturb_seed(1, 2, 3), perturb_seed(1, 2, 4), perturb_seed(1, 3, 3), perturb_seed(2, 2, 3)}) == 4
    assert 0 <= perturb_seed(1, 2, 3) < 2**64
    a = draw_cell_masks([(8, 12)], make_generator(1, 2, 3))[0]
    b = draw_cell_masks([(8, 12)], make_generator(1, 2, 3))[0]
    c = draw_cell_masks([(8, 12)], make_generator(1, 2, 4))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_about_half_blackened():
    m = draw_cell_masks([(64, 64)], make_generator(0, 0, 0))[0]
    assert abs(m.float().mean().item() - 0.5) < 0.03


def test_pixel_and_image_modes_agree(processor):
    images = _images()
    orig = processor(images=images, return_tensors="pt")
    pv, thw = orig["pixel_values"], orig["image_grid_thw"]
    geo = ImageGeometry.of_image_processor(processor)
    px = perturb_pixel_values(pv, thw, make_generator(5, 1, 2), processor.image_mean, processor.image_std,
                              geometry=geo)
    im = perturb_images_and_process(images, make_generator(5, 1, 2), _process(processor), cell=geo.patch_size)
    assert px.shape == pv.shape and im["pixel_values"].shape == pv.shape
    assert torch.equal(im["image_grid_thw"], thw)
    torch.testing.assert_close(px, im["pixel_values"], atol=1e-5, rtol=0)
    # the same cells, and about half of them, changed; the rest kept their values exactly
    changed = (px != pv).any(-1)
    masks = draw_cell_masks([(h, w) for _, h, w in thw.tolist()], make_generator(5, 1, 2))
    assert torch.equal(changed, torch.cat([cell_order(m, processor.merge_size) for m in masks]))
    assert 0.3 < changed.float().mean().item() < 0.7
    black = -torch.tensor(processor.image_mean) / torch.tensor(processor.image_std)
    rows = px[changed].view(-1, 3, 2 * 14 * 14)
    torch.testing.assert_close(rows, black.view(1, 3, 1).expand_as(rows))


def test_single_cell_lands_in_processor_order(processor):
    """Independent of cell_order: black one cell in the image, see which pixel_values row changes."""
    img = _images()[0]
    orig = processor(images=[img], return_tensors="pt")["pixel_values"]
    _, h, w = processor(images=[img], return_tensors="pt")["image_grid_thw"][0].tolist()
    for r, c in [(0, 0), (0, 1), (1, 0), (3, 5), (7, 11)]:
        mask = torch.zeros(h, w, dtype=torch.bool)
        mask[r, c] = True
        arr = np.array(img)
        arr[r * 14:(r + 1) * 14, c * 14:(c + 1) * 14] = 0
        via_image = processor(images=[Image.fromarray(arr)], return_tensors="pt")["pixel_values"]
        via_pixels = blacken_pixel_values(orig, torch.tensor([[1, h, w]]), [mask], processor.image_mean,
                                          processor.image_std, geometry=ImageGeometry.of_image_processor(processor))
        assert (via_image != orig).any(-1).nonzero().flatten().tolist() == \
            (via_pixels != orig).any(-1).nonzero().flatten().tolist()
        torch.testing.assert_close(via_pixels, via_image, atol=1e-5, rtol=0)


def test_image_mode_partial_edge_cells_and_sizes():
    img = Image.fromarray(np.full((30, 20, 3), 200, dtype=np.uint8))  # 3×2 cells, edges partial
    out = perturb_images([img], make_generator(0, 0, 1), prob=1.0, cell=14)[0]
    assert out.size == img.size and out.mode == img.mode and np.array(out).max() == 0
    rgba = Image.fromarray(np.full((28, 28, 4), 200, dtype=np.uint8))
    out = np.array(perturb_images([rgba], make_generator(0, 0, 1), prob=1.0, cell=14)[0])
    assert out[..., :3].max() == 0 and (out[..., 3] == 200).all()  # alpha kept


def test_text_only_untouched():
    g = make_generator(1, 1, 1)
    state = g.get_state()
    assert perturb_pixel_values(None, None, g, [0.5] * 3, [0.5] * 3) is None
    empty = torch.zeros(0, 1176)
    assert perturb_pixel_values(empty, torch.zeros(0, 3, dtype=torch.long), g, [0.5] * 3, [0.5] * 3) is empty
    assert perturb_images_and_process([], g, lambda ims: pytest.fail("processor called"), cell=14) is None
    assert perturb_images([], g, cell=14) == []
    assert torch.equal(g.get_state(), state)


def test_bad_grid_is_a_clear_error():
    with pytest.raises(ValueError, match="image_grid_thw covers"):
        perturb_pixel_values(torch.zeros(10, 1176), torch.tensor([[1, 2, 2]]), make_generator(0, 0, 0),
                             [0.5] * 3, [0.5] * 3)
