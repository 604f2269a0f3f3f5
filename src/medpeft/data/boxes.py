"""Bounding-box annotations for detection: conventions, readers, checks and resizing.

    ann = read_kvasir_boxes("../shared/data/Kvasir-SEG/kavsir_bboxes.json")
    ann = read_coco_boxes("annotations.json")            # COCO: images, annotations, categories
    ann = read_box_csv("boxes.csv")                      # path,x0,y0,x1,y1,label, one row per box
    ann = read_mask_boxes("../shared/data/CVC-ClinicDB", min_size=16)   # one box per mask component
    targets = ann.targets(size=224)                      # [{"boxes", "labels"}] for a 224 x 224 model

Conventions (every function of the detection modules follows them)
------------------------------------------------------------------
* **Coordinates**: float32 ``[N, 4]`` as ``(x0, y0, x1, y1)`` in *continuous* pixel coordinates
  of the image the boxes belong to - the convention of torchvision's detection models, of
  ``torchvision.ops.box_iou`` and of COCO evaluation. Pixel column ``i`` covers ``[i, i + 1)``, so
  a box around the pixel columns ``c0..c1`` (inclusive) is ``x0 = c0, x1 = c1 + 1`` (x1/y1 are
  exclusive as pixel indices), its width is ``x1 - x0`` and its area ``(x1 - x0) * (y1 - y0)``
  (no "+1"). A valid box has ``0 <= x0 < x1 <= W`` and ``0 <= y0 < y1 <= H``.
* **Labels**: int64 ``[N]`` with values ``1..K``; 0 is reserved for the background, as
  torchvision's Faster R-CNN / RetinaNet / FCOS expect and as in segmentation masks.
  ``class_names[0] == "background"``; ``class_names[k]`` names label ``k``. Readers take the
  foreground names as ``classes`` (label ``k`` = ``classes[k - 1]``).
* **Sizes** are ``(height, width)``, as in torch.
* **Images without boxes** are valid (true negatives): boxes of shape ``(0, 4)``, labels ``(0,)``.
* **Which image**: boxes returned by the readers are in the pixels of the image *file as
  stored* (its decoded size, EXIF orientation applied as ``io.read_image`` does). The loader
  resizes images to the model size ``S x S`` (square, aspect ratio not kept); ``resize_boxes``
  / ``BoxAnnotations.targets(size=S)`` scale the boxes with them: ``x * S / W``, ``y * S / H``.

Bad input (the error names the file, the image and the box)
------------------------------------------------------------
* non-finite or non-numeric coordinates, ``x1 <= x0`` or ``y1 <= y0`` (zero or negative area),
  a box lying entirely outside its image: ``DataError`` (the annotation is broken; nothing
  sensible can be guessed).
* a box reaching beyond the image border by at most ``clip_tolerance`` of the image side
  (default 2 %, i.e. 5 px of a 256 px image: annotation tools often write ``xmax = width`` or
  one pixel more) is clipped to the image and counted in ``corrections["clipped"]``; further
  out it is a ``DataError`` - such boxes usually come from another image size's pixels (e.g.
  original-size boxes on resized images), and clipping them would silently corrupt the data.
* an annotation naming an image file that does not exist: ``DataError`` (``missing="error"``,
  the default) or skipped, counted in ``corrections["skipped_missing_images"]`` and listed in
  ``skipped`` (``missing="skip"``; the Kvasir reader's default, because the public Kvasir-SEG
  json lists two ids without an image).
* a class name that is not one of ``classes``, a COCO annotation whose ``category_id`` has no
  category, an image without an annotation entry where one is required: ``DataError``.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from scipy import ndimage

from medpeft.data.io import is_image_file, read_image
from medpeft.data.manifest import _inside, _read_rows, _require
from medpeft.errors import ConfigError, DataError

BACKGROUND = "background"
DEFAULT_CLIP_TOLERANCE = 0.02  # fraction of the image side a box may overshoot and still be clipped
MISSING_MODES = ("error", "skip")
CSV_COLUMNS = ("path", "x0", "y0", "x1", "y1", "label")
BOX_FIELDS = ("x0", "y0", "x1", "y1")
CORRECTION_KEYS = ("clipped", "skipped_missing_images", "rescaled_images", "dropped_small_components")
# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse)
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)


# ----------------------------------------------------------------------------- data types
def empty_boxes() -> np.ndarray:
    return np.zeros((0, 4), dtype=np.float32)


def empty_labels() -> np.ndarray:
    return np.zeros((0,), dtype=np.int64)


@dataclass
class BoxImage:
    """One image and its boxes (conventions in the module docstring)."""

    image_id: str  # Kvasir id, COCO file_name or CSV path: how the annotation file names it
    path: str  # absolute path of the image file
    size: tuple[int, int]  # (height, width) of the stored image: the frame of ``boxes``
    boxes: np.ndarray  # float32 [N, 4] x0, y0, x1, y1
    labels: np.ndarray  # int64 [N], 1..K

    def target(self, size: int | tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """torchvision target ``{"boxes": float32 [N, 4], "labels": int64 [N]}``, scaled to ``size``
        (an int for the square model input, or (height, width)); None keeps the stored size."""
        boxes = self.boxes if size is None else resize_boxes(self.boxes, self.size, size)
        return {"boxes": torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32)),
                "labels": torch.from_numpy(np.ascontiguousarray(self.labels, dtype=np.int64))}


@dataclass
class BoxAnnotations:
    """What every box reader returns: images in file order, their boxes and what was corrected."""

    source: str  # the annotation file (or mask folder) read
    class_names: list[str]  # index = label; class_names[0] == "background"
    images: list[BoxImage]
    # clipped: boxes clipped to their image; skipped_missing_images: annotated images without a
    # file (missing="skip"); rescaled_images: images whose annotation size differs from the file
    # (boxes scaled to the file); dropped_small_components: mask components below min_size
    corrections: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CORRECTION_KEYS, 0))
    skipped: list[str] = field(default_factory=list)  # ids of the skipped images

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_boxes(self) -> int:
        return int(sum(len(item.boxes) for item in self.images))

    @property
    def num_negative_images(self) -> int:
        """Images without any box (true negatives when a model predicts nothing there)."""
        return sum(1 for item in self.images if len(item.boxes) == 0)

    def targets(self, size: int | tuple[int, int] | None = None) -> list[dict[str, torch.Tensor]]:
        """One torchvision target per image, boxes scaled to ``size`` (see ``BoxImage.target``)."""
        return [item.target(size) for item in self.images]


# ----------------------------------------------------------------------------- geometry
def _as_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def resize_boxes(boxes, from_size: tuple[int, int], to_size: int | tuple[int, int]) -> np.ndarray:
    """Scale boxes with their image: ``(H, W) -> (h, w)`` maps x by ``w / W`` and y by ``h / H``
    (continuous coordinates scale exactly with a resize; no rounding). ``to_size`` as an int is a
    square ``to_size x to_size``, the loader's resize."""
    fh, fw = _as_hw(from_size)
    th, tw = _as_hw(to_size)
    scale = np.array([tw / fw, th / fh, tw / fw, th / fh], dtype=np.float64)
    return (np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * scale).astype(np.float32)


def box_area(boxes) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)


def _show_box(box) -> str:
    return "(" + ", ".join(f"{float(v):g}" for v in box) + ")"


def check_boxes(boxes, size: tuple[int, int], where: str,
                clip_tolerance: float = DEFAULT_CLIP_TOLERANCE) -> tuple[np.ndarray, int]:
    """(valid float32 boxes, number clipped) for boxes in an image of ``size`` (H, W).

    DataError naming ``where`` for a wrong shape, non-finite values, zero/negative area, a box
    entirely outside the image or one overshooting the border by more than ``clip_tolerance``
    of the image side; boxes overshooting by less are clipped to the image (and counted)."""
    h, w = _as_hw(size)
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.size == 0:
        return empty_boxes(), 0
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise DataError(f"{where}: boxes of shape {arr.shape}; expected [N, 4] (x0, y0, x1, y1)")
    for box in arr:
        _check_one(box, h, w, where, clip_tolerance)
    clipped = np.clip(arr, 0, [w, h, w, h])
    n_clipped = int(np.any(clipped != arr, axis=1).sum())
    return clipped.astype(np.float32), n_clipped


def _check_one(box: np.ndarray, h: int, w: int, where: str, tolerance: float) -> None:
    shown = _show_box(box)
    if not np.all(np.isfinite(box)):
        raise DataError(f"{where}: box {shown} has a non-finite coordinate")
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        raise DataError(f"{where}: box {shown} has zero or negative area; expected x0 < x1 and y0 < y1 "
                        "(x0, y0, x1, y1 in pixels)")
    if x0 >= w or y0 >= h or x1 <= 0 or y1 <= 0:
        raise DataError(f"{where}: box {shown} lies entirely outside the {w} x {h} (width x height) image")
    over_x = max(-x0, x1 - w, 0.0)
    over_y = max(-y0, y1 - h, 0.0)
    if over_x > tolerance * w or over_y > tolerance * h:
        raise DataError(f"{where}: box {shown} reaches {max(over_x, over_y):g} px beyond the {w} x {h} "
                        f"(width x height) image, more than the {tolerance:.0%} that is clipped; are the "
                        "boxes in the pixels of another image size (e.g. the original before resizing)?")


# ----------------------------------------------------------------------------- shared helpers
def image_size(path: str) -> tuple[int, int]:
    """(height, width) of an image file as ``io.read_image`` decodes it, from the header alone
    (EXIF rotations by 90/270 degrees swap the two). DataError naming an unreadable file."""
    if path.lower().endswith(".dcm"):
        return tuple(read_image(path).shape[:2])
    try:
        with Image.open(path) as image:
            w, h = image.size
            orientation = image.getexif().get(0x0112, 1)
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None
    return (w, h) if orientation in _SWAPPING_ORIENTATIONS else (h, w)


def _check_missing_mode(missing: str) -> str:
    if missing not in MISSING_MODES:
        raise ConfigError(f"missing={missing!r}; expected one of {', '.join(MISSING_MODES)}")
    return missing


def _check_tolerance(clip_tolerance) -> float:
    if isinstance(clip_tolerance, bool) or not isinstance(clip_tolerance, (int, float)) \
            or not 0 <= clip_tolerance < 1:
        raise ConfigError(f"clip_tolerance={clip_tolerance!r}; expected a fraction of the image side in [0, 1)")
    return float(clip_tolerance)


def _class_index(classes: list[str] | None, found: list[str], where: str = "") -> dict[str, int]:
    """name -> label (1..K): ``classes`` if given (ConfigError if malformed), else the names found
    in the file ``where`` in sorted order (DataError if one is empty or 'background')."""
    names = sorted(set(found)) if classes is None else [str(c).strip() for c in classes]
    if all(names) and len(set(names)) == len(names) and BACKGROUND not in names:
        return {name: i + 1 for i, name in enumerate(names)}
    if classes is None:
        raise DataError(f"{where}: class names {names!r} found; every box needs a non-empty class name other "
                        f"than {BACKGROUND!r} (label 0 is reserved for it)")
    raise ConfigError(f"classes {names!r} must be distinct non-empty names, without {BACKGROUND!r} "
                      "(label 0 is reserved for it)")


def _label_of(name: str, index: dict[str, int], where: str) -> int:
    if name not in index:
        raise DataError(f"{where}: unknown class name {name!r}; expected one of {', '.join(index) or 'none'}")
    return index[name]


def _report_missing_images(missing: list[tuple[str, str]], source: str, mode: str,
                           corrections: dict[str, int], skipped: list[str]) -> None:
    """missing: [(image id, expected file)]. Raise (mode error) or record them as skipped."""
    if not missing:
        return
    if mode == "error":
        shown = "; ".join(f"{image_id} (expected {expected})" for image_id, expected in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DataError(f"{source} names {len(missing)} image(s) that do not exist: {shown}{more}; "
                        "fix the file, or pass missing='skip' to leave them out (they are counted)")
    corrections["skipped_missing_images"] += len(missing)
    skipped.extend(image_id for image_id, _ in missing)


def _finish(item: BoxImage, raw, labels, ann_size, where: str, tolerance: float,
            corrections: dict[str, int]) -> BoxImage:
    """Check ``raw`` boxes in the annotation's frame ``ann_size``, then scale them to the stored file."""
    boxes, n_clipped = check_boxes(raw, ann_size, where, tolerance)
    corrections["clipped"] += n_clipped
    if tuple(ann_size) != tuple(item.size):
        corrections["rescaled_images"] += 1
        boxes = resize_boxes(boxes, ann_size, item.size)
    return replace(item, boxes=boxes, labels=np.asarray(labels, dtype=np.int64).reshape(-1))


def _new_corrections() -> dict[str, int]:
    return dict.fromkeys(CORRECTION_KEYS, 0)


def _load_json(path: str) -> object:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise DataError(f"box file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read box file {path}: {exc}; expected a UTF-8 JSON file") from None


# ----------------------------------------------------------------------------- (a) Kvasir-SEG json
def _number(value, where: str) -> float:
    if isinstance(value, bool):
        raise DataError(f"{where}: {value!r} is not a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise DataError(f"{where}: {value!r} is not a finite number")
    return number


def _stems(folder: str) -> dict[str, str]:
    if not os.path.isdir(folder):
        raise DataError(f"image folder not found: {folder}")
    return {os.path.splitext(name)[0]: os.path.join(folder, name)
            for name in sorted(os.listdir(folder)) if is_image_file(name)}


def _kvasir_entry(image_id: str, entry, path: str, index: dict[str, int]):
    """(raw boxes [N, 4], labels [N], (height, width) of the original image) of one json entry."""
    where = f"{path}: entry {image_id!r}"
    if not isinstance(entry, dict) or "bbox" not in entry:
        raise DataError(f"{where} is not an object with 'height', 'width' and 'bbox'")
    size = (_number(entry.get("height"), f"{where}, field 'height'"),
            _number(entry.get("width"), f"{where}, field 'width'"))
    if min(size) <= 0:
        raise DataError(f"{where}: original size {size} (height, width) must be positive")
    raw, labels = [], []
    for k, box in enumerate(entry["bbox"] or []):
        field_where = f"{where}, box {k}"
        if not isinstance(box, dict):
            raise DataError(f"{field_where} is not an object with xmin, ymin, xmax, ymax, label")
        # xmax/ymax are continuous coordinates (x1 = xmax): against the masks' extents this fits
        # better (mean IoU 0.975) than treating them as inclusive pixel indices (0.967)
        raw.append([_number(box.get(key), f"{field_where}, field {key!r}") for key in ("xmin", "ymin", "xmax", "ymax")])
        labels.append(_label_of(str(box.get("label", "")).strip(), index, field_where))
    return np.asarray(raw, dtype=np.float64).reshape(-1, 4), labels, (int(size[0]), int(size[1]))


def read_kvasir_boxes(json_path: str, images_dir: str | None = None, classes: list[str] | None = ("polyp",),
                      missing: str = "skip", clip_tolerance: float = DEFAULT_CLIP_TOLERANCE) -> BoxAnnotations:
    """Kvasir-SEG's ``kavsir_bboxes.json``: ``{id: {"height", "width", "bbox": [{"label", "xmin",
    "ymin", "xmax", "ymax"}]}}`` with boxes in the ORIGINAL image's pixels; the stored images
    (``images_dir``, default ``images/`` beside the json, ``<id>.<ext>``) are resized, so every
    box is checked in the original frame and then scaled by ``stored / original`` per axis.

    ``missing="skip"`` (default) leaves out json ids without an image file (the public release
    has two), counted and listed; an image file without a json entry is a DataError (a frame
    without polyps needs an entry with an empty ``bbox`` list, not silence). Images are in
    sorted id order."""
    missing, tolerance = _check_missing_mode(missing), _check_tolerance(clip_tolerance)
    data = _load_json(json_path)
    if not isinstance(data, dict):
        raise DataError(f"{json_path}: expected a JSON object mapping image ids to their boxes")
    files = _stems(images_dir or os.path.join(os.path.dirname(os.path.abspath(json_path)), "images"))
    index = _class_index(list(classes) if classes is not None else None,
                         [str(b.get("label", "")).strip() for e in data.values() if isinstance(e, dict)
                          for b in (e.get("bbox") or []) if isinstance(b, dict)], json_path)
    unlisted = sorted(set(files) - set(data))
    if unlisted:
        raise DataError(f"{json_path}: {len(unlisted)} image(s) in the image folder have no entry "
                        f"(first: {files[unlisted[0]]}); add them, with an empty 'bbox' list if they hold no polyp")
    corrections, skipped, images = _new_corrections(), [], []
    _report_missing_images([(i, f"{i}.<jpg|png|...>") for i in sorted(data) if i not in files],
                           json_path, missing, corrections, skipped)
    for image_id in sorted(i for i in data if i in files):
        raw, labels, original = _kvasir_entry(image_id, data[image_id], json_path, index)
        item = BoxImage(image_id, files[image_id], image_size(files[image_id]), empty_boxes(), empty_labels())
        images.append(_finish(item, raw, labels, original, f"{json_path}: entry {image_id!r}", tolerance,
                              corrections))
    return BoxAnnotations(json_path, [BACKGROUND, *index], images, corrections, skipped)


# ----------------------------------------------------------------------------- (b) masks
def boxes_from_mask(mask, min_size: int = 1) -> tuple[np.ndarray, np.ndarray, int]:
    """(boxes float32 [N, 4], labels int64 [N], number of components dropped) of a label mask.

    One box per connected component of each non-zero mask value (the value is the label),
    with **8-connectivity** (diagonal neighbours join: a lesion outline drawn at 45 degrees
    stays one object). Components of fewer than ``min_size`` pixels (JPEG speckle, stray
    annotation dots) are dropped and counted. A component over pixel columns c0..c1 and rows
    r0..r1 gives the box (c0, r0, c1 + 1, r1 + 1): continuous coordinates, the pixels' outer
    edges. Boxes are sorted by label, then by component order (row-major first pixel)."""
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 1:
        raise ConfigError(f"min_size={min_size!r}; expected an integer number of pixels >= 1")
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise DataError(f"mask of shape {mask.shape}; expected a 2D (H, W) label mask")
    boxes, labels, dropped = [], [], 0
    for value in np.unique(mask):
        if value == 0:
            continue
        components, n = ndimage.label(mask == value, structure=np.ones((3, 3), dtype=bool))
        sizes = np.bincount(components.ravel(), minlength=n + 1)
        for k, slices in enumerate(ndimage.find_objects(components), start=1):
            if sizes[k] < min_size:
                dropped += 1
                continue
            rows, cols = slices
            boxes.append([cols.start, rows.start, cols.stop, rows.stop])
            labels.append(int(value))
    if not boxes:
        return empty_boxes(), empty_labels(), dropped
    return np.asarray(boxes, dtype=np.float32), np.asarray(labels, dtype=np.int64), dropped


def read_mask_boxes(root: str, min_size: int = 1, mask_pattern: str | None = "*_mask*",
                    classes: list[str] | None = ("lesion",)) -> BoxAnnotations:
    """Boxes from a segmentation folder (the layouts of ``data.masks``: ``images/`` + ``masks/``,
    or masks beside the images as in BUSI). Each mask file is read like the segmentation loader
    reads it (JPEG thresholded at > 127) at the image's own size, and gives one box per connected
    component (``boxes_from_mask``); an image with several mask files (BUSI's ``_mask_1``) gets
    the boxes of each file, so two touching lesions annotated separately stay two boxes.
    ``classes``: the foreground names of the mask values 1..K. Images without foreground are
    negatives; dropped components are counted in ``corrections["dropped_small_components"]``."""
    from medpeft.data.masks import detect_layout, read_mask, scan_beside_folder, scan_paired_folder

    index = _class_index(list(classes), [])
    if detect_layout(root, mask_pattern) == "paired":
        pairs = scan_paired_folder(root)
    else:
        pairs = scan_beside_folder(root, mask_pattern)[0]
    corrections, images = _new_corrections(), []
    for image_id, mask_ids in pairs:
        path = os.path.join(root, image_id)
        size = image_size(path)
        boxes, labels = [empty_boxes()], [empty_labels()]
        for mask_id in mask_ids:
            mask = read_mask(os.path.join(root, mask_id), num_classes=len(index) + 1)
            if mask.shape != size:
                raise DataError(f"mask {os.path.join(root, mask_id)} is {mask.shape[1]} x {mask.shape[0]} but its "
                                f"image {path} is {size[1]} x {size[0]} (width x height); they must match")
            b, lab, dropped = boxes_from_mask(mask, min_size)
            boxes.append(b), labels.append(lab)
            corrections["dropped_small_components"] += dropped
        images.append(BoxImage(image_id, path, size, np.concatenate(boxes), np.concatenate(labels)))
    return BoxAnnotations(root, [BACKGROUND, *index], images, corrections, [])


# ----------------------------------------------------------------------------- (c) COCO json
def _coco_lists(data, path: str) -> tuple[list, list, list]:
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a COCO object with 'images', 'annotations' and 'categories'")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: COCO field {key!r} is missing or not a list")
    return data["images"], data["annotations"], data["categories"]


def _coco_categories(categories: list, classes, path: str) -> tuple[dict, dict[str, int]]:
    """(category id -> label, class name -> label), checked against ``classes``."""
    names: dict = {}
    for k, cat in enumerate(categories):
        if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
            raise DataError(f"{path}: categories[{k}] needs 'id' and 'name'")
        if cat["id"] in names:
            raise DataError(f"{path}: category id {cat['id']!r} appears twice")
        names[cat["id"]] = str(cat["name"]).strip()
    if len(set(names.values())) != len(names):
        raise DataError(f"{path}: category names {sorted(names.values())} are not distinct")
    # without ``classes`` the labels follow the category ids' order (COCO's own order)
    ordered = [names[i] for i in sorted(names, key=lambda i: (isinstance(i, str), i))]
    index = _class_index(list(classes) if classes is not None else ordered, [])
    return {cid: _label_of(name, index, f"{path}: category {cid!r}") for cid, name in names.items()}, index


def _coco_images(images: list, root: str, path: str):
    """{image id: (file name, absolute path, annotated (h, w) or None)} in file order."""
    out = {}
    for k, img in enumerate(images):
        if not isinstance(img, dict) or "id" not in img or not img.get("file_name"):
            raise DataError(f"{path}: images[{k}] needs 'id' and 'file_name'")
        if img["id"] in out:
            raise DataError(f"{path}: image id {img['id']!r} appears twice")
        file_path = _inside(root, str(img["file_name"]), f"{path}: images[{k}]")
        size = None
        if img.get("width") is not None and img.get("height") is not None:
            size = (int(_number(img["height"], f"{path}: images[{k}].height")),
                    int(_number(img["width"], f"{path}: images[{k}].width")))
        out[img["id"]] = (str(img["file_name"]), file_path, size)
    return out


def _coco_annotation(k: int, ann, path: str, images: dict, categories: dict):
    where = f"{path}: annotations[{k}]"
    if not isinstance(ann, dict):
        raise DataError(f"{where} is not an object")
    if ann.get("image_id") not in images:
        raise DataError(f"{where}: image_id {ann.get('image_id')!r} is not in 'images'")
    if ann.get("category_id") not in categories:
        raise DataError(f"{where}: category_id {ann.get('category_id')!r} is not in 'categories' "
                        f"(ids: {', '.join(map(repr, categories))})")
    if ann.get("iscrowd", 0):
        raise DataError(f"{where}: crowd annotations (iscrowd=1) are not supported; give one box per object")
    bbox = ann.get("bbox")
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise DataError(f"{where}: bbox {bbox!r} is not [x, y, width, height]")
    x, y, w, h = (_number(v, f"{where}, bbox") for v in bbox)
    return ann["image_id"], [x, y, x + w, y + h], categories[ann["category_id"]]


def read_coco_boxes(json_path: str, image_root: str | None = None, classes: list[str] | None = None,
                    missing: str = "error", clip_tolerance: float = DEFAULT_CLIP_TOLERANCE) -> BoxAnnotations:
    """A COCO detection file: ``images`` (id, file_name relative to ``image_root`` - default the
    json's folder -, width, height), ``annotations`` (image_id, category_id, bbox ``[x, y, w, h]``
    in the pixels of the image's recorded width x height) and ``categories`` (id, name).

    Labels: ``classes`` (foreground names) if given - a category whose name is not among them is
    a DataError -, else the categories in id order get labels 1..K. Boxes are checked in the
    recorded width x height and scaled to the file's real size when it differs (counted in
    ``rescaled_images``). Images without annotations are negatives. Crowd annotations are refused."""
    missing, tolerance = _check_missing_mode(missing), _check_tolerance(clip_tolerance)
    root = os.path.realpath(image_root or os.path.dirname(os.path.abspath(json_path)))
    images, annotations, categories = _coco_lists(_load_json(json_path), json_path)
    cat_labels, index = _coco_categories(categories, classes, json_path)
    entries = _coco_images(images, root, json_path)
    per_image: dict = {image_id: ([], []) for image_id in entries}
    for k, ann in enumerate(annotations):
        image_id, box, label = _coco_annotation(k, ann, json_path, entries, cat_labels)
        per_image[image_id][0].append(box), per_image[image_id][1].append(label)
    corrections, skipped = _new_corrections(), []
    _report_missing_images([(name, file) for name, file, _ in entries.values() if not os.path.isfile(file)],
                           json_path, missing, corrections, skipped)
    out = []
    for image_id, (name, file_path, recorded) in entries.items():
        if not os.path.isfile(file_path):
            continue
        size = image_size(file_path)
        raw, labels = per_image[image_id]
        item = BoxImage(name, file_path, size, empty_boxes(), empty_labels())
        out.append(_finish(item, np.asarray(raw, dtype=np.float64).reshape(-1, 4), labels, recorded or size,
                           f"{json_path}: image {name!r}", tolerance, corrections))
    return BoxAnnotations(json_path, [BACKGROUND, *index], out, corrections, skipped)


# ----------------------------------------------------------------------------- (d) CSV manifest
def _csv_row(line: int, row: dict, path: str, index: dict[str, int]):
    """(box [4] or None for an image without boxes, label or None) of one CSV row."""
    where = f"{path} line {line}"
    values = [row.get(key, "") for key in BOX_FIELDS]
    if not any(values):
        return None, None  # no box: the image is a negative (its label field is ignored)
    if not all(values):
        empty = [key for key, v in zip(BOX_FIELDS, values) if not v]
        raise DataError(f"{where}: box fields {', '.join(empty)} are empty; give all of x0, y0, x1, y1 "
                        "or none (an image without boxes)")
    box = [_number(v, f"{where}, column {key!r}") for key, v in zip(BOX_FIELDS, values)]
    return box, _label_of(row.get("label", ""), index, where)


def read_box_csv(csv_path: str, root: str | None = None, classes: list[str] | None = None,
                 missing: str = "error", clip_tolerance: float = DEFAULT_CLIP_TOLERANCE) -> BoxAnnotations:
    """A CSV with columns ``path,x0,y0,x1,y1,label``: one row per box, in the pixels of the image
    file; an image without boxes is one row with the four box fields empty (its label is
    ignored). Paths are relative to ``root`` (default the CSV's folder) and must stay inside it.
    ``label`` is a class name; ``classes`` fixes the names and their order (labels 1..K), else
    the names found are sorted. An image listed both without and with boxes is a DataError.
    Images come in order of first appearance."""
    missing, tolerance = _check_missing_mode(missing), _check_tolerance(clip_tolerance)
    root_real = os.path.realpath(root or os.path.dirname(os.path.abspath(csv_path)))
    columns, rows = _read_rows(csv_path)
    _require(columns, list(CSV_COLUMNS), csv_path)
    index = _class_index(list(classes) if classes is not None else None,
                         [r["label"] for _, r in rows if any(r.get(k) for k in BOX_FIELDS)], csv_path)
    grouped: dict[str, dict] = {}
    for line, row in rows:
        file_path = _inside(root_real, row["path"], f"{csv_path} line {line}")
        image_id = os.path.relpath(file_path, root_real).replace(os.sep, "/")
        entry = grouped.setdefault(image_id, {"file": file_path, "boxes": [], "labels": [], "empty_line": None,
                                              "box_line": None})
        box, label = _csv_row(line, row, csv_path, index)
        if box is None:
            entry["empty_line"] = line
        else:
            entry["boxes"].append(box), entry["labels"].append(label)
            entry["box_line"] = entry["box_line"] or line
        if entry["empty_line"] and entry["box_line"]:
            raise DataError(f"{csv_path}: {image_id!r} is listed without boxes (line {entry['empty_line']}) and "
                            f"with boxes (line {entry['box_line']}); use one or the other")
    corrections, skipped = _new_corrections(), []
    _report_missing_images([(i, e["file"]) for i, e in grouped.items() if not os.path.isfile(e["file"])],
                           csv_path, missing, corrections, skipped)
    out = []
    for image_id, entry in grouped.items():
        if not os.path.isfile(entry["file"]):
            continue
        size = image_size(entry["file"])
        item = BoxImage(image_id, entry["file"], size, empty_boxes(), empty_labels())
        out.append(_finish(item, np.asarray(entry["boxes"], dtype=np.float64).reshape(-1, 4), entry["labels"], size,
                           f"{csv_path}: {image_id!r}", tolerance, corrections))
    return BoxAnnotations(csv_path, [BACKGROUND, *index], out, corrections, skipped)
