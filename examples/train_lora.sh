#!/usr/bin/env bash
# Step 2 with LoRA (DDP), resuming from the newest checkpoint if there is one.
# Output: /path/to/lora_run/pytorch_lora_weights.safetensors for QwenImageEditPlusPipeline.load_lora_weights and
# qwen_image_edit_lora_comfyui.safetensors for ComfyUI (both also in every checkpoint-N/), validation images under
# /path/to/lora_run/validation/. The same settings as a recipe: examples/recipes/train_lora.yaml.
set -euo pipefail
accelerate launch --mixed_precision="bf16" --num_processes "${GPUS_PER_NODE:-8}" \
  -m pipeline.train \
  --pretrained_model_name_or_path="/path/to/Qwen-Image-Edit-2509" \
  --train_data_meta_dir="/path/to/shards" \
  --train_data_weights="dataset_a=1,dataset_b=1" --train_src_img_num_weights="0=1,1=1,2=1,3=0" \
  --use_peft_lora --lora_r 64 --lora_alpha 64 --lora_export_format both \
  --train_batch_size=1 --image_sample_size=512 --max_train_steps=2000 \
  --learning_rate=1e-4 --lr_scheduler=constant_with_warmup --lr_warmup_steps=100 \
  --checkpointing_steps=250 --checkpoints_total_limit=3 --resume_from_checkpoint latest \
  --output_dir="/path/to/lora_run" --gradient_checkpointing --mixed_precision="bf16" \
  --validation_jsonl=/path/to/validation.jsonl --validation_steps=250 --validation_inference_steps=20 \
  --validation_guidance_scale=4.0
