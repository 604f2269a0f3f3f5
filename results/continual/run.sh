#!/bin/bash
# Issue 16 continual study, sized for 2 CPU cores: BreastMNIST -> PneumoniaMNIST (task-incremental,
# the 28 px MedMNIST files at 64 px) and Kvasir-SEG -> CVC-ClinicDB (site-incremental, 64 px, with and without
# replay), EfficientNet-Lite0, full / LoRA (rank 4, 16) / SSF / BitFit, 5 seeds. Every run writes
# runs/continual/<sequence>/<method>/s<seed>/continual.json (accuracy matrix, average, BWT, FWT);
# finished runs are skipped, so the script resumes. ~3 CPU-hours.
set -e
cd "$(dirname "$0")/../.."
MEDPEFT="${MEDPEFT:-.venv/bin/medpeft}"
for seed in 0 1 2 3 4; do
  for spec in "full" "lora --lora-rank 4" "lora --lora-rank 16" "ssf" "bitfit"; do
    set -- $spec; tag="$(echo "$spec" | tr ' ' '_' | tr -d '-')"
    out=runs/continual/breast_pneumonia/$tag/s$seed
    [ -f $out/continual.json ] || $MEDPEFT continual --sequence breastmnist,pneumoniamnist --mode task \
        --image-size 64 --backbone efficientnet_lite0 --method $spec --seed $seed \
        --steps 150 --batch-size 32 --quiet --threads 1 --out $out --overwrite
    for replay in 0 32; do
      out=runs/continual/kvasir_cvc_replay$replay/$tag/s$seed
      [ -f $out/continual.json ] || $MEDPEFT continual --task segmentation \
          --sequence ../shared/data/Kvasir-SEG,../shared/data/CVC-ClinicDB --mode site --replay $replay \
          --image-size 64 --backbone efficientnet_lite0 --method $spec --seed $seed --val-ratio 0.1 \
          --test-ratio 0.1 --steps 160 --batch-size 16 --head-lr 0.001 --quiet --threads 1 --out $out --overwrite
    done
  done
done
