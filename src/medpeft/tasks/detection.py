"""Detection: lesion boxes with torchvision's FCOS on the project's backbones.

The model is torchvision's FCOS (``DetectionModel`` subclasses it) with four changes: its
backbone is any backbone of the registry (the PEFT methods adapt it exactly as in
classification) under a feature pyramid, its head is lighter for a CPU, its box regression is the
paper's exp(s_l x) rather than torchvision's relu(x), which died on small training sets
(``ExpRegressionHead``), and its input transform is the identity (``BatchLoader`` already sized
and normalised the batch with the backbone's own statistics). The pyramid and the head are always trained and saved with the adapter (peft's
``modules_to_save``); ``head`` (backbone frozen) is the detection analogue of the linear probe.

Why FCOS: anchor-free, so nothing is tuned to the image size (anchor scales and ratios of
RetinaNet / Faster R-CNN are set for 800 px COCO images; our runs use 128-256 px), one stage
(no RPN / RoI sampling hyper-parameters to sweep), and its loss (focal + GIoU + centre-ness)
is what torchvision ships and tests. Pyramid: a CNN's three deepest strides (8, 16, 32 for
EfficientNet) through torchvision's FPN plus a max-pooled level; a plain ViT (all blocks at the
patch stride, DINOv2) or LiteMedSAM (stride 4) through a ViTDet-style simple pyramid from its
last map: deconvolution / identity / max-pooling to four strides near 8-64.

Targets are padded tensors (``data.detection``): [N, M, 5] (x0, y0, x1, y1, label), NaN rows as
padding; outputs likewise [N, D, 6] (box, score, label), D = ``DETECTIONS_PER_IMAGE``.
In training mode the model returns its loss (the sum of FCOS's three terms), so the trainer's
criterion passes it through; there is no validation loss (FCOS computes it only in training
mode): selection monitors a detection metric.
"""
from __future__ import annotations

import csv
import json
import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead, FCOSRegressionHead
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..data.base import DataBundle, ImageSet
from ..errors import ConfigError
from .base import Task, best_worst_figure
from .segmentation import FeatureTaps, _safe_name

PYRAMID_CHANNELS = 64  # torchvision's FCOS: 256 at 800 px on a GPU; 64 keeps the head cheaper than the backbone on a CPU
HEAD_CONVS = 2  # torchvision: 4
DETECTIONS_PER_IMAGE = 100  # COCO's cap for mAP
SCORE_FLOOR = 0.05  # detections below are dropped before NMS (torchvision's RetinaNet default; FCOS uses 0.2)
NMS_IOU = 0.6
MAX_LOG_DISTANCE = math.log(1000.0)  # a box side at most 1000 strides from its point: exp never overflows


# ----------------------------------------------------------------------------- pyramid
def pyramid_plan(encoder: nn.Module) -> dict:
    """Which encoder modules feed the pyramid and at which strides, from timm's ``feature_info``:
    ``{"kind": "fpn" | "simple", "modules", "channels", "strides"}`` (strides of the pyramid's outputs)."""
    info = list(getattr(encoder, "feature_info", []) or [])
    if not info:
        raise ConfigError(f"{type(encoder).__name__} has no feature_info: its feature maps cannot feed a detector")
    by_stride: dict[int, dict] = {}
    for entry in info:
        by_stride[int(entry["reduction"])] = entry  # the last module of each stride
    deep = [by_stride[s] for s in sorted(by_stride) if s >= 8]
    if len(deep) >= 3:  # a CNN: its three deepest strides, then one max-pooled level
        chosen = deep[-3:]
        strides = [int(e["reduction"]) for e in chosen]
        return {"kind": "fpn", "modules": [e["module"] for e in chosen], "channels": [int(e["num_chs"]) for e in chosen],
                "strides": strides + [strides[-1] * 2]}
    last = info[-1]
    s = int(last["reduction"])
    scales = (2.0, 1.0, 0.5, 0.25) if s >= 12 else (1.0, 0.5, 0.25, 0.125)  # strides near 8..64
    return {"kind": "simple", "modules": [last["module"]], "channels": [int(last["num_chs"])],
            "strides": [int(round(s / f)) for f in scales], "scales": list(scales)}


def unused_tail(encoder: nn.Module, last: str) -> list[nn.Module]:
    """The modules registered after ``last`` (a dotted module name) at every level of its path:
    in timm's models, which register modules in execution order, what runs after it."""
    out, parent = [], encoder
    for part in last.split("."):
        names = [n for n, _ in parent.named_children()]
        if part not in names:
            return out
        out += [getattr(parent, n) for n in names[names.index(part) + 1:]]
        parent = getattr(parent, part)
    return out


class SimplePyramid(nn.Module):
    """ViTDet's simple feature pyramid from one map: each level resamples it (2x deconvolution,
    identity or max-pooling) and projects it (1x1 then 3x3 convolution, GroupNorm)."""

    def __init__(self, in_channels: int, channels: int, scales: list[float]):
        super().__init__()
        self.levels = nn.ModuleList()
        for scale in scales:
            if scale == 2.0:
                resample = nn.ConvTranspose2d(in_channels, in_channels, 2, stride=2)
            elif scale == 1.0:
                resample = nn.Identity()
            else:
                k = int(round(1 / scale))
                resample = nn.MaxPool2d(k, stride=k, ceil_mode=True)
            self.levels.append(nn.Sequential(
                resample, nn.Conv2d(in_channels, channels, 1, bias=False), nn.GroupNorm(32, channels),
                nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.GroupNorm(32, channels)))

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        return [level(maps[-1]) for level in self.levels]


class FpnPyramid(nn.Module):
    """torchvision's FPN over the tapped maps plus a max-pooled coarser level."""

    def __init__(self, in_channels: list[int], channels: int):
        super().__init__()
        self.fpn = FeaturePyramidNetwork(in_channels, channels, extra_blocks=LastLevelMaxPool())

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps))).values())


def build_pyramid(plan: dict, channels: int = PYRAMID_CHANNELS) -> nn.Module:
    if plan["kind"] == "fpn":
        return FpnPyramid(plan["channels"], channels)
    return SimplePyramid(plan["channels"][0], channels, plan["scales"])


class PyramidBackbone(nn.Module):
    """encoder (a registry backbone, PEFT-adapted) -> pyramid levels, fine to coarse, for FCOS."""

    def __init__(self, encoder: nn.Module, patch: int | None):
        super().__init__()
        self.encoder = encoder
        self.plan = pyramid_plan(encoder)
        self.pyramid = build_pyramid(self.plan)
        self.out_channels = PYRAMID_CHANNELS
        patch = patch or 1
        self._taps = FeatureTaps(encoder, self.plan["modules"], lambda size: (size[0] // patch, size[1] // patch))

    def forward(self, x: torch.Tensor) -> OrderedDict:
        self.encoder.forward_features(x)
        levels = self.pyramid(self._taps.maps(x.shape[-2:]))
        return OrderedDict((str(i), level) for i, level in enumerate(levels))


class InputAsIs(nn.Module):
    """FCOS's transform slot: the batch arrives sized and normalised, boxes in its pixels."""

    def forward(self, images: torch.Tensor, targets=None):
        return ImageList(images, [tuple(images.shape[-2:])] * images.shape[0]), targets

    def postprocess(self, detections, image_sizes, original_sizes):
        return detections


class ExpRegressionHead(FCOSRegressionHead):
    """FCOS's box regression as in the paper (Tian et al. 2019, section 2.2): distances exp(s_l * x)
    with a learnable scale s_l per pyramid level. torchvision (like the FCOS repository's
    ``norm_reg_targets`` variant) takes relu(x) instead, whose gradient is 0 once an output turns
    negative: on a small training set (CVC-ClinicDB at 64 px) whole box sides died and every
    detection had zero width. exp(.) stays positive with a gradient everywhere."""

    def __init__(self, in_channels: int, num_levels: int, num_convs: int):
        super().__init__(in_channels, 1, num_convs=num_convs)
        self.scales = nn.Parameter(torch.ones(num_levels))

    def forward(self, x: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        boxes, centreness = [], []
        for level, features in enumerate(x):
            hidden = self.conv(features)
            logd = (self.scales[level] * self.bbox_reg(hidden)).clamp(max=MAX_LOG_DISTANCE)
            # [N, 4, H, W] -> [N, HW, 4] and [N, 1, H, W] -> [N, HW, 1], torchvision's anchor order
            boxes.append(torch.exp(logd).flatten(2).transpose(1, 2))
            centreness.append(self.bbox_ctrness(hidden).flatten(2).transpose(1, 2))
        return torch.cat(boxes, dim=1), torch.cat(centreness, dim=1)


def build_head(num_classes: int, num_levels: int) -> FCOSHead:
    """torchvision's FCOS head (its initialisation, the classification bias at the focal-loss
    prior) with the paper's exp regression in place of its relu one."""
    head = FCOSHead(PYRAMID_CHANNELS, 1, num_classes, num_convs=HEAD_CONVS)
    head.regression_head = ExpRegressionHead(PYRAMID_CHANNELS, num_levels, HEAD_CONVS)
    return head


class DetectionModel(FCOS):
    """FCOS on a registry backbone: ``backbone.encoder`` is what the methods adapt;
    ``get_classifier()`` (the pyramid and the FCOS head) is always trained and saved."""

    def __init__(self, encoder: nn.Module, num_classes: int, patch: int | None):
        backbone = PyramidBackbone(encoder, patch)
        strides = backbone.plan["strides"]
        # FCOS reads an anchor's size as its level's scale: objects of 4-8 sizes go to that level
        anchors = AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * len(strides))
        head = build_head(num_classes, len(strides))
        super().__init__(backbone, num_classes, min_size=1, max_size=1, anchor_generator=anchors, head=head,
                         score_thresh=SCORE_FLOOR, nms_thresh=NMS_IOU, detections_per_img=DETECTIONS_PER_IMAGE)
        self.transform = InputAsIs()
        self.num_classes = num_classes

    @property
    def encoder(self) -> nn.Module:
        return self.backbone.encoder

    def get_classifier(self) -> nn.Module:  # a view: not registered, so nothing is saved twice
        return nn.ModuleDict({"pyramid": self.backbone.pyramid, "head": self.head})

    def reset_head(self) -> None:
        """The pyramid and the head anew with torchvision's initialisation (the head's
        classification bias at the focal-loss prior), from the caller's seeded RNG."""
        self.backbone.pyramid = build_pyramid(self.backbone.plan)
        self.head = build_head(self.num_classes, len(self.backbone.plan["strides"]))

    @property
    def medpeft_methods(self) -> list[str]:
        return getattr(self.encoder, "medpeft_methods", [])


# ----------------------------------------------------------------------------- tensors <-> lists
def unpad_targets(targets) -> list[dict[str, torch.Tensor]]:
    from ..data.detection import unpad

    return unpad(targets)


def pad_detections(detections: list[dict[str, torch.Tensor]], size: int = DETECTIONS_PER_IMAGE) -> torch.Tensor:
    """torchvision's per-image dicts -> float [B, size, 6] (x0, y0, x1, y1, score, label), NaN padding."""
    out = torch.full((len(detections), size, 6), float("nan"))
    for i, det in enumerate(detections):
        # FCOS's channel 0 (the background label) is never a positive target: a detection there
        # (an untrained head) is no object
        keep = det["labels"] > 0
        boxes, scores, labels = det["boxes"][keep], det["scores"][keep], det["labels"][keep]
        n = min(len(scores), size)
        out[i, :n, :4] = boxes[:n].float().cpu()
        out[i, :n, 4] = scores[:n].float().cpu()
        out[i, :n, 5] = labels[:n].float().cpu()
    return out


def prediction_list(predictions) -> list[dict[str, np.ndarray]]:
    """[N, D, 6] padded detections -> the metric functions' per-image dicts."""
    out = []
    for rows in np.asarray(predictions, dtype=np.float64):
        rows = rows[~np.isnan(rows[:, 0])]
        out.append({"boxes": rows[:, :4], "scores": rows[:, 4], "labels": np.round(rows[:, 5]).astype(np.int64)})
    return out


def degenerate_share(preds: list[dict[str, np.ndarray]]) -> float:
    """Share of the detections with zero width or height (NaN when there are none)."""
    boxes = np.concatenate([p["boxes"] for p in preds]) if preds else np.zeros((0, 4))
    if not len(boxes):
        return float("nan")
    return float(np.mean((boxes[:, 2] - boxes[:, 0] <= 0) | (boxes[:, 3] - boxes[:, 1] <= 0)))


def warn_if_degenerate(preds: list[dict[str, np.ndarray]], most: float = 0.5) -> None:
    """A warning when most validation detections have no area: a collapsed box regression makes
    every box metric 0 with no other sign of why (torchvision's relu regression did so; the exp
    one should not, and this check says so if it ever does)."""
    share = degenerate_share(preds)
    if share > most:
        import warnings

        warnings.warn(f"{share:.0%} of the validation detections have zero width or height: the box "
                      "regression collapsed in training, so mAP / recall are near 0 whatever the "
                      "classifier learned. Try a larger --image-size or another seed", stacklevel=2)


def target_list(targets) -> list[dict[str, np.ndarray]]:
    """[N, M, 5] padded targets -> per-image dicts."""
    out = []
    for rows in np.asarray(targets, dtype=np.float64):
        rows = rows[~np.isnan(rows[:, 0])]
        out.append({"boxes": rows[:, :4], "labels": np.round(rows[:, 4]).astype(np.int64)})
    return out


def _passthrough_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Training: the model's own loss passes through. Evaluation: none (NaN)."""
    return outputs if outputs.dim() == 0 else outputs.new_tensor(float("nan"))


# ----------------------------------------------------------------------------- figures and files
CASES_FILE = "test_cases.png"
DETECTIONS_FILE = "test_detections.json"


def _draw_boxes(ax, boxes, color, scores=None) -> None:
    from matplotlib.patches import Rectangle

    for k, (x0, y0, x1, y1) in enumerate(boxes):
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=1.3))
        if scores is not None:
            ax.text(x0, y0, f"{scores[k]:.2f}", color=color, fontsize=6, va="bottom")


def case_figure(path: Path, test: ImageSet, preds: list[dict], targets: list[dict], f1: np.ndarray,
                threshold: float, n: int = 3) -> None:
    """The n best and n worst test images by per-image F1 at IoU 0.5: ground truth green,
    detections at or above the validation-chosen threshold red, with scores."""
    def draw(ax, i):
        keep = preds[i]["scores"] >= threshold
        _draw_boxes(ax, targets[i]["boxes"], "lime")
        _draw_boxes(ax, preds[i]["boxes"][keep], "red", preds[i]["scores"][keep])

    best_worst_figure(path, test.images, f1, "F1", draw,
                      f"test cases (green: ground truth, red: detections with score >= {threshold:.2f})", n)


def _rows(entry: dict, scale=(1.0, 1.0)) -> list[dict]:
    sx, sy = scale
    out = []
    for k, box in enumerate(entry["boxes"]):
        row = {"box": [round(float(box[0]) * sx, 2), round(float(box[1]) * sy, 2),
                       round(float(box[2]) * sx, 2), round(float(box[3]) * sy, 2)],
               "label": int(entry["labels"][k])}
        if "scores" in entry:
            row["score"] = round(float(entry["scores"][k]), 5)
        out.append(row)
    return out


# ----------------------------------------------------------------------------- the task
class DetectionTask(Task):
    name = "detection"
    primary_metric = "map50"
    fallback_metric = "map50"
    report_metrics = ("map50", "map50_95", "recall", "froc")
    onnx_refusal = ("ONNX export covers classification and segmentation: a detection run's graph ends in per-image "
                    "box decoding and NMS with data-dependent output sizes; export the merged weights with an output "
                    "ending in .safetensors and run the detector with medpeft")

    @property
    def metrics(self) -> dict:
        from .det_metrics import DET_METRICS

        return DET_METRICS

    def monitors(self) -> tuple[str, ...]:
        return tuple(self.metrics)  # no validation loss: FCOS computes its loss in training mode only

    def targets(self, data: ImageSet) -> torch.Tensor:
        if data.boxes is None:
            raise ConfigError("task detection needs boxes: load the data with task detection")
        return data.boxes

    def build_augment(self, name: str, strength: float):
        from ..box_augment import build_box_augment

        return build_box_augment(name, strength)

    def build_model(self, backbone, num_classes, image_size, in_chans=3, weights=None, pretrained=True):
        from ..backbones import create_backbone

        encoder, info = create_backbone(backbone, num_classes=0, image_size=image_size, weights=weights,
                                        pretrained=pretrained, in_chans=in_chans)
        return DetectionModel(encoder, num_classes, getattr(info, "patch_size", None)), info

    def methods_target(self, model: nn.Module) -> nn.Module:
        return model.encoder

    def finish_model(self, model: nn.Module) -> None:
        """Freeze what runs after the last tapped module (a CNN's conv_head, a ViT's final norm and
        classifier): the detector never reads it, so no method trains it or counts it as trained."""
        for module in unused_tail(model.encoder, model.backbone.plan["modules"][-1]):
            for param in module.parameters():
                param.requires_grad_(False)

    def check_model(self, model: nn.Module, options: dict) -> None:
        super().check_model(model, options)
        if options.get("mix", "none") not in ("none", None):
            raise ConfigError(f"mix {options['mix']!r}: mixing images mixes their boxes; detection trains with "
                              "mix none")

    def forward(self, model, x, targets, options, gen=None):
        if model.training:
            if targets is None:
                raise ConfigError("a detection model in training mode needs its target boxes")
            losses = model(x, unpad_targets(targets))
            return losses["classification"] + losses["bbox_regression"] + losses["bbox_ctrness"]
        return pad_detections(model(x)).to(x.device)

    def loss(self, bundle: DataBundle, options: dict):
        return _passthrough_loss

    def predictions(self, outputs: torch.Tensor, options: dict) -> torch.Tensor:
        return outputs

    def scores(self, targets, predictions, options):
        """Selection metrics of one epoch: mAP50 and mAP50-95 (one matching, no bootstrap); the
        thresholded ones (precision, recall, F1, mean IoU) at the F1-best threshold of these data."""
        from .det_metrics import choose_score_threshold, coco_map, det_metrics, match_all

        preds, truth = prediction_list(predictions), target_list(targets)
        aps = coco_map(match_all(preds, truth))[0]
        out = {"map50": float(aps[0]), "map50_95": float(np.mean(aps))}
        if options.get("monitor") not in (None, "map50", "map50_95"):
            threshold = choose_score_threshold(preds, truth)["threshold"]
            values = det_metrics(preds, truth, threshold)
            out.update({k: values[k] for k in self.metrics})
        return out

    def fit_on_validation(self, targets, predictions, options) -> dict:
        """The score threshold of precision / recall / F1 (and of drawn boxes): F1-best on validation."""
        from .det_metrics import choose_score_threshold

        preds = prediction_list(predictions)
        warn_if_degenerate(preds)
        chosen = choose_score_threshold(preds, target_list(targets))
        return {"score_threshold": chosen["threshold"] if math.isfinite(chosen["threshold"]) else 1.0}

    def metrics_with_ci(self, targets, predictions, options, n_boot, seed):
        from .det_metrics import det_metrics_with_ci

        out = det_metrics_with_ci(prediction_list(predictions), target_list(targets),
                                  options.get("score_threshold", 0.5), n_boot=n_boot, seed=seed)
        out["froc_at"] = {str(k): v for k, v in out["froc_at"].items()}
        return out

    def write_predictions(self, out: Path, bundle: DataBundle, predictions: np.ndarray, options: dict | None = None
                          ) -> list[str]:
        """Every test detection with its score (JSON, pixels of the S x S model input), the per-image
        counts at the validation-chosen threshold (CSV) and the best / worst cases figure."""
        from .det_metrics import per_image_values

        threshold = float((options or {}).get("score_threshold", 0.5))
        preds, truth = prediction_list(predictions), target_list(bundle.test.boxes)
        payload = {"frame": f"pixels of the {bundle.test.images.shape[-1]} x {bundle.test.images.shape[-2]} model input",
                   "score_threshold": threshold, "class_names": bundle.class_names,
                   "images": [{"id": ident, "detections": _rows(p), "ground_truth": _rows(t)}
                              for ident, p, t in zip(bundle.test.ids, preds, truth)]}
        (out / DETECTIONS_FILE).write_text(json.dumps(payload, indent=1))
        values = per_image_values(preds, truth, threshold)
        names = [k for k in values[0] if isinstance(values[0][k], (int, float))] if values else []
        with open(out / "test_per_image.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id"] + names)
            for ident, row in zip(bundle.test.ids, values):
                writer.writerow([ident] + [f"{float(row[n]):.6g}" for n in names])
        f1 = np.array([float(row.get("f1", math.nan)) for row in values])
        case_figure(out / CASES_FILE, bundle.test, preds, truth, f1, threshold)
        return [DETECTIONS_FILE, "test_per_image.csv", CASES_FILE]

    def predict_settings(self, metadata: dict, image_size: int) -> dict:
        """What ``medpeft predict`` passes on: the run's validation-chosen threshold and the model input size."""
        fitted = json.loads(metadata.get("fitted_on_validation") or "{}")
        return {"fitted": {**fitted, "input_size": int(image_size)}}

    def write_user_predictions(self, files, predictions, class_names, kind, out, fitted: dict | None = None):
        """Per image: ``<stem>_boxes.json`` (every detection with its score and class, in the image's
        own pixels, and whether it passes the run's validation-chosen threshold) and
        ``<stem>_overlay.png`` (the detections at or above the threshold)."""
        from PIL import Image, ImageDraw

        if not out:
            raise ConfigError("medpeft predict on a detection run needs --out FOLDER for the boxes and overlays")
        threshold = float((fitted or {}).get("score_threshold", 0.5))
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        preds = prediction_list(predictions)
        for path, det in zip(files, preds):
            image = Image.open(path).convert("RGB")
            w, h = image.size
            s = float((fitted or {}).get("input_size") or np.nan)
            rows = _rows(det, (w / s, h / s))
            for row in rows:
                row["class"] = class_names[row["label"]] if 0 <= row["label"] < len(class_names) else str(row["label"])
                row["above_threshold"] = row["score"] >= threshold
            stem = _safe_name(Path(path).stem)
            (folder / f"{stem}_boxes.json").write_text(json.dumps(
                {"image": Path(path).name, "score_threshold": threshold, "frame": "pixels of the image file",
                 "detections": rows}, indent=1))
            draw = ImageDraw.Draw(image)
            for row in rows:
                if row["above_threshold"]:
                    draw.rectangle(row["box"], outline=(255, 0, 0), width=max(1, round(min(w, h) / 150)))
                    draw.text((row["box"][0] + 2, row["box"][1] + 2), f"{row['class']} {row['score']:.2f}",
                              fill=(255, 0, 0))
            image.save(folder / f"{stem}_overlay.png")
        return f"wrote boxes and overlays of {len(files)} image(s) to {folder} (score threshold {threshold:.3f})"
