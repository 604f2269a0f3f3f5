"""Training augmentations, named and scaled by one strength, built on torchvision.transforms.v2.

    aug = build_augment("medical", strength=0.5)      # or "flip,rotation,gamma=2,speckle"
    x = aug(x, gen)                                    # float [B, C, H, W] in [0, 1], seeded by gen
    img, mask = aug.apply_with_mask(img, mask, gen)    # geometry moves the mask, intensity leaves it
    x, y_soft = mix_batch(x, y, num_classes, gen, "mixup+cutmix")

Operations (``OPS``), applied in this order whatever order a spec names them:
  geometric  flip, vflip, rotation, scale (random resized crop), elastic
  intensity  brightness, contrast, gamma
  artefact   noise (Gaussian), speckle (multiplicative), blur (Gaussian), motion_blur
Presets: ``none``, ``light`` (the fast batched ``batching.LightAugment``), ``medical`` (all of the
above except vflip, each with its own probability), ``geometric``, ``intensity``, ``artefact``.
A spec is a preset or a comma list of operations/presets, each optionally ``=factor`` (its
strength relative to the global one). Every random draw comes from ``gen``: a seed gives the
same augmented batch, and the global torch RNG is left as it was.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from .batching import LightAugment
from .errors import ConfigError, unknown_name

MAX_STRENGTH = 5.0


# ----------------------------------------------------------------------------- own v2 transforms
def _size(flat_inputs) -> tuple[int, int]:
    for item in flat_inputs:
        if isinstance(item, torch.Tensor) and item.ndim >= 2:
            return int(item.shape[-2]), int(item.shape[-1])
    raise TypeError("no image tensor among the inputs")


def _is_image(inpt) -> bool:
    """Pixels to change: an Image/Video or a plain tensor - never a Mask, boxes or key points."""
    return isinstance(inpt, (tv_tensors.Image, tv_tensors.Video)) or type(inpt) is torch.Tensor


class RandomGamma(v2.Transform):
    """x ** gamma with log(gamma) ~ U(-log_range, log_range): brightens or darkens mid-tones."""

    def __init__(self, log_range: float = 0.3):
        super().__init__()
        self.log_range = float(log_range)

    def make_params(self, flat_inputs):
        return {"gamma": math.exp((torch.rand(1).item() * 2 - 1) * self.log_range)}

    def transform(self, inpt, params):
        return self._call_kernel(TF.adjust_gamma, inpt, gamma=params["gamma"])


class SpeckleNoise(v2.Transform):
    """Multiplicative noise x * (1 + s * n), n ~ N(0, 1), s ~ U(0, sigma): ultrasound-like speckle."""

    def __init__(self, sigma: float = 0.15):
        super().__init__()
        self.sigma = float(sigma)

    def make_params(self, flat_inputs):
        return {"sigma": torch.rand(1).item() * self.sigma}

    def transform(self, inpt, params):
        if not _is_image(inpt):
            return inpt
        x = inpt.as_subclass(torch.Tensor)
        out = (x * (1 + params["sigma"] * torch.randn_like(x))).clamp(0, 1)
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out


def line_kernel(length: int, angle_deg: float) -> torch.Tensor:
    """Normalised (k, k) kernel of a line of ``length`` pixels through the centre at ``angle_deg``."""
    length = max(1, int(length))
    k = length if length % 2 else length + 1
    kernel = torch.zeros(k, k)
    centre = (k - 1) / 2
    theta = math.radians(angle_deg)
    for t in torch.linspace(-(length - 1) / 2, (length - 1) / 2, 4 * length).tolist():
        r = int(round(centre - t * math.sin(theta)))
        c = int(round(centre + t * math.cos(theta)))
        kernel[r, c] = 1.0
    return kernel / kernel.sum()


class MotionBlur(v2.Transform):
    """Blur along a random direction over up to ``max_length`` pixels (probe or patient motion)."""

    def __init__(self, max_length: float = 5.0):
        super().__init__()
        self.max_length = float(max_length)

    def make_params(self, flat_inputs):
        length = 1 + int(torch.rand(1).item() * max(self.max_length - 1, 0) + 0.5)
        return {"kernel": line_kernel(length, torch.rand(1).item() * 180.0)}

    def transform(self, inpt, params):
        kernel = params["kernel"]
        if not _is_image(inpt) or kernel.shape[0] == 1:
            return inpt
        x = inpt.as_subclass(torch.Tensor)
        shape = x.shape
        flat = x.reshape(-1, 1, *shape[-2:])
        pad = kernel.shape[0] // 2
        mode = "reflect" if min(shape[-2:]) > pad else "replicate"
        flat = F.conv2d(F.pad(flat, [pad] * 4, mode=mode), kernel.to(flat)[None, None])
        out = flat.reshape(shape)
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out


# ----------------------------------------------------------------------------- operations
@dataclass(frozen=True)
class Op:
    name: str
    category: str  # geometric | intensity | artefact
    p: float  # probability the operation is applied to a sample (in the medical preset and specs)
    build: Callable[[float, int, int], v2.Transform]  # (strength, height, width) -> transform
    what: str


class SmoothElastic(v2.ElasticTransform):
    """Elastic deformation whose displacement field is random noise on a coarse ``grid`` x ``grid``
    lattice, bicubically upsampled: as smooth as v2's blurred field at a fraction of its cost
    (v2 blurs a full-size field with a kernel of 8 sigma, ~1 s per 224 px image on one core).
    ``magnitude``: standard deviation of the displacement as a fraction of the image size."""

    def __init__(self, magnitude: float = 0.01, grid: int = 5):
        super().__init__(alpha=1.0, sigma=1.0)  # alpha/sigma unused: make_params draws the field
        self.magnitude = float(magnitude)
        self.grid = int(grid)

    def make_params(self, flat_inputs):
        h, w = _size(flat_inputs)
        coarse = torch.randn(1, 2, self.grid, self.grid)
        field = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)
        field = field / field.std().clamp_min(1e-6)  # unit std whatever the grid
        # normalised grid coordinates span 2 per image size
        return {"displacement": (field * 2 * self.magnitude).permute(0, 2, 3, 1).contiguous()}


class AlignedResizedCrop(v2.RandomResizedCrop):
    """RandomResizedCrop whose masks are resampled at pixel centres ('nearest-exact', the grid the
    image's bilinear resize uses): torchvision's 'nearest' for masks samples at pixel corners,
    which shifted masks by ~0.3-0.45 px against their images (measured over 40 crops at 64 px)."""

    def transform(self, inpt, params):
        if isinstance(inpt, tv_tensors.Mask):  # (resized_crop's mask kernel ignores the interpolation asked)
            cropped = v2.functional.crop_mask(inpt.as_subclass(torch.Tensor), **params)
            out = v2.functional.resize_mask(cropped, list(self.size), interpolation=v2.InterpolationMode.NEAREST_EXACT)
            return tv_tensors.wrap(out, like=inpt)
        return super().transform(inpt, params)


def _elastic(s: float, h: int, w: int) -> v2.Transform:
    return SmoothElastic(magnitude=0.01 * s)


def _blur(s: float, h: int, w: int) -> v2.Transform:
    sigma = max(0.2, 0.012 * min(h, w) * s)
    k = 2 * math.ceil(3 * sigma) + 1
    k = min(k, (min(h, w) // 2) * 2 - 1) if min(h, w) > 3 else 1
    return v2.GaussianBlur(kernel_size=max(k, 1), sigma=(0.1, sigma))


OPS: dict[str, Op] = {op.name: op for op in [
    Op("flip", "geometric", 0.5, lambda s, h, w: v2.RandomHorizontalFlip(p=1.0), "horizontal flip"),
    Op("vflip", "geometric", 0.5, lambda s, h, w: v2.RandomVerticalFlip(p=1.0), "vertical flip (not for "
       "images with a fixed top, e.g. ultrasound)"),
    Op("rotation", "geometric", 0.5, lambda s, h, w: v2.RandomRotation(degrees=15.0 * s), "rotation by up to 15 deg"),
    Op("scale", "geometric", 0.5, lambda s, h, w: AlignedResizedCrop(
        (h, w), scale=(max(0.05, 1 - 0.3 * s), 1.0), ratio=(1 / (1 + 0.2 * s), 1 + 0.2 * s), antialias=True),
       "random crop of 70-100% of the area, resized back"),
    Op("elastic", "geometric", 0.25, _elastic, "smooth elastic deformation (~1% of the size)"),
    Op("brightness", "intensity", 0.5, lambda s, h, w: v2.ColorJitter(brightness=min(0.2 * s, 1.0)),
       "brightness x U(0.8, 1.2)"),
    Op("contrast", "intensity", 0.5, lambda s, h, w: v2.ColorJitter(contrast=min(0.2 * s, 1.0)),
       "contrast x U(0.8, 1.2)"),
    Op("gamma", "intensity", 0.5, lambda s, h, w: RandomGamma(0.3 * s), "gamma in exp(U(-0.3, 0.3))"),
    Op("noise", "artefact", 0.25, lambda s, h, w: v2.GaussianNoise(sigma=0.04 * s), "Gaussian noise, sigma 0.04"),
    Op("speckle", "artefact", 0.25, lambda s, h, w: SpeckleNoise(0.15 * s), "multiplicative speckle, sigma <= 0.15"),
    Op("blur", "artefact", 0.2, _blur, "Gaussian blur, sigma up to 1.2% of the size"),
    Op("motion_blur", "artefact", 0.1, lambda s, h, w: MotionBlur(max(1.0, 0.06 * min(h, w) * s)),
       "motion blur over up to 6% of the size"),
]}
CATEGORY_ORDER = ("geometric", "intensity", "artefact")
PRESETS: dict[str, list[str]] = {
    "geometric": ["flip", "rotation", "scale", "elastic"],
    "intensity": ["brightness", "contrast", "gamma"],
    "artefact": ["noise", "speckle", "blur", "motion_blur"],
}
PRESETS["medical"] = PRESETS["geometric"] + PRESETS["intensity"] + PRESETS["artefact"]
AUGMENT_NAMES = ("none", "light", *PRESETS)


def _check_strength(value, what: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number in [0, {MAX_STRENGTH}], got {value!r}") from None
    if not 0 <= value <= MAX_STRENGTH:
        raise ConfigError(f"{what} must be a number in [0, {MAX_STRENGTH}], got {value!r}")
    return value


def parse_augment_spec(spec: str) -> list[tuple[str, float]]:
    """``"flip,rotation=0.5,artefact"`` -> [(op, relative strength)] in canonical order.
    ``none``/``light`` are returned as [(name, 1.0)]."""
    text = (spec or "none").strip().lower()
    if text in ("none", "light"):
        return [(text, 1.0)]
    ops: dict[str, float] = {}
    for token in [t.strip() for t in text.split(",") if t.strip()]:
        name, _, factor = token.partition("=")
        name = name.strip().replace("-", "_")
        scale = _check_strength(factor, f"augment strength of {name!r}") if factor else 1.0
        if name in ("none", "light"):
            raise ConfigError(f"augment {spec!r}: {name!r} cannot be combined with other operations")
        names = PRESETS.get(name) or ([name] if name in OPS else None)
        if names is None:
            raise unknown_name("augmentation", name, [*OPS, *AUGMENT_NAMES])
        for op in names:
            ops[op] = scale
    if not ops:
        return [("none", 1.0)]
    order = {name: (CATEGORY_ORDER.index(OPS[name].category), i) for i, name in enumerate(OPS)}
    return sorted(ops.items(), key=lambda item: order[item[0]])


def check_augment(spec: str, strength: float = 1.0) -> None:
    """ConfigError for an unknown augmentation name or a bad strength (for config validation)."""
    parse_augment_spec(spec)
    _check_strength(strength, "augment strength")


def build_augment(name_or_spec: str | None, strength: float = 1.0):
    """A callable ``aug(x, gen)`` for ``batching.BatchLoader`` (None for ``none``).

    ``light`` is the batched LightAugment (fast; magnitudes scaled by strength), anything else
    an ``Augment`` applying v2 transforms sample by sample."""
    strength = _check_strength(strength, "augment strength")
    ops = parse_augment_spec(name_or_spec or "none")
    if ops[0][0] == "none" or strength == 0:
        return None
    if ops[0][0] == "light":
        return LightAugment(degrees=10.0 * strength, scale=(1 - 0.1 * strength, 1 + 0.1 * strength),
                            translate=0.05 * strength, brightness=0.1 * strength, contrast=0.1 * strength)
    ops = [(name, factor * strength) for name, factor in ops if factor > 0]
    return Augment(ops, name=name_or_spec, strength=strength) if ops else None


def describe_augment(name_or_spec: str | None, strength: float = 1.0) -> dict:
    """Plain description for a run's config: every operation with its probability and strength."""
    aug = build_augment(name_or_spec, strength)
    if aug is None:
        return {"name": "none", "strength": float(strength), "ops": []}
    if isinstance(aug, LightAugment):
        return {"name": "light", "strength": float(strength), "ops": [{"name": "light", **vars(aug)}]}
    return aug.describe()


# ----------------------------------------------------------------------------- determinism
@contextmanager
def seeded_global_rng(gen: torch.Generator | None, device: torch.device):
    """Seed torch's global RNG (CPU, and the tensor's GPU) from ``gen``; restore it afterwards.
    torchvision v2 draws from the global RNG, so this makes it reproducible without side effects."""
    if gen is None:
        yield
        return
    seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device).item())
    cpu_state = torch.random.get_rng_state()
    cuda = device.type == "cuda"
    if cuda:
        index = device.index if device.index is not None else torch.cuda.current_device()
        cuda_state = torch.cuda.get_rng_state(index)
    torch.random.default_generator.manual_seed(seed)
    if cuda:
        with torch.cuda.device(index):
            torch.cuda.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(cpu_state)
        if cuda:
            torch.cuda.set_rng_state(cuda_state, index)


class Augment:
    """Per-sample random v2 transforms; every operation applied with its own probability."""

    def __init__(self, ops: list[tuple[str, float]], name: str | None = None, strength: float = 1.0):
        for op, s in ops:
            if op not in OPS:
                raise unknown_name("augmentation", op, OPS)
            _check_strength(s, f"strength of {op!r}")
        self.ops = list(ops)
        self.name = name or ",".join(f"{op}={s:g}" for op, s in ops)
        self.strength = float(strength)
        self._pipelines: dict[tuple[int, int], v2.Compose] = {}

    def pipeline(self, height: int, width: int) -> v2.Compose:
        key = (int(height), int(width))
        if key not in self._pipelines:
            steps = []
            for op, s in self.ops:
                transform = OPS[op].build(s, *key)
                p = OPS[op].p
                steps.append(transform if p >= 1 else v2.RandomApply([transform], p=p))
            self._pipelines[key] = v2.Compose(steps)
        return self._pipelines[key]

    def describe(self) -> dict:
        return {"name": self.name, "strength": self.strength,
                "ops": [{"name": op, "category": OPS[op].category, "p": OPS[op].p, "strength": round(s, 6),
                         "what": OPS[op].what} for op, s in self.ops]}

    def __repr__(self) -> str:
        return f"Augment({self.name!r}, strength={self.strength:g})"

    def __call__(self, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        """x: float [B, C, H, W] in [0, 1] -> same shape; grayscale stored as 3 equal channels
        stays gray (noise is drawn once and shared by the channels)."""
        if x.ndim != 4:
            raise ValueError(f"augment expects a batch [B, C, H, W], got shape {tuple(x.shape)}")
        gray3 = x.shape[1] == 3 and (x.stride(1) == 0 or (torch.equal(x[:, 0], x[:, 1])
                                                         and torch.equal(x[:, 1], x[:, 2])))
        src = x[:, :1] if gray3 else x
        pipe = self.pipeline(*x.shape[-2:])
        with seeded_global_rng(gen, x.device):
            out = torch.stack([pipe(tv_tensors.Image(sample)).as_subclass(torch.Tensor) for sample in src])
        out = out.clamp_(0, 1)
        return out.expand(-1, 3, -1, -1) if gray3 else out

    def apply_with_mask(self, image: torch.Tensor, mask: torch.Tensor, gen: torch.Generator | None = None):
        """Augment images and their segmentation masks together: geometric operations move the
        mask exactly as the image (nearest-neighbour), intensity and artefact ones leave it alone.
        image [C, H, W] or [B, C, H, W] float in [0, 1]; mask [H, W], [1, H, W], [B, H, W] or
        [B, 1, H, W] (any dtype). Returns tensors of the input shapes."""
        batched = image.ndim == 4
        images = image if batched else image[None]
        masks = mask if batched else mask[None]
        if masks.shape[0] != images.shape[0] or masks.shape[-2:] != images.shape[-2:]:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match image shape {tuple(image.shape)}")
        pipe = self.pipeline(*images.shape[-2:])
        out_images, out_masks = [], []
        with seeded_global_rng(gen, images.device):
            for img, msk in zip(images, masks):
                a, b = pipe(tv_tensors.Image(img), tv_tensors.Mask(msk))
                out_images.append(a.as_subclass(torch.Tensor).clamp(0, 1))
                out_masks.append(b.as_subclass(torch.Tensor))
        out_i, out_m = torch.stack(out_images), torch.stack(out_masks)
        return (out_i, out_m) if batched else (out_i[0], out_m[0])


def apply_with_mask(aug: Augment, image: torch.Tensor, mask: torch.Tensor, gen: torch.Generator | None = None):
    """Function form of ``Augment.apply_with_mask``."""
    return aug.apply_with_mask(image, mask, gen)


# ----------------------------------------------------------------------------- MixUp / CutMix
MIX_MODES = ("none", "mixup", "cutmix", "mixup+cutmix")


@dataclass
class MixConfig:
    """Batch mixing with soft targets. ``mixup+cutmix`` picks one of the two per batch (50/50)."""

    mode: str = "none"
    mixup_alpha: float = 0.2  # Beta(alpha, alpha) mixing weight (Zhang et al. 2018)
    cutmix_alpha: float = 1.0  # Beta(alpha, alpha) kept area (Yun et al. 2019)
    prob: float = 1.0  # probability that a batch is mixed at all

    def __post_init__(self):
        self.mode = str(self.mode).strip().lower()
        if self.mode not in MIX_MODES:
            raise ConfigError(f"mix {self.mode!r} is not one of {', '.join(MIX_MODES)}")
        for name in ("mixup_alpha", "cutmix_alpha"):
            if not float(getattr(self, name)) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 <= float(self.prob) <= 1:
            raise ConfigError(f"mix prob must be in [0, 1], got {self.prob!r}")

    @property
    def active(self) -> bool:
        return self.mode != "none" and self.prob > 0


def soft_targets(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class indices [B] -> one-hot float [B, K]; multi-label [B, L] -> float as is."""
    if y.ndim == 2:
        return y.float()
    return F.one_hot(y.long(), num_classes).float()


def mix_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int, gen: torch.Generator,
              config: MixConfig | str = "mixup") -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp / CutMix one batch: (mixed inputs, soft targets [B, K] whose rows sum to 1, or
    mixed multi-label targets). All randomness comes from ``gen``; inputs are not modified."""
    cfg = config if isinstance(config, MixConfig) else MixConfig(mode=config)
    targets = soft_targets(y, num_classes)
    b = x.shape[0]
    draw = torch.rand(2, generator=gen, device=gen.device).tolist()
    if not cfg.active or b < 2 or draw[0] >= cfg.prob:
        return x, targets
    mode = cfg.mode if cfg.mode != "mixup+cutmix" else ("mixup" if draw[1] < 0.5 else "cutmix")
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device).item()))
    perm = torch.randperm(b, generator=gen, device=gen.device).to(x.device)
    if mode == "mixup":
        lam = float(rng.beta(cfg.mixup_alpha, cfg.mixup_alpha))
        mixed = x * lam + x[perm] * (1 - lam)
    else:
        lam = float(rng.beta(cfg.cutmix_alpha, cfg.cutmix_alpha))
        h, w = x.shape[-2:]
        cut = math.sqrt(1 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        y1, y2 = max(cy - ch // 2, 0), min(cy + ch - ch // 2, h)
        x1, x2 = max(cx - cw // 2, 0), min(cx + cw - cw // 2, w)
        mixed = x.clone()
        mixed[..., y1:y2, x1:x2] = x[perm][..., y1:y2, x1:x2]
        lam = 1 - (y2 - y1) * (x2 - x1) / float(h * w)  # the area actually kept
    return mixed, targets * lam + targets[perm.to(targets.device)] * (1 - lam)
