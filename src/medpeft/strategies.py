"""Noise-robust training strategies that combine with every method (single-label classification).

* ``plain``: cross-entropy (the default).
* ``gce``: generalized cross-entropy (Zhang & Sabuncu, NeurIPS 2018), L = (1 - p_y ** q) / q with
  q = 0.7: between cross-entropy (q -> 0) and the noise-robust mean absolute error (q = 1).
* ``cufit``: curriculum fine-tuning (Yu et al., NeurIPS 2024). Three modules train side by side
  on every batch: (A) a linear probe on the frozen pretrained backbone, on every sample - linear
  probing resists memorising wrong labels; (B) an intermediate module, the backbone adapted by the
  run's method with its own head, on the samples whose label A's prediction agrees with; (C) the
  last module - the run's model, adapted the same way - on the samples B agrees with. C is
  what is selected on validation, tested and saved; A and B are training-time modules. As in the
  authors' code, agreement is the arg-max prediction equal to the (noisy) label, per batch,
  without gradient; each module's loss is the mean over the batch of the kept samples' CE.

How many labels each stage kept and how clean the kept set was (the flipped ids are known when
the noise was injected) is measured after training in one pass over the training split.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

STRATEGIES = ("plain", "gce", "cufit")
GCE_Q = 0.7


def gce_loss(logits: torch.Tensor, y: torch.Tensor, q: float = GCE_Q) -> torch.Tensor:
    """Mean generalized cross-entropy over the batch; ``y`` class indices (or soft targets)."""
    p = torch.softmax(logits, dim=-1)
    if y.dim() == 2:  # soft targets (mixing): the expected loss
        return (y * (1 - p.clamp_min(1e-12) ** q) / q).sum(1).mean()
    p_y = p.gather(1, y[:, None]).squeeze(1).clamp_min(1e-12)
    return ((1 - p_y ** q) / q).mean()


def check_strategy(strategy: str, kind: str) -> None:
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if strategy != "plain" and kind not in ("binary", "multiclass"):
        raise ConfigError(f"strategy {strategy!r} applies to single-label classification; this data set is {kind}")


class Cufit:
    """Modules A (``probe``) and B (``intermediate``) of CUFIT beside the run's model (C)."""

    def __init__(self, probe: nn.Module, intermediate: nn.Module):
        self.probe = probe
        self.intermediate = intermediate
        self.kept = {"b": 0, "c": 0, "n": 0}  # per epoch: samples B and C trained on, of n

    def modules(self) -> list[nn.Module]:
        return [self.probe, self.intermediate]

    def parameters(self):
        return [p for m in self.modules() for p in m.parameters() if p.requires_grad]

    def loss(self, logits_c: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if y.dim() != 1:
            raise ConfigError("strategy cufit needs hard labels: train with mix none")
        logits_a = self.probe(x)
        logits_b = self.intermediate(x)
        with torch.no_grad():
            agree_a = (logits_a.argmax(1) == y).float()
            agree_b = (logits_b.argmax(1) == y).float()
        self.kept["b"] += int(agree_a.sum())
        self.kept["c"] += int(agree_b.sum())
        self.kept["n"] += len(y)
        loss_a = F.cross_entropy(logits_a.float(), y)
        loss_b = (agree_a * F.cross_entropy(logits_b.float(), y, reduction="none")).mean()
        loss_c = (agree_b * F.cross_entropy(logits_c.float(), y, reduction="none")).mean()
        return loss_a + loss_b + loss_c

    def epoch_fractions(self) -> dict:
        n = max(self.kept["n"], 1)
        out = {"cufit_kept_b": self.kept["b"] / n, "cufit_kept_c": self.kept["c"] / n}
        self.kept = {"b": 0, "c": 0, "n": 0}
        return out


@torch.no_grad()
def curriculum_record(cufit: Cufit, loader, noisy: torch.Tensor | None) -> dict:
    """After training: on the training split (no augmentation), how many samples each stage keeps
    (A agrees -> B trains on it; B agrees -> C trains on it) and, with injected noise, how many of
    the kept labels are wrong. ``noisy``: bool [N] in the loader's order, or None."""
    from .methods import set_train_mode

    for module in cufit.modules():
        set_train_mode(module, False)
    keep_b, keep_c, start = [], [], 0
    for x, y in loader:
        keep_b.append((cufit.probe(x).argmax(1) == y).cpu())
        keep_c.append((cufit.intermediate(x).argmax(1) == y).cpu())
        start += len(y)
    keep_b, keep_c = torch.cat(keep_b), torch.cat(keep_c)
    record = {"n_train": int(len(keep_b)), "stage_b_kept": int(keep_b.sum()), "stage_c_kept": int(keep_c.sum())}
    if noisy is not None:
        record.update(n_noisy=int(noisy.sum()), stage_b_kept_noisy=int((keep_b & noisy).sum()),
                      stage_c_kept_noisy=int((keep_c & noisy).sum()))
        for stage, keep in (("b", keep_b), ("c", keep_c)):
            kept = int(keep.sum())
            record[f"stage_{stage}_clean_fraction"] = float(((keep & ~noisy).sum() / kept).item()) if kept else None
    return record
