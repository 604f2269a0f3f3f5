"""Label noise injected into the labels a user trains and selects with (classification).

``label_noise`` specs:

* ``symmetric:R`` - each label is replaced, with probability R, by one of the *other* classes
  drawn uniformly: R is the expected fraction of wrong labels;
* ``asymmetric:R`` - class-conditional pair flipping: class k becomes class (k + 1) mod K with
  probability R (for a binary task both directions, for BreastMNIST "benign read as malignant and
  malignant as benign");
* ``matrix:[[...],[...]]`` - a row-stochastic transition matrix T, T[i][j] = P(noisy j | true i).

The draw is seeded (``seed``: the run's label-subset seed, so seeds vary the noise pattern) and
applied to the training split and - unless ``clean_validation`` - to the validation split, since
a user's validation labels are as noisy as their training labels; the test split is never
touched. Which labels flipped is recorded (``DataBundle.label_noise``: the run folder's
``noisy_labels.csv``), so a curriculum's kept set can be scored for cleanliness.
"""
from __future__ import annotations

import json

import numpy as np
import torch

from medpeft.errors import ConfigError

NOISE_SEED_OFFSET = 424_242
KINDS = ("symmetric", "asymmetric", "matrix")


def parse_label_noise(spec: str | None, num_classes: int | None = None) -> tuple[str, np.ndarray | float] | None:
    """(kind, rate or matrix) from a spec; ConfigError naming what is expected."""
    if spec is None or spec == "" or spec == "none":
        return None
    kind, sep, value = str(spec).partition(":")
    if kind not in KINDS or not sep:
        raise ConfigError(f"label_noise {spec!r}: expected symmetric:R, asymmetric:R (0 <= R < 1) or "
                          "matrix:[[p00, p01], [p10, p11]] (rows sum to 1)")
    if kind == "matrix":
        try:
            matrix = np.asarray(json.loads(value), dtype=float)
        except (ValueError, TypeError):
            raise ConfigError(f"label_noise {spec!r}: the matrix is not a JSON list of rows") from None
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or np.any(matrix < 0) \
                or not np.allclose(matrix.sum(1), 1.0, atol=1e-6):
            raise ConfigError(f"label_noise {spec!r}: expected a square matrix of probabilities whose rows sum to 1")
        if num_classes is not None and matrix.shape[0] != num_classes:
            raise ConfigError(f"label_noise {spec!r}: a {matrix.shape[0]}x{matrix.shape[0]} matrix for "
                              f"{num_classes} classes")
        return kind, matrix
    try:
        rate = float(value)
    except ValueError:
        raise ConfigError(f"label_noise {spec!r}: the rate {value!r} is not a number") from None
    if not 0.0 <= rate < 1.0:
        raise ConfigError(f"label_noise {spec!r}: the rate must be in [0, 1)")
    return kind, rate


def transition_matrix(kind: str, value, num_classes: int) -> np.ndarray:
    k = num_classes
    if kind == "matrix":
        return np.asarray(value, dtype=float)
    if kind == "symmetric":
        if k < 2:
            raise ConfigError("symmetric label noise needs at least 2 classes")
        matrix = np.full((k, k), value / (k - 1))
        np.fill_diagonal(matrix, 1.0 - value)
        return matrix
    matrix = np.eye(k) * (1.0 - value)
    for i in range(k):
        matrix[i, (i + 1) % k] += value
    return matrix


def noisy_labels(labels: torch.Tensor, matrix: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """Each label i replaced by a draw from row i of the transition matrix."""
    y = labels.numpy().astype(np.int64)
    cumulative = np.cumsum(matrix, axis=1)
    u = rng.random(len(y))
    noisy = (u[:, None] > cumulative[y]).sum(1)
    return torch.from_numpy(np.minimum(noisy, matrix.shape[0] - 1).astype(np.int64))


def apply_label_noise(bundle, spec: str | None, seed: int, clean_validation: bool = False) -> None:
    """Corrupt bundle.train (and bundle.val unless ``clean_validation``) labels in place; record
    the flips in ``bundle.label_noise`` and a summary in ``bundle.split_info["label_noise"]``."""
    parsed = parse_label_noise(spec, bundle.num_classes)
    if parsed is None:
        return
    if bundle.task not in ("binary", "multiclass"):
        raise ConfigError(f"label_noise applies to single-label classification; this data set is {bundle.task}")
    kind, value = parsed
    matrix = transition_matrix(kind, value, bundle.num_classes)
    rng = np.random.default_rng(int(seed) + NOISE_SEED_OFFSET)
    flipped, summary = [], {"spec": spec, "validation": "clean" if clean_validation else "noisy"}
    for split in ("train", "val"):
        part = getattr(bundle, split)
        if split == "val" and clean_validation:
            summary["n_flipped_val"] = 0
            continue
        clean = part.labels.clone()
        part.labels = noisy_labels(clean, matrix, rng)
        changed = torch.nonzero(part.labels != clean).flatten().tolist()
        flipped += [(split, part.ids[i], int(clean[i]), int(part.labels[i])) for i in changed]
        summary[f"n_flipped_{split}"] = len(changed)
        summary[f"rate_{split}"] = len(changed) / max(len(part), 1)
    bundle.label_noise = {"summary": summary, "flipped": flipped}
    bundle.split_info["label_noise"] = summary
