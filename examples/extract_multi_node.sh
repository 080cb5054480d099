#!/usr/bin/env bash
# Step 1 on several nodes: run this on every node with its NODE_RANK.
# WORLD_SIZE = NNODES x GPUS_PER_NODE ranks share the lines; one manifest covers all shards.
set -euo pipefail
export GPUS_PER_NODE=${GPUS_PER_NODE:-8}
export NNODES=${NNODES:-2}
export NODE_RANK=${NODE_RANK:?set NODE_RANK (0..NNODES-1)}
export MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR to node 0}
export MASTER_PORT=${MASTER_PORT:-6003}

torchrun --nproc_per_node="$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  -m pipeline.extract /path/to/your/data.jsonl \
  --output_dir s3://my-bucket/shards/dataset_a \
  --model_path /path/to/Qwen-Image-Edit-2509 --batch_size 4
