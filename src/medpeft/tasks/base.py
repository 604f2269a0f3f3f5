"""The Task protocol: everything that differs between classification, segmentation, ...

A task answers: what a target is (``targets``), what goes on the backbone (``build_model``:
head or decoder, always trained and saved with the adapter, like peft's ``modules_to_save``),
the loss, how model outputs become predictions, which metrics exist and in which direction,
the default monitor, and how predictions are written. ``run``, ``train``, the sweep and the
report ask the task; none of them branches on its name.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.base import DataBundle, ImageSet
from ..errors import ConfigError


def best_worst_figure(path: Path, images, scores: np.ndarray, score_name: str, draw, title: str, n: int = 3) -> None:
    """The ``n`` best and ``n`` worst test images by a per-image score (NaN ranks lowest), each drawn
    as the image with ``draw(ax, index)`` overlaid: the test-case figure of segmentation and detection."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(np.nan_to_num(scores, nan=-1.0), kind="stable")
    picks = list(order[::-1][:n]) + list(order[:n])
    fig, axes = plt.subplots(2, n, figsize=(3 * n, 6.4), squeeze=False)
    for k, (ax, i) in enumerate(zip(axes.ravel(), picks)):
        image = images[i].permute(1, 2, 0).numpy()
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray")
        draw(ax, i)
        ax.set_title(f"{'best' if k < n else 'worst'}: {score_name} {scores[i]:.3g}", fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


class Task:
    name: str = ""
    # metric name -> "max" (higher is better) or "min"
    metrics: dict[str, str] = {}
    primary_metric: str = ""
    report_metrics: tuple[str, ...] = ()  # shown in the benchmark report beside the ranked metric
    fallback_metric: str = ""  # monitored when the primary is undefined on a validation set
    onnx_refusal: str = ""  # why `medpeft export out.onnx` cannot export this task's model ("" = it can)

    # ------------------------------------------------------------------ metrics

    def monitors(self) -> tuple[str, ...]:
        return tuple(self.metrics) + ("loss",)

    def resolve_monitor(self, monitor: str) -> str:
        """"auto" -> the task's primary metric; anything else must be one of ``monitors()``."""
        if monitor == "auto":
            return self.primary_metric
        if monitor not in self.monitors():
            raise ConfigError(f"monitor {monitor!r} is not a {self.name} metric; expected auto or one of "
                              f"{', '.join(self.monitors())}")
        return monitor

    def score(self, values: dict, monitor: str) -> float:
        """The monitored value as a score where higher is better (model selection, HPO)."""
        if monitor == "loss":
            return -float(values["loss"])
        value = float(values.get(monitor, float("nan")))
        if math.isnan(value):
            value = float(values.get(self.fallback_metric, float("nan")))
            monitor = self.fallback_metric
        return value if self.metrics.get(monitor, "max") == "max" else -value

    def direction(self, metric: str) -> str:
        return "min" if metric == "loss" else self.metrics.get(metric, "max")

    # ------------------------------------------------------------------ to implement

    def targets(self, data: ImageSet) -> torch.Tensor:
        raise NotImplementedError

    def build_model(self, backbone: str, num_classes: int, image_size: int, in_chans: int = 3,
                    weights: str | None = None, pretrained: bool = True) -> tuple[nn.Module, object]:
        """The backbone with this task's head/decoder: (model, backbone info). The model's
        ``get_classifier()`` returns the part that is always trained and saved."""
        raise NotImplementedError

    def forward(self, model: nn.Module, x: torch.Tensor, targets: torch.Tensor | None, options: dict,
                gen: torch.Generator | None = None) -> torch.Tensor:
        """The model's outputs for a batch (``gen``: given while training). Tasks with prompts
        (segmentation with box prompts) derive the extra inputs here."""
        return model(x)

    def check_model(self, model: nn.Module, options: dict) -> None:
        """ConfigError when the run's options ask the model for something it cannot do."""
        if options.get("prompt", "none") != "none":
            raise ConfigError(f"prompt {options['prompt']!r}: a {self.name} model takes no prompts")

    def methods_target(self, model: nn.Module) -> nn.Module:
        """The part of the model the PEFT methods adapt (the backbone/encoder)."""
        return model

    def finish_model(self, model: nn.Module) -> None:
        """Called once the methods are applied (and the head made trainable): a last adjustment,
        e.g. freezing backbone parts the task's model never uses."""

    def loss(self, bundle: DataBundle, options: dict) -> callable:
        raise NotImplementedError

    def predictions(self, outputs: torch.Tensor, options: dict) -> torch.Tensor:
        """Model outputs (logits) -> what the metrics read (probabilities, label maps)."""
        raise NotImplementedError

    def scores(self, targets: np.ndarray, predictions: np.ndarray, options: dict) -> dict:
        """Per-epoch metrics (cheap) for selection."""
        raise NotImplementedError

    def metrics_with_ci(self, targets: np.ndarray, predictions: np.ndarray, options: dict, n_boot: int,
                        seed: int) -> dict:
        raise NotImplementedError

    def write_predictions(self, out: Path, bundle: DataBundle, predictions: np.ndarray, options: dict | None = None
                          ) -> list[str]:
        """Write the test predictions into the run folder; returns the files written."""
        raise NotImplementedError

    def build_augment(self, name: str, strength: float):
        """The training augmentation of ``--augment`` for this task's targets (None: none)."""
        from ..augment import build_augment

        return build_augment(name, strength)

    def fit_on_validation(self, targets: np.ndarray, predictions: np.ndarray, options: dict) -> dict:
        """Settings fitted on the selection data after training and applied to the test predictions
        (detection: the score threshold); merged into the options of ``metrics_with_ci``, recorded
        in metrics.json and the adapter's metadata. Read on validation only, never on test."""
        return {}

    def predict_settings(self, metadata: dict, image_size: int) -> dict:
        """Keyword arguments ``medpeft predict`` passes to ``write_user_predictions`` (from the adapter's metadata)."""
        return {}

    def write_user_predictions(self, files: list[str], predictions: np.ndarray, class_names: list[str], kind: str,
                               out: str | None) -> str:
        """``medpeft predict``: write (or print) the predictions of ``files``; returns a summary line."""
        raise NotImplementedError
