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
from .backbones import (backbone_info, check_image_size, create_backbone, default_image_size,
                        resolution_warning)
from .data import load_data, save_split
from .data.base import DataBundle, DataConfig
from .errors import ConfigError, DataError
from .methods import (apply_methods, build_configs, config_to_dict, count_parameters,
                      get_method, load_trained_state, parse_method, trained_state_dict)
from .metrics import metrics_with_ci
from .metrics import compute_metrics
from .train import TrainConfig, _score, cv_folds, plan_epochs, resolve_device, seed_everything, train_model

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

    def __post_init__(self):
        if self.data.image_size is None:  # the default size, fitted to the backbone's patch grid
            self.data.image_size = default_image_size(self.backbone)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
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
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown keys in '{where}': {unknown}; expected some of {sorted(known)}")
    return cls(**values)


def build_model(backbone: str, num_classes: int, image_size: int, method: str, method_options: dict,
                weights: str | None = None, pretrained: bool = True, in_chans: int = 3, head_seed: int = 0):
    """Backbone + methods applied; returns (model, backbone info, method names, method configs).

    ``head_seed`` (the run seed) initialises the new head: seeds must vary it, since head
    initialisation alone moved test AUROC by 0.07 on BreastMNIST.
    """
    names = parse_method(method)
    configs = build_configs(names, method_options)
    # The base model is created under a fixed, forked RNG: random-weight backbones are then identical
    # in every process, and the caller's RNG stream is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, info = create_backbone(backbone, num_classes=num_classes, image_size=image_size, weights=weights,
                                      pretrained=pretrained, in_chans=in_chans)
    # The head is initialised afterwards from its own seed: creating the backbone may or may not
    # convert weights (cold or warm cache), and nothing it does may shift the head.
    init_head(model, head_seed)
    check_image_size(info, image_size)
    apply_methods(model, names, configs, info.family)
    return model, info, names, configs


def init_head(model: torch.nn.Module, seed: int) -> None:
    """Re-initialise the classifier's parameters from ``seed`` alone (default init of each layer)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
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


def peak_memory_mb(device: torch.device) -> dict:
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def execute(cfg: RunConfig, out_dir: str | Path | None = None, bundle: DataBundle | None = None,
            progress=None, save: bool = True, evaluate_test: bool = True) -> dict:
    """Run one configuration; returns the metrics dict (also written to ``out_dir``).

    ``evaluate_test=False`` (HPO trials, model selection) never reads the test split:
    ``metrics["test"]`` and ``metrics["n_test"]`` are None.
    """
    started = time.perf_counter()
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
    positive = _positive_index(bundle)
    lr = cfg.train.lr if cfg.train.lr is not None else get_method(parse_method(cfg.method)[0]).default_lr
    device = resolve_device(cfg.train.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    folds = cv_folds(cfg.train.select)
    if folds:
        model, info, names, configs, result, selection_labels = _cross_validated(cfg, bundle, lr, folds, progress,
                                                                                 evaluate_test)
        n_selection = len(bundle.train)
    else:
        model, info, names, configs = _model_for(cfg, bundle)
        result = train_model(model, bundle, info.mean, info.std, cfg.train, lr, progress=progress,
                             evaluate_test=evaluate_test)
        selection_labels, n_selection = bundle.val.labels.numpy(), len(bundle.val)
    counts = count_parameters(model)
    metrics = {
        "medpeft_version": __version__,
        "data": bundle.name,
        "task": bundle.task,
        "class_names": bundle.class_names,
        "positive_class": None if positive is None else bundle.class_names[positive],
        "backbone": cfg.backbone,
        "weights_source": info.weights_source,
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
        "monitor": cfg.train.monitor,
        "augment": result.augment,
        "feature_cache": result.feature_cache,
        "feature_cache_note": result.feature_cache_note,  # what was cached, or why not
        "train_seconds": result.train_seconds,
        "val": metrics_with_ci(selection_labels, result.val_probs, bundle.task, n_boot=cfg.n_boot,
                               seed=cfg.train.seed, positive=_or1(positive)),
        "test": metrics_with_ci(bundle.test.labels.numpy(), result.test_probs, bundle.task, n_boot=cfg.n_boot,
                                seed=cfg.train.seed, positive=_or1(positive)) if evaluate_test else None,
        **peak_memory_mb(device),
    }
    metrics["total_seconds"] = time.perf_counter() - started
    if save:
        out = Path(out_dir) if out_dir else default_out_dir(cfg)
        metrics["adapter_bytes"] = write_run(out, cfg, metrics, result.history, model, bundle, info)
        if evaluate_test:
            write_predictions(out / "test_predictions.csv", bundle, result.test_probs)
        metrics["out_dir"] = str(out)
    return metrics


def _model_for(cfg: RunConfig, bundle: DataBundle):
    seed_everything(cfg.train.seed)  # before model creation: adapter init uses the RNG
    return build_model(cfg.backbone, bundle.num_classes, cfg.data.image_size, cfg.method, cfg.method_options,
                       cfg.weights, cfg.pretrained, head_seed=cfg.train.seed)


def _positive_index(bundle: DataBundle) -> int | None:
    """The positive class of a binary task (class 1 unless the data or the user names another)."""
    if bundle.task != "binary":
        return None
    return 1 if bundle.positive_class is None else int(bundle.positive_class)


def _or1(index: int | None) -> int:
    return 1 if index is None else index


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
    labels = train.labels.numpy()
    positive = _or1(_positive_index(bundle))
    scores = [_score({**compute_metrics(labels, p, bundle.task, positive=positive), "loss": _log_loss(labels, p)},
                     cfg.train.monitor) for p in oof]
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
    result.best_val = scores[chosen - 1] if cfg.train.monitor != "loss" else -scores[chosen - 1]
    result.val_probs = oof[chosen - 1]
    return model, info, names, configs, result, labels


def _log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
    probs = np.clip(probs, 1e-7, 1.0)
    if labels.ndim == 2:  # multi-label: binary cross-entropy per label
        return float(-np.mean(labels * np.log(probs) + (1 - labels) * np.log(np.clip(1 - probs, 1e-7, 1.0))))
    return float(-np.mean(np.log(probs[np.arange(len(labels)), labels])))


def write_run(out: Path, cfg: RunConfig, metrics: dict, history: list[dict], model, bundle: DataBundle, info) -> int:
    """Write the run folder; returns the adapter file size in bytes."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    meta = {
        "backbone": cfg.backbone, "method": metrics["method"], "method_options": json.dumps(cfg.method_options),
        "num_classes": str(bundle.num_classes), "class_names": json.dumps(bundle.class_names),
        "task": bundle.task, "image_size": str(cfg.data.image_size), "mean": json.dumps(list(info.mean)),
        "std": json.dumps(list(info.std)), "medpeft_version": __version__,
    }
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


def write_predictions(path: Path, bundle: DataBundle, probs) -> None:
    labels = bundle.test.labels.numpy()
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "label"] + [f"p_{c}" for c in bundle.class_names])
        for ident, label, row in zip(bundle.test.ids, labels, probs):
            label = "|".join(str(int(v)) for v in label) if getattr(label, "ndim", 0) else int(label)
            writer.writerow([ident, label] + [f"{float(v):.8g}" for v in row])


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
    model, info, names, configs = build_model(
        meta["backbone"], int(meta["num_classes"]), int(meta["image_size"]), meta["method"],
        json.loads(meta.get("method_options", "{}")), weights=weights, pretrained=True,
    )
    load_trained_state(model, state, source=str(adapter))
    if merge:
        merge_methods(model)
    model.eval()
    return LoadedRun(model, json.loads(meta.get("class_names", "[]")), meta["task"], int(meta["image_size"]),
                     tuple(json.loads(meta["mean"])), tuple(json.loads(meta["std"])), meta["method"], meta)
