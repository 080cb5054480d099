#!/usr/bin/env bash
# Write shards to object storage and train from there. Credentials and endpoint come from the
# usual places (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL, ~/.aws, FSSPEC_S3_*),
# or pass --storage_options '{"s3": {"endpoint_url": "https://minio.example:9000"}}'.
set -euo pipefail
export AWS_ENDPOINT_URL=${AWS_ENDPOINT_URL:-https://s3.amazonaws.com}

for task in dataset_a dataset_b; do
  torchrun --nproc_per_node="${GPUS_PER_NODE:-8}" -m pipeline.extract "/data/$task/data.jsonl" \
    --output_dir "s3://my-bucket/shards/$task" --model_path /path/to/Qwen-Image-Edit-2509
done

# the training flags below are also examples/recipes/s3_train.yaml
accelerate launch --num_processes "${GPUS_PER_NODE:-8}" -m pipeline.train \
  --pretrained_model_name_or_path=/path/to/Qwen-Image-Edit-2509 \
  --train_data_meta_dir=s3://my-bucket/shards --train_data_weights="dataset_a=0.5,dataset_b=1.2" \
  --max_train_steps=1000 --output_dir=/path/to/ckpts --mixed_precision=bf16
