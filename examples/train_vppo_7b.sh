#!/usr/bin/env bash
# Qwen2.5-VL-7B VPPO, the paper's recipe on 8 GPUs (one node): NNODES=1 examples/train_vppo_7b.sh
# Extra arguments are config overrides, e.g. model.path=/ckpt/Qwen2.5-VL-7B-Instruct train.total_steps=10
exec "$(dirname "$0")/launch_torchrun.sh" "$(dirname "$0")/configs/qwen2_5_vl_7b_vppo.yaml" "$@"
