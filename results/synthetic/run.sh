#!/bin/bash
# Issue 18 study, sized for 2 CPU cores (~4 CPU-hours; resumable: finished steps are skipped).
# A class-conditional diffusion UNet pre-trained on PneumoniaMNIST (32 px), adapted to BreastMNIST with
# full / LoRA / DoRA / BitFit / norm and trained from scratch (the no-pre-training baseline), 3 seeds:
# FD-DINOv2, KID, precision/recall, memorised fraction (eval.json), trainable count, adapter bytes and
# time (generator.json). Downstream: BreastMNIST classifiers at 1 % and 10 % labels, real only vs real +
# 500 synthetic images per class. A classifier only ever sees synthetic images from a generator adapted
# on its own labelled images (same label fraction, same subset seed): a generator adapted on 100 % of
# the labels would smuggle those labels into a 1 % classifier. Hence the generators at 1 % (full, LoRA,
# scratch: the 1 % row is a probe, 5 images) and 10 %, and the 100 % ones for generator quality only.
# Then: medpeft generator report runs/synthetic  ->  runs/synthetic/report/report.md
set -e
cd "$(dirname "$0")/../.."
M="${MEDPEFT:-.venv/bin/medpeft}"
G=runs/synthetic
CLS="--data breastmnist --image-size 64 --method lora --steps 150 --quiet"
[ -f $G/base/generator.json ] || $M generator pretrain --data pneumoniamnist --image-size 32 --steps 3000 --out $G/base
for seed in 0 1 2; do
  for fraction in 0.1 1.0 0.01; do
    methods="full lora dora bitfit norm scratch"
    [ $fraction = 0.01 ] && methods="full lora scratch"
    for method in $methods; do
      out=$G/${method}_f${fraction}_s$seed
      [ -f $out/generator.json ] || $M generator adapt $G/base --data breastmnist --method $method --fraction $fraction \
          --steps 600 --seed $seed --out $out
      [ -f $out/eval.json ] || $M generator eval $out --data breastmnist --per-class 200 --seed $seed
      [ $fraction = 1.0 ] && continue  # quality only: no classifier may use a 100 %-label generator at 1 / 10 %
      [ -f $out/synth/manifest.csv ] || $M generator sample $out --per-class 500 --seed $seed --out $out/synth
      [ -f $out/downstream/metrics.json ] || $M run $CLS --fraction $fraction --synthetic $out/synth/manifest.csv \
          --seed $seed --out $out/downstream
    done
    [ $fraction = 1.0 ] && continue
    [ -f $G/real_only_f${fraction}_s$seed/metrics.json ] || $M run $CLS --fraction $fraction --seed $seed \
        --out $G/real_only_f${fraction}_s$seed
  done
done
$M generator report $G
