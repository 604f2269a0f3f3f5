"""Metrics of a generator's samples against real images, on feature vectors (issue 18).

Features come from a fixed encoder that works offline - the DINOv2 ViT-S/14 pooled features
(FD-DINOv2, which Stein et al., NeurIPS 2023, recommend over Inception's) via
``forgetting.pooled_features`` - or any other [N, D] arrays.

* ``frechet_distance``: ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)) between the Gaussians
  fitted to the two feature sets (Heusel et al. 2017); the matrix square root by scipy, its
  imaginary round-off dropped.
* ``kernel_inception_distance``: the unbiased MMD^2 estimate with the cubic polynomial kernel
  k(x, y) = (x . y / d + 1)^3 (Binkowski et al. 2018), averaged over random subsets (seeded).
* ``precision_recall``: the k-NN manifold estimate (Kynkaenniemi et al. 2019, k = 3): precision =
  the share of generated samples inside some real sample's k-NN ball, recall the converse.
* ``memorisation``: each sample's nearest training image (Euclidean distance on the given
  vectors - features or flattened pixels); the copy threshold is calibrated on the training set
  itself, as the 1st percentile of its images' distances to their nearest *other* training image;
  a sample closer to a training image than that is flagged as a likely copy.
"""
from __future__ import annotations

import numpy as np
from scipy import linalg


def _as2d(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"expected [N >= 2, D] features, got shape {x.shape}")
    return x


def frechet_distance_gaussians(mu1, sigma1, mu2, sigma2) -> float:
    mu1, mu2 = np.asarray(mu1, float), np.asarray(mu2, float)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(float), np.atleast_2d(sigma2).astype(float)
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # a singular product: the usual small diagonal offset
        offset = np.eye(len(sigma1)) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_distance(real, generated) -> float:
    real, generated = _as2d(real), _as2d(generated)
    return frechet_distance_gaussians(real.mean(0), np.cov(real, rowvar=False),
                                      generated.mean(0), np.cov(generated, rowvar=False))


def mmd2_unbiased(x, y) -> float:
    """Unbiased MMD^2 with KID's cubic polynomial kernel."""
    x, y = _as2d(x), _as2d(y)
    d = x.shape[1]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def kernel_inception_distance(real, generated, subsets: int = 10, subset_size: int = 100, seed: int = 0) -> dict:
    real, generated = _as2d(real), _as2d(generated)
    size = min(subset_size, len(real), len(generated))
    rng = np.random.default_rng(seed)
    values = [mmd2_unbiased(real[rng.choice(len(real), size, replace=False)],
                            generated[rng.choice(len(generated), size, replace=False)]) for _ in range(subsets)]
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if subsets > 1 else float("nan")}


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T, 0.0))


def _radii(x: np.ndarray, k: int) -> np.ndarray:
    d = _pairwise(x, x)
    return np.sort(d, axis=1)[:, min(k, len(x) - 1)]  # column 0 is the point itself


def precision_recall(real, generated, k: int = 3) -> dict:
    real, generated = _as2d(real), _as2d(generated)
    real_radii, gen_radii = _radii(real, k), _radii(generated, k)
    d = _pairwise(generated, real)  # [G, R]
    precision = float((d <= real_radii[None, :]).any(1).mean())
    recall = float((d.T <= gen_radii[None, :]).any(1).mean())
    return {"precision": precision, "recall": recall, "k": k}


def memorisation(samples, training, percentile: float = 1.0) -> dict:
    """Nearest training image per sample and the share flagged as copies (see the module docstring)."""
    samples, training = _as2d(samples), _as2d(training)
    own = _pairwise(training, training)
    np.fill_diagonal(own, np.inf)
    threshold = float(np.percentile(own.min(1), percentile))
    d = _pairwise(samples, training)
    nearest = d.argmin(1)
    distance = d[np.arange(len(samples)), nearest]
    flagged = distance < threshold
    return {"threshold": threshold, "flagged_fraction": float(flagged.mean()), "flagged": np.flatnonzero(flagged).tolist(),
            "nearest": nearest.tolist(), "distance": distance.tolist()}
