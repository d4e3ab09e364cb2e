#!/usr/bin/env bash
# Qwen2.5-VL-32B VPPO on 32 GPUs (4 nodes x 8): on each node
#   NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=<node 0> examples/train_vppo_32b.sh [section.key=value ...]
# Training TP4·SP·PP4·DP2; rollout on all 32 GPUs: 8 SGLang engines of TP4 (rollout.engine_tp=4).
exec "$(dirname "$0")/launch_torchrun.sh" "$(dirname "$0")/configs/qwen2_5_vl_32b_vppo.yaml" "$@"
