"""Test-time corruption suites per imaging modality, 5 severities each, deterministic per seed.

    images = corrupt(test_images_uint8, "speckle_noise", severity=3, suite="ultrasound", seed=0)

Anchor: MedMNIST-C (Di Salvo et al. 2024, the ``medmnistc`` package): its corruption
definitions and its severity parameters for the MedMNIST sets of each modality -
ultrasound = BreastMNIST's, X-ray = PneumoniaMNIST's, CT/MR = OrganAMNIST's, fundus =
RetinaMNIST's. Added here: ``endoscopy`` (no MedMNIST set; Kvasir-SEG / CVC-ClinicDB) with
specular highlights, its characteristic artefact, and ``generic``. Definitions, on images in
[0, 1] (uint8 in, uint8 out, like MedMNIST-C):

* pixelate: box-filter resize to ``f`` of the size and back (PIL, as MedMNIST-C);
* jpeg_compression: JPEG at quality ``q`` (PIL);
* gaussian_noise: x + N(0, c); speckle_noise: x + x * N(0, c); impulse_noise: a fraction ``c``
  of the values set to 0 or 1 (half each); shot_noise: Poisson(x * m) / m;
* gaussian_blur: torchvision's Gaussian blur with MedMNIST-C's kernel size ``k`` at 224 px
  (sigma = 0.3 ((k - 1) / 2 - 1) + 0.8), the sigma scaled to the image size;
* motion_blur: a uniform line kernel of length 2 sigma (MedMNIST-C's ImageMagick sigma, px at 224,
  scaled to the image size) at a random angle in [-45, 45] deg (ImageMagick's own kernel weights
  a one-sided Gaussian; ours is the common uniform approximation);
* brightness (up / down): x * f (PIL ``ImageEnhance.Brightness``); contrast: mean + f (x - mean)
  with the image's mean gray level (PIL ``ImageEnhance.Contrast``); gamma: x ** g;
* specular_highlights (endoscopy, added): ``n`` saturated white elliptical spots with soft
  edges at random places (light reflected by wet mucosa).

No corruption is geometric, so masks and boxes stay valid as they are. Randomness (noise draws,
blur angles, highlight positions) comes from a generator seeded by (seed, corruption), the same
for every severity (a stronger severity is the same draw made stronger): the same call gives the
same images on any machine.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError

SEVERITIES = (1, 2, 3, 4, 5)
REFERENCE_SIZE = 224  # MedMNIST-C's spatial parameters are in pixels of 224 px images


# ----------------------------------------------------------------------------- the operations
def _per_image_pil(x, fn):
    """Apply ``fn`` (PIL image -> PIL image) to every image of a float batch in [0, 1]."""
    from PIL import Image

    out = []
    for image in (x * 255).round().clamp(0, 255).to(torch.uint8):
        array = image.permute(1, 2, 0).numpy()
        result = np.asarray(fn(Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)))
        result = result[..., None] if result.ndim == 2 else result
        out.append(torch.from_numpy(result.copy()).permute(2, 0, 1))
    return torch.stack(out).float() / 255


def _pixelate(x, f, gen):
    from PIL import Image

    def fn(pil):  # MedMNIST-C: a box filter down and up (nearest-up is not monotone in f at small sizes)
        w, h = pil.size
        return pil.resize((max(1, int(w * f)), max(1, int(h * f))), Image.BOX).resize((w, h), Image.BOX)

    return _per_image_pil(x, fn)


def _jpeg(x, quality, gen):
    from PIL import Image

    def fn(pil):
        buffer = io.BytesIO()
        pil.save(buffer, "JPEG", quality=int(quality))
        return Image.open(io.BytesIO(buffer.getvalue()))

    return _per_image_pil(x, fn)


def _gaussian_noise(x, c, gen):
    return x + c * torch.randn(x.shape, generator=gen)


def _speckle(x, c, gen):
    return x + x * c * torch.randn(x.shape, generator=gen)


def _impulse(x, amount, gen):
    u = torch.rand(x.shape, generator=gen)
    x = x.clone()
    x[u < amount / 2] = 0.0
    x[(u >= amount / 2) & (u < amount)] = 1.0
    return x


def _shot(x, mult, gen):
    return torch.poisson(x * mult, generator=gen) / mult


def _sigma_at(size: int, kernel_224: int) -> float:
    return (0.3 * ((kernel_224 - 1) * 0.5 - 1) + 0.8) * size / REFERENCE_SIZE


def _gaussian_blur(x, kernel_224, gen):
    from torchvision.transforms.v2 import functional as TF

    sigma = _sigma_at(min(x.shape[-2:]), kernel_224)
    k = 2 * math.ceil(3 * sigma) + 1
    k = max(1, min(k, (min(x.shape[-2:]) // 2) * 2 - 1))
    return TF.gaussian_blur(x, kernel_size=[k, k], sigma=[sigma, sigma]) if k > 1 else x


def _motion_blur(x, sigma_224, gen):
    from .augment import line_kernel

    length = max(1, int(round(2 * sigma_224 * min(x.shape[-2:]) / REFERENCE_SIZE)))
    out = []
    for image in x:
        angle = float(torch.empty(1).uniform_(-45.0, 45.0, generator=gen))
        kernel = line_kernel(length, angle)
        pad = kernel.shape[0] // 2
        flat = image[:, None]
        mode = "reflect" if min(image.shape[-2:]) > pad else "replicate"
        out.append(F.conv2d(F.pad(flat, [pad] * 4, mode=mode), kernel[None, None])[:, 0])
    return torch.stack(out)


def _brightness(x, f, gen):
    return x * f


def _contrast(x, f, gen):
    gray = x.mean(1, keepdim=True) if x.shape[1] == 1 else (
        0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    mean = (gray.mean(dim=(1, 2, 3), keepdim=True) * 255).round() / 255  # PIL: the integer mean gray level
    return mean + f * (x - mean)


def _gamma(x, g, gen):
    return x.clamp(0, 1) ** g


def _specular(x, n, gen):
    b, _, h, w = x.shape
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    out = x.clone()
    for i in range(b):
        spots = torch.zeros(h, w)
        for _ in range(int(n)):
            cy, cx = float(torch.rand(1, generator=gen)) * h, float(torch.rand(1, generator=gen)) * w
            ry = (0.02 + 0.03 * float(torch.rand(1, generator=gen))) * h
            rx = (0.02 + 0.03 * float(torch.rand(1, generator=gen))) * w
            d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
            spots = torch.maximum(spots, torch.clamp(1.5 - d, 0, 1))  # saturated core, soft rim
        out[i] = out[i] * (1 - spots) + spots
    return out


@dataclass(frozen=True)
class Corruption:
    name: str
    category: str  # digital | noise | blur | color | task-specific (MedMNIST-C's folds)
    apply: Callable
    params: tuple  # one per severity 1..5


def _suite(spec: dict[str, tuple]) -> dict[str, Corruption]:
    kinds = {"pixelate": ("digital", _pixelate), "jpeg_compression": ("digital", _jpeg),
             "gaussian_noise": ("noise", _gaussian_noise), "speckle_noise": ("noise", _speckle),
             "impulse_noise": ("noise", _impulse), "shot_noise": ("noise", _shot),
             "gaussian_blur": ("blur", _gaussian_blur), "motion_blur": ("blur", _motion_blur),
             "brightness_up": ("color", _brightness), "brightness_down": ("color", _brightness),
             "contrast_up": ("color", _contrast), "contrast_down": ("color", _contrast),
             "gamma_corr_up": ("task-specific", _gamma), "gamma_corr_down": ("task-specific", _gamma),
             "specular_highlights": ("task-specific", _specular)}
    return {name: Corruption(name, kinds[name][0], kinds[name][1], tuple(params)) for name, params in spec.items()}


_JPEG = (50, 30, 15, 10, 7)
SUITES: dict[str, dict[str, Corruption]] = {
    # BreastMNIST's (MedMNIST-C); motion blur: the sigmas of (radius, sigma)
    "ultrasound": _suite({"pixelate": (0.30, 0.25, 0.20, 0.15, 0.10), "jpeg_compression": _JPEG,
                          "speckle_noise": (0.10, 0.15, 0.20, 0.25, 0.30), "motion_blur": (5, 7, 10, 10, 12),
                          "brightness_up": (1.4, 1.5, 1.6, 1.8, 2.0), "brightness_down": (0.55, 0.5, 0.45, 0.4, 0.3),
                          "contrast_down": (0.9, 0.8, 0.7, 0.6, 0.4)}),
    # PneumoniaMNIST's; gaussian_blur: kernel sizes at 224 px
    "xray": _suite({"pixelate": (0.8, 0.7, 0.6, 0.5, 0.40), "jpeg_compression": _JPEG,
                    "gaussian_noise": (0.04, 0.05, 0.06, 0.07, 0.08), "speckle_noise": (0.05, 0.07, 0.10, 0.15, 0.20),
                    "impulse_noise": (0.005, 0.01, 0.013, 0.017, 0.02), "shot_noise": (300, 200, 150, 100, 80),
                    "gaussian_blur": (3, 5, 7, 9, 11), "brightness_up": (1.1, 1.2, 1.3, 1.4, 1.5),
                    "brightness_down": (0.9, 0.8, 0.7, 0.6, 0.5), "contrast_up": (1.1, 1.2, 1.3, 1.4, 1.6),
                    "contrast_down": (0.9, 0.8, 0.7, 0.6, 0.4), "gamma_corr_up": (1.1, 1.2, 1.3, 1.4, 1.6),
                    "gamma_corr_down": (0.9, 0.8, 0.7, 0.6, 0.4)}),
    # OrganAMNIST's (abdominal CT)
    "ct_mr": _suite({"pixelate": (0.7, 0.6, 0.5, 0.40, 0.35), "jpeg_compression": _JPEG,
                     "gaussian_noise": (0.04, 0.08, 0.12, 0.16, 0.20), "speckle_noise": (0.05, 0.10, 0.20, 0.30, 0.40),
                     "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.08), "shot_noise": (200, 100, 50, 25, 15),
                     "gaussian_blur": (11, 13, 15, 17, 21), "brightness_up": (1.2, 1.3, 1.4, 1.5, 1.6),
                     "brightness_down": (0.8, 0.75, 0.7, 0.65, 0.60), "contrast_up": (1.3, 1.4, 1.6, 1.7, 1.8),
                     "contrast_down": (0.8, 0.7, 0.6, 0.55, 0.5), "gamma_corr_up": (1.3, 1.4, 1.6, 1.8, 2.0),
                     "gamma_corr_down": (0.9, 0.8, 0.7, 0.6, 0.4)}),
    # RetinaMNIST's
    "fundus": _suite({"pixelate": (0.8, 0.60, 0.50, 0.40, 0.35), "jpeg_compression": (30, 25, 20, 10, 5),
                      "gaussian_noise": (0.04, 0.08, 0.12, 0.16, 0.20), "speckle_noise": (0.10, 0.15, 0.20, 0.25, 0.30),
                      "gaussian_blur": (5, 7, 9, 11, 13), "motion_blur": (5, 5, 8, 12, 15),
                      "brightness_down": (0.9, 0.8, 0.7, 0.6, 0.5), "contrast_down": (0.9, 0.8, 0.7, 0.6, 0.4)}),
    # added (no MedMNIST set): colonoscopy video frames
    "endoscopy": _suite({"jpeg_compression": _JPEG, "gaussian_noise": (0.02, 0.04, 0.06, 0.08, 0.10),
                         "gaussian_blur": (3, 5, 7, 9, 11), "motion_blur": (3, 5, 7, 9, 12),
                         "brightness_up": (1.1, 1.2, 1.3, 1.4, 1.5), "brightness_down": (0.9, 0.8, 0.7, 0.6, 0.5),
                         "contrast_down": (0.9, 0.8, 0.7, 0.6, 0.4), "specular_highlights": (2, 4, 6, 8, 12)}),
    "generic": _suite({"pixelate": (0.8, 0.7, 0.6, 0.5, 0.40), "jpeg_compression": _JPEG,
                       "gaussian_noise": (0.04, 0.06, 0.08, 0.10, 0.12), "gaussian_blur": (3, 5, 7, 9, 11),
                       "brightness_up": (1.1, 1.2, 1.3, 1.4, 1.5), "brightness_down": (0.9, 0.8, 0.7, 0.6, 0.5),
                       "contrast_up": (1.1, 1.2, 1.3, 1.4, 1.6), "contrast_down": (0.9, 0.8, 0.7, 0.6, 0.4)}),
}


def get_suite(name: str) -> dict[str, Corruption]:
    if name not in SUITES:
        raise ConfigError(f"corruption suite {name!r} is not one of {', '.join(SUITES)}")
    return SUITES[name]


def _seed(seed: int, name: str) -> int:
    # not the severity: every severity draws the same noise pattern / angle / spot places, scaled,
    # so a higher severity is the same corruption made stronger (common random numbers)
    return (int(seed) * 1_000_003 + sum(ord(c) * 31 ** i for i, c in enumerate(name)) * 7) % 2**63


def corrupt(images: torch.Tensor, name: str, severity: int, suite: str = "generic", seed: int = 0) -> torch.Tensor:
    """uint8 [N, C, H, W] -> the same images under ``name`` at ``severity`` (1..5), uint8."""
    corruptions = get_suite(suite)
    if name not in corruptions:
        raise ConfigError(f"corruption {name!r} is not in the {suite} suite; expected one of {', '.join(corruptions)}")
    if severity not in SEVERITIES:
        raise ConfigError(f"severity {severity!r}: expected one of 1, 2, 3, 4, 5")
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ConfigError(f"corrupt() takes uint8 images [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
    item = corruptions[name]
    gen = torch.Generator().manual_seed(_seed(seed, name))
    x = item.apply(images.float() / 255, item.params[severity - 1], gen)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)
