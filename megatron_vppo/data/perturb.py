"""Image perturbation I → I' for VPPO's dependency pass (spec §2): random patch-cell blackening.

A cell is one vision patch (14×14 pixels for Qwen2.5-VL): the geometry comes from the processor
(`VLProcessor.geometry`, a `models.ImageGeometry`) or the model's spec, never from constants here.
A cell mask is drawn per image on its (h, w) patch grid, cell (0, 0) at the top-left, each cell black
with probability `prob`, from a generator seeded by (run seed, step, trajectory index). Two ways to apply
the same mask:

* pixel — edit the processor's flattened `pixel_values` in place of re-processing: every patch row of a
  black cell becomes the normalised value of black, (0 - mean_c) / std_c, for each channel and each
  temporal copy. Rows follow the Qwen2-VL processor's merge-window order (see `cell_order`).
* image — blacken the cells of the (already smart-resized) PIL images and hand them to the caller's
  processor callable.

For the same generator state both modes black out the same spatial cells, so they agree up to the
processor's float arithmetic. Shapes, `image_grid_thw` and image-token counts never change; text-only
samples (no images) are returned untouched.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from megatron_vppo.models.spec import ImageGeometry

def perturb_seed(run_seed: int, step: int, trajectory: int) -> int:
    """Deterministic 64-bit seed from (run seed, RL step, global trajectory index)."""
    key = f"megatron_vppo.perturb|{int(run_seed)}|{int(step)}|{int(trajectory)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def make_generator(run_seed: int, step: int, trajectory: int) -> torch.Generator:
    """A CPU generator for one trajectory's masks (masks are tiny; drawing on CPU keeps them device-free)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(perturb_seed(run_seed, step, trajectory))
    return g


def draw_cell_masks(grids: Sequence[tuple[int, int]], generator: torch.Generator,
                    prob: float = 0.5) -> list[Tensor]:
    """One bool [h, w] mask per image, drawn in image order; True = black."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"perturbation probability {prob} must be in [0, 1]")
    return [torch.rand((int(h), int(w)), generator=generator) < prob for h, w in grids]


def _default_geometry() -> ImageGeometry:
    """The default `model.arch`'s geometry, for callers that pass none (transitional: train/loop.py)."""
    from megatron_vppo.config import ModelConfig
    from megatron_vppo.models import MODELS

    return MODELS[ModelConfig().arch].image_geometry({})


def cell_order(mask: Tensor, merge_size: int) -> Tensor:
    """[h, w] cell mask → [h·w] in the processor's row order (h/m, w/m, m, m): m×m merge windows
    row-major over the grid, and row-major inside each window."""
    h, w = mask.shape
    if h % merge_size or w % merge_size:
        raise ValueError(f"grid {h}x{w} is not divisible by merge_size={merge_size}; pixel_values "
                         "from the Qwen2-VL processor always are")
    return mask.reshape(h // merge_size, merge_size, w // merge_size, merge_size).permute(0, 2, 1, 3).reshape(-1)


def _check_grid_thw(pixel_values: Tensor, image_grid_thw: Tensor, channels: int, patch_size: int,
                    temporal_patch_size: int) -> Tensor:
    thw = torch.as_tensor(image_grid_thw, dtype=torch.long).reshape(-1, 3).cpu()
    row = channels * temporal_patch_size * patch_size * patch_size
    if pixel_values.dim() != 2 or pixel_values.shape[1] != row:
        raise ValueError(f"pixel_values must be [N, {channels}*{temporal_patch_size}*{patch_size}*{patch_size}"
                         f"={row}], got {tuple(pixel_values.shape)}")
    total = int(thw.prod(-1).sum())
    if total != pixel_values.shape[0]:
        raise ValueError(f"image_grid_thw covers {total} patches but pixel_values has "
                         f"{pixel_values.shape[0]} rows; pass the grid of exactly these images")
    return thw


def blacken_pixel_values(pixel_values: Tensor, image_grid_thw: Tensor, masks: Sequence[Tensor],
                         image_mean: Sequence[float], image_std: Sequence[float], *,
                         geometry: ImageGeometry | None = None) -> Tensor:
    """Copy of `pixel_values` with the patches of black cells set to (0 - mean_c) / std_c.

    A grid with t > 1 (several temporal groups) gets the same spatial mask in every group.
    `geometry`: the processor's (`VLProcessor.geometry`); the default model's when None.
    """
    g = geometry or _default_geometry()
    patch_size, temporal_patch_size, merge_size = g.patch_size, g.temporal_patch_size, g.merge_size
    channels = len(image_mean)
    if len(image_std) != channels:
        raise ValueError(f"image_mean has {channels} channels but image_std has {len(image_std)}")
    thw = _check_grid_thw(pixel_values, image_grid_thw, channels, patch_size, temporal_patch_size)
    if len(masks) != thw.shape[0]:
        raise ValueError(f"{len(masks)} masks for {thw.shape[0]} images")
    flat = []
    for (t, h, w), m in zip(thw.tolist(), masks):
        if tuple(m.shape) != (h, w):
            raise ValueError(f"mask shape {tuple(m.shape)} does not match the image grid {(h, w)}")
        flat.append(cell_order(m.bool(), merge_size).repeat(t))
    rows = torch.cat(flat).to(pixel_values.device) if flat else torch.zeros(0, dtype=torch.bool)
    # (0 - mean_c) / std_c in float64, then the pixels' dtype (python floats are float64)
    black = torch.tensor([-float(m) / float(s) for m, s in zip(image_mean, image_std)], dtype=torch.float64)
    black = black.to(device=pixel_values.device, dtype=pixel_values.dtype)
    # one pass that writes a new tensor (no clone + masked write)
    view = pixel_values.reshape(pixel_values.shape[0], channels, -1)
    return torch.where(rows.view(-1, 1, 1), black.view(1, channels, 1), view).reshape(pixel_values.shape)


def perturb_pixel_values(pixel_values: Tensor | None, image_grid_thw: Tensor | None,
                         generator: torch.Generator, image_mean: Sequence[float], image_std: Sequence[float],
                         prob: float = 0.5, *, geometry: ImageGeometry | None = None) -> Tensor | None:
    """`pixel` mode for one trajectory: draw masks on each image's (h, w) grid and blacken.

    Text-only samples (None / no images) come back as given, without touching the generator.
    """
    if pixel_values is None or image_grid_thw is None or torch.as_tensor(image_grid_thw).numel() == 0:
        return pixel_values
    thw = torch.as_tensor(image_grid_thw, dtype=torch.long).reshape(-1, 3)
    masks = draw_cell_masks([(h, w) for _, h, w in thw.tolist()], generator, prob)
    return blacken_pixel_values(pixel_values, thw, masks, image_mean, image_std, geometry=geometry)


def image_grid(image: Image.Image, cell: int) -> tuple[int, int]:
    """Cells covering the image from (0, 0); edge cells may be partial."""
    w, h = image.size
    return -(-h // cell), -(-w // cell)


def blacken_image(image: Image.Image, mask: Tensor, cell: int) -> Image.Image:
    """New image with the colour channels of black cells set to 0 (an alpha band is kept)."""
    if image.mode not in ("RGB", "RGBA", "L", "LA"):
        image = image.convert("RGB")
    if tuple(mask.shape) != image_grid(image, cell):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the image's cell grid "
                         f"{image_grid(image, cell)}")
    arr = np.array(image)
    w, h = image.size
    pix = np.repeat(np.repeat(mask.numpy().astype(bool), cell, axis=0), cell, axis=1)[:h, :w]
    colour = 1 if image.mode in ("L", "LA") else 3
    if arr.ndim == 2:
        arr[pix] = 0
    else:
        arr[pix, :colour] = 0
    return Image.fromarray(arr)


def perturb_images(images: Sequence[Image.Image], generator: torch.Generator, prob: float = 0.5, *,
                   cell: int) -> list[Image.Image]:
    """`image` mode for one trajectory: masks drawn on each image's `cell`-pixel grid (the processor's
    patch size), in image order."""
    masks = draw_cell_masks([image_grid(im, cell) for im in images], generator, prob)
    return [blacken_image(im, m, cell) for im, m in zip(images, masks)]


def resize_to_grid(images: Sequence[Image.Image], image_grid_thw: Tensor, *, cell: int) -> list[Image.Image]:
    """Each image in RGB at its grid's pixel size (w·cell, h·cell; cell = the processor's patch size),
    bicubic: the resize the Qwen2-VL PIL processor makes, so re-processing the result resizes by the
    identity and gives the same pixels."""
    grids = torch.as_tensor(image_grid_thw, dtype=torch.long).reshape(-1, 3).tolist()
    if len(grids) != len(images):
        raise ValueError(f"{len(images)} images for {len(grids)} image grids; pass the grids of exactly these images")
    return [im.convert("RGB").resize((int(w) * cell, int(h) * cell), Image.BICUBIC)
            for im, (_, h, w) in zip(images, grids)]


def perturbed_images_at_grid(images: Sequence[Image.Image], image_grid_thw: Tensor, generator: torch.Generator,
                             prob: float = 0.5, *, cell: int) -> list[Image.Image] | None:
    """`image` mode's perturbed PIL view of one trajectory: resize to the processor's size, then blacken.

    Engines that preprocess raw images (vLLM) score this; the trainer processes it (same pixels: the
    resize is then the identity). None for a text-only sample, without touching the generator.
    """
    if not images:
        return None
    return perturb_images(resize_to_grid(images, image_grid_thw, cell=cell), generator, prob, cell=cell)


def perturb_images_and_process(images: Sequence[Image.Image], generator: torch.Generator,
                               process: Callable[[list[Image.Image]], Any], prob: float = 0.5, *,
                               cell: int) -> Any:
    """Blacken, then run the caller's processor callable on the perturbed images.

    Returns None for a text-only sample (no images): reuse the original features.
    The images must already have the processor's smart-resized size, so the processor's resize is the
    identity and the cell grid equals the patch grid.
    """
    if not images:
        return None
    return process(perturb_images(images, generator, prob, cell=cell))
