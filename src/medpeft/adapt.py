"""Unsupervised domain adaptation with DANN (Ganin et al., JMLR 2016) on top of any PEFT method.

    medpeft run ... --adapt dann --target-unlabelled ../shared/data/CVC-ClinicDB

A domain classifier (two linear layers) reads the features the methods adapt - the output of the
backbone's last ``feature_info`` module (a CNN's deepest stage, a ViT's last block), averaged over
space or tokens - behind a gradient-reversal layer, and learns to tell source (the labelled
training images) from target (unlabelled images of the other centre) while the backbone, through
the reversed gradient, learns features it cannot tell apart. Each optimizer step adds one target
batch (the same size, drawn in a seeded order) and ``weight * BCE`` to the task loss; the
reversal coefficient follows Ganin's schedule ``2 / (1 + exp(-10 p)) - 1`` over training progress
``p`` in [0, 1]. What the backbone may change is what the method trains: with ``head`` or
``linear`` nothing of the backbone moves, so DANN adapts only methods that train the backbone.
The domain classifier is a training-time module: it is neither saved nor used for predictions.
"""
from __future__ import annotations

import math
import os

import torch
from torch import nn

from .errors import ConfigError, DataError

ADAPTATIONS = ("none", "dann")
DOMAIN_HIDDEN = 256


class GradientReversal(torch.autograd.Function):
    """Identity forward; the gradient multiplied by ``-coeff`` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, coeff: float) -> torch.Tensor:
        ctx.coeff = float(coeff)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.coeff * grad, None


def grad_reverse(x: torch.Tensor, coeff: float = 1.0) -> torch.Tensor:
    return GradientReversal.apply(x, coeff)


def reversal_coefficient(progress: float) -> float:
    """Ganin et al.'s schedule: 0 at the start of training, -> 1 at its end."""
    return 2.0 / (1.0 + math.exp(-10.0 * min(max(progress, 0.0), 1.0))) - 1.0


class DomainClassifier(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(channels, DOMAIN_HIDDEN), nn.ReLU(inplace=True), nn.Linear(DOMAIN_HIDDEN, 1))

    def forward(self, features: torch.Tensor, coeff: float) -> torch.Tensor:
        return self.net(grad_reverse(features, coeff)).squeeze(1)


def _pooled(output) -> torch.Tensor:
    if isinstance(output, (tuple, list)):
        output = output[0]
    if output.dim() == 4:  # [B, C, H, W]
        return output.mean(dim=(2, 3))
    if output.dim() == 3:  # tokens [B, N, C]
        return output.mean(dim=1)
    return output.flatten(1)


class FeatureHook:
    """Keeps the pooled output of one backbone module at every forward."""

    def __init__(self, module: nn.Module):
        self.value: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._keep)

    def _keep(self, module, args, output):
        self.value = _pooled(output)

    def remove(self) -> None:
        self.handle.remove()


def feature_module(backbone: nn.Module) -> tuple[str, int]:
    """(name, channels) of the backbone module whose output DANN aligns: the last ``feature_info`` entry."""
    info = list(getattr(backbone, "feature_info", []) or [])
    if not info:
        raise ConfigError(f"{type(backbone).__name__} has no feature_info: DANN cannot find the features to align")
    return info[-1]["module"], int(info[-1]["num_chs"])


class Dann:
    """The domain classifier, the feature hook and the target batches of one training run."""

    def __init__(self, backbone: nn.Module, target_loader, weight: float, total_steps: int):
        name, channels = feature_module(backbone)
        self.backbone = backbone
        self.hook = FeatureHook(dict(backbone.named_modules())[name])
        ref = next(backbone.parameters())
        self.classifier = DomainClassifier(channels).to(device=ref.device)
        self.loader = target_loader
        self.weight = float(weight)
        self.total_steps = max(int(total_steps), 1)
        self.step = 0
        self._batches = iter(())

    def parameters(self):
        return self.classifier.parameters()

    def _target_batch(self) -> torch.Tensor:
        try:
            return next(self._batches)[0]
        except StopIteration:  # a new pass (the loader's seeded order moves on with its epoch)
            self._batches = iter(self.loader)
            return next(self._batches)[0]

    def loss(self, source_size: int) -> torch.Tensor:
        """Called right after the task's forward on the source batch (the hook holds its features)."""
        source = self.hook.value
        if source is None or len(source) != source_size:
            raise RuntimeError("DANN: the source features were not captured by the task's forward")
        target_x = self._target_batch()[:source_size]
        self.backbone.forward_features(target_x)
        target = self.hook.value
        coeff = reversal_coefficient(self.step / self.total_steps)
        self.step += 1
        features = torch.cat([source, target]).float()
        domains = torch.cat([torch.zeros(len(source)), torch.ones(len(target))]).to(features.device)
        logits = self.classifier(features, coeff)
        return self.weight * nn.functional.binary_cross_entropy_with_logits(logits, domains)

    def close(self) -> None:
        self.hook.remove()


def load_target_images(folder: str, size: int, channels: int, dicom_window: str | None = None):
    """Every image file under ``folder`` (recursively; masks named ``*_mask*`` skipped), at the run's
    size and channel count, as an ImageSet without labels. DataError for a missing or empty folder."""
    from .data.base import ImageSet
    from .data.external import convert_channels
    from .data.io import is_image_file, load_images

    if not folder or not os.path.isdir(folder):
        raise DataError(f"--target-unlabelled {folder!r} is not a folder; expected a folder of unlabelled target "
                        "images")
    files = sorted(os.path.join(root, f) for root, _, names in os.walk(folder) for f in names
                   if is_image_file(f) and "_mask" not in f and os.sep + "masks" not in root)
    if not files:
        raise DataError(f"--target-unlabelled {folder!r} holds no images; expected image files (png, jpg, dcm, ...)")
    images = convert_channels(load_images(files, size, dicom_window), channels)
    return ImageSet(images=images, labels=torch.zeros(len(files), dtype=torch.long),
                    ids=[os.path.relpath(f, folder) for f in files])
