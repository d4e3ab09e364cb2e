#!/usr/bin/env bash
# Multi-node torchrun launch of `megatron-vppo train CONFIG [key=value ...]`.
# Set on every node: NNODES, NODE_RANK, MASTER_ADDR (and MASTER_PORT, GPUS_PER_NODE if not 29500 / 8).
# It stays in the caller's directory, so relative paths in CONFIG, its data/output keys and the overrides
# resolve where the user typed them; the checkout goes on PYTHONPATH so an uninstalled tree runs too.
set -euo pipefail
CONFIG=${1:?usage: examples/launch_torchrun.sh CONFIG.yaml [section.key=value ...]}
shift
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export CUDA_DEVICE_MAX_CONNECTIONS=1   # Megatron's TP/SP communication-overlap ordering
# SGLang (0.5.23, `_set_envs_and_config`) sets these in the engine ranks' processes when unset; NCCL
# communicators whose ranks disagree on them break, so every rank gets the same values up front.
export NCCL_CUMEM_ENABLE=0
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
exec torchrun --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" --nproc-per-node "${GPUS_PER_NODE:-8}" \
  --rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}" \
  -m megatron_vppo.cli train "$CONFIG" "$@"
