#!/usr/bin/env python
"""Rank TP/PP/VPP/SP/DP layouts for a Qwen2.5-VL VPPO run by estimated memory and tokens/s/GPU.

    python tools/tune_parallelism.py --model examples/model_configs/qwen2_5_vl_7b.json --gpus 8 --gpu-mem-gib 79.6

See docs/parallelism.md for what the estimate counts and its assumptions.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_vppo.tuning.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
