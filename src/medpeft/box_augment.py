"""Box-aware training augmentation for detection, on torchvision.transforms.v2.

    aug = build_box_augment("flip,vflip,scale,rotation", strength=1.0)
    image, boxes, labels = aug(image, boxes, labels, gen)       # one sample, seeded by gen
    images, targets = aug.batch(images, targets, gen)           # [B, C, H, W] + torchvision targets

Why v2: its ``tv_tensors.BoundingBoxes`` are moved by every geometric transform the project
already uses for images and masks (``augment.OPS``), so a spec means the same thing for
classification, segmentation and detection, and intensity/artefact operations leave boxes alone
by construction. The operations, with how boxes follow them:

* ``flip`` / ``vflip``: exact (x -> W - x, the box's corners swapped).
* ``scale`` (random resized crop, ``augment.AlignedResizedCrop``): exact (crop = shift, resize =
  scale of the continuous coordinates).
* ``rotation`` and the ``light`` preset's small affine (``v2.RandomAffine``: flip, rotation,
  scale, translate, the magnitudes of ``batching.LightAugment``): the 4 corners are transformed
  and the enclosing axis-aligned box is taken - exact for the rotated rectangle's extent, larger
  than a rotated round lesion (the usual detection convention).
* ``elastic``: a box's whole outline (points 1 px apart, not only its corners: an elastic warp
  bends edges) is moved through the inverse of the warp (fixed-point iteration on the smooth
  displacement field) and the enclosing box taken (``OutlineElastic``). torchvision's own
  elastic box kernel moves the 4 corners only: over 20 draws on a 96 x 128 image its worst IoU
  with the warped rectangles' extents was 0.93 at strength 1 and 0.81 at strength 3, the
  outline's 0.96 and 0.95 (pixel quantisation bounds it).

The batched ``light`` augmentation of classification (``batching.LightAugment``, one
``F.affine_grid`` warp per batch) has no box support; ``light`` here is the same recipe per
sample in v2.

Boxes leaving the image (``BoxKeepRule``): v2 runs with ``clamping_mode=None`` so the boxes come
out unclipped; each is then clipped to the image and **dropped** when less than
``min_visible`` (default 25 %) of its transformed area remains inside the image, or when its
clipped width or height is below ``min_side`` pixels (default 2). Labels follow their boxes.

Determinism: torchvision draws from torch's global RNG; ``augment.seeded_global_rng`` seeds it
from ``gen`` for the call and restores it afterwards, so a seed gives the same sample and the
caller's RNG is untouched.
"""
from __future__ import annotations

from dataclasses import dataclass

import math

import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2

from medpeft.augment import OPS, SmoothElastic, _check_strength, parse_augment_spec, seeded_global_rng
from medpeft.errors import ConfigError, DataError


@dataclass(frozen=True)
class BoxKeepRule:
    """When a box cut by the image border survives an augmentation."""

    min_visible: float = 0.25  # fraction of the transformed box's area that must stay inside
    min_side: float = 2.0  # pixels: narrower or flatter clipped boxes are dropped

    def __post_init__(self):
        if not 0 <= self.min_visible <= 1:
            raise ConfigError(f"min_visible={self.min_visible!r}; expected a fraction in [0, 1]")
        if not self.min_side >= 0:
            raise ConfigError(f"min_side={self.min_side!r}; expected pixels >= 0")


def clip_and_filter(boxes, labels, size: tuple[int, int], rule: BoxKeepRule = BoxKeepRule()
                    ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(clipped boxes float32 [M, 4], their labels [M], number dropped) under ``rule``; ``boxes``
    in continuous (x0, y0, x1, y1) pixels of an image of ``size`` (H, W), possibly outside it."""
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    h, w = size
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    lo = torch.tensor([0.0, 0.0, 0.0, 0.0])
    hi = torch.tensor([w, h, w, h], dtype=torch.float32)
    clipped = torch.minimum(torch.maximum(boxes, lo), hi)
    cw, ch = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    visible = cw.clamp(min=0) * ch.clamp(min=0) / area.clamp(min=1e-12)
    keep = (area > 0) & (visible >= rule.min_visible) & (cw >= rule.min_side) & (ch >= rule.min_side)
    return clipped[keep], labels[keep], int((~keep).sum())


# ----------------------------------------------------------------------------- elastic boxes
def _outline_points(box: torch.Tensor) -> torch.Tensor:
    """[P, 2] (x, y) points along the 4 edges of one box, at most 1 px apart, corners included."""
    x0, y0, x1, y1 = box.tolist()
    nx, ny = max(2, math.ceil(x1 - x0) + 1), max(2, math.ceil(y1 - y0) + 1)
    xs, ys = torch.linspace(x0, x1, nx), torch.linspace(y0, y1, ny)
    return torch.cat([torch.stack([xs, torch.full_like(xs, y0)], 1), torch.stack([xs, torch.full_like(xs, y1)], 1),
                      torch.stack([torch.full_like(ys, x0), ys], 1), torch.stack([torch.full_like(ys, x1), ys], 1)])


def elastic_boxes(boxes: torch.Tensor, displacement: torch.Tensor, size: tuple[int, int],
                  iterations: int = 3) -> torch.Tensor:
    """Boxes [N, 4] after v2's elastic warp with ``displacement`` [1, H, W, 2] (normalised units,
    added to the sampling grid: the output point u samples the input at u + d(u)). Each outline
    point q goes to the u solving u + d(u) = q, found by iterating u <- q - d(u) (d is smooth and
    small, so this converges in a few steps); the enclosing box of the moved outline is returned,
    unclipped."""
    h, w = size
    if boxes.numel() == 0:
        return boxes.reshape(0, 4).float()
    field = displacement.permute(0, 3, 1, 2).float()  # [1, 2, H, W], x then y, normalised
    half = torch.tensor([w / 2.0, h / 2.0])
    out = []
    for box in boxes.float():
        q = _outline_points(box)
        u = q.clone()
        for _ in range(iterations):
            grid = (u / half - 1.0).view(1, 1, -1, 2)  # continuous pixels -> normalised, align_corners=False
            d = F.grid_sample(field, grid, mode="bilinear", padding_mode="border", align_corners=False)
            u = q - d[0, :, 0].T * half
        out.append(torch.cat([u.min(0).values, u.max(0).values]))
    return torch.stack(out)


class OutlineElastic(SmoothElastic):
    """``augment.SmoothElastic`` whose boxes follow their whole outline (``elastic_boxes``)."""

    def transform(self, inpt, params):
        if isinstance(inpt, tv_tensors.BoundingBoxes):
            moved = elastic_boxes(inpt.as_subclass(torch.Tensor), params["displacement"], inpt.canvas_size)
            return tv_tensors.wrap(moved.to(inpt.dtype), like=inpt)
        return super().transform(inpt, params)


def _box_aware(transform: v2.Transform) -> v2.Transform:
    """The transform, with torchvision's corner-only elastic box kernel replaced."""
    if isinstance(transform, SmoothElastic):
        return OutlineElastic(magnitude=transform.magnitude, grid=transform.grid)
    return transform


# ----------------------------------------------------------------------------- pipelines
def _light_steps(s: float, always: bool) -> list[v2.Transform]:
    """``batching.LightAugment``'s recipe per sample in v2 (flip, small affine, jitter)."""
    return [v2.RandomHorizontalFlip(p=1.0 if always else 0.5),
            v2.RandomAffine(degrees=10.0 * s, translate=(min(0.05 * s, 1.0),) * 2,
                            scale=(max(0.05, 1 - 0.1 * s), 1 + 0.1 * s)),
            v2.ColorJitter(brightness=min(0.1 * s, 1.0), contrast=min(0.1 * s, 1.0))]


class BoxAugment:
    """Per-sample random v2 transforms moving images and their boxes together.

    ``ops``: [(operation name of ``augment.OPS`` or "light", strength)]; every operation is
    applied with its own probability (``OPS[name].p``), or always with ``always=True`` (tests,
    previews)."""

    def __init__(self, ops: list[tuple[str, float]], rule: BoxKeepRule = BoxKeepRule(), always: bool = False):
        for op, s in ops:
            if op != "light" and op not in OPS:
                raise ConfigError(f"unknown augmentation {op!r}; valid: light, {', '.join(OPS)}")
            _check_strength(s, f"strength of {op!r}")
        self.ops = list(ops)
        self.rule = rule
        self.always = always
        self._pipelines: dict[tuple[int, int], v2.Compose] = {}

    def __repr__(self) -> str:
        return f"BoxAugment({self.ops!r}, rule={self.rule!r}, always={self.always})"

    def pipeline(self, height: int, width: int) -> v2.Compose:
        key = (int(height), int(width))
        if key not in self._pipelines:
            steps = []
            for op, s in self.ops:
                if op == "light":
                    steps += _light_steps(s, self.always)
                    continue
                transform = _box_aware(OPS[op].build(s, *key))
                p = 1.0 if self.always else OPS[op].p
                steps.append(transform if p >= 1 else v2.RandomApply([transform], p=p))
            self._pipelines[key] = v2.Compose(steps)
        return self._pipelines[key]

    def __call__(self, image: torch.Tensor, boxes, labels, gen: torch.Generator | None = None):
        """image float [C, H, W] in [0, 1]; boxes [N, 4] (x0, y0, x1, y1) pixels; labels [N].
        Returns (image, boxes float32 [M, 4], labels int64 [M]) with M <= N (``rule``). A grayscale
        image stored as 3 equal channels stays gray (noise is drawn once for all channels)."""
        if image.ndim != 3:
            raise DataError(f"box augmentation expects one image [C, H, W], got shape {tuple(image.shape)}")
        boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        if len(boxes) != len(labels):
            raise DataError(f"{len(boxes)} boxes but {len(labels)} labels; expected one label per box")
        size = tuple(image.shape[-2:])
        gray3 = image.shape[0] == 3 and torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
        src = image[:1] if gray3 else image
        wrapped = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=size, clamping_mode=None)
        with seeded_global_rng(gen, image.device):
            # the image goes first: the project's own transforms read the size from the first tensor
            out, moved = self.pipeline(*size)(tv_tensors.Image(src), wrapped)
        out = out.as_subclass(torch.Tensor).clamp(0, 1)
        kept, kept_labels, _ = clip_and_filter(moved.as_subclass(torch.Tensor), labels, tuple(out.shape[-2:]),
                                               self.rule)
        return (out.expand(3, -1, -1) if gray3 else out), kept, kept_labels

    def batch(self, images: torch.Tensor, targets: list[dict], gen: torch.Generator | None = None):
        """images float [B, C, H, W]; targets: one ``{"boxes", "labels", ...}`` per image (other keys
        are kept). Returns (images [B, C, H, W], new targets)."""
        if images.ndim != 4 or len(targets) != images.shape[0]:
            raise DataError(f"{len(targets)} targets for images of shape {tuple(images.shape)}; expected "
                            "[B, C, H, W] and one target per image")
        out_images, out_targets = [], []
        for image, target in zip(images, targets):
            img, boxes, labels = self(image, target["boxes"], target["labels"], gen)
            out_images.append(img)
            out_targets.append({**target, "boxes": boxes, "labels": labels})
        return torch.stack(out_images), out_targets


def build_box_augment(name_or_spec: str | None, strength: float = 1.0, rule: BoxKeepRule = BoxKeepRule(),
                      always: bool = False) -> BoxAugment | None:
    """The box-aware counterpart of ``augment.build_augment``: the same names and specs
    (``none``, ``light``, presets, ``"flip,scale=0.5"``...), None for ``none`` or strength 0."""
    strength = _check_strength(strength, "augment strength")
    ops = parse_augment_spec(name_or_spec or "none")
    if ops[0][0] == "none" or strength == 0:
        return None
    ops = [(name, factor * strength) for name, factor in ops if factor > 0]
    return BoxAugment(ops, rule=rule, always=always) if ops else None

