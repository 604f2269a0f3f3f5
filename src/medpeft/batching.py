"""Batches straight from in-memory uint8 tensors: no per-sample Python in the hot loop.

Normalisation (the backbone's own mean/std), grayscale -> 3 channels and the light
training augmentation all run on whole batches, on the training device. Augmentation
parameters are drawn per sample from a seeded generator, so a seed gives the same run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from .data.base import ImageSet


@dataclass
class LightAugment:
    """Per-sample random flip, small affine and brightness/contrast jitter, batched."""

    hflip: float = 0.5
    degrees: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.05
    brightness: float = 0.1
    contrast: float = 0.1
    # every operation treats channels alike: a grayscale batch is augmented as 1 channel and only
    # then broadcast to 3 (a third of the work, the same result)
    grayscale_safe = True

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """x: float [B, C, H, W] in [0, 1]."""
        return self.apply_with_mask(x, None, gen)[0]

    def apply_with_mask(self, x: torch.Tensor, mask: torch.Tensor | None, gen: torch.Generator):
        """x as in ``__call__``; mask [B, H, W] class indices moved by the same affine warp
        (nearest neighbour: no interpolated class values), untouched by the intensity jitter."""
        b = x.shape[0]

        def uniform(lo, hi):
            return torch.rand(b, generator=gen, device=gen.device).to(x.device) * (hi - lo) + lo

        angle = uniform(-self.degrees, self.degrees) * math.pi / 180
        scale = uniform(*self.scale)
        tx, ty = uniform(-self.translate, self.translate) * 2, uniform(-self.translate, self.translate) * 2
        flip = torch.where(uniform(0, 1) < self.hflip, -1.0, 1.0)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack(
            [torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1
        ).to(x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if mask is not None:  # outside the image after the warp: background
            mask = F.grid_sample(mask[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                                 align_corners=False)[:, 0].to(mask.dtype)
        bright = uniform(1 - self.brightness, 1 + self.brightness).view(b, 1, 1, 1)
        contrast = uniform(1 - self.contrast, 1 + self.contrast).view(b, 1, 1, 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * contrast + mean) * bright
        return x.clamp_(0, 1), mask


class BatchLoader:
    """Iterates (inputs, targets) over an ImageSet.

    Inputs are float [B, 3, H, W] normalised with the backbone's mean/std on ``device``.
    With ``shuffle`` the order comes from ``seed`` and the epoch number, so a run is
    reproducible and a resumed epoch sees the same order.
    """

    def __init__(self, data: ImageSet, batch_size: int, mean, std, device="cpu", shuffle=False,
                 augment=None, seed: int = 0, drop_last: bool = False, channels_last: bool = False,
                 targets=None):
        self.data = data
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed
        self.drop_last = drop_last and len(data) > self.batch_size
        self.epoch = 0
        self.channels_last = channels_last
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        # (x / 255 - mean) / std as one multiply-add (a grayscale batch broadcasts to 3 channels in it)
        self.scale = 1.0 / (255.0 * self.std)
        self.inv_std = 1.0 / self.std
        self.shift = -self.mean / self.std
        self.images = data.images.to(self.device)  # uint8, moved once
        # what the task learns: class labels, per-pixel masks or padded boxes (both augmented with the images)
        self.labels = (data.labels if targets is None else targets(data)).to(self.device)
        self.boxes = self.labels.dim() == 3 and self.labels.is_floating_point()  # [N, M, 5], data.detection
        self.dense = self.labels.dim() == 3 and not self.boxes

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def to_input(self, images_uint8: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        return self.to_batch(images_uint8, None, gen)[0]

    def to_batch(self, images_uint8: torch.Tensor, targets: torch.Tensor | None, gen: torch.Generator | None = None):
        """(normalised inputs, targets): masks move with the images under augmentation."""
        if self.augment is None or gen is None:
            x = torch.addcmul(self.shift, images_uint8.float(), self.scale)
        else:
            x = images_uint8.float().div_(255)
            if x.shape[1] == 1 and not getattr(self.augment, "grayscale_safe", False):
                x = x.expand(-1, 3, -1, -1)
            if self.dense and targets is not None:
                x, targets = self.augment.apply_with_mask(x, targets, gen)
            elif self.boxes and targets is not None:
                x, targets = self._augment_boxes(x, targets, gen)
            else:
                x = self.augment(x, gen)
            x = torch.addcmul(self.shift, x, self.inv_std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, targets

    def _augment_boxes(self, x: torch.Tensor, targets: torch.Tensor, gen: torch.Generator):
        """A box-aware augmentation (``box_augment.BoxAugment``) per image; boxes it drops (cut by
        the border) become padding, so the batch keeps its [B, M, 5] shape."""
        from .data.detection import padded_boxes, unpad

        if not hasattr(self.augment, "batch"):
            raise TypeError(f"{type(self.augment).__name__} cannot move boxes; detection needs a box-aware "
                            "augmentation (box_augment.build_box_augment)")
        x, moved = self.augment.batch(x, unpad(targets.cpu()), gen)
        out = torch.full_like(targets, float("nan"))
        padded = padded_boxes([(t["boxes"].numpy(), t["labels"].numpy()) for t in moved])
        out[:, :padded.shape[1]] = padded.to(out.device)  # never wider: an augmentation only drops boxes
        return x, out

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.data)
        gen = None
        if self.shuffle or self.augment is not None:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        order = order.to(self.device)
        self.epoch += 1
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.to_batch(self.images[idx], self.labels[idx], gen)
