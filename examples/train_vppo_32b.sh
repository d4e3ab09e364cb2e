#!/usr/bin/env bash
# Multi-node torchrun launch for Qwen2.5-VL-32B VPPO. Set NNODES, NODE_RANK, MASTER_ADDR (and MASTER_PORT)
# on every node; extra arguments are config overrides, e.g. train.total_steps=10 model.path=/ckpt/hf.
set -euo pipefail
cd "$(dirname "$0")/.."
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
export CUDA_DEVICE_MAX_CONNECTIONS=1   # Megatron's TP/SP comm overlap ordering
exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \
  -m megatron_vppo.cli train examples/configs/qwen2_5_vl_32b_vppo.yaml "$@"
