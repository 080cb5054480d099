#!/usr/bin/env bash
# Step 1 on one node with 8 GPUs: one process per GPU, each takes every 8th line.
# Rerun the same command after a crash or preemption: finished shards are kept.
set -euo pipefail
export GPUS_PER_NODE=${GPUS_PER_NODE:-8}
export MASTER_ADDR=${MASTER_ADDR:-localhost}
export MASTER_PORT=${MASTER_PORT:-6003}

torchrun --nproc_per_node="$GPUS_PER_NODE" --nnodes 1 --node_rank 0 \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  -m pipeline.extract /path/to/your/data.jsonl \
  --output_dir /path/to/shards/dataset_a \
  --model_path /path/to/Qwen-Image-Edit-2509 \
  --batch_size 4 --num_workers 4
