"""The MODELS registry: light to import, a clear error for unknown names, and a spec whose geometry and
weight adapter agree with what the real processor and the real HF checkpoint hold."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_vppo.config import ConfigError

from megatron_vppo.run_config import load_config
from megatron_vppo.data.perturb import blacken_pixel_values, make_generator, perturb_images_and_process, \
    perturb_pixel_values
from megatron_vppo.models import MODELS, ImageGeometry, check_hf_config, spec_for_hf_config

ROOT = Path(__file__).resolve().parents[1]


def test_registry_import_is_light():
    code = (
        "import sys\n"
        "from megatron_vppo.models import MODELS\n"
        "names = sorted(MODELS)\n"
        "specs = [MODELS[n].name for n in names]\n"  # looking specs up stays light: heavy imports are in methods
        "heavy = sorted(m for m in ('megatron', 'transformers') if m in sys.modules)\n"
        "print(names, specs, heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert out.stdout.strip() == "['qwen2_5_vl', 'qwen3_vl'] ['qwen2_5_vl', 'qwen3_vl'] []"


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ConfigError, match=r"model.arch='qwen9'.*known: \['qwen2_5_vl', 'qwen3_vl'\]"):
        load_config(None, ["model.arch=qwen9"])
    with pytest.raises(KeyError, match=r"known: \['qwen2_5_vl', 'qwen3_vl'\]"):
        MODELS["qwen9"]
    assert load_config(None, []).model.arch == "qwen2_5_vl"
    with pytest.raises(KeyError, match="model_type 'llama'"):
        spec_for_hf_config({"model_type": "llama"})
    with pytest.raises(ValueError, match="model_type 'llama'"):
        check_hf_config(MODELS["qwen2_5_vl"], {"model_type": "llama"})


def test_hf_directory_picks_its_spec(tiny_model_dir):
    assert spec_for_hf_config(tiny_model_dir) is MODELS["qwen2_5_vl"]
    assert json.loads((tiny_model_dir / "config.json").read_text())["model_type"] in MODELS["qwen2_5_vl"].hf_model_types


def test_geometry_matches_processed_image(tiny_model_dir, test_images):
    """The spec's geometry (from config.json) equals what the real processor does to a real image."""
    from megatron_vppo.data.processor import VLProcessor

    spec = MODELS["qwen2_5_vl"]
    geo = spec.image_geometry(spec.load_hf_config(tiny_model_dir))
    proc = VLProcessor.from_pretrained(tiny_model_dir)
    assert proc.geometry == geo
    img = test_images[0]
    pv, thw = proc.process_images([img])
    t, h, w = thw[0].tolist()
    # one pixel row per patch: channels x temporal frames x patch x patch values
    assert pv.shape == (t * h * w, 3 * geo.temporal_patch_size * geo.patch_size ** 2)
    rh, rw = spec.resized_size(img.height, img.width, proc.image_processor)
    assert (h * geo.patch_size, w * geo.patch_size) == (rh, rw)
    assert rh % (geo.patch_size * geo.merge_size) == 0 and rw % (geo.patch_size * geo.merge_size) == 0
    n_pad = int((proc.encode("Q", [img])["input_ids"] == proc.image_token_id).sum())
    assert n_pad == t * h * w // geo.merge_size ** 2
    assert torch.equal(proc.image_grids([img]), thw)


@pytest.mark.parametrize("tp", [1, 2])
def test_adapter_round_trip_is_bit_exact(tiny_model_dir, tp):
    from safetensors.torch import load_file

    spec = MODELS["qwen2_5_vl"]
    cfg = spec.load_hf_config(tiny_model_dir)
    hf = load_file(str(tiny_model_dir / "model.safetensors"))
    adapter = spec.weight_adapter(cfg, tp, 128)
    mc = adapter.hf_to_mcore(hf)
    back = adapter.mcore_to_hf(mc)
    want = {adapter.canonical_hf_name(k): v for k, v in hf.items()}
    assert sorted(back) == sorted(want)
    for k, v in want.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    # the engine-side names reach every parameter of the transformers class the spec names
    from transformers import Qwen2_5_VLForConditionalGeneration

    assert spec.engine_model_class() is Qwen2_5_VLForConditionalGeneration
    meta = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny_model_dir))
    params = dict(meta.named_parameters())
    assert {spec.engine_param_name(k) for k in hf} == set(params)


def test_perturb_follows_a_patch_16_processor():
    """With a patch-16 processor both modes blacken 16-pixel cells and agree; the 14-pixel default
    would not fit its pixel rows, so nothing in perturb.py assumes Qwen2.5-VL's 14."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ip = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2,
                                  min_pixels=64 * 64, max_pixels=32 * 32 * 64)
    geo = ImageGeometry.of_image_processor(ip)
    assert geo == ImageGeometry(patch_size=16, merge_size=2, temporal_patch_size=2)
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(1, 256, (96, 128, 3), dtype=np.uint8))]  # already 32-aligned
    orig = ip(images=images, return_tensors="pt")
    pv, thw = orig["pixel_values"], orig["image_grid_thw"]
    assert thw[0].tolist() == [1, 96 // 16, 128 // 16]

    px = perturb_pixel_values(pv, thw, make_generator(3, 1, 0), ip.image_mean, ip.image_std, geometry=geo)
    seen = []

    def process(ims):
        seen.extend(ims)
        return ip(images=ims, return_tensors="pt")

    im = perturb_images_and_process(images, make_generator(3, 1, 0), process, cell=geo.patch_size)
    torch.testing.assert_close(px, im["pixel_values"], atol=1e-5, rtol=0)
    assert 0 < int((px != pv).any(-1).sum()) < pv.shape[0]
    # black regions of the perturbed image are unions of whole 16x16 cells on the 16-pixel grid
    black = (np.array(seen[0]) == 0).all(-1)
    cells = black.reshape(6, 16, 8, 16)
    assert (cells.all(axis=(1, 3)) == cells.any(axis=(1, 3))).all() and cells.any()

    with pytest.raises(ValueError, match="pixel_values must be"):
        blacken_pixel_values(pv, thw, [torch.zeros(6, 8, dtype=torch.bool)], ip.image_mean, ip.image_std,
                             geometry=ImageGeometry(patch_size=14, merge_size=2, temporal_patch_size=2))
