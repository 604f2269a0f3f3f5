"""How far fine-tuning moved the pretrained representation (``--forgetting``).

* **Linear CKA** (Kornblith et al., ICML 2019) between the pretrained backbone's features and the
  fine-tuned backbone's on a reference set (the home test images; their labels are not read):
  CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) with X, Y column-centred. 1 = the same
  representation up to rotation and isotropic scaling (a frozen backbone: linear probing, head-only
  methods), lower = more moved.
* **Linear probe on another data set** (``--forgetting-probe DATA``, a classification set the run
  was *not* tuned on): logistic regression on the pooled features of its training split, scored on
  its test split (AUROC), with the pretrained backbone and with the fine-tuned one; the change is
  what fine-tuning cost (or gained) the representation for a task it never saw.

Features are the backbone's pooled pre-logits (``forward_head(..., pre_logits=True)``), in eval
mode, for the part the methods adapted (the encoder of a segmentation or detection model).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise ValueError(f"CKA needs the same >= 2 examples in both: {x.shape} vs {y.shape}")
    x = x - x.mean(0, keepdims=True)
    y = y - y.mean(0, keepdims=True)
    cross = np.linalg.norm(y.T @ x) ** 2
    norm = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(cross / norm) if norm > 0 else float("nan")


@torch.no_grad()
def pooled_features(backbone: nn.Module, images, mean, std, batch_size: int = 128, device="cpu") -> np.ndarray:
    """[N, D] pooled pre-logit features of uint8 images through ``backbone`` (eval mode)."""
    from .batching import BatchLoader
    from .methods import set_train_mode

    loader = BatchLoader(images, batch_size, mean, std, device=device, targets=lambda d: d.labels)
    backbone.to(loader.device)
    set_train_mode(backbone, False)
    out = []
    for x, _ in loader:
        features = backbone.forward_features(x)
        out.append(backbone.forward_head(features, pre_logits=True).float().flatten(1).cpu())
    return torch.cat(out).numpy()


def probe_auroc(train_x, train_y, test_x, test_y, positive: int = 1) -> float:
    """Logistic-regression probe (standardised features, L2, lbfgs) -> test AUROC (macro one-vs-rest)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    probe.fit(train_x, train_y)
    scores = probe.predict_proba(test_x)
    if scores.shape[1] == 2:
        return float(roc_auc_score(test_y, scores[:, positive]))
    return float(roc_auc_score(test_y, scores, multi_class="ovr"))
