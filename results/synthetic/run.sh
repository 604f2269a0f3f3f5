#!/bin/bash
# Issue 18 study, sized for 2 CPU cores (~3 CPU-hours; resumable: finished steps are skipped).
# A class-conditional diffusion UNet pre-trained on PneumoniaMNIST (32 px), adapted to BreastMNIST
# at 10 % and 100 % with full / LoRA / DoRA / BitFit / norm and trained from scratch (the baseline),
# 3 seeds: FD-DINOv2, KID, precision/recall, memorised fraction (eval.json), trainable count and
# time (generator.json); then the downstream table: BreastMNIST classifiers at 10 % with real vs
# real + 500 synthetic images per class of each generator (medpeft run --synthetic).
set -e
cd "$(dirname "$0")/../.."
M="${MEDPEFT:-.venv/bin/medpeft}"
G=runs/synthetic
[ -f $G/base/generator.json ] || $M generator pretrain --data pneumoniamnist --image-size 32 --steps 3000 --out $G/base
for seed in 0 1 2; do
  for fraction in 0.1 1.0; do
    for method in full lora dora bitfit norm scratch; do
      out=$G/${method}_f${fraction}_s$seed
      [ -f $out/generator.json ] || $M generator adapt $G/base --data breastmnist --method $method --fraction $fraction \
          --steps 600 --seed $seed --out $out
      [ -f $out/eval.json ] || $M generator eval $out --data breastmnist --per-class 200 --seed $seed
      [ -f $out/synth/manifest.csv ] || $M generator sample $out --per-class 500 --seed $seed --out $out/synth
      [ -f $out/downstream/metrics.json ] || $M run --data breastmnist --fraction 0.1 --image-size 64 \
          --synthetic $out/synth/manifest.csv --method lora --seed $seed --steps 150 --quiet --out $out/downstream
    done
  done
  [ -f $G/real_only_s$seed/metrics.json ] || $M run --data breastmnist --fraction 0.1 --image-size 64 --method lora \
      --seed $seed --steps 150 --quiet --out $G/real_only_s$seed
done
