#!/bin/bash
# The BUSI Dice >= 0.75 attempt of issue 12 (this folder's run): EfficientNet-Lite0 + LoRA at 160 px,
# the 80/10/10 split with near-duplicate groups kept on one side, 40 epochs with patience 12, one core.
cd "$(dirname "$0")/../../.."   # the repository root
OMP_NUM_THREADS=1 MEDPEFT_OFFLINE=1 .venv/bin/medpeft run --task segmentation --data ../shared/data/Dataset_BUSI_with_GT \
  --backbone efficientnet_lite0 --method lora --image-size 160 --epochs 40 --batch-size 16 \
  --patience 12 --max-minutes 40 --val-ratio 0.1 --test-ratio 0.1 --threads 1 --seed 0 \
  --out runs/busi_lora160 --quiet
