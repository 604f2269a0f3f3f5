"""The ``medpeft`` command line.

Every user error (a ``MedpeftError``) is printed as one line naming the bad value; exit code 2.
"""
from __future__ import annotations

import argparse
import os
import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError, MedpeftError

if TYPE_CHECKING:  # the annotation of run_config_from_args only (run.py imports torch)
    from .run import RunConfig


def _bool(text: str) -> bool:
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None


def add_method_options(parser: argparse.ArgumentParser) -> None:
    """One ``--<method>-<field>`` option per field of every method's config dataclass."""
    from .methods import get_method, list_methods

    group = parser.add_argument_group("method options (apply when the method is selected)")
    for name in list_methods():
        spec = get_method(name)
        for f in dataclasses.fields(spec.config_cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            kind = type(default) if default is not None else str
            kind = _bool if kind is bool else kind
            group.add_argument(f"--{name}-{f.name}".replace("_", "-"), dest=f"{name}_{f.name}", type=kind,
                               default=None, help=f"{name}: {f.name} (default {default!r})")


def add_data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default="breastmnist",
                   help="MedMNIST flag (breastmnist, pneumoniamnist, ...), a folder with one sub-folder per class, "
                        "or a CSV manifest (path,label[,split][,group]) (default: breastmnist)")
    g.add_argument("--task", choices=("classification", "segmentation", "detection"), default="classification",
                   help="classification (image labels), segmentation (masks: <name>_mask.png beside each image, "
                        "images/ + masks/ folders, or a manifest 'mask' column) or detection (boxes: Kvasir-SEG's "
                        "kavsir_bboxes.json, --box-file COCO/CSV, a CSV manifest path,x0,y0,x1,y1,label, or one box "
                        "per mask component)")
    g.add_argument("--label-noise", default=None, metavar="SPEC",
                   help="classification: inject label noise into the training and validation labels: symmetric:R, "
                        "asymmetric:R (pair flip) or matrix:[[..],[..]]; the test split stays clean; flips are "
                        "recorded in noisy_labels.csv")
    g.add_argument("--clean-validation", action="store_true",
                   help="with --label-noise: keep the validation labels clean (default: as noisy as training)")
    g.add_argument("--synthetic", default=None, metavar="MANIFEST",
                   help="classification: a CSV manifest path,label of synthetic images added to the training split "
                        "only (validation and test stay real)")
    g.add_argument("--synthetic-only", action="store_true", help="train on the synthetic images alone")
    g.add_argument("--box-file", default=None,
                   help="detection: the box file inside the data folder (COCO JSON, Kvasir JSON or CSV "
                        "path,x0,y0,x1,y1,label; default kavsir_bboxes.json if present, else boxes from the masks)")
    g.add_argument("--box-min-size", type=int, default=10,
                   help="detection from masks: mask components of fewer pixels give no box (default 10)")
    g.add_argument("--mask-classes", default=None,
                   help="segmentation: comma-separated names of the mask values 0..K-1 (0 = background) for "
                        "multi-class label maps (default: binary background,lesion)")
    g.add_argument("--data-root", default=None,
                   help="where MedMNIST .npz files live / root of manifest paths (default: $MEDPEFT_DATA, "
                        "else medmnist's default ~/.medmnist)")
    g.add_argument("--image-size", type=int, default=None,
                   help="square input size in pixels (default per backbone: 64 for CNNs, a 2x2 final map; "
                        "8x8 tokens for a ViT, 112 for dinov2_vits14; coarser sizes are warned about)")
    g.add_argument("--medmnist-size", type=int, choices=(28, 64, 128, 224), default=None,
                   help="which MedMNIST file variant to read (default 28)")
    g.add_argument("--fraction", type=_fraction, default=None,
                   help="label fraction of the training split, 0 < f <= 1 (stratified, nested across fractions)")
    g.add_argument("--shots", type=int, default=None, help="k training examples per class instead of --fraction")
    g.add_argument("--subset-seed", type=int, default=None, help="seed of the label subset (default: --seed)")
    g.add_argument("--val-labels", choices=("follow", "full"), default="follow",
                   help="labels for model selection: follow (default: the validation split is subsampled with the "
                        "same fraction/shots rule as training, as a user with few labels would have) or full (every "
                        "validation label: the literature's protocol, optimistic)")
    g.add_argument("--positive-class", default=None,
                   help="binary tasks: the clinically positive class (name or index); sensitivity, specificity "
                        "and F1 follow it (MedMNIST default: the clinical one, e.g. malignant, pneumonia; else class 1)")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the split when the data has none (default 0)")
    g.add_argument("--val-ratio", type=float, default=0.15,
                   help="validation share when the data has no split of its own (default 0.15)")
    g.add_argument("--test-ratio", type=float, default=0.15,
                   help="test share when the data has no split of its own (default 0.15)")
    g.add_argument("--group-column", default=None, help="manifest column with patient ids: no patient on two sides")
    g.add_argument("--label-columns", default=None, help="comma-separated 0/1 manifest columns (multi-label task)")
    g.add_argument("--mask-pattern", default="*_mask*", help="files excluded from image folders (default *_mask*)")
    g.add_argument("--split-file", default=None, help="JSON split to reuse (ids per split)")
    g.add_argument("--near-duplicates", choices=("group", "ignore"), default="group",
                   help="automatic splits keep near-duplicate images on one side (group, default) or split them "
                        "like any image (ignore: the naive split, which leaks on data like BUSI)")
    g.add_argument("--near-duplicate-threshold", default="auto",
                   help="perceptual-hash Hamming distance for near-duplicates (bits), or auto (default)")
    g.add_argument("--window", default=None, help="DICOM window CENTER,WIDTH (default: each file's own)")
    g.add_argument("--audit", choices=("warn", "strict", "off"), default="warn",
                   help="data audit before training: warn (default), strict (leakage/duplicates stop the run), off")


def add_run_options(run: argparse.ArgumentParser) -> None:
    """The options of 'medpeft run' (also every step of 'medpeft continual')."""
    run.add_argument("--config", default=None, help="YAML run config (as written to a run's config.yaml); "
                                                    "command-line options given explicitly are not merged")
    add_data_options(run)
    g = run.add_argument_group("model")
    g.add_argument("--backbone", default="efficientnet_lite0",
                   help="registry name (efficientnet_lite0, dinov2_vits14, ...) or any timm model name")
    g.add_argument("--weights", default=None, help="local backbone weights (.safetensors, or .pth loaded weights_only)")
    g.add_argument("--no-pretrained", action="store_true", help="random initialisation (for ablations)")
    g.add_argument("--method", default="lora", help="method name or hybrid like lora+ssf ('medpeft methods' lists them)")
    add_train_options(run)
    run.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for confidence intervals")
    g = run.add_argument_group("applying the model (classification)")
    g.add_argument("--operating-point", default=None, metavar="TARGET",
                   help="binary tasks: a decision threshold chosen on validation for sensitivity=X, specificity=X or "
                        "youden; test sensitivity/specificity/PPV/NPV at it; saved with the adapter, used by predict")
    g.add_argument("--no-calibration", action="store_true",
                   help="skip Platt (binary) / temperature (multi-class) scaling fitted on validation (default: "
                        "fitted, reported before/after and applied by predict)")
    g = run.add_argument_group("shift")
    g.add_argument("--external-test", action="append", default=None, metavar="DATA",
                   help="an external test set (folder, CSV manifest or MedMNIST name of the same task and label "
                        "space; repeatable), evaluated once after the home test by the model chosen on home "
                        "validation: metrics.json 'external'")
    g.add_argument("--align", default=None, metavar="METHOD[,METHOD]",
                   help="also evaluate each external set aligned to the home training images at test time: "
                        "histogram (matching) and/or fda (Fourier amplitude swap); recorded as <name>+<method>")
    g.add_argument("--forgetting", action="store_true",
                   help="measure how far fine-tuning moved the pretrained representation: linear CKA between the "
                        "pretrained and fine-tuned backbone's features on the test images (metrics.json 'forgetting')")
    g.add_argument("--forgetting-probe", default=None, metavar="DATA",
                   help="also a logistic-regression probe on another classification set, with the pretrained and "
                        "the fine-tuned backbone (test AUROC before vs after)")
    g.add_argument("--corruptions", default=None, metavar="SUITE",
                   help="evaluate the test split under a corruption suite (ultrasound, xray, ct_mr, fundus, "
                        "endoscopy, generic; MedMNIST-C's corruptions and severities): every corruption x 5 "
                        "severities, metrics.json 'corruptions'")
    run.add_argument("--out", default=None, help="run folder (default: a new folder under runs/); must be new or "
                                                  "empty unless --overwrite (checked before training)")
    run.add_argument("--overwrite", action="store_true",
                     help="allow --out to be an existing run folder or non-empty folder: its run files are replaced")
    run.add_argument("--quiet", action="store_true", help="no per-epoch progress bar (the final metrics table is still printed)")
    from .tracking import add_tracking_options

    add_tracking_options(run)  # --mlflow URI: not part of the run config
    add_method_options(run)



def add_train_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=30, help="maximum training epochs (default 30)")
    g.add_argument("--steps", type=int, default=None,
                   help="training budget in optimizer steps instead of --epochs (the same number of updates at "
                        "every label fraction)")
    g.add_argument("--select", default="holdout",
                   help="model selection: holdout (early stopping on the validation labels, default) or cv:K "
                        "(K-fold cross-validation inside the labelled training images chooses the epoch, then a "
                        "refit on all of them; no validation labels used)")
    g.add_argument("--bn-stats", choices=("frozen", "update"), default="frozen",
                   help="BatchNorm running statistics while training: frozen (default) or update")
    g.add_argument("--min-steps", type=int, default=0,
                   help="train at least this many optimizer steps (raises the epochs for tiny label fractions)")
    g.add_argument("--batch-size", type=int, default=32, help="training batch size (default 32)")
    g.add_argument("--lr", type=float, default=None, help="learning rate (default: the method's own)")
    g.add_argument("--head-lr", type=float, default=None,
                   help="learning rate of the head / segmentation decoder (default: --lr); one rate for every "
                        "method's decoder makes a segmentation comparison about the encoder")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default 1e-4)")
    g.add_argument("--warmup-epochs", type=float, default=1.0,
                   help="linear warm-up before the cosine decay, in epochs (default 1)")
    g.add_argument("--patience", type=int, default=6, help="early-stopping patience in epochs (default 6)")
    g.add_argument("--monitor", default="auto",
                   help="validation metric for selection: auto (the task's primary: AUROC, Dice), loss, or a metric "
                        "of the task (auroc, acc, balanced_acc, f1, sensitivity, specificity; dice, iou, vs, hd95, "
                        "assd, nsd)")
    g.add_argument("--seg-loss", default="dice_ce", help="segmentation loss: dice_ce (default), dice, ce, dice_focal")
    g.add_argument("--seg-postprocess", default="auto", choices=("auto", "none"),
                   help="segmentation: auto (default) drops small components / keeps the largest when that "
                        "raises validation Dice; none keeps the raw masks")
    g.add_argument("--prompt", default="none", choices=("none", "box"),
                   help="segmentation with litemedsam: none (default: a learned prompt) or box (each image's "
                        "ground-truth bounding box, jittered in training; results are 'prompted', never ranked "
                        "with unprompted ones; predict then needs --boxes)")
    g.add_argument("--nsd-tolerance", type=float, default=2.0,
                   help="segmentation: tolerance of the normalised surface Dice, in pixels (default 2)")
    g.add_argument("--class-weighted", action="store_true", help="inverse-frequency class weights in the loss")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 disables)")
    g.add_argument("--augment", default="auto",
                   help="auto (light, the same for every method) | none | light | medical | geometric | intensity | "
                        "artefact | a list like 'flip,rotation=0.5,speckle'")
    g.add_argument("--augment-strength", type=float, default=1.0, help="scales every augmentation magnitude")
    g.add_argument("--mix", default="none", help="none | mixup | cutmix | mixup+cutmix (soft targets)")
    g.add_argument("--adapt", default="none", choices=("none", "dann"),
                   help="unsupervised domain adaptation: dann (a domain classifier behind gradient reversal on the "
                        "backbone features the method adapts), with --target-unlabelled")
    g.add_argument("--target-unlabelled", default=None, metavar="DIR",
                   help="a folder of unlabelled images of the target domain (another centre) for --adapt dann")
    g.add_argument("--adapt-weight", type=float, default=1.0, help="weight of the DANN domain loss (default 1)")
    g.add_argument("--semi", default="none", choices=("none", "fixmatch", "selftrain"),
                   help="semi-supervised training on the unlabelled rest of the training split (with --fraction or "
                        "--shots): fixmatch (confident weak-view pseudo-labels supervise a strong view) or selftrain "
                        "(pseudo-label rounds, a fresh model each round)")
    g.add_argument("--semi-rounds", type=int, default=1, help="selftrain: pseudo-label rounds (1)")
    g.add_argument("--semi-threshold", type=float, default=0.95, help="FixMatch's confidence threshold (0.95)")
    g.add_argument("--semi-ratio", type=int, default=1, help="unlabelled images per labelled image in a step (1)")
    g.add_argument("--strategy", default="plain", choices=("plain", "gce", "cufit"),
                   help="noise-robust training (classification): plain cross-entropy, gce (generalized CE), or "
                        "cufit (curriculum: linear probe -> intermediate -> last module, each on the samples the "
                        "previous one agrees with)")
    g.add_argument("--cache-features", default="auto",
                   help="auto | on | off: compute the frozen front of the network once per split (linear probing: "
                        "the features; partial: the frozen blocks' output); needs --augment none")
    g.add_argument("--compile", action="store_true", help="torch.compile the trained network (slower first steps)")
    g.add_argument("--channels-last", default="auto", choices=("auto", "on", "off"),
                   help="NHWC activations (auto: CNNs on any device, every model on a GPU)")
    g.add_argument("--no-fused-adamw", action="store_true", help="the foreach AdamW instead of the fused kernel")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    g.add_argument("--no-amp", action="store_true", help="disable bf16 autocast on the GPU")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    g.add_argument("--max-minutes", type=float, default=None, help="stop training after this many minutes")
    g.add_argument("--seed", type=int, default=0,
                   help="training seed, also the label-subset seed unless --subset-seed is given (default 0)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="medpeft", description=(
        "Which way of fine-tuning a pretrained model works best on my medical images, at what cost?"))
    parser.add_argument("--version", action="version", version=f"medpeft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train one method on one data set and evaluate it once on test",
                         description="Train, early-stop on validation, evaluate the best state once on test, "
                                     "write a run folder (config.yaml, metrics.json, history.csv, adapter.safetensors).")
    add_run_options(run)
    continual = sub.add_parser(
        "continual", help="fine-tune one method on a sequence of data sets; every task re-tested after each step",
        description="Continual fine-tuning (medpeft/continual.py): site-incremental (one head, the same label "
                    "space; --replay N rehearses N images per earlier task) or task-incremental (one head per task, "
                    "the adapted backbone shared). Writes continual.json: the accuracy matrix, average, backward "
                    "and forward transfer. Every 'medpeft run' option applies to each step (--data is replaced by "
                    "the sequence).")
    continual.add_argument("--sequence", required=True, help="comma-separated data sets, in training order")
    continual.add_argument("--mode", choices=("site", "task"), default="site",
                           help="site: one head for all (same label space); task: one head per task (classification)")
    continual.add_argument("--replay", type=int, default=0, help="site mode: training images kept per earlier task")
    add_run_options(continual)
    COMMANDS["continual"] = cmd_continual
    winner = sub.add_parser(
        "winner", help="which method won a sweep (on validation), and train / export it",
        description="Choose each cell's winner of a 'medpeft benchmark' sweep on validation only (ties within the "
                    "margin go to the fewest trainable parameters, then the fastest), print the ranking with the "
                    "test scores marked as not used, and with --train retrain the winner from the sweep's stored "
                    "configuration into a normal run folder (same seed, same numbers).")
    winner.add_argument("sweep", help="the sweep's --out folder (holding results.db)")
    winner.add_argument("--tie", type=float, default=None,
                        help="validation means within this of the best are tied (default: the experiment's margin)")
    winner.add_argument("--max-trainable", type=float, default=None, metavar="PERCENT",
                        help="only methods training at most this %% of the model's parameters")
    winner.add_argument("--cell", default=None, metavar="DATA,BACKBONE,FRACTION",
                        help="with --train: which cell's winner (needed when the sweep has several)")
    winner.add_argument("--train", action="store_true", help="retrain the winner into --out")
    winner.add_argument("--out", default=None, help="run folder of the retrained winner")
    winner.add_argument("--overwrite", action="store_true", help="allow --out to be an existing run folder")
    winner.add_argument("--seed", type=int, default=None, help="which of the winner's seeds (default: the first)")
    winner.add_argument("--data-root", default=None,
                        help="with --train: the folder holding the sweep's data when it was given as an absolute "
                             "path (sweeps never record absolute paths)")
    winner.add_argument("--operating-point", default=None, metavar="TARGET",
                        help="binary: a decision threshold chosen on validation (sensitivity=0.95, ...)")
    winner.add_argument("--export", choices=("onnx", "safetensors"), default=None,
                        help="also export the trained winner (OUT/model.onnx or OUT/merged.safetensors)")
    winner.add_argument("--card", action="store_true", help="also write OUT/MODEL_CARD.md")
    winner.add_argument("--json", action="store_true", help="print the choice as JSON")
    COMMANDS["winner"] = cmd_winner
    pre = sub.add_parser(
        "pretrain", help="continue self-supervised pre-training of a backbone on unlabelled images",
        description="MAE (ViTs: masked patches, the encoder sees only the visible ones) or SimCLR (CNNs and ViTs) on "
                    "a data source's training split (labels ignored) or a folder of images; resumable; writes a "
                    "safetensors file that 'medpeft run --weights' loads (medpeft/pretrain.py).")
    pre.add_argument("--data", required=True, help="a data source (its training split) or a folder of images")
    pre.add_argument("--data-root", default=None, help="data root (MedMNIST: default $MEDPEFT_DATA)")
    pre.add_argument("--backbone", default="dinov2_vits14", help="the backbone to pre-train (registry name)")
    pre.add_argument("--ssl", choices=("mae", "simclr"), default="mae", help="mae (ViTs) or simclr (any backbone)")
    pre.add_argument("--image-size", type=int, default=112, help="square input size in pixels (112)")
    pre.add_argument("--steps", type=int, default=200, help="optimizer steps (200)")
    pre.add_argument("--batch-size", type=int, default=32, help="images per step (32)")
    pre.add_argument("--lr", type=float, default=1.5e-4, help="peak learning rate, cosine schedule (1.5e-4)")
    pre.add_argument("--mask-ratio", type=float, default=0.75, help="MAE: fraction of patches masked (0.75)")
    pre.add_argument("--seed", type=int, default=0, help="seed of the batches, masks, views and heads")
    pre.add_argument("--method", default="full",
                     help="parameter-efficient pre-training: only this (mergeable) method's parameters move, merged "
                          "into the weights written (lora, bitfit, norm, ...); default full")
    pre.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (OUT.ckpt)")
    pre.add_argument("--monitor-every", type=int, default=0,
                     help="steps between k-NN validation accuracies (labelled sources; 0: never)")
    pre.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    pre.add_argument("--resume", action="store_true", help="continue from OUT.ckpt")
    pre.add_argument("--out", required=True, help="output .safetensors file")
    COMMANDS["pretrain"] = cmd_pretrain
    gen = sub.add_parser("generator", help="a diffusion generator (class-conditional, or Stable Diffusion "
                                           "text-to-image): pretrain, adapt with a PEFT method, sample, evaluate")
    gsub = gen.add_subparsers(dest="generator_command", required=True,
                              help="pretrain, adapt, sample, eval or tiny-sd")
    g = gsub.add_parser("pretrain", help="train the generator on a (large) source data set")
    g.add_argument("--data", required=True, help="a classification data source (MedMNIST name, folder, manifest)")
    g.add_argument("--data-root", default=None, help="data root (MedMNIST: default $MEDPEFT_DATA)")
    g.add_argument("--image-size", type=int, default=32, help="generated image size, a multiple of 4 (32)")
    g.add_argument("--steps", type=int, default=2000, help="training steps (2000)")
    g.add_argument("--batch-size", type=int, default=32, help="images per step (32)")
    g.add_argument("--lr", type=float, default=2e-4, help="learning rate (2e-4)")
    g.add_argument("--seed", type=int, default=0, help="seed of batches, noise and sampling")
    g.add_argument("--out", required=True, help="generator folder")
    g = gsub.add_parser("adapt", help="adapt a pre-trained generator or Stable Diffusion to a target with a method")
    g.add_argument("base", help="a generator folder (ignored by --method scratch), or a Stable Diffusion folder "
                                "(model_index.json) or Hub id: text-to-image")
    g.add_argument("--data", required=True, help="a classification data source (MedMNIST name, folder, manifest)")
    g.add_argument("--data-root", default=None, help="data root (MedMNIST: default $MEDPEFT_DATA)")
    g.add_argument("--method", default="lora", choices=("full", "bitfit", "norm", "lora", "dora", "scratch"),
                   help="how the generator adapts (scratch: no pre-training, the baseline; not for Stable Diffusion)")
    g.add_argument("--rank", type=int, default=8, help="LoRA / DoRA rank")
    g.add_argument("--fraction", type=float, default=None, help="label fraction of the target's training split")
    g.add_argument("--steps", type=int, default=500, help="training steps (500)")
    g.add_argument("--batch-size", type=int, default=32, help="images per step (32)")
    g.add_argument("--lr", type=float, default=1e-4, help="learning rate (1e-4)")
    g.add_argument("--seed", type=int, default=0, help="seed of batches, noise and sampling")
    g.add_argument("--prompt", default=None,
                   help="text-to-image: the prompt template, {label} = class name (default 'a medical image of "
                        "{label}')")
    g.add_argument("--image-size", type=int, default=None,
                   help="text-to-image: training and sample size, a multiple of the VAE x UNet downsampling (64)")
    g.add_argument("--out", required=True, help="generator folder")
    g = gsub.add_parser("sample", help="write samples of each class (or --classes) and a manifest (path,label)")
    g.add_argument("generator", help="a generator folder")
    g.add_argument("--per-class", type=int, default=100, help="images generated per class (100)")
    g.add_argument("--classes", default=None, help="only these classes: NAME,NAME,... (default: all)")
    g.add_argument("--seed", type=int, default=0, help="seed of batches, noise and sampling")
    g.add_argument("--guidance", type=float, default=None,
                   help="text-to-image: classifier-free guidance scale (1: none, the default)")
    g.add_argument("--base", default=None,
                   help="text-to-image: the Stable Diffusion folder, when its path was not recorded")
    g.add_argument("--out", required=True, help="folder of PNGs and manifest.csv")
    g = gsub.add_parser("eval", help="FD-DINOv2, KID, precision/recall and memorisation against the target")
    g.add_argument("generator", help="a generator folder")
    g.add_argument("--data", required=True, help="a classification data source (MedMNIST name, folder, manifest)")
    g.add_argument("--data-root", default=None, help="data root (MedMNIST: default $MEDPEFT_DATA)")
    g.add_argument("--per-class", type=int, default=100, help="images generated per class (100)")
    g.add_argument("--seed", type=int, default=0, help="seed of batches, noise and sampling")
    g.add_argument("--guidance", type=float, default=None,
                   help="text-to-image: classifier-free guidance scale (1: none, the default)")
    g.add_argument("--base", default=None,
                   help="text-to-image: the Stable Diffusion folder, when its path was not recorded")
    g = gsub.add_parser("tiny-sd", help="write a tiny random Stable Diffusion folder: an offline smoke test of "
                                        "the text-to-image path, not a real generator")
    g.add_argument("out", help="folder to write (model_index.json, unet/, vae/, text_encoder/, tokenizer/)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    g = gsub.add_parser("report", help="the study's tables: each generator's FD / KID / precision / recall / "
                                       "memorisation / cost, and classifiers with synthetic images vs real only")
    g.add_argument("folder", help="a folder of generator folders and 'medpeft run' folders (results/synthetic/run.sh)")
    g.add_argument("--metric", default="auroc", help="the classifiers' test metric (auroc)")
    g.add_argument("--margin", type=float, default=0.02, help="equivalence margin of the TOST (0.02)")
    COMMANDS["generator"] = cmd_generator

    methods = sub.add_parser("methods", help="list every method, the backbones it applies to and its trainable %%")
    methods.add_argument("--backbone", default=None, help="count trainable parameters on this backbone")
    methods.add_argument("--image-size", type=int, default=None,
                         help="input size the counts are made at (default: the backbone's own)")
    methods.add_argument("--num-classes", type=int, default=2, help="classes of the head counted (default 2)")
    methods.add_argument("--json", action="store_true", help="print JSON instead of a table")

    predict = sub.add_parser("predict", help="apply a trained run to image files")
    predict.add_argument("run", help="run folder written by 'medpeft run' (or its adapter.safetensors)")
    predict.add_argument("images", nargs="+", help="image files (png, jpg, dcm, ...)")
    predict.add_argument("--merge", action="store_true", help="merge the adapter into the backbone first")
    predict.add_argument("--weights", default=None, help="backbone weights file, if the run used one")
    predict.add_argument("--out", default=None,
                         help="classification: CSV file for the predictions (default: print); segmentation: folder "
                              "for a mask PNG and an overlay per image (required)")
    predict.add_argument("--window", default=None, help="DICOM window CENTER,WIDTH (default: each file's own)")
    predict.add_argument("--uncalibrated", action="store_true",
                         help="show the model's raw probabilities instead of the calibrated ones (the decision at an "
                              "operating point is still made on the probabilities its threshold was chosen on)")
    predict.add_argument("--boxes", default=None, metavar="CSV",
                         help="box prompts for a run trained with --prompt box: CSV path,x0,y0,x1,y1 in each image's "
                              "own pixels (an image without a row gets the default prompt)")

    export = sub.add_parser("export", help="write a trained run as ONNX (model.onnx, checked with onnxruntime) or as "
                                           "a merged, plain timm state dict (merged.safetensors)")
    export.add_argument("run", help="run folder written by 'medpeft run' (or its adapter.safetensors)")
    export.add_argument("out", help="output file: .onnx (merged model + preprocessing metadata, parity-checked) or "
                                    ".safetensors (merged state dict); never replaced without --overwrite")
    export.add_argument("--weights", default=None, help="backbone weights file, if the run used one")
    from .onnx_export import add_export_options

    add_export_options(export)
    from .explain import add_explain_parser, cmd_explain

    add_explain_parser(sub)
    COMMANDS["explain"] = cmd_explain
    from .audit import add_audit_parser, cmd_audit

    add_audit_parser(sub)
    COMMANDS["audit"] = cmd_audit
    from .calibration_cli import add_calibrate_parser, cmd_calibrate

    add_calibrate_parser(sub)
    COMMANDS["calibrate"] = cmd_calibrate
    from .card import add_card_parser, cmd_card

    add_card_parser(sub)
    COMMANDS["card"] = cmd_card
    from .bench.cli import add_benchmark_parsers  # benchmark + report

    COMMANDS.update(add_benchmark_parsers(sub))
    return parser


def run_config_from_args(args) -> "RunConfig":
    import yaml

    from .data.base import DataConfig
    from .run import RunConfig
    from .train import TrainConfig

    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        return RunConfig.from_dict(data)
    data = DataConfig(
        name=args.data, root=args.data_root, medmnist_size=args.medmnist_size,
        image_size=args.image_size,  # None: RunConfig fits the default size to the backbone
        fraction=args.fraction, shots=args.shots,
        subset_seed=args.seed if args.subset_seed is None else args.subset_seed, split_seed=args.split_seed,
        val_ratio=args.val_ratio, test_ratio=args.test_ratio, mask_pattern=args.mask_pattern,
        group_column=args.group_column,
        label_columns=args.label_columns.split(",") if args.label_columns else None, split_file=args.split_file,
        near_duplicates=args.near_duplicates, dicom_window=args.window, audit=args.audit,
        val_labels=args.val_labels, positive_class=args.positive_class, task=args.task,
        boxes=args.box_file, box_min_size=args.box_min_size, label_noise=args.label_noise,
        clean_validation=args.clean_validation, noise_seed=args.seed if args.label_noise else None,
        synthetic=args.synthetic, synthetic_only=args.synthetic_only,
        mask_classes=args.mask_classes.split(",") if args.mask_classes else None,
        near_duplicate_threshold=(int(args.near_duplicate_threshold) if str(args.near_duplicate_threshold).isdigit()
                                  else args.near_duplicate_threshold),
    )
    train = TrainConfig(
        epochs=args.epochs, steps=args.steps, select=args.select, min_steps=args.min_steps, bn_stats=args.bn_stats, batch_size=args.batch_size, lr=args.lr, head_lr=args.head_lr, weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs, patience=args.patience, monitor=args.monitor, seg_loss=args.seg_loss, seg_postprocess=args.seg_postprocess, prompt=args.prompt,
        nsd_tolerance=args.nsd_tolerance,
        class_weighted=args.class_weighted, grad_clip=args.grad_clip or None, augment=args.augment,
        augment_strength=args.augment_strength, mix=args.mix, adapt=args.adapt,
        target_unlabelled=args.target_unlabelled, adapt_weight=args.adapt_weight, strategy=args.strategy,
        semi=args.semi, semi_threshold=args.semi_threshold, semi_ratio=args.semi_ratio, semi_rounds=args.semi_rounds,
        cache_features=args.cache_features, device=args.device, amp=not args.no_amp, seed=args.seed,
        threads=args.threads, max_minutes=args.max_minutes, compile=args.compile,
        channels_last=args.channels_last, fused_adamw=not args.no_fused_adamw,
    )
    from .methods import parse_method

    names = parse_method(args.method)
    check_method_options(args, names)
    options = {k: v for k, v in vars(args).items()
               if v is not None and any(k.startswith(n + "_") for n in names)}
    return RunConfig(data=data, train=train, backbone=args.backbone, weights=args.weights,
                     pretrained=not args.no_pretrained, method=args.method, method_options=options,
                     n_boot=args.n_boot, calibration="off" if args.no_calibration else "auto",
                     operating_point=args.operating_point, external_test=list(args.external_test or []),
                     corruptions=args.corruptions, align=args.align or [], forgetting=args.forgetting,
                     forgetting_probe=args.forgetting_probe)


def check_method_options(args, names: list[str]) -> None:
    """A ``--<method>-<option>`` given for a method that ``--method`` does not use is an error
    (it would be silently ignored)."""
    from .methods import get_method, list_methods

    for name in list_methods():
        if name in names:
            continue
        for f in dataclasses.fields(get_method(name).config_cls):
            if getattr(args, f"{name}_{f.name}", None) is not None:
                flag = f"--{name}-{f.name}".replace("_", "-")
                raise ConfigError(f"{flag} is an option of method {name!r}, but --method {args.method} uses "
                                  f"{', '.join(repr(n) for n in names)}; drop {flag} or choose a method that uses it")


def cmd_run(args) -> int:
    from .report_console import print_run_summary, progress_printer
    from .run import execute
    from .tracking import spec_from_args

    cfg = run_config_from_args(args)
    if args.out is not None:  # before any data is read or any step trained
        from .run import check_out_dir

        check_out_dir(args.out, overwrite=args.overwrite)
    tracking = spec_from_args(args)  # None unless --mlflow; checked before training
    with progress_printer(cfg.train.epochs, quiet=args.quiet) as progress:
        metrics = execute(cfg, out_dir=args.out, progress=progress, tracking=tracking)
    print_run_summary(metrics)
    return 0


def cmd_continual(args) -> int:
    import json

    from .continual import run_continual
    from .report_console import progress_printer

    sequence = [part.strip() for part in args.sequence.split(",") if part.strip()]
    args.data = sequence[0] if sequence else args.data
    cfg = run_config_from_args(args)
    if args.out is not None:
        from .run import check_out_dir

        check_out_dir(args.out, overwrite=args.overwrite)
    with progress_printer(cfg.train.epochs, quiet=args.quiet) as progress:
        record = run_continual(cfg, sequence, mode=args.mode, replay=args.replay, out=args.out, progress=progress)
    print(json.dumps({k: record[k] for k in ("mode", "method", "metric", "matrix_rows", "matrix", "average", "bwt",
                                             "fwt")}, indent=1))
    return 0


def cmd_winner(args) -> int:
    import json

    from .winner import describe, train_winner, winners

    if args.train and not args.out:
        raise ConfigError("--train needs --out DIR for the winner's run folder")
    if (args.export or args.card or args.operating_point) and not args.train:
        raise ConfigError("--export, --card and --operating-point apply to the trained winner: add --train --out DIR")
    result = winners(args.sweep, tie=args.tie, max_trainable=args.max_trainable)
    if args.json:
        slim = {**result, "cells": [{**c, "winner": (c["winner"] or {}).get("method"),
                                     "ranking": [{k: v for k, v in e.items() if k != "runs"} for e in c["ranking"]]}
                                    for c in result["cells"]]}
        print(json.dumps(slim, indent=1, default=str))
    else:
        print(describe(result))
    if not args.train:
        return 0
    cells = result["cells"]
    if args.cell:
        parts = [p.strip() for p in args.cell.split(",")]
        cells = [c for c in cells if len(parts) == 3 and c["backbone"] == parts[1] and f"{c['fraction']:g}" ==
                 f"{float(parts[2]):g}" and (c["data"] == parts[0] or c["data"].rstrip("/").endswith(parts[0]))]
    if len(cells) != 1:
        options = "; ".join(f"{c['data']},{c['backbone']},{c['fraction']:g}" for c in result["cells"])
        raise ConfigError(f"--train needs one cell: give --cell DATA,BACKBONE,FRACTION (one of: {options})")
    metrics = train_winner(args.sweep, cells[0], args.out, seed=args.seed, operating_point=args.operating_point,
                           overwrite=args.overwrite, data_root=args.data_root)
    from pathlib import Path

    out = Path(args.out)
    print(f"trained the winner into {out}")
    if args.export:
        from .onnx_export import export_onnx, export_safetensors

        if args.export == "onnx":
            report = export_onnx(out, out / "model.onnx")
            print(f"exported {out / 'model.onnx'} (parity max |diff| {report.get('max_abs_diff')})")
        else:
            print(export_safetensors(out, out / "merged.safetensors"))
    if args.card:
        from .card import CARD_FILE, build_card

        (out / CARD_FILE).write_text(build_card(out))
        print(f"wrote {out / CARD_FILE}")
    return 0 if metrics else 1


def cmd_pretrain(args) -> int:
    from .pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(data=args.data, backbone=args.backbone, ssl=args.ssl, image_size=args.image_size,
                         steps=args.steps, batch_size=args.batch_size, lr=args.lr, mask_ratio=args.mask_ratio,
                         seed=args.seed, data_root=args.data_root, checkpoint_every=args.checkpoint_every,
                         monitor_every=args.monitor_every, threads=args.threads, method=args.method)
    summary = pretrain(cfg, args.out, resume=args.resume)
    print(f"wrote {summary['out']} ({summary['steps']} steps of {cfg.ssl} on {summary['n_images']} images, "
          f"final loss {summary['final_loss']:.4f})")
    return 0


def cmd_generator(args) -> int:
    import json

    from . import generator

    if args.generator_command == "pretrain":
        meta = generator.run_pretrain(args.data, args.out, args.image_size, args.steps, args.batch_size, args.lr,
                                      args.seed, args.data_root)
        print(f"wrote {args.out} ({meta['steps']} steps on {meta['n_train']} images)")
    elif args.generator_command == "adapt":
        meta = generator.run_adapt(args.base, args.data, args.out, args.method, args.fraction, args.steps,
                                   args.batch_size, args.lr, args.rank, args.seed, args.data_root,
                                   prompt=args.prompt, image_size=args.image_size)
        print(f"wrote {args.out} ({args.method}: {meta['trainable']:,} of {meta['total']:,} parameters trained)")
    elif args.generator_command == "sample":
        manifest = generator.run_sample(args.generator, args.out, args.per_class, args.seed, args.classes,
                                        args.guidance, args.base)
        print(f"wrote {manifest}")
    elif args.generator_command == "report":
        from .gen_report import write_report

        print(f"wrote {write_report(args.folder, args.metric, args.margin)}")
    elif args.generator_command == "tiny-sd":
        from .text2image import make_tiny_pipeline

        print(f"wrote {make_tiny_pipeline(args.out, args.seed)} (a tiny random Stable Diffusion: a smoke test only)")
    else:
        print(json.dumps(generator.run_eval(args.generator, args.data, args.per_class, args.seed, args.data_root,
                                            guidance=args.guidance, base=args.base), indent=1))
    return 0


def cmd_methods(args) -> int:
    from .report_console import methods_table

    if args.num_classes < 1:
        raise ConfigError(f"--num-classes {args.num_classes}: expected a number of classes >= 1")
    methods_table(args.backbone, args.image_size, args.num_classes, as_json=args.json)
    return 0


def cmd_predict(args) -> int:
    import torch

    from .data.base import ImageSet
    from .data.io import load_images
    from .run import load_run
    from .tasks import get_task
    from .train import predict_images

    loaded = load_run(args.run, weights=args.weights, merge=args.merge)
    prompted = loaded.metadata.get("prompt", "none") == "box"
    if prompted != (args.boxes is not None):
        raise ConfigError(f"{args.run} was trained with box prompts: give --boxes CSV (path,x0,y0,x1,y1)" if prompted
                          else f"--boxes: {args.run} was trained without prompts; its model takes no boxes")
    stacked = load_images(args.images, loaded.image_size, args.window)  # same decoding/resizing as training
    images = ImageSet(stacked, torch.zeros(len(args.images), dtype=torch.long), list(args.images))
    kind = loaded.task
    boxes = read_boxes(args.boxes, args.images, loaded.image_size) if prompted else None
    predictions = predict_images(loaded.model, images, loaded.mean, loaded.std, kind, len(loaded.class_names),
                                 boxes=boxes)
    extra = None
    if kind in ("binary", "multiclass"):  # the run's calibration map and operating point, if any
        from .calibration import apply_for_predict, predict_note, predict_settings

        calibration, point, source = predict_settings(args.run, loaded.metadata)
        predictions, extra = apply_for_predict(predictions, calibration, point, loaded.class_names, args.uncalibrated)
        print(f"medpeft predict: {predict_note(calibration, point, source, args.uncalibrated)}", file=sys.stderr)
    task = get_task(kind)
    settings = {"extra": extra} if extra is not None else task.predict_settings(loaded.metadata, loaded.image_size)
    print(task.write_user_predictions(list(args.images), predictions, loaded.class_names, kind, args.out, **settings))
    return 0


def read_boxes(path: str, images: list[str], size: int):
    """[N, 4] boxes (x0, y0, x1, y1) in pixels of the ``size`` model input from a CSV path,x0,y0,x1,y1 in
    each image's own pixels; NaN rows for images the file does not name."""
    import csv

    import torch

    from .data.io import read_image

    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as err:
        raise ConfigError(f"--boxes {path}: cannot read it ({err.strerror})") from None
    columns = ("path", "x0", "y0", "x1", "y1")
    if not rows or any(c not in rows[0] for c in columns):
        raise ConfigError(f"--boxes {path}: expected a header {','.join(columns)} and one row per image")
    table = {}
    for line, row in enumerate(rows, start=2):
        try:
            box = [float(row[c]) for c in columns[1:]]
        except (TypeError, ValueError):
            raise ConfigError(f"--boxes {path}, line {line}: x0,y0,x1,y1 must be numbers, got "
                              f"{[row.get(c) for c in columns[1:]]}") from None
        if not (box[0] <= box[2] and box[1] <= box[3]) or min(box) < 0:
            raise ConfigError(f"--boxes {path}, line {line}: box {box} is not x0 <= x1, y0 <= y1 in pixels >= 0")
        table[os.path.normpath(row["path"])] = box
    stray = sorted(set(table) - {os.path.normpath(p) for p in images})
    if stray:
        raise ConfigError(f"--boxes {path}: {len(stray)} row(s) name no image given, e.g. {stray[0]!r}")
    out = torch.full((len(images), 4), float("nan"))
    for i, image in enumerate(images):
        box = table.get(os.path.normpath(image))
        if box is not None:
            height, width = read_image(image).shape[:2]
            out[i] = torch.tensor(box) * torch.tensor([size / width, size / height] * 2)
    return out


def cmd_export(args) -> int:
    from .onnx_export import cmd_export as export  # .onnx or .safetensors; checks the output location first

    return export(args)


COMMANDS = {"run": cmd_run, "methods": cmd_methods, "predict": cmd_predict, "export": cmd_export}


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except MedpeftError as err:
        print(f"medpeft {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
