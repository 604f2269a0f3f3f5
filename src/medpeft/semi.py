"""Semi-supervised fine-tuning with FixMatch (Sohn et al., NeurIPS 2020) on top of any method.

    medpeft run --data breastmnist --fraction 0.1 --semi fixmatch --method lora

The unlabelled pool is the rest of the training split - the images the label budget left without
labels (``DataBundle.unlabelled``, made by the fraction / shots subset); never validation or test
images, and, because automatic splits keep near-duplicate groups on one side, never a
near-duplicate of one. Their labels are blanked (-1) before training, so nothing can read them.

``selftrain`` (plain self-training, pseudo-label rounds): train on the labelled images; label the
unlabelled pool with the model's predictions whose confidence reaches ``threshold``; train a fresh
model (the same seed) on labelled + pseudo-labelled images; repeat for ``rounds``. Selection stays
on the labelled validation split; the test split is read once, by the last round's model.

FixMatch: each optimizer step adds a batch of ``ratio x batch_size`` unlabelled images seen twice - weakly
augmented (the ``light`` policy) and strongly augmented (the ``medical`` preset at strength 1.5:
geometry, intensity and artefacts) - and the loss ``weight * mean_b(1[max p_weak >= threshold] *
CE(strong, argmax p_weak))``: the model's confident predictions on the weak view are the targets
of the strong view; below ``threshold`` (0.95, the paper's) an image contributes nothing. The
pseudo-labels carry no gradient. Each epoch records the fraction of unlabelled images above the
threshold.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import ConfigError

SEMI = ("none", "fixmatch", "selftrain")
STRONG_AUGMENT = ("medical", 1.5)


def fixmatch_loss(logits_weak: torch.Tensor, logits_strong: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
    """(the unlabelled loss, how many images passed the threshold)."""
    with torch.no_grad():
        confidence, pseudo = torch.softmax(logits_weak.float(), dim=1).max(dim=1)
        mask = (confidence >= threshold).float()
    loss = (F.cross_entropy(logits_strong.float(), pseudo, reduction="none") * mask).mean()
    return loss, int(mask.sum())


class FixMatch:
    def __init__(self, weak_loader, strong_loader, threshold: float, weight: float):
        self.weak, self.strong = weak_loader, strong_loader
        self.threshold, self.weight = float(threshold), float(weight)
        self._batches = iter(())
        self.used = self.seen = 0

    def _next(self):
        try:
            return next(self._batches)
        except StopIteration:  # both loaders restart together: the same seeded order, two views
            self._batches = zip(iter(self.weak), iter(self.strong))
            return next(self._batches)

    def loss(self, forward) -> torch.Tensor:
        (weak, _), (strong, _) = self._next()
        with torch.no_grad():
            logits_weak = forward(weak)
        loss, used = fixmatch_loss(logits_weak, forward(strong), self.threshold)
        self.used += used
        self.seen += len(weak)
        return self.weight * loss

    def epoch_rate(self) -> float:
        rate = self.used / max(self.seen, 1)
        self.used = self.seen = 0
        return rate


def pseudo_labelled(unlabelled, probabilities, threshold: float):
    """The pool's images whose top probability reaches ``threshold``, labelled with its class."""
    import numpy as np

    probabilities = np.asarray(probabilities)
    confident = np.flatnonzero(probabilities.max(1) >= threshold)
    chosen = unlabelled.subset(confident)
    chosen.labels = torch.as_tensor(probabilities[confident].argmax(1), dtype=torch.int64)
    return chosen


def check_semi(semi: str, kind: str, unlabelled) -> None:
    if semi not in SEMI:
        raise ConfigError(f"semi {semi!r} is not one of {', '.join(SEMI)}")
    if semi == "none":
        return
    if kind not in ("binary", "multiclass"):
        raise ConfigError(f"semi {semi!r} applies to single-label classification; this data set is {kind}")
    if unlabelled is None or len(unlabelled) == 0:
        raise ConfigError(f"semi {semi!r} needs unlabelled images: train with --fraction or --shots, so the rest of "
                          "the training split is the unlabelled pool")
