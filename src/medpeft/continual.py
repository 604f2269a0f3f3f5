"""Continual fine-tuning: one method adapts one backbone to a sequence of data sets in turn, and
every task is re-evaluated after each step (``medpeft continual``).

* ``site`` (site-incremental: the same label space, e.g. Kvasir-SEG -> CVC-ClinicDB): one model,
  its head / decoder kept and trained on, step after step; ``--replay N`` adds N training images
  of every earlier task (seeded) to the next task's training split, the standard rehearsal baseline.
* ``task`` (task-incremental, classification: e.g. BreastMNIST -> PneumoniaMNIST): the method's
  adapted backbone is shared, each task has its own head (initialised from the seed when the task
  arrives), and a task is evaluated with its own head.

Each step trains as ``medpeft run`` does (early stopping on that task's validation split, the
best state kept) and then tests every task once with the current backbone. The accuracy matrix
R[i][j] is the task's primary test metric (AUROC, Dice) on task j after step i (row 0: before any
training, site mode). Summaries (Lopez-Paz & Ranzato, 2017): average = mean_j R[T][j]; backward
transfer BWT = mean_{j<T} (R[T][j] - R[j][j]) (negative = forgetting); forward transfer FWT =
mean_{j>=2} (R[j-1][j] - R[0][j]) (site mode only: a task-incremental head does not exist before
its task).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError

MODES = ("site", "task")


def _evaluate(model, bundle, info, cfg, plugin) -> dict:
    from .train import predict_images, task_options

    options = task_options(bundle, cfg.train)
    predictions = predict_images(model, bundle.test, info.mean, info.std, bundle.task, bundle.num_classes,
                                 batch_size=cfg.train.eval_batch_size, device=cfg.train.device)
    return plugin.metrics_with_ci(plugin.targets(bundle.test).numpy(), predictions, options, cfg.n_boot, cfg.train.seed)


def _replay_set(previous: list, count: int, seed: int):
    """``count`` training images of each earlier task (seeded), as one ImageSet."""
    from .data.splits import concat_sets

    parts = []
    for k, bundle in enumerate(previous):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + k)
        index = torch.randperm(len(bundle.train), generator=gen)[:count]
        parts.append(bundle.train.subset(index))
    return concat_sets(parts) if parts else None


def summarize(matrix: list[list[float | None]], mode: str) -> dict:
    """Average, BWT and FWT of an accuracy matrix (rows: 0 = before training in site mode, then
    one per step; columns: tasks)."""
    r = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    offset = 1 if mode == "site" else 0  # row index of the state after step 1
    t = r.shape[1]
    last = r[offset + t - 1]
    out = {"average": float(np.nanmean(last))}
    out["bwt"] = float(np.mean([last[j] - r[offset + j, j] for j in range(t - 1)])) if t > 1 else None
    out["fwt"] = float(np.mean([r[offset + j - 1, j] - r[0, j] for j in range(1, t)])) \
        if mode == "site" and t > 1 else None
    return out


def run_continual(cfg, sequence: list[str], mode: str = "site", replay: int = 0, out: str | Path | None = None,
                  progress=None) -> dict:
    """Train ``cfg`` (a RunConfig: method, backbone, training) on each data set of ``sequence`` in turn."""
    from .data import load_data
    from .run import audit_before_training, build_model, init_head
    from .tasks import get_task
    from .train import seed_everything, train_model

    if mode not in MODES:
        raise ConfigError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    if len(sequence) < 2:
        raise ConfigError("a continual sequence needs at least two data sets (--sequence A,B)")
    if replay and mode != "site":
        raise ConfigError("--replay applies to site-incremental sequences (one head for every task)")
    if isinstance(replay, bool) or not isinstance(replay, int) or replay < 0:
        raise ConfigError(f"--replay {replay!r}: expected a whole number of images per earlier task")
    bundles = []
    for name in sequence:  # every data set read (and checked) before any training
        bundle = load_data(dataclasses.replace(cfg.data, name=name))
        audit_before_training(bundle, dataclasses.replace(cfg.data, name=name))
        bundles.append(bundle)
    plugin = get_task(bundles[0].task)
    if mode == "site":
        first = bundles[0]
        for name, bundle in zip(sequence[1:], bundles[1:]):
            if bundle.class_names != first.class_names or bundle.task != first.task:
                raise ConfigError(f"site-incremental: {name!r} has classes {bundle.class_names} ({bundle.task}); "
                                  f"{sequence[0]!r} has {first.class_names} ({first.task}); use --mode task for "
                                  "different label spaces")
    elif plugin.name != "classification":
        raise ConfigError("task-incremental sequences (one head per task) are for classification; use --mode site")

    seed_everything(cfg.train.seed)
    model, info, names, _ = build_model(cfg.backbone, bundles[0].num_classes, cfg.data.image_size, cfg.method,
                                        cfg.method_options, cfg.weights, cfg.pretrained, head_seed=cfg.train.seed,
                                        task=plugin.name)
    from .methods import get_method

    lr = cfg.train.lr if cfg.train.lr is not None else get_method(names[0]).default_lr
    heads: dict[int, dict] = {}

    def use_head(k: int) -> None:  # task mode: task k's head on the shared backbone
        device = next(model.parameters()).device
        model.reset_classifier(bundles[k].num_classes)
        model.get_classifier().to(device)
        if k in heads:
            model.get_classifier().load_state_dict(heads[k])
        else:
            init_head(model, cfg.train.seed + k)
        for param in model.get_classifier().parameters():
            param.requires_grad_(True)

    matrix, steps = [], []
    if mode == "site":  # row 0: the pretrained backbone with its fresh head, before any training
        matrix.append([_evaluate(model, b, info, cfg, plugin)[plugin.primary_metric]["value"] for b in bundles])
    for k, bundle in enumerate(bundles):
        if mode == "task":
            use_head(k)
        train_bundle = bundle
        if replay and k > 0:
            from .data.splits import concat_sets

            extra = _replay_set(bundles[:k], replay, cfg.train.seed)
            train_bundle = dataclasses.replace(bundle, train=concat_sets([bundle.train, extra]))
        result = train_model(model, train_bundle, info.mean, info.std, cfg.train, lr, progress=progress,
                             evaluate_test=False)
        if mode == "task":
            heads[k] = {n: v.detach().clone() for n, v in model.get_classifier().state_dict().items()}
        row = []
        for j, other in enumerate(bundles):
            if mode == "task":
                if j > k:
                    row.append(None)
                    continue
                use_head(j)
            row.append(_evaluate(model, other, info, cfg, plugin)[plugin.primary_metric]["value"])
        if mode == "task":
            use_head(k)
        matrix.append(row)
        steps.append({"data": sequence[k], "n_train": len(train_bundle.train), "best_epoch": result.best_epoch,
                      "best_val": result.best_val, "train_seconds": result.train_seconds})
    from .data.privacy import public_path

    record = {"mode": mode, "sequence": [public_path(s) for s in sequence], "backbone": cfg.backbone,
              "method": "+".join(names), "method_options": cfg.method_options, "seed": cfg.train.seed,
              "replay": replay, "metric": plugin.primary_metric,
              "matrix_rows": (["before training"] if mode == "site" else []) + [f"after {public_path(s)}" for s in sequence],
              "matrix": matrix, **summarize(matrix, mode), "steps": steps}
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "continual.json").write_text(json.dumps(record, indent=1))
        record["out_dir"] = str(folder)
    return record
