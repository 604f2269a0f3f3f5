"""Detection data: images with boxes, in memory at the run's image size, ready to split.

Where the boxes come from (``DataConfig.boxes`` names a file; otherwise the folder decides):

* a folder with ``kavsir_bboxes.json`` (Kvasir-SEG): the published boxes, scaled from the
  original images to the stored ones (``boxes.read_kvasir_boxes``);
* ``boxes: <file>.json`` with ``images`` / ``annotations`` / ``categories``: COCO
  (``boxes.read_coco_boxes``, image paths relative to the folder); any other JSON object is
  read as the Kvasir format;
* ``boxes: <file>.csv`` or a ``.csv`` data set: ``path,x0,y0,x1,y1,label`` rows
  (``boxes.read_box_csv``);
* any segmentation folder (BUSI, CVC-ClinicDB): one box per connected mask component of at least
  ``box_min_size`` pixels (``boxes.read_mask_boxes``), so every segmentation set is a detection set.

Targets: ``ImageSet.boxes`` float32 [N, M, 5] rows ``x0, y0, x1, y1, label`` in the pixels of the
S x S model input, NaN rows as padding (M = the most boxes any image has, at least 1); an image
without boxes (a true negative) is all padding. ``ImageSet.labels`` is the split stratum: 1 if the
image has a box, else 0.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from medpeft.data.base import DataConfig, ImageSet
from medpeft.data.boxes import BACKGROUND, BoxAnnotations, read_box_csv, read_coco_boxes, read_kvasir_boxes
from medpeft.data.boxes import read_mask_boxes, resize_boxes
from medpeft.errors import ConfigError, DataError

KVASIR_FILE = "kavsir_bboxes.json"  # (sic) the name in the Kvasir-SEG release
STRATA = ["no object", "object"]


@dataclass
class DetectionSource:
    name: str
    class_names: list[str]  # [background, class 1, ...]
    pool: ImageSet
    split: list[str] | None  # a manifest's split column (None: automatic)
    layout: str  # kvasir | coco | csv | masks
    corrections: dict


def padded_boxes(per_image: list[tuple[np.ndarray, np.ndarray]]) -> torch.Tensor:
    """[(boxes [n, 4], labels [n])] -> float32 [N, M, 5] with NaN padding (M >= 1)."""
    most = max([len(b) for b, _ in per_image] + [1])
    out = torch.full((len(per_image), most, 5), float("nan"), dtype=torch.float32)
    for i, (boxes, labels) in enumerate(per_image):
        if len(boxes):
            out[i, :len(boxes), :4] = torch.as_tensor(np.asarray(boxes, dtype=np.float32))
            out[i, :len(boxes), 4] = torch.as_tensor(np.asarray(labels, dtype=np.float32))
    return out


def unpad(boxes: torch.Tensor | np.ndarray) -> list[dict[str, torch.Tensor]]:
    """float [N, M, 5] (NaN padding) -> one torchvision target ``{"boxes", "labels"}`` per image."""
    boxes = torch.as_tensor(boxes)
    out = []
    for rows in boxes:
        rows = rows[~torch.isnan(rows[:, 0])]
        out.append({"boxes": rows[:, :4].float(), "labels": rows[:, 4].round().long()})
    return out


def _resolve_box_file(name: str, folder: str) -> str:
    """The box file named by ``boxes``: relative to the data folder (or absolute), never outside it."""
    from medpeft.data.manifest import _inside

    path = _inside(os.path.realpath(folder), name, f"boxes file {name!r}")
    if not os.path.isfile(path):
        raise DataError(f"boxes file {name!r} not found in the data folder {folder}; expected a COCO or Kvasir JSON "
                        "or a CSV with path,x0,y0,x1,y1,label")
    return path


def _read_json_kind(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as err:
        raise DataError(f"boxes file {path} is not readable JSON: {err}") from None
    return "coco" if isinstance(data, dict) and {"images", "annotations"} <= set(data) else "kvasir"


def box_layout(kind: str, where: str, cfg: DataConfig) -> tuple[str, str]:
    """(layout, path) of a detection source's boxes: csv | coco | kvasir (a box file) or masks (the folder).
    The one place that decides where a source's boxes come from."""
    if kind == "medmnist":
        raise ConfigError(f"data set {where!r} is a MedMNIST classification set: it has no boxes. For task detection "
                          "give a folder (Kvasir-SEG's kavsir_bboxes.json, a COCO/CSV file via --boxes, or masks) "
                          "or a CSV manifest path,x0,y0,x1,y1,label")
    if kind == "manifest":
        return "csv", where
    if cfg.boxes:
        path = _resolve_box_file(cfg.boxes, where)
        if path.lower().endswith(".csv"):
            return "csv", path
        return _read_json_kind(path), path
    kvasir = os.path.join(where, KVASIR_FILE)
    if os.path.isfile(kvasir):
        return "kvasir", kvasir
    return "masks", where


def read_annotations(kind: str, where: str, cfg: DataConfig) -> tuple[BoxAnnotations, str]:
    """(annotations, layout) for the data source; DataError/ConfigError naming the file."""
    layout, path = box_layout(kind, where, cfg)
    if layout == "csv":
        return read_box_csv(path, root=cfg.root if kind == "manifest" else where), layout
    if layout == "coco":
        return read_coco_boxes(path, image_root=where), layout
    if layout == "kvasir":
        return read_kvasir_boxes(path, images_dir=os.path.join(where, "images")), layout
    return read_mask_boxes(where, min_size=cfg.box_min_size, mask_pattern=cfg.mask_pattern,
                           classes=_mask_box_classes(cfg)), layout


def _mask_box_classes(cfg: DataConfig) -> list[str]:
    """Foreground names of boxes drawn from masks: ``mask_classes`` without the background (default
    'lesion'), so masks can name their class as another set's box file does (e.g. 'polyp')."""
    from medpeft.data.masks import mask_class_names

    return mask_class_names(cfg)[1:]


def load_detection(kind: str, where: str, cfg: DataConfig) -> DetectionSource:
    """Read every annotated image at ``cfg.image_size`` with its boxes scaled to it."""
    from medpeft.data.io import read_image, resize_images, stack_mixed_channels
    from medpeft.data.masks import _chw_view

    annotations, layout = read_annotations(kind, where, cfg)
    if not annotations.images:
        raise DataError(f"{annotations.source}: no annotated image with a file; nothing to train on")
    size = int(cfg.image_size)

    from medpeft.data.near_duplicates import decoded_hashes

    def one(item):  # the resized image and the near-duplicate hashes of the decoded one
        pixels = read_image(item.path, cfg.dicom_window)
        return (resize_images(_chw_view(pixels), size).contiguous(),
                decoded_hashes(item.path, pixels, cfg.dicom_window))

    if len(annotations.images) < 32:
        results = [one(item) for item in annotations.images]
    else:
        with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as pool:
            results = list(pool.map(one, annotations.images))
    images, hashes = [r[0] for r in results], [r[1] for r in results]
    per_image = [(resize_boxes(item.boxes, item.size, size), item.labels) for item in annotations.images]
    root = where if kind == "folder" else os.path.dirname(os.path.abspath(where))
    ids = [os.path.relpath(item.path, root).replace(os.sep, "/") for item in annotations.images]
    groups = None
    if kind == "folder":
        from medpeft.data.groups import folder_groups

        groups = folder_groups(where, ids)[0]  # video sequences / patients the folder documents
    strata = torch.tensor([int(len(b) > 0) for b, _ in per_image], dtype=torch.int64)
    pool = ImageSet(images=stack_mixed_channels(images), labels=strata, ids=ids, groups=groups,
                    boxes=padded_boxes(per_image), files=[item.path for item in annotations.images],
                    file_hashes=hashes)
    name = os.path.basename(os.path.normpath(where)) if kind == "folder" else os.path.splitext(os.path.basename(where))[0]
    corrections = {k: v for k, v in annotations.corrections.items() if v}
    return DetectionSource(name=name, class_names=list(annotations.class_names), pool=pool, split=None,
                           layout=layout, corrections=corrections)
