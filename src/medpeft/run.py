"""One fine-tuning run end to end, and loading a finished run back for inference.

A run folder holds:
  config.yaml         the resolved configuration (everything needed to repeat the run)
  metrics.json        validation and test metrics with bootstrap CIs, parameter counts, time, memory
  history.csv         one row per epoch
  adapter.safetensors what training changed (method parameters + head + trained norm statistics),
                      with the backbone/method/config in its metadata so it loads onto a fresh backbone
  test_predictions.csv  id, label and class probabilities of each test image (for paired re-analysis)
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import resource
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import yaml

from . import __version__
from .backbones import backbone_info, check_image_size, default_image_size, resolution_warning
from .data import load_data, save_split
from .data.base import DataBundle, DataConfig
from .errors import ConfigError, DataError
from .methods import (apply_methods, build_configs, config_to_dict, count_parameters,
                      get_method, load_trained_state, parse_method, trained_state_dict)
from .tasks import get_task
from .train import TrainConfig, cv_folds, plan_epochs, resolve_device, seed_everything, task_options, train_model

ADAPTER_FILE = "adapter.safetensors"
SPLIT_FILE = "split.json"


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    backbone: str = "efficientnet_lite0"
    weights: str | None = None  # explicit local weights file for the backbone
    pretrained: bool = True
    method: str = "lora"  # a method name or a hybrid "lora+ssf"
    method_options: dict = field(default_factory=dict)  # {"lora_rank": 8, ...}
    n_boot: int = 1000  # bootstrap resamples for the CIs
    # classification: auto (Platt / temperature scaling fitted on validation, see calibration.py) | off
    calibration: str = "auto"
    operating_point: str | None = None  # binary: "sensitivity=0.95" | "specificity=0.9" | "youden"
    # data sources evaluated once after the home test by the model chosen on home validation
    # (same task and label space; data/external.py)
    external_test: list = field(default_factory=list)
    # a corruption suite (corruptions.SUITES: ultrasound, xray, ct_mr, fundus, endoscopy, generic)
    # applied to the test images after the clean test: every corruption x 5 severities
    corruptions: str | None = None
    # training-free style alignment of each external set to the home training images (align.py):
    # each listed method adds an aligned evaluation "<name>+<method>" beside the raw one
    align: list = field(default_factory=list)
    # how far fine-tuning moved the pretrained representation (forgetting.py): linear CKA on the test
    # images, and with forgetting_probe a linear probe on another classification set, before vs after
    forgetting: bool = False
    forgetting_probe: str | None = None

    def __post_init__(self):
        if self.data.image_size is None:  # the default size, fitted to the backbone's patch grid
            self.data.image_size = default_image_size(self.backbone)
        from .calibration import parse_operating_point

        if self.calibration not in ("auto", "off"):
            raise ConfigError(f"calibration {self.calibration!r} is not one of auto, off")
        parse_operating_point(self.operating_point)  # ConfigError for a malformed target
        if isinstance(self.external_test, str):
            self.external_test = [self.external_test]
        if not isinstance(self.external_test, list) or not all(isinstance(s, str) and s for s in self.external_test):
            raise ConfigError(f"external_test {self.external_test!r}: expected a list of data sources (folders, CSV "
                              "manifests, MedMNIST names)")
        if isinstance(self.align, str):
            self.align = [a.strip() for a in self.align.split(",") if a.strip()]
        from .align import ALIGNMENTS

        unknown = [a for a in self.align if a not in ALIGNMENTS]
        if unknown:
            raise ConfigError(f"align {unknown[0]!r} is not one of {', '.join(ALIGNMENTS)}")
        if self.align and not self.external_test:
            raise ConfigError("align aligns external test sets to the home training images: give --external-test too")
        if self.corruptions is not None:
            from .corruptions import get_suite

            get_suite(self.corruptions)  # ConfigError naming the suites

    # options added after sweeps were stored: left out at their defaults, so the results-store keys
    # of sweeps started before they existed stay valid (a resumed sweep reruns nothing)
    LATER_OPTIONS = ((None, "calibration", "auto"), (None, "operating_point", None), (None, "external_test", []),
                     (None, "corruptions", None), (None, "align", []), (None, "forgetting", False),
                     (None, "forgetting_probe", None), ("train", "adapt", "none"),
                     ("train", "target_unlabelled", None), ("train", "adapt_weight", 1.0), ("train", "strategy", "plain"),
                     ("train", "semi", "none"), ("train", "semi_threshold", 0.95), ("train", "semi_weight", 1.0),
                     ("train", "semi_ratio", 1), ("train", "semi_rounds", 1),
                     ("data", "boxes", None), ("data", "box_min_size", 10), ("data", "label_noise", None),
                     ("data", "clean_validation", False), ("data", "noise_seed", None), ("data", "synthetic", None),
                     ("data", "synthetic_only", False))

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for section, name, default in self.LATER_OPTIONS:
            holder = out if section is None else out[section]
            if holder.get(name, default) == default:
                holder.pop(name, None)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"a run config must be a mapping of keys (data:, train:, backbone:, method:, ...), "
                              f"got a {type(data).__name__}")
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown run config keys {unknown}; expected some of {sorted(known)}")
        data_values = {"image_size": None, **(data.pop("data", {}) or {})}  # None: resolved by __post_init__
        data_cfg = _dataclass_from(DataConfig, data_values, "data")
        train_cfg = _dataclass_from(TrainConfig, data.pop("train", {}) or {}, "train")
        return cls(data=data_cfg, train=train_cfg, **data)


def _dataclass_from(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"'{where}' must be a mapping of keys, got {values!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown keys in '{where}': {unknown}; expected some of {sorted(known)}")
    return cls(**values)


def build_model(backbone: str, num_classes: int, image_size: int, method: str, method_options: dict,
                weights: str | None = None, pretrained: bool = True, in_chans: int = 3, head_seed: int = 0,
                task: str = "classification"):
    """Backbone + the task's head/decoder + methods applied to the backbone; returns (model,
    backbone info, method names, method configs).

    ``head_seed`` (the run seed) initialises the new head or decoder: seeds must vary it, since
    head initialisation alone moved test AUROC by 0.07 on BreastMNIST.
    """
    names = parse_method(method)
    configs = build_configs(names, method_options)
    plugin = get_task(task)
    # The base model is created under a fixed, forked RNG: random-weight backbones are then identical
    # in every process, and the caller's RNG stream is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, info = plugin.build_model(backbone, num_classes, image_size, in_chans=in_chans, weights=weights,
                                         pretrained=pretrained)
    # The head is initialised afterwards from its own seed: creating the backbone may or may not
    # convert weights (cold or warm cache), and nothing it does may shift the head.
    init_head(model, head_seed)
    check_image_size(info, image_size)
    apply_methods(plugin.methods_target(model), names, configs, info.family)
    for param in model.get_classifier().parameters():  # the head / decoder is always trained
        param.requires_grad_(True)
    plugin.finish_model(model)
    return model, info, names, configs


def init_head(model: torch.nn.Module, seed: int) -> None:
    """Re-initialise the classifier's parameters from ``seed`` alone (default init of each layer);
    a model whose head is partly pretrained (SAM's mask decoder) re-initialises its fresh parts."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        if hasattr(model, "reset_head"):
            model.reset_head()
            return
        for module in model.get_classifier().modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()


def audit_before_training(bundle: DataBundle, data_cfg: DataConfig) -> dict | None:
    """Duplicates / near-duplicates across splits or classes: a warning, or an error with --audit strict."""
    if data_cfg.audit == "off":
        return None
    from .audit import audit_dataset

    report = audit_dataset(bundle, threshold=data_cfg.near_duplicate_threshold)
    problems = report.problems()
    if problems:
        message = (f"data audit of {bundle.name}: " + "; ".join(problems)
                   + f" (see 'medpeft audit {data_cfg.name}' for the files)")
        if data_cfg.audit == "strict":
            raise DataError(message + "; stopped because the audit is strict")
        warnings.warn(message, stacklevel=2)
    return {**report.counts, "problems": problems}


def default_out_dir(cfg: RunConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{Path(cfg.data.name).name}-{cfg.backbone}-{cfg.method}-s{cfg.train.seed}"


def check_out_dir(out: str | Path, overwrite: bool = False) -> None:
    """Before any training: ``out`` must be a folder medpeft can create or write, and - unless
    ``overwrite`` - new or empty, so a finished run (or anything else) is never overwritten."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; the run folder must be a folder (new or empty)")
    if out.is_dir():
        found = sorted(p.name for p in out.iterdir())
        if found and not overwrite:
            what = "a run folder" if (out / ADAPTER_FILE).exists() or (out / "metrics.json").exists() else \
                "a folder that is not empty"
            raise ConfigError(f"--out {out} is {what} ({len(found)} entries, e.g. {', '.join(found[:3])}); "
                              "choose a new folder, or give --overwrite to replace its run files")
        if not os.access(out, os.W_OK | os.X_OK):
            raise ConfigError(f"--out {out}: the folder is not writable")
        return
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"--out {out}: {parent} is a file, so the run folder cannot be created under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: cannot create it, {parent} is not writable")


def peak_memory_mb(device: torch.device) -> dict:
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def execute(cfg: RunConfig, out_dir: str | Path | None = None, bundle: DataBundle | None = None,
            progress=None, save: bool = True, evaluate_test: bool = True, tracking: dict | None = None) -> dict:
    """Run one configuration; returns the metrics dict (also written to ``out_dir``).

    ``evaluate_test=False`` (HPO trials, model selection) never reads the test split:
    ``metrics["test"]`` and ``metrics["n_test"]`` are None. ``tracking`` (``tracking.spec``, from
    ``--mlflow``): log the run to MLflow; it is not part of ``cfg``.
    """
    if tracking:
        from .tracking import tracked_execute

        return tracked_execute(execute, tracking, cfg, out_dir=out_dir, bundle=bundle, progress=progress, save=save,
                               evaluate_test=evaluate_test)
    started = time.perf_counter()
    from .data.privacy import check_weights_recorded, public_text

    check_weights_recorded(cfg.weights)  # a config.yaml run again: its weights path is not recorded
    info = backbone_info(cfg.backbone)
    check_image_size(info, cfg.data.image_size)  # fail before loading any data
    coarse = resolution_warning(info, cfg.data.image_size)
    if coarse:
        warnings.warn(coarse, stacklevel=2)
    if cfg.train.threads:
        torch.set_num_threads(int(cfg.train.threads))
    audit = None
    if bundle is None:
        bundle = load_data(cfg.data)
        audit = audit_before_training(bundle, cfg.data)
    plugin = get_task(bundle.task)
    from .data.splits import check_splits

    check_splits(bundle, need_val=cv_folds(cfg.train.select) is None, need_test=evaluate_test)  # empty / one-class
    from .calibration import check_operating_point

    check_operating_point(cfg.operating_point, bundle.task, bundle.num_classes)  # before any training
    if evaluate_test and cfg.external_test:
        check_external_sources(cfg, bundle.class_names)  # names, files, classes, prompts: before training
    from .strategies import check_strategy

    check_strategy(cfg.train.strategy, bundle.task)
    from .semi import check_semi

    check_semi(cfg.train.semi, bundle.task, bundle.unlabelled)
    if evaluate_test and cfg.forgetting_probe:  # the probe set exists and is readable: before training
        from .data.registry import check_source

        check_source(_probe_data(cfg))
    if cfg.train.semi == "selftrain" and cv_folds(cfg.train.select):
        raise ConfigError("semi selftrain with cross-validated selection (select cv:K) is not supported; use holdout")
    if cfg.train.strategy == "cufit" and cv_folds(cfg.train.select):
        raise ConfigError("strategy cufit with cross-validated selection (select cv:K) is not supported; use holdout")
    target = None
    if cfg.train.adapt != "none":  # unlabelled target-domain images (DANN), read before training
        if cv_folds(cfg.train.select):
            raise ConfigError("adapt dann with cross-validated selection (select cv:K) is not supported; use holdout")
        from .adapt import load_target_images

        target = load_target_images(cfg.train.target_unlabelled, cfg.data.image_size, bundle.in_channels,
                                    cfg.data.dicom_window)
    options = task_options(bundle, cfg.train)
    positive = _positive_index(bundle)
    lr = cfg.train.lr if cfg.train.lr is not None else get_method(parse_method(cfg.method)[0]).default_lr
    device = resolve_device(cfg.train.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    folds = cv_folds(cfg.train.select)
    if folds:
        model, info, names, configs, result, selection_targets = _cross_validated(cfg, bundle, lr, folds, progress,
                                                                                  evaluate_test)
        n_selection = len(bundle.train)
    else:
        model, info, names, configs = _model_for(cfg, bundle)
        curriculum = _curriculum_for(cfg, bundle) if cfg.train.strategy == "cufit" else None
        last_round = cfg.train.semi != "selftrain"
        result = train_model(model, bundle, info.mean, info.std, cfg.train, lr, progress=progress,
                             evaluate_test=evaluate_test and last_round, target=target, curriculum=curriculum)
        if not last_round:  # self-training: pseudo-label rounds, each a fresh model on labelled + pseudo-labelled
            model, result, self_training = _self_training(cfg, bundle, model, info, lr, progress, evaluate_test, target)
        selection_targets, n_selection = plugin.targets(bundle.val).numpy(), len(bundle.val)
    counts = count_parameters(model)
    # e.g. detection's score threshold: chosen on the selection data only, then applied to test
    fitted = plugin.fit_on_validation(selection_targets, result.val_probs, options)
    options.update(fitted)
    metrics = {
        "medpeft_version": __version__,
        "data": bundle.name,
        "task": bundle.task,
        "class_names": bundle.class_names,
        "positive_class": None if positive is None else bundle.class_names[positive],
        "backbone": cfg.backbone,
        "weights_source": public_text(info.weights_source),  # file:<name>#<hash>, no absolute path
        "method": "+".join(names),
        "method_config": config_to_dict(configs),
        "seed": cfg.train.seed,  # head init, data order, augmentation, dropout
        "subset_seed": bundle.split_info.get("subset_seed"),  # which labelled images (None: all)
        "lr": lr,
        "split": bundle.split_info,
        "n_train": len(bundle.train), "n_val": len(bundle.val) if not folds else 0,
        "n_test": len(bundle.test) if evaluate_test else None,
        # the labels model selection used: scarce by default (validation follows the label budget)
        "selection": {"mode": cfg.train.select, "val_labels": None if folds else cfg.data.val_labels,
                      "n_selection_labels": n_selection},
        # box prompts from the ground truth: prompted scores, not comparable with unprompted ones
        "prompt": cfg.train.prompt,
        "params": counts,
        "audit": audit,
        "best_epoch": result.best_epoch,
        "best_val": result.best_val,  # the monitored validation score of the kept state
        "best_is_last": result.best_is_last,
        "epochs_run": len(result.history),
        "epochs_planned": result.epochs_planned,
        "steps_per_epoch": result.steps_per_epoch,
        "steps_run": len(result.history) * result.steps_per_epoch,
        "curve": result.curve,  # [[optimizer step, monitored validation score], ...]
        "monitor": options["monitor"],
        "augment": result.augment,
        "feature_cache": result.feature_cache,
        "feature_cache_note": result.feature_cache_note,  # what was cached, or why not
        "train_seconds": result.train_seconds,
        "fitted_on_validation": fitted,
        # noise-robust training: plain | gce | cufit, and what CUFIT's stages kept (and how clean)
        "strategy": cfg.train.strategy,
        # semi-supervised training: its unlabelled pool (the rest of the training split) and setting
        "semi": None if cfg.train.semi == "none" else {
            "method": cfg.train.semi, "n_unlabelled": len(bundle.unlabelled), "pool": "training split minus its "
            "labelled subset (never validation or test)", "threshold": cfg.train.semi_threshold,
            "ratio": cfg.train.semi_ratio, "weight": cfg.train.semi_weight,
            "rounds": self_training if cfg.train.semi == "selftrain" else None},
        "curriculum": result.curriculum,
        # unsupervised domain adaptation: what adapted the backbone (the folder's name only)
        "adapt": None if target is None else {
            "method": cfg.train.adapt, "target": os.path.basename(os.path.normpath(cfg.train.target_unlabelled)),
            "n_target_images": len(target), "weight": cfg.train.adapt_weight},
        "val": plugin.metrics_with_ci(selection_targets, result.val_probs, options, cfg.n_boot, cfg.train.seed),
        "test": plugin.metrics_with_ci(plugin.targets(bundle.test).numpy(), result.test_probs, options, cfg.n_boot,
                                       cfg.train.seed) if evaluate_test else None,
        **peak_memory_mb(device),
    }
    if evaluate_test:  # classification: "calibration" (fitted on validation) and "operating_point" entries
        from .calibration import add_to_metrics

        add_to_metrics(metrics, cfg, positive, selection_targets, result.val_probs,
                       plugin.targets(bundle.test).numpy(), result.test_probs)
    if evaluate_test and cfg.external_test:  # after the home test, by the same chosen state, once
        metrics["external"] = evaluate_external(cfg, model, bundle, info, plugin, options)
    if evaluate_test and (cfg.forgetting or cfg.forgetting_probe):  # the representation before vs after
        metrics["forgetting"] = evaluate_forgetting(cfg, model, bundle, info, plugin)
    if evaluate_test and cfg.corruptions:  # the home test images corrupted, after the clean test
        metrics["corruptions"] = evaluate_corruptions(cfg, model, bundle, info, plugin, options, metrics["test"])
    metrics["total_seconds"] = time.perf_counter() - started
    if save:
        out = Path(out_dir) if out_dir else default_out_dir(cfg)
        metrics["adapter_bytes"] = write_run(out, cfg, metrics, result.history, model, bundle, info)
        if evaluate_test:
            metrics["predictions"] = plugin.write_predictions(out, bundle, result.test_probs, options)
            if bundle.label_noise:  # which training / validation labels the injected noise flipped
                metrics["predictions"].append(write_noisy_labels(out, bundle.label_noise, bundle.class_names))
            from .calibration import write_run_files

            metrics["predictions"] += write_run_files(out, metrics, (bundle.train if folds else bundle.val).ids,
                                                      selection_targets, result.val_probs)
        metrics["out_dir"] = str(out)
    return metrics


def write_noisy_labels(out: Path, record: dict, class_names: list[str]) -> str:
    path = Path(out) / "noisy_labels.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["split", "id", "clean_label", "noisy_label"])
        for split, ident, clean, noisy in record["flipped"]:
            writer.writerow([split, ident, class_names[clean], class_names[noisy]])
    return path.name


def check_external_sources(cfg: RunConfig, class_names: list[str]) -> None:
    """ConfigError / DataError before any training: duplicate names, a source that does not
    exist or has no targets of the task, a class folder set other than the run's, a box-prompted
    run (its model needs ground-truth boxes). The images are read only after training."""
    from .data.external import check_class_names, check_external_names
    from .data.registry import check_source

    names = check_external_names(cfg.external_test)
    if cfg.train.prompt != "none":
        raise ConfigError("external test sets of a box-prompted run are not supported: its model needs a "
                          "ground-truth box per image; evaluate an unprompted run")
    for source, name in zip(cfg.external_test, names):
        external = dataclasses.replace(cfg.data, name=source, fraction=None, shots=None, split_file=None)
        found = check_source(external).class_names
        if found is not None:
            check_class_names(name, found, class_names, task=cfg.data.task)


def evaluate_external(cfg: RunConfig, model, bundle: DataBundle, info, plugin, options: dict) -> dict:
    """Each external set's metrics (value + CI, as the home test's) under the model chosen on home
    validation, with its size and any conversion note; read only now, after training and testing."""
    from .align import SourceStyle, align
    from .data.external import load_external
    from .train import predict_images

    def scored(images):
        predictions = predict_images(model, images, info.mean, info.std, bundle.task, bundle.num_classes,
                                     batch_size=cfg.train.eval_batch_size, device=cfg.train.device)
        return plugin.metrics_with_ci(plugin.targets(images).numpy(), predictions, options, cfg.n_boot, cfg.train.seed)

    style = SourceStyle.from_images(bundle.train.images) if cfg.align else None  # the home training images
    out = {}
    for source in cfg.external_test:
        ext = load_external(cfg.data, source, bundle.class_names, bundle.in_channels)
        out[ext.name] = {**scored(ext.images), "n_images": len(ext.images), "notes": ext.notes}
        for method in cfg.align:
            aligned = dataclasses.replace(ext.images, images=align(ext.images.images, method, style))
            out[f"{ext.name}+{method}"] = {**scored(aligned), "n_images": len(ext.images), "notes": ext.notes,
                                          "aligned": method}
    return out


def _probe_data(cfg: RunConfig) -> DataConfig:
    return DataConfig(name=cfg.forgetting_probe, root=cfg.data.root, image_size=cfg.data.image_size,
                      medmnist_size=cfg.data.medmnist_size, audit="off")


def evaluate_forgetting(cfg: RunConfig, model, bundle: DataBundle, info, plugin) -> dict:
    """Linear CKA between the pretrained and the fine-tuned backbone's features on the test images,
    and (``forgetting_probe``) a logistic-regression probe on another set with both backbones."""
    from .data.privacy import public_path
    from .forgetting import linear_cka, pooled_features, probe_auroc

    with torch.random.fork_rng(devices=[]):  # exactly as build_model creates the base (random weights too)
        torch.manual_seed(0)
        reference, _ = plugin.build_model(cfg.backbone, bundle.num_classes, cfg.data.image_size, in_chans=3,
                                          weights=cfg.weights, pretrained=cfg.pretrained)
    pretrained, tuned = plugin.methods_target(reference), plugin.methods_target(model)
    kw = dict(batch_size=cfg.train.eval_batch_size, device=resolve_device(cfg.train.device))
    before = pooled_features(pretrained, bundle.test, info.mean, info.std, **kw)
    after = pooled_features(tuned, bundle.test, info.mean, info.std, **kw)
    out = {"cka": linear_cka(before, after), "reference": f"test split ({len(bundle.test)} images, labels unused)"}
    if cfg.forgetting_probe:
        other = load_data(_probe_data(cfg))
        if other.task not in ("binary", "multiclass"):
            raise ConfigError(f"forgetting_probe {cfg.forgetting_probe!r} is a {other.task} set; expected a "
                              "single-label classification set")
        scores = {}
        for name, backbone in (("pretrained", pretrained), ("fine_tuned", tuned)):
            scores[name] = probe_auroc(pooled_features(backbone, other.train, info.mean, info.std, **kw),
                                       other.train.labels.numpy(),
                                       pooled_features(backbone, other.test, info.mean, info.std, **kw),
                                       other.test.labels.numpy(),
                                       positive=1 if other.positive_class is None else int(other.positive_class))
        out["probe"] = {"data": public_path(cfg.forgetting_probe), "metric": "auroc", **scores,
                        "change": scores["fine_tuned"] - scores["pretrained"]}
    return out


def evaluate_corruptions(cfg: RunConfig, model, bundle: DataBundle, info, plugin, options: dict, clean: dict) -> dict:
    """The task's metrics on the test split under every corruption of the suite at severities 1-5
    (``corruptions.py``; drawn from the run seed, so methods at one seed see the same corrupted
    images), with per-corruption means, the mean over all and the relative robustness
    (corrupted / clean) of the primary metric."""
    from .corruptions import SEVERITIES, corrupt, get_suite
    from .train import predict_images

    metric = plugin.primary_metric
    targets = plugin.targets(bundle.test).numpy()
    results, means = {}, {}
    for name in get_suite(cfg.corruptions):
        results[name] = {}
        for severity in SEVERITIES:
            images = corrupt(bundle.test.images, name, severity, cfg.corruptions, seed=cfg.train.seed)
            test = dataclasses.replace(bundle.test, images=images)
            predictions = predict_images(model, test, info.mean, info.std, bundle.task, bundle.num_classes,
                                         batch_size=cfg.train.eval_batch_size, device=cfg.train.device)
            values = plugin.metrics_with_ci(targets, predictions, options, cfg.n_boot, cfg.train.seed)
            results[name][str(severity)] = {k: v for k, v in values.items() if isinstance(v, dict) and "value" in v}
        means[name] = float(np.nanmean([results[name][str(s)][metric]["value"] for s in SEVERITIES]))
    corrupted = float(np.nanmean(list(means.values())))
    clean_value = float((clean.get(metric) or {}).get("value", float("nan")))
    higher = plugin.direction(metric) == "max"
    return {"suite": cfg.corruptions, "metric": metric, "clean": clean_value, "mean": corrupted,
            # > 1 would mean better under corruption; for a lower-is-better metric clean / corrupted
            "relative": (corrupted / clean_value if higher else clean_value / corrupted)
            if clean_value and corrupted else float("nan"),
            "per_corruption": means, "results": results}


def _model_for(cfg: RunConfig, bundle: DataBundle):
    seed_everything(cfg.train.seed)  # before model creation: adapter init uses the RNG
    return build_model(cfg.backbone, bundle.num_classes, cfg.data.image_size, cfg.method, cfg.method_options,
                       cfg.weights, cfg.pretrained, head_seed=cfg.train.seed, task=bundle.task)


def _self_training(cfg: RunConfig, bundle: DataBundle, model, info, lr: float, progress, evaluate_test: bool,
                   target) -> tuple:
    """Rounds of pseudo-labelling the unlabelled pool with the current model (confidence >= the
    threshold) and training a fresh model on labelled + pseudo-labelled images; the test split is
    read by the last round only. Returns (model, result, [per-round record])."""
    from .data.splits import concat_sets
    from .semi import pseudo_labelled
    from .train import predict_images

    plain = dataclasses.replace(cfg.train, semi="none")
    rounds, result = [], None
    for r in range(1, int(cfg.train.semi_rounds) + 1):
        probabilities = predict_images(model, bundle.unlabelled, info.mean, info.std, bundle.task, bundle.num_classes,
                                       batch_size=cfg.train.eval_batch_size, device=cfg.train.device)
        pseudo = pseudo_labelled(bundle.unlabelled, probabilities, cfg.train.semi_threshold)
        round_bundle = dataclasses.replace(bundle, train=concat_sets([bundle.train, pseudo]))
        rounds.append({"round": r, "pseudo_labelled": len(pseudo), "pool": len(bundle.unlabelled),
                       "per_class": [int((pseudo.labels == k).sum()) for k in range(bundle.num_classes)]})
        model, info, _, _ = _model_for(cfg, round_bundle)
        result = train_model(model, round_bundle, info.mean, info.std, plain, lr, progress=progress,
                             evaluate_test=evaluate_test and r == int(cfg.train.semi_rounds), target=target)
    return model, result, rounds


def _curriculum_for(cfg: RunConfig, bundle: DataBundle) -> tuple:
    """CUFIT's training-time modules: (A) a linear probe on the frozen backbone and (B) the backbone
    adapted by the run's method with its own head, each from its own seed (the caller's RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        modules = []
        for offset, method, options in ((1, "linear", {}), (2, cfg.method, cfg.method_options)):
            seed_everything(cfg.train.seed + offset)
            module, *_ = build_model(cfg.backbone, bundle.num_classes, cfg.data.image_size, method, options,
                                     cfg.weights, cfg.pretrained, head_seed=cfg.train.seed + offset, task=bundle.task)
            modules.append(module)
    return tuple(modules)


def _positive_index(bundle: DataBundle) -> int | None:
    """The positive class of a binary task (class 1 unless the data or the user names another)."""
    if bundle.task != "binary":
        return None
    return 1 if bundle.positive_class is None else int(bundle.positive_class)


def _cross_validated(cfg: RunConfig, bundle: DataBundle, lr: float, folds: int, progress, evaluate_test: bool):
    """Selection by K-fold cross-validation inside the labelled training subset.

    Every fold trains the same schedule on the other folds and predicts its own fold after every
    epoch; the out-of-fold predictions of all folds are pooled per epoch (a fold of a 5-image
    subset cannot hold both classes, the pool can) and the epoch with the best pooled score is
    chosen. The model is then refit on every labelled image and stopped at that epoch. No
    validation label is read; the pooled out-of-fold score is the selection score.
    """
    from .data.splits import split_indices, stratum_keys

    train = bundle.train
    if len(train) < folds:
        raise ConfigError(f"select cv:{folds} needs at least {folds} labelled training images, got {len(train)}")
    schedule = dataclasses.replace(cfg.train, steps=None, min_steps=0,
                                   epochs=plan_epochs(len(train), cfg.train)[0])
    parts = split_indices(stratum_keys(train.labels), train.groups, [1.0 / folds] * folds, cfg.train.seed)
    oof: list = [None] * schedule.epochs  # per epoch: probabilities of every training row
    for k, rows in enumerate(parts):
        if len(rows) == 0:
            continue
        rest = np.setdiff1d(np.arange(len(train)), rows)
        fold = dataclasses.replace(bundle, train=train.subset(rest), val=train.subset(rows),
                                   split_info=dict(bundle.split_info))
        model, info, _, _ = _model_for(cfg, fold)
        fold_result = train_model(model, fold, info.mean, info.std, schedule, lr, evaluate_test=False,
                                  record_val_probs=True)
        for epoch, probs in enumerate(fold_result.epoch_val_probs):
            if oof[epoch] is None:
                oof[epoch] = np.zeros((len(train),) + probs.shape[1:], dtype=probs.dtype)
            oof[epoch][rows] = probs
    plugin, options = get_task(bundle.task), task_options(bundle, cfg.train)
    if options["monitor"] == "loss" and bundle.task not in ("binary", "multiclass"):
        raise ConfigError(f"select cv:K with monitor loss needs single-label classification (got {bundle.task}); "
                          "monitor a metric instead")
    targets = plugin.targets(train)
    plain_loss = plugin.loss(bundle, {**options, "class_weighted": False})
    scores = []
    for p in oof:  # the pooled out-of-fold predictions of each epoch, scored like a validation split
        loss = float(plain_loss(torch.log(torch.as_tensor(p).clamp_min(1e-7)), targets)) \
            if options["monitor"] == "loss" else float("nan")
        scores.append(plugin.score({**plugin.scores(targets.numpy(), p, options), "loss": loss}, options["monitor"]))
    labels = targets.numpy()
    chosen = int(np.argmax(scores)) + 1  # first best epoch
    refit_bundle = dataclasses.replace(bundle, val=train)  # no validation is read in a refit
    model, info, names, configs = _model_for(cfg, refit_bundle)
    result = train_model(model, refit_bundle, info.mean, info.std, schedule, lr, progress=progress,
                         evaluate_test=evaluate_test, stop_epoch=chosen)
    for row, score in zip(result.history, scores):
        row["score"] = score
    # the learning curve is the pooled out-of-fold score of every epoch of the schedule
    result.curve = [[epoch * result.steps_per_epoch, score] for epoch, score in enumerate(scores, 1)]
    result.best_epoch, result.best_is_last = chosen, chosen == schedule.epochs
    result.best_val = scores[chosen - 1] if plugin.direction(options["monitor"]) == "max" else -scores[chosen - 1]
    result.val_probs = oof[chosen - 1]
    return model, info, names, configs, result, labels


def write_run(out: Path, cfg: RunConfig, metrics: dict, history: list[dict], model, bundle: DataBundle, info) -> int:
    """Write the run folder; returns the adapter file size in bytes."""
    from safetensors.torch import save_file

    from .data.privacy import public_run_config

    out.mkdir(parents=True, exist_ok=True)
    # data paths relative to the data root, no absolute path (MEDPEFT_RECORD_PATHS=1: full paths)
    (out / "config.yaml").write_text(yaml.safe_dump(public_run_config(cfg.to_dict()), sort_keys=False))
    meta = {
        "backbone": cfg.backbone, "method": metrics["method"], "method_options": json.dumps(cfg.method_options),
        "num_classes": str(bundle.num_classes), "class_names": json.dumps(bundle.class_names),
        "task": bundle.task, "image_size": str(cfg.data.image_size), "mean": json.dumps(list(info.mean)),
        "std": json.dumps(list(info.std)), "medpeft_version": __version__,
        "prompt": cfg.train.prompt,  # a box-prompted model needs boxes at prediction time too
        # what predict applies as the run did (detection: the validation-chosen score threshold)
        "fitted_on_validation": json.dumps(metrics.get("fitted_on_validation") or {}),
        # the backbone weights trained on: load_run rebuilds the same backbone or refuses
        "pretrained": "true" if cfg.pretrained else "false",
    }
    if cfg.weights is not None:
        meta.update(weights_file=Path(cfg.weights).name, weights_sha256=info.weights_sha256 or "")
    from .calibration import adapter_metadata

    meta.update(adapter_metadata(metrics))  # calibration map and operating point: applied by predict
    state = {k: v.detach().to("cpu").contiguous() for k, v in trained_state_dict(model).items()}
    adapter = out / ADAPTER_FILE
    save_file(state, str(adapter), metadata=meta)
    metrics["adapter_bytes"] = adapter.stat().st_size
    with open(out / "metrics.json", "w") as fh:
        json.dump(metrics, fh, indent=2, default=float)
    # the ids of the split (and of the label subset): rerun or share it with --split-file
    save_split(bundle, out / SPLIT_FILE)
    if history:
        with open(out / "history.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(history[0]))
            writer.writeheader()
            writer.writerows(history)
    return metrics["adapter_bytes"]


@dataclass
class LoadedRun:
    model: torch.nn.Module
    class_names: list[str]
    task: str
    image_size: int
    mean: tuple
    std: tuple
    method: str
    metadata: dict  # the adapter file's metadata: backbone, classes, task, image size, mean/std, ...


def load_run(path: str | Path, weights: str | None = None, merge: bool = False) -> LoadedRun:
    """Rebuild a trained model from a run folder (or an adapter file): fresh backbone + methods + saved state."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .methods import merge_methods

    path = Path(path)
    adapter = path / ADAPTER_FILE if path.is_dir() else path
    if not adapter.is_file():
        raise ConfigError(f"no trained adapter at {adapter}; expected a run folder written by 'medpeft run' "
                          f"or an {ADAPTER_FILE} file")
    try:
        with safe_open(str(adapter), framework="pt") as fh:
            meta = fh.metadata() or {}
        state = load_file(str(adapter))
    except Exception as err:  # safetensors raises its own error types
        raise ConfigError(f"{adapter} is not a readable safetensors file: {err}") from None
    required = ("backbone", "method", "num_classes", "image_size", "task")
    missing = [k for k in required if k not in meta]
    if missing:
        raise ConfigError(f"{adapter} lacks medpeft metadata {missing}; it was not written by medpeft")
    weights = _trained_weights(adapter, meta, weights)
    model, info, names, configs = build_model(
        meta["backbone"], int(meta["num_classes"]), int(meta["image_size"]), meta["method"],
        json.loads(meta.get("method_options", "{}")), weights=weights, pretrained=meta.get("pretrained") != "false",
        task=meta["task"],
    )
    load_trained_state(model, state, source=str(adapter))
    if merge:
        merge_methods(model)
    model.eval()
    return LoadedRun(model, json.loads(meta.get("class_names", "[]")), meta["task"], int(meta["image_size"]),
                     tuple(json.loads(meta["mean"])), tuple(json.loads(meta["std"])), meta["method"], meta)


def _trained_weights(adapter: Path, meta: dict, weights: str | None) -> str | None:
    """The backbone weights file to rebuild a run with: the file it was trained on (its name and
    SHA-256 are in the adapter's metadata; a file with another checksum is refused), or None for a
    run trained on the backbone's default weights (then ``weights`` is refused). Adapters written
    before the weights were recorded take ``weights`` as given."""
    from .data.privacy import is_redacted

    if weights is not None and is_redacted(str(weights)):
        weights = None  # a config.yaml that did not record the path: the file is asked for below
    needed, sha = meta.get("weights_file"), meta.get("weights_sha256") or ""
    if needed:
        if weights is None:
            raise ConfigError(f"{adapter} was trained on the backbone weights file {needed} (sha256 {sha[:16]}...); "
                              f"give that file with --weights {needed} (the default {meta['backbone']} weights "
                              "would give other predictions)")
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ConfigError(f"weights file {weights} not found; {adapter} needs {needed} (sha256 {sha[:16]}...)")
        from .backbones.offline import sha256_file

        found = sha256_file(path)
        if sha and found != sha:
            raise ConfigError(f"weights file {weights} has sha256 {found[:16]}..., not that of {needed} "
                              f"({sha[:16]}...), the file {adapter} was trained on; give that file")
        return str(path)
    if weights is not None and "pretrained" in meta:  # recorded: trained without a weights file
        kind = "pretrained" if meta["pretrained"] != "false" else "random (--no-pretrained)"
        raise ConfigError(f"{adapter} was trained on the default {kind} weights of {meta['backbone']}, not on a "
                          f"weights file; drop --weights {weights} (other weights would give other predictions)")
    return weights
