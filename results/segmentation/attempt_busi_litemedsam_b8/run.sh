#!/bin/bash
# The second BUSI attempt with LiteMedSAM + LoRA (issue 12): as ../attempt_busi_litemedsam/ but batch 8,
# i.e. twice the optimizer steps (912) at the same CPU cost; the two are compared on validation only.
cd "$(dirname "$0")/../../.."   # the repository root
OMP_NUM_THREADS=1 MEDPEFT_OFFLINE=1 .venv/bin/medpeft run --task segmentation --data ../shared/data/Dataset_BUSI_with_GT \
  --backbone litemedsam --method lora --image-size 64 --epochs 12 --batch-size 8 \
  --patience 6 --max-minutes 75 --val-ratio 0.1 --test-ratio 0.1 --threads 1 --seed 0 \
  --out runs/busi_litemedsam64_b8 --quiet
