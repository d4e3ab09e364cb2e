"""Let megatron-core 0.16.1 run on a CPU-only torch (gloo), for tests and the tiny demo.

Megatron-Core assumes CUDA in a handful of ways (platform.md lists them). `apply_cpu_adapter()` covers
each one, once per process, and does nothing when CUDA is present — GPU runs never see these patches:

* `torch.cuda.current_device()` -> torch.device("cpu") (a device, not an index, so tensors created with
  `device=torch.cuda.current_device()` land on CPU even where the mode below is not active — inside
  `torch.autograd.backward`, whose override runs the whole backward with modes popped);
  `torch.cuda.synchronize()` -> no-op;
* a TorchFunctionMode that turns `device="cuda"`/`device=0`/`.cuda()`/`.to("cuda")` into CPU, and makes
  the no-argument `Tensor.type()` report `torch.cuda.*Tensor` (the optimizer and grad-clip check it);
* the CUDA RNG tracker (`model_parallel_cuda_manual_seed`, dropout forks) keeps CPU generator states;
* the torch-norm wrapper accepts sequence parallel and tags its params `sequence_parallel=True`, so the
  finalize-grads step all-reduces their grads over the TP group as Megatron does for fused norms.

The mode is thread-local: it is active on the thread that applied the adapter (the main thread).
"""
from __future__ import annotations

import contextlib
import copy
import threading

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_APPLIED = False
_MODE: TorchFunctionMode | None = None
_LOCK = threading.Lock()

_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
    "torch.ByteTensor": "torch.cuda.ByteTensor",
    "torch.BoolTensor": "torch.cuda.BoolTensor",
}


def _is_cuda_device(dev, allow_int: bool) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    if allow_int and isinstance(dev, int) and not isinstance(dev, bool):
        return True
    return False


class CudaToCpuMode(TorchFunctionMode):
    """Redirect CUDA tensor placement to CPU; report CUDA type names for `Tensor.type()`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs) if kwargs else {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _TYPE_NAMES.get(name, name)
        if "device" in kwargs and _is_cuda_device(kwargs["device"], allow_int=True):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1], allow_int=True):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class CpuRNGStatesTracker:
    """Drop-in for Megatron's CudaRNGStatesTracker keeping named CPU generator states.

    `fork(name)` swaps the CPU default generator to the tracked state and back, which is what the
    CUDA tracker does for the CUDA generator; on CPU there is only one generator to swap.
    """

    def __init__(self, use_cudagraphable_rng=False, is_inference_rng_tracker=False):
        self.use_cudagraphable_rng = False
        self.is_inference_rng_tracker = is_inference_rng_tracker
        self.reset()

    def is_initialized(self):
        return self._is_initialized

    def reset(self):
        self._is_initialized = False
        self.states_ = {}
        self.seeds_ = set()
        self._current_state_name = "default-rng"

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = states

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig_state = torch.get_rng_state()
        orig_name = self._current_state_name
        if orig_name != "default-rng":
            self.states_[orig_name] = orig_state
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            if orig_name != "default-rng":
                orig_state = self.states_[orig_name]
            torch.set_rng_state(orig_state)
            self._current_state_name = orig_name


def _patch_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    # Subclass so isinstance(tracker, CudaRNGStatesTracker) checks (get_all_rng_states) still hold.
    tracker_cls = type("CpuRNGStatesTracker", (CpuRNGStatesTracker, mrandom.CudaRNGStatesTracker), {})
    mrandom.CudaRNGStatesTracker = tracker_cls
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, *a, **k: torch.set_rng_state(new_state)
    # A tracker created before the patch is of the CUDA kind: drop it so the next call rebuilds.
    mrandom._CUDA_RNG_STATE_TRACKER = None
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = False


def _patch_torch_norm() -> None:
    from megatron.core.transformer import torch_norm

    orig_new = torch_norm.WrappedTorchNorm.__new__

    def new(cls, config, hidden_size, eps=1e-5, *args, **kwargs):
        if not config.sequence_parallel:
            return orig_new(cls, config, hidden_size, eps, *args, **kwargs)
        cfg = copy.copy(config)
        cfg.sequence_parallel = False
        norm = orig_new(cls, cfg, hidden_size, eps, *args, **kwargs)
        for p in norm.parameters():
            p.sequence_parallel = True
        return norm

    torch_norm.WrappedTorchNorm.__new__ = staticmethod(new)


def apply_cpu_adapter(force: bool = False) -> bool:
    """Patch megatron-core for CPU once per process; returns True when the adapter is active.

    No-op (returns False) when CUDA is available, unless `force` (tests only).
    """
    global _APPLIED, _MODE
    if torch.cuda.is_available() and not force:
        return False
    with _LOCK:
        if _APPLIED:
            return True
        torch.cuda.current_device = lambda: _CPU
        torch.cuda.synchronize = lambda *a, **k: None
        _patch_rng()
        _patch_torch_norm()
        _MODE = CudaToCpuMode()
        _MODE.__enter__()
        _APPLIED = True
    return True


def without_device_redirect():
    """Context in which torch calls skip the CUDA->CPU redirect mode (a no-op where it is not active).

    For hot loops of our own code that never name a CUDA device — the weight sync copies every
    parameter, and the mode's per-call dispatch costs ~20 % of it on CPU. Megatron code must not run
    inside it."""
    return torch._C.DisableTorchFunction() if _MODE is not None else contextlib.nullcontext()
