"""Parallelism tuning: which TP/PP/VPP/SP/CP/DP layouts fit a VPPO run, and which is fastest.

`model_spec` reads the shapes from an HF config, `memory` and `throughput` estimate one layout,
`search` enumerates and ranks layouts, `cli` is `tools/tune_parallelism.py`.
"""
from megatron_vppo.tuning.memory import KERNELS, Kernels, MemoryEstimate, Precision, Workload, estimate_memory
from megatron_vppo.tuning.model_spec import ModelShape, ModelSpecError, load_model_spec, spec_from_dict
from megatron_vppo.tuning.search import Candidate, TuningError, enumerate_layouts, tune
from megatron_vppo.tuning.throughput import GPU_TYPES, GpuType, estimate_throughput

__all__ = [
    "KERNELS", "Kernels", "MemoryEstimate", "Precision", "Workload", "estimate_memory",
    "ModelShape", "ModelSpecError", "load_model_spec", "spec_from_dict",
    "Candidate", "TuningError", "enumerate_layouts", "tune",
    "GPU_TYPES", "GpuType", "estimate_throughput",
]
