"""Classification (binary, multi-class, multi-label): a linear head on the pooled features,
cross-entropy (binary cross-entropy for multi-label), class probabilities, the metrics of
``medpeft.metrics`` (AUROC primary) and a probability CSV."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.base import DataBundle, ImageSet
from ..errors import ConfigError
from ..metrics import METRIC_NAMES, compute_metrics, metrics_with_ci
from .base import Task


def class_weights_for(labels: torch.Tensor, task: str, num_classes: int) -> torch.Tensor:
    if task == "multilabel":
        pos = labels.float().sum(0).clamp(min=1)
        return (labels.shape[0] - pos) / pos  # pos_weight = negatives / positives
    counts = torch.bincount(labels, minlength=num_classes).float().clamp(min=1)
    return counts.sum() / (num_classes * counts)


class ClassificationTask(Task):
    name = "classification"
    metrics = {name: "max" for name in METRIC_NAMES}
    primary_metric = "auroc"
    fallback_metric = "acc"  # AUROC is undefined on a validation set holding one class

    def targets(self, data: ImageSet) -> torch.Tensor:
        return data.labels

    def build_model(self, backbone, num_classes, image_size, in_chans=3, weights=None, pretrained=True):
        from ..backbones import create_backbone

        return create_backbone(backbone, num_classes=num_classes, image_size=image_size, weights=weights,
                               pretrained=pretrained, in_chans=in_chans)

    def loss(self, bundle: DataBundle, options: dict):
        weights = None
        if options.get("class_weighted"):
            weights = class_weights_for(bundle.train.labels, bundle.task, bundle.num_classes)
            weights = weights.to(options.get("device", "cpu"))
        if bundle.task == "multilabel":
            return lambda logits, y: F.binary_cross_entropy_with_logits(logits, y.float(), pos_weight=weights)
        if options.get("strategy") == "gce":  # noise-robust generalized cross-entropy (strategies.py)
            from ..strategies import gce_loss

            return gce_loss
        return lambda logits, y: F.cross_entropy(logits, y, weight=weights)

    def predictions(self, outputs: torch.Tensor, options: dict) -> torch.Tensor:
        return torch.sigmoid(outputs) if options["kind"] == "multilabel" else torch.softmax(outputs, dim=-1)

    def scores(self, targets, predictions, options):
        return compute_metrics(targets, predictions, options["kind"], positive=options.get("positive", 1))

    def metrics_with_ci(self, targets, predictions, options, n_boot, seed):
        return metrics_with_ci(targets, predictions, options["kind"], n_boot=n_boot, seed=seed,
                               positive=options.get("positive", 1))

    def write_user_predictions(self, files, predictions, class_names, kind, out, extra=None):
        """``extra``: per-file columns added after the prediction (the decision at an operating point)."""
        import json

        rows = []
        for i, (name, p) in enumerate(zip(files, predictions)):
            row = {"file": name, **{f"p_{c}": float(v) for c, v in zip(class_names, p)}}
            if kind != "multilabel":
                row["prediction"] = class_names[int(np.argmax(p))]
            if extra is not None:
                row.update(extra[i])
            rows.append(row)
        if not out:
            return "\n".join(json.dumps(row) for row in rows)
        folder = Path(out).expanduser().parent
        if Path(out).expanduser().is_dir() or not folder.is_dir():
            raise ConfigError(f"--out {out}: " + ("is a folder; give a CSV file name" if Path(out).expanduser().is_dir()
                                                  else f"the folder {folder} does not exist; create it first"))
        try:
            with open(out, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
        except OSError as err:
            raise ConfigError(f"--out {out}: cannot write it ({err.strerror})") from None
        return f"wrote {len(rows)} predictions to {out}"

    def write_predictions(self, out: Path, bundle: DataBundle, predictions: np.ndarray, options: dict | None = None
                          ) -> list[str]:
        labels = bundle.test.labels.numpy()
        path = out / "test_predictions.csv"
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id", "label"] + [f"p_{c}" for c in bundle.class_names])
            for ident, label, row in zip(bundle.test.ids, labels, predictions):
                label = "|".join(str(int(v)) for v in label) if getattr(label, "ndim", 0) else int(label)
                writer.writerow([ident, label] + [f"{float(v):.8g}" for v in row])
        return [path.name]
