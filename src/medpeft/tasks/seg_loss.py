"""Segmentation losses (MONAI) for 2D label maps.

``seg_loss(name, num_classes)`` returns a module called as ``loss(logits, target)`` with
``logits`` float [B, K, H, W] (raw scores, K = num_classes, softmax applied inside) and
``target`` long [B, H, W] class indices; the result is a scalar tensor.

``SEG_LOSSES``:

* ``dice_ce``    soft Dice + cross-entropy (``monai.losses.DiceCELoss``), the usual default
* ``dice``       soft Dice alone (``monai.losses.DiceLoss``)
* ``ce``         cross-entropy alone (``torch.nn.CrossEntropyLoss``, over all classes)
* ``dice_focal`` soft Dice + softmax focal loss (``monai.losses.DiceLoss`` +
  ``monai.losses.FocalLoss(use_softmax=True, gamma=2)``)

Dice settings (shared by every Dice term), chosen for small lesion masks:

* ``include_background=False``: the background channel's Dice is ~1 whatever the model does
  on a small lesion, which dilutes the foreground signal (nnU-Net also drops it); background
  is still learned through the softmax and the CE/focal term, which covers every class.
* ``batch=True``: TP/FP/FN are summed over the whole batch before the ratio (nnU-Net's
  "batch Dice"). Per-image Dice is degenerate on lesion-free images (loss ~1 for a single
  false-positive pixel, ~0 otherwise) and noisy on tiny lesions; batch Dice is stable.
* ``smooth_nr = smooth_dr = 1e-5`` (MONAI's defaults): small enough not to bias the Dice of
  a lesion of a few pixels (a smooth of 1 would add ~5% on a 20-pixel lesion), large enough
  to avoid 0/0 on an all-background batch.

The focal term uses softmax over all K classes (``include_background=True``): MONAI's
``DiceFocalLoss`` uses a per-channel sigmoid focal loss, which does not match a softmax model,
and dropping the background channel before a softmax would renormalise over the foreground
classes only.
"""
from __future__ import annotations

import numbers

import torch
from torch import nn

from medpeft.errors import ConfigError, DataError

SEG_LOSSES = ("dice_ce", "dice", "ce", "dice_focal")

_DICE_KW = dict(include_background=False, to_onehot_y=True, softmax=True, batch=True,
                smooth_nr=1e-5, smooth_dr=1e-5)


class SegLoss(nn.Module):
    """``loss(logits [B, K, H, W], target [B, H, W] long) -> scalar``; see the module docstring."""

    def __init__(self, name: str, num_classes: int, inner: nn.Module):
        super().__init__()
        self.name = name
        self.num_classes = num_classes
        self.inner = inner

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.ndim != 4 or logits.shape[1] != self.num_classes:
            raise DataError(f"{self.name} loss: logits have shape {tuple(logits.shape)}; expected "
                            f"[B, {self.num_classes}, H, W] (one channel per class)")
        if target.ndim != 3 or target.shape[0] != logits.shape[0] or target.shape[1:] != logits.shape[2:]:
            raise DataError(f"{self.name} loss: target has shape {tuple(target.shape)}; expected "
                            f"[{logits.shape[0]}, {logits.shape[2]}, {logits.shape[3]}] class indices "
                            "matching the logits")
        target = target.long()
        if self.name == "ce":
            return self.inner(logits, target)
        return self.inner(logits, target.unsqueeze(1))


class _DiceFocal(nn.Module):
    def __init__(self):
        super().__init__()
        from monai.losses import DiceLoss, FocalLoss
        self.dice = DiceLoss(**_DICE_KW)
        self.focal = FocalLoss(include_background=True, to_onehot_y=True, use_softmax=True, gamma=2.0)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.dice(logits, target) + self.focal(logits, target)


def seg_loss(name: str, num_classes: int) -> SegLoss:
    """The segmentation loss ``name`` (one of ``SEG_LOSSES``) for ``num_classes`` classes (>= 2)."""
    if name not in SEG_LOSSES:
        raise ConfigError(f"unknown segmentation loss {name!r}; valid choices: {', '.join(SEG_LOSSES)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise ConfigError(f"num_classes={num_classes!r}; expected an integer >= 2 (background + foreground classes)")
    from monai.losses import DiceCELoss, DiceLoss  # imported lazily: monai is slow to import

    if name == "dice_ce":
        inner: nn.Module = DiceCELoss(**_DICE_KW)
    elif name == "dice":
        inner = DiceLoss(**_DICE_KW)
    elif name == "ce":
        inner = nn.CrossEntropyLoss()
    else:
        inner = _DiceFocal()
    return SegLoss(name, int(num_classes), inner)
