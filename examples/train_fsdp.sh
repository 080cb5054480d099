#!/usr/bin/env bash
# Step 2, full fine-tuning with FSDP: the original tool's command with the module name changed.
# The same settings as a recipe: examples/recipes/train_fsdp.yaml (pass it with --config).
set -euo pipefail
export GPUS_PER_NODE=${GPUS_PER_NODE:-8}
export NNODES=${NNODES:-1}
export NODE_RANK=${NODE_RANK:-0}
export MASTER_ADDR=${MASTER_ADDR:-localhost}
export MASTER_PORT=${MASTER_PORT:-6003}

accelerate launch --mixed_precision="bf16" --use_fsdp \
  --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP \
  --fsdp_transformer_layer_cls_to_wrap=QwenImageTransformerBlock \
  --fsdp_state_dict_type=SHARDED_STATE_DICT \
  --num_processes $((GPUS_PER_NODE * NNODES)) --num_machines "$NNODES" --machine_rank "$NODE_RANK" \
  --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \
  -m pipeline.train \
  --pretrained_model_name_or_path="/path/to/Qwen-Image-Edit-2509" \
  --train_data_meta_dir="/path/to/shards" \
  --train_data_weights="dataset_a=0.5,dataset_b=1.2,dataset_c=1.0" \
  --train_src_img_num_weights="0=1,1=1,2=1,3=0" \
  --train_batch_size=1 --image_sample_size=512 --gradient_accumulation_steps=1 \
  --max_train_steps=512 --learning_rate=2e-05 --lr_scheduler="constant_with_warmup" --lr_warmup_steps=100 \
  --checkpointing_steps=100 --output_dir="/path/to/ckpts" --gradient_checkpointing --mixed_precision="bf16" \
  --adam_weight_decay=3e-2 --max_grad_norm=0.05 --uniform_sampling --trainable_modules "." --vae_mini_batch=1
