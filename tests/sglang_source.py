"""SGLang 0.5.23's own Python code, for contract tests on machines where `import sglang` cannot work.

`import sglang` needs its CUDA stack (its utils module imports triton, ~1 GB, at the top), so on CPU we
run the pieces the contracts rest on straight from SGLang's source files, unchanged: the
flattened-bucket module as a module, and named top-level definitions of the heavier modules
(`MultiprocessingSerializer`, `SafeUnpickler`, the payload normalisation, `GenerateReqInput`'s
image-data normalisation) executed with their module's standard-library and torch imports.
`scripts/bootstrap.sh` extracts those files from the pinned wheel into `<venv>/sglang-src/0.5.23/`
(`SGLANG_SRC` overrides the location). Where the real package imports (a GPU machine), it is used.
One substitution: `pybase64` is the standard library's `base64` (same b64encode/b64decode API).
"""
from __future__ import annotations

import ast
import base64
import importlib.util
import os
import sys
import types
from pathlib import Path

VERSION = "0.5.23"
FILES = (
    "sglang/srt/weight_sync/tensor_bucket.py",
    "sglang/srt/utils/common.py",
    "sglang/srt/managers/io_struct.py",
    "sglang/srt/entrypoints/engine.py",
    "sglang/srt/entrypoints/http_server.py",
    "sglang/srt/managers/scheduler_components/weight_updater.py",
    "sglang/srt/managers/tp_worker.py",
    "sglang/srt/utils/patch_torch.py",
    "sglang/srt/model_executor/model_runner_components/weight_updater.py",
    *(f"sglang/srt/arg_groups/fields/{f}.py" for f in ("device", "exec_", "model", "parallel", "schedule", "serving")),
)

# The log-prob path (logit_bias before the sampler's log-probs; issue 18): a separate list, so a venv
# unpacked before these were added keeps running the other contract tests (these skip until the next
# bootstrap or with SGLANG_SRC set).
LOGPROB_FILES = (
    "sglang/srt/sampling/sampling_batch_info.py",
    "sglang/srt/model_executor/model_runner.py",
    "sglang/srt/layers/sampler.py",
)
ALL_FILES = FILES + LOGPROB_FILES  # what scripts/fetch_sglang_source.sh unpacks


def source_root(files=FILES) -> Path | None:
    env = os.environ.get("SGLANG_SRC")
    root = Path(env) if env else Path(sys.prefix) / "sglang-src" / VERSION
    return root if all((root / f).is_file() for f in files) else None


def real_sglang_importable() -> bool:
    try:
        import sglang.srt.utils  # noqa: F401
    except Exception:  # noqa: BLE001 — ImportError or a CUDA-only failure inside it
        return False
    return True


SKIP_REASON = (
    f"SGLang {VERSION}'s source is not here: run scripts/bootstrap.sh (it extracts the files the contract tests "
    f"read into <venv>/sglang-src/{VERSION}/) or set SGLANG_SRC to an unpacked sglang=={VERSION} wheel"
)


def available(files=FILES) -> bool:
    return source_root(files) is not None


def read(relpath: str) -> str:
    return (source_root((relpath,)) / relpath).read_text()


def _module_imports(tree: ast.Module) -> list[ast.stmt]:
    """The file's top-level imports, minus `__future__` and SGLang modules not already loaded by `install`
    (importing the `sglang` package itself would pull its CUDA stack)."""
    def keep(n):
        if isinstance(n, ast.Import):
            return not any(a.name.startswith("sglang") for a in n.names)
        mod = n.module or ""
        return mod != "__future__" and (not mod.startswith("sglang") or mod in sys.modules)
    return [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)) and keep(n)]


def exec_defs(relpath: str, names: set[str], module_name: str) -> types.ModuleType:
    """A module holding the named top-level definitions of an SGLang source file, unchanged, after the
    file's own imports (those that import here; `import sglang...` is never run)."""
    tree = ast.parse(read(relpath))
    mod = types.ModuleType(module_name)
    mod.__dict__["pybase64"] = base64
    for node in _module_imports(tree):
        try:
            exec(compile(ast.Module([node], []), relpath, "exec"), mod.__dict__)
        except Exception:  # noqa: BLE001 — an import the kept definitions do not need (triton, zmq, ...)
            pass
    found = set()
    for node in tree.body:
        name = getattr(node, "name", None)
        if name is None and isinstance(node, (ast.Assign, ast.AnnAssign)):
            tgt = node.targets[0] if isinstance(node, ast.Assign) else node.target
            name = getattr(tgt, "id", None)
        if name in names:
            exec(compile(ast.Module([node], []), relpath, "exec"), mod.__dict__)
            found.add(name)
    missing = names - found
    if missing:
        raise LookupError(f"{relpath} of SGLang {VERSION} has no top-level {sorted(missing)}")
    return mod


def class_method(relpath: str, cls: str, method: str):
    """One method of a class in an SGLang source file, as a plain function (its module's imports)."""
    tree = ast.parse(read(relpath))
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls), None)
    fn = next((n for n in (node.body if node else []) if isinstance(n, ast.FunctionDef) and n.name == method), None)
    if fn is None:
        raise LookupError(f"{relpath} of SGLang {VERSION} has no {cls}.{method}")
    ns: dict = {}
    for imp in _module_imports(tree):
        try:
            exec(compile(ast.Module([imp], []), relpath, "exec"), ns)
        except Exception:  # noqa: BLE001
            pass
    exec(compile(ast.Module([fn], []), relpath, "exec"), ns)
    return ns[method]


def method_params(relpath: str, cls: str) -> dict[str, list[str]]:
    """{method: parameter names (self excluded)} of a class, read from the source."""
    tree = ast.parse(read(relpath))
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    out = {}
    for fn in node.body:
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = fn.args
            out[fn.name] = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs][1:]
    return out


def _package(name: str) -> types.ModuleType:
    mod = sys.modules.get(name)
    if mod is None:
        mod = types.ModuleType(name)
        mod.__path__ = []  # a package, so pickle can import the modules below it
        sys.modules[name] = mod
    return mod


def install() -> types.SimpleNamespace:
    """SGLang's serializer, unpickler, payload normalisation and flattened bucket, importable under
    their SGLang module names (pickle records and resolves classes by those names). Idempotent;
    call it in every process that pickles or unpickles payloads."""
    if real_sglang_importable():
        from sglang.srt.utils import MultiprocessingSerializer
        from sglang.srt.utils.common import SafeUnpickler, normalize_serialized_named_tensor_payloads
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket, FlattenedTensorMetadata

        return types.SimpleNamespace(MultiprocessingSerializer=MultiprocessingSerializer, SafeUnpickler=SafeUnpickler,
                                     normalize_payloads=normalize_serialized_named_tensor_payloads,
                                     FlattenedTensorBucket=FlattenedTensorBucket,
                                     FlattenedTensorMetadata=FlattenedTensorMetadata)
    name = "sglang.srt.weight_sync.tensor_bucket"
    if name not in sys.modules:
        for pkg in ("sglang", "sglang.srt", "sglang.srt.weight_sync"):
            _package(pkg)
        spec = importlib.util.spec_from_file_location(name, source_root() / "sglang/srt/weight_sync/tensor_bucket.py")
        tb = importlib.util.module_from_spec(spec)
        sys.modules[name] = tb
        spec.loader.exec_module(tb)
    tb = sys.modules[name]
    common = exec_defs("sglang/srt/utils/common.py", {
        "MultiprocessingSerializer", "SafeUnpickler", "_safe_load_torch_storage", "SerializedTensorPayload",
        "_looks_like_pickle_payload", "normalize_serialized_named_tensor_payload",
        "normalize_serialized_named_tensor_payloads"}, "sglang_srt_utils_common_defs")
    return types.SimpleNamespace(MultiprocessingSerializer=common.MultiprocessingSerializer,
                                 SafeUnpickler=common.SafeUnpickler,
                                 normalize_payloads=common.normalize_serialized_named_tensor_payloads,
                                 FlattenedTensorBucket=tb.FlattenedTensorBucket,
                                 FlattenedTensorMetadata=tb.FlattenedTensorMetadata)


def torch_reduction_patch():
    """SGLang's `monkey_patch_torch_reductions` (CUDA/ROCm path: `_is_npu` False), with its helpers."""
    mod = exec_defs("sglang/srt/utils/patch_torch.py", {
        "monkey_patch_torch_reductions", "_REDUCE_TENSOR_ARG_DEVICE_INDEX", "_reduce_tensor_modified",
        "_rebuild_cuda_tensor_modified", "_device_to_uuid", "_device_from_maybe_uuid", "_modify_tuple"},
        "sglang_srt_utils_patch_torch_defs")
    mod._is_npu = False
    return mod.monkey_patch_torch_reductions


def flattened_bucket_loader():
    """SGLang's model-runner side of a flattened-bucket update, `WeightUpdater._update_weights_from_flattened_bucket`
    (call it as fn(obj_with_get_model, flattened_tensor_bucket_dict=payload))."""
    install()
    return class_method("sglang/srt/model_executor/model_runner_components/weight_updater.py", "WeightUpdater",
                        "_update_weights_from_flattened_bucket")
