#!/bin/bash
# The BUSI Dice >= 0.75 attempt of issue 12 with the medical encoder: LiteMedSAM (TinyViT pre-trained
# on ~1.5 M medical image-mask pairs, ultrasound among them) + LoRA, its own SAM mask decoder,
# unprompted, 64 px (the CPU's limit: its stride-4 stem makes one step ~35x EfficientNet-Lite0's),
# the 80/10/10 split with near-duplicate groups kept on one side, one core.
cd "$(dirname "$0")/../../.."   # the repository root
OMP_NUM_THREADS=1 MEDPEFT_OFFLINE=1 .venv/bin/medpeft run --task segmentation --data ../shared/data/Dataset_BUSI_with_GT \
  --backbone litemedsam --method lora --image-size 64 --epochs 12 --batch-size 16 \
  --patience 6 --max-minutes 75 --val-ratio 0.1 --test-ratio 0.1 --threads 1 --seed 0 \
  --out runs/busi_litemedsam64 --quiet
