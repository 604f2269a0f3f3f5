"""Training-free style alignment of target images to the source (the home training images),
applied at test time to external sets (``--align histogram|fda``).

* ``histogram``: per channel, every target image's grey levels are mapped through its own CDF
  onto the quantiles of the pooled source histogram (classic histogram matching against the
  source distribution rather than one reference image).
* ``fda``: Fourier domain adaptation (Yang & Soatto, CVPR 2020): per channel, the low-frequency
  amplitude of the target image's spectrum - a centred square of half-size ``beta * min(H, W)``
  in the shifted spectrum - is replaced by the mean amplitude of the source images, the phase
  kept; ``beta`` 0.01 as in the paper's best setting for its segmentation shift, at least one
  frequency bin.

Both read the source images once (``SourceStyle.from_images``) and nothing of the targets'
labels; uint8 in, uint8 out.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import ConfigError

ALIGNMENTS = ("histogram", "fda")
FDA_BETA = 0.01


@dataclass
class SourceStyle:
    cdf: np.ndarray  # [C, 256] pooled source CDF per channel
    amplitude: torch.Tensor  # [C, H, W] mean |FFT| of the source images (fftshifted)

    @classmethod
    def from_images(cls, images: torch.Tensor) -> "SourceStyle":
        """images: uint8 [N, C, H, W], the home training split."""
        x = images.numpy()
        cdf = np.stack([np.cumsum(np.bincount(x[:, c].ravel(), minlength=256)) for c in range(x.shape[1])]).astype(float)
        cdf /= cdf[:, -1:]
        spectrum = torch.fft.fftshift(torch.fft.fft2(images.float()), dim=(-2, -1))
        return cls(cdf=cdf, amplitude=spectrum.abs().mean(0))


def match_histograms(images: torch.Tensor, style: SourceStyle) -> torch.Tensor:
    """Each image's channel c mapped so that its grey-level distribution follows the source's."""
    if images.shape[1] != style.cdf.shape[0]:
        raise ConfigError(f"histogram alignment: {images.shape[1]}-channel targets vs a {style.cdf.shape[0]}-channel "
                          "source")
    x = images.numpy()
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        for c in range(x.shape[1]):
            counts = np.bincount(x[i, c].ravel(), minlength=256).astype(float)
            own = np.cumsum(counts) / counts.sum()
            # each level goes to the source's quantile of its cumulative share: the smallest source
            # level whose CDF reaches it (tolerance: float sums of the two CDFs)
            mapping = np.searchsorted(style.cdf[c], own - 1e-9, side="left").clip(0, 255)
            out[i, c] = mapping[x[i, c]].astype(np.uint8)
    return torch.from_numpy(out)


def fda(images: torch.Tensor, style: SourceStyle, beta: float = FDA_BETA) -> torch.Tensor:
    """Replace the targets' low-frequency amplitude by the source's (phase kept)."""
    if tuple(images.shape[1:]) != tuple(style.amplitude.shape):
        raise ConfigError(f"FDA alignment: target images {tuple(images.shape[1:])} vs source {tuple(style.amplitude.shape)}")
    h, w = images.shape[-2:]
    b = max(1, int(np.floor(min(h, w) * beta)))
    spectrum = torch.fft.fftshift(torch.fft.fft2(images.float()), dim=(-2, -1))
    amplitude, phase = spectrum.abs(), spectrum.angle()
    cy, cx = h // 2, w // 2
    amplitude[..., cy - b:cy + b + 1, cx - b:cx + b + 1] = style.amplitude[..., cy - b:cy + b + 1, cx - b:cx + b + 1]
    mixed = torch.polar(amplitude, phase)
    out = torch.fft.ifft2(torch.fft.ifftshift(mixed, dim=(-2, -1))).real
    return out.round().clamp(0, 255).to(torch.uint8)


def align(images: torch.Tensor, method: str, style: SourceStyle) -> torch.Tensor:
    if method == "histogram":
        return match_histograms(images, style)
    if method == "fda":
        return fda(images, style)
    raise ConfigError(f"alignment {method!r} is not one of {', '.join(ALIGNMENTS)}")
