"""Segmentation data: images with per-pixel masks (``DataConfig.task == "segmentation"``).

Three layouts, each read into one pool (the registry splits it like classification data):

* masks beside the images (BUSI): ``root/<class>/<stem>.png`` with ``<stem>_mask.png`` and, for
  images with several lesions, ``<stem>_mask_1.png``, ``<stem>_mask_2.png``... - every file that
  matches ``cfg.mask_pattern`` (default ``*_mask*``) is a mask and belongs to the image whose name
  precedes the pattern's marker (``_mask``); the masks of one image are OR-ed. Every image needs
  a mask file, also images without a lesion (BUSI ships empty masks for its ``normal`` class): a
  missing mask is an error, never silently "empty".
* paired folders (Kvasir-SEG, CVC-ClinicDB): ``root/images/<name>.<ext>`` and
  ``root/masks/<name>.<ext>`` (same relative path and stem, any image extension).
* a CSV manifest with a ``mask`` column (paths checked like the ``path`` column: relative, inside
  the root); ``label`` is optional, ``split`` and ``group`` work as for classification.

Mask values. Binary masks (the default, class names ``["background", "lesion"]``): JPEG masks are
thresholded at > 127 (compression noise at the edges is harmless); other files must hold only
{0, 1} or only {0, 255}. Label maps with K > 2 classes: set ``cfg.mask_classes`` to the K class
names (value i = ``mask_classes[i]``, 0 = background; a list or a comma-separated string); their
files must hold integers 0..K-1 and must not be JPEG (lossy). With ``mask_classes`` of 2 names
binary masks are read as above under those names.

Sizes. A mask must have its image's original size; both are resized once to ``cfg.image_size``:
the image like a classification image (``io.resize_images``), the mask with nearest neighbour
(PIL NEAREST: class indices, never interpolated values).

Strata (``ImageSet.labels``, int64, used to stratify splits and fraction/shots subsets): the
image's class folder (beside layout with >= 2 class sub-folders), the manifest's ``label``
column, else 1 if the mask (at original size) has foreground and 0 if not.
"""
from __future__ import annotations

import fnmatch
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from medpeft.data.base import DataConfig, ImageSet
from medpeft.data.io import array_to_chw, is_image_file, read_image, resize_images, stack_mixed_channels
from medpeft.errors import ConfigError, DataError

BINARY_CLASSES = ("background", "lesion")
FOREGROUND_STRATA = ("no foreground", "foreground")
JPEG_THRESHOLD = 127  # JPEG masks: foreground where the gray value is > 127
MAX_MASK_CLASSES = 256  # masks are stored as uint8 class indices


@dataclass
class SegmentationSource:
    """What a segmentation reader hands to the registry."""

    name: str
    class_names: list[str]  # mask classes, index = pixel value; 0 = background
    pool: ImageSet  # images, masks, labels = strata, ids = relative paths
    split: list[str] | None  # manifest split column (train/val/test per image), else None
    strata_names: list[str]  # name of each stratum value of pool.labels
    layout: str  # beside | paired | manifest


# ----------------------------------------------------------------------------- class names
def mask_class_names(cfg: DataConfig) -> list[str]:
    """The mask classes: ``cfg.mask_classes`` (list or comma-separated string) or the binary default."""
    raw = cfg.mask_classes
    if raw is None:
        return list(BINARY_CLASSES)
    names = [n.strip() for n in raw.split(",")] if isinstance(raw, str) else [str(n).strip() for n in raw]
    if len(names) < 2 or len(names) > MAX_MASK_CLASSES or not all(names) or len(set(names)) != len(names):
        raise ConfigError(f"mask_classes {raw!r} must be 2 to {MAX_MASK_CLASSES} distinct non-empty names, "
                          "one per mask value 0..K-1 (0 = background), e.g. background,liver,tumour")
    return names


# ----------------------------------------------------------------------------- one mask file
def _show(values) -> str:
    values = [int(v) for v in values]
    return ", ".join(map(str, values[:12])) + (f", ... ({len(values)} values)" if len(values) > 12 else "")


def _values(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return np.flatnonzero(np.bincount(array.ravel(), minlength=256))
    return np.unique(array)


def _mask_pixels(image: Image.Image, jpeg: bool) -> np.ndarray:
    """Decoded mask pixels before any checking: (H, W) gray / label values, (H, W, 3) for colour
    modes, float for mode F (``mask_indices`` judges them)."""
    mode = image.mode
    if mode == "1":
        return np.asarray(image).astype(np.uint8)  # bool -> 0/1 (PIL stores True as 255: never .view)
    if jpeg:
        return np.asarray(image.convert("L"))
    if mode in ("L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        return np.asarray(image)  # P: palette indices are the label values
    if mode == "LA":
        return np.asarray(image)[..., 0]
    return np.asarray(image.convert("RGB"))


def decode_mask(path: str | os.PathLike) -> tuple[np.ndarray, bool, bool]:
    """(pixels before any value check, JPEG?, 1-bit?) of one mask file, EXIF orientation applied
    like the images. DataError naming the file when it cannot be decoded (the audit tells an
    unreadable mask from one with unexpected values by which step fails)."""
    path = os.fspath(path)
    try:
        with Image.open(path) as image:
            image.load()
            jpeg = image.format == "JPEG"
            image = ImageOps.exif_transpose(image)
            one_bit = image.mode == "1"  # 1-bit masks (BUSI) hold 0/1 only: nothing to check
            array = _mask_pixels(image, jpeg)
    except FileNotFoundError:
        raise DataError(f"mask file not found: {path}") from None
    except Image.DecompressionBombError as exc:
        from medpeft.data.io import over_budget

        raise over_budget(path, exc) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot read mask {path}: {exc}; expected a readable PNG/JPEG/BMP/TIFF mask") from None
    if array.ndim not in (2, 3) or array.size == 0:
        raise DataError(f"cannot read mask {path}: decoded shape {array.shape} is not a 2D mask")
    return array, jpeg, one_bit


def mask_indices(array: np.ndarray, path: str, jpeg: bool = False, one_bit: bool = False,
                 num_classes: int = 2) -> np.ndarray:
    """Decoded pixels (``decode_mask``) -> uint8 (H, W) class indices. Binary (num_classes 2): JPEG
    thresholded at > 127, otherwise only {0, 1} or {0, 255} allowed; label maps: values
    0..num_classes-1, no JPEG. DataError naming the file for any other values."""
    if one_bit:
        return array
    if array.ndim == 3:
        if not (np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 1], array[..., 2])):
            raise DataError(f"mask {path} is a colour image (channels differ); expected a grayscale, "
                            "1-bit or palette mask holding class indices")
        array = array[..., 0]
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise DataError(f"mask {path} holds non-integer (float) values; expected class indices")
        array = array.astype(np.int64)
    if jpeg:
        if num_classes > 2:
            raise DataError(f"mask {path} is a JPEG file: lossy compression cannot hold a label map of "
                            f"{num_classes} classes; save label maps as PNG")
        return (array > JPEG_THRESHOLD).astype(np.uint8)
    values = _values(array)
    if num_classes == 2:
        if set(values.tolist()) <= {0, 1}:
            return array.astype(np.uint8, copy=False)
        if set(values.tolist()) <= {0, 255}:
            return (array > 0).astype(np.uint8)
        raise DataError(f"mask {path} holds the values {_show(values)}; a binary mask may hold only 0 and 255 "
                        "or only 0 and 1 (for label maps with more classes give mask_classes)")
    if values.min() < 0 or values.max() >= num_classes:
        raise DataError(f"mask {path} holds the values {_show(values)}; expected class indices 0..{num_classes - 1} "
                        f"({num_classes} mask_classes)")
    return array.astype(np.uint8)


def read_mask(path: str | os.PathLike, num_classes: int = 2) -> np.ndarray:
    """One mask file -> uint8 (H, W) class indices at its original size (``decode_mask`` then
    ``mask_indices``). DataError naming the file."""
    array, jpeg, one_bit = decode_mask(path)
    return mask_indices(array, os.fspath(path), jpeg, one_bit, num_classes)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W) class indices -> (size, size) by nearest neighbour (PIL NEAREST)."""
    if mask.shape == (size, size):
        return np.ascontiguousarray(mask)
    return np.asarray(Image.fromarray(mask, mode="L").resize((size, size), Image.NEAREST))


def read_pair(image_path: str, mask_paths: list[str], size: int, num_classes: int = 2,
              dicom_window: str | None = None) -> tuple[torch.Tensor, np.ndarray, bool, tuple | None]:
    """(image uint8 [C, size, size], mask uint8 (size, size), has foreground at original size, the
    image's near-duplicate hashes from the decoded pixels: ``near_duplicates.decoded_hashes``).
    Several mask files are merged: OR for binary masks, later files' non-zero labels win for
    label maps. DataError when a mask's size differs from its image's (original sizes)."""
    pixels = read_image(image_path, dicom_window)
    height, width = pixels.shape[:2]
    mask = None
    for mask_path in mask_paths:
        part = read_mask(mask_path, num_classes)
        if part.shape != (height, width):
            raise DataError(f"mask {mask_path} is {part.shape[1]}x{part.shape[0]} px but its image {image_path} "
                            f"is {width}x{height} px; a mask must have the size of its image")
        mask = part if mask is None else (np.maximum(mask, part) if num_classes == 2
                                          else np.where(part > 0, part, mask))
    from medpeft.data.near_duplicates import decoded_hashes

    image = resize_images(_chw_view(pixels), size).contiguous()
    return image, resize_mask(mask, size), bool(mask.any()), decoded_hashes(image_path, pixels, dicom_window)


def _chw_view(pixels: np.ndarray) -> torch.Tensor:
    """Like ``io.array_to_chw`` but an RGB image stays a channels-last view: torchvision then takes
    its uint8 fast path (about 3x faster, the same pixels)."""
    if pixels.ndim == 2:
        return array_to_chw(pixels)
    return torch.from_numpy(np.array(pixels, copy=True)).permute(2, 0, 1)


def load_pairs(pairs: list[tuple[str, list[str]]], size: int, num_classes: int = 2,
               dicom_window: str | None = None) -> tuple[torch.Tensor, torch.Tensor, list[bool], list]:
    """Read (image, mask files) pairs with a few threads (decoding and resizing release the GIL):
    images uint8 [N, C, S, S], masks uint8 [N, S, S], has-foreground and near-duplicate hashes per image."""
    if not pairs:
        raise DataError("no images with masks to read")

    def one(pair):
        return read_pair(pair[0], pair[1], size, num_classes, dicom_window)

    if len(pairs) < 32:
        results = [one(p) for p in pairs]
    else:
        with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as pool:
            results = list(pool.map(one, pairs))
    images = stack_mixed_channels([r[0] for r in results])
    masks = torch.from_numpy(np.stack([r[1] for r in results]))
    return images, masks, [r[2] for r in results], [r[3] for r in results]


# ----------------------------------------------------------------------------- folder layouts
def _no_masks(root: str) -> DataError:
    return DataError(f"no masks found in {root}: expected <stem>_mask.png beside each image or "
                     "images/ + masks/ folders")


def _walk(folder: str):
    """(relative path with '/', file name) of every non-hidden file under folder, sorted."""
    for current, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for file in sorted(files):
            if not file.startswith("."):
                yield os.path.relpath(os.path.join(current, file), folder).replace(os.sep, "/"), file


def _paired_dirs(root: str) -> tuple[str, str] | None:
    """root/images and root/masks (names case-insensitive), or None."""
    found = {}
    for entry in os.scandir(root):
        if entry.is_dir() and entry.name.lower() in ("images", "masks"):
            found[entry.name.lower()] = entry.path
    return (found["images"], found["masks"]) if len(found) == 2 else None


def detect_layout(root: str, mask_pattern: str | None = "*_mask*") -> str:
    """``paired`` (root/images + root/masks) or ``beside`` (mask files matching mask_pattern next
    to the images); DataError when the folder holds no masks in either layout."""
    if not os.path.isdir(root):
        raise DataError(f"image folder not found: {root}")
    if _paired_dirs(root):
        return "paired"
    if mask_pattern and any(is_image_file(name) and fnmatch.fnmatch(name, mask_pattern) for _, name in _walk(root)):
        return "beside"
    raise _no_masks(root)


def _mask_marker(mask_pattern: str | None) -> str:
    marker = (mask_pattern or "").strip("*")
    if not marker or any(c in marker for c in "*?["):
        raise ConfigError(f"mask_pattern {mask_pattern!r}: for segmentation it must look like '*<marker>*' "
                          "(e.g. '*_mask*'), so that '<stem><marker>...' is the mask of '<stem>.<ext>'")
    return marker


def _by_stem(rel_paths: list[str], what: str, root: str) -> dict[str, str]:
    """{relative path without extension: relative path}; two files with one stem are ambiguous."""
    out: dict[str, str] = {}
    for rel in rel_paths:
        key = os.path.splitext(rel)[0]
        if key in out:
            raise DataError(f"two {what} files share the name {key!r} in {root}: {out[key]!r} and {rel!r}; "
                            "keep one file per name")
        out[key] = rel
    return out


def _report_missing(missing: list[str], expected, root: str) -> None:
    if not missing:
        return
    shown = "; ".join(f"{os.path.join(root, m)} (expected {expected(m)})" for m in missing[:5])
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    raise DataError(f"{len(missing)} image(s) have no mask: {shown}{more}. Every image needs a mask file, "
                    "also images without a lesion (use an all-zero mask, as BUSI does for its normal images)")


def match_paired_folder(root: str) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """(pairs [(image id ``images/<rel>``, [mask id ``masks/<rel>``] or [] without a mask)] sorted by
    image, orphan mask ids) of a paired layout. Missing and orphan masks are returned, not raised:
    the loader refuses them, the audit lists them all."""
    dirs = _paired_dirs(root)
    if dirs is None:
        raise _no_masks(root)
    image_dir, mask_dir = dirs
    image_sub, mask_sub = os.path.basename(image_dir), os.path.basename(mask_dir)
    images = _by_stem([rel for rel, name in _walk(image_dir) if is_image_file(name)], "image", image_dir)
    masks = _by_stem([rel for rel, name in _walk(mask_dir) if is_image_file(name)], "mask", mask_dir)
    if not masks:
        raise _no_masks(root)
    if not images:
        raise DataError(f"no images found in {image_dir} (its masks folder {mask_dir} holds {len(masks)} file(s))")
    pairs = [(f"{image_sub}/{images[k]}", [f"{mask_sub}/{masks[k]}"] if k in masks else [])
             for k in sorted(images, key=images.get)]
    orphans = sorted(f"{mask_sub}/{masks[k]}" for k in masks if k not in images)
    return pairs, orphans


def scan_paired_folder(root: str) -> list[tuple[str, list[str]]]:
    """[(image id ``images/<rel>``, [mask id ``masks/<rel>``])] of a paired layout, sorted by image;
    DataError when an image has no mask, a warning for masks without an image."""
    pairs, orphans = match_paired_folder(root)
    mask_sub = os.path.basename(_paired_dirs(root)[1])
    _report_missing([image for image, masks in pairs if not masks],
                    lambda m: f"{mask_sub}/{os.path.splitext(m.split('/', 1)[1])[0]}.<png|jpg|...>", root)
    if orphans:
        warnings.warn(f"{len(orphans)} mask(s) in {os.path.join(root, mask_sub)} have no image and are ignored "
                      f"(first: {orphans[0]})", stacklevel=3)
    return pairs


def _owner(rel: str, marker: str) -> tuple[str | None, str | None]:
    """(image key = relative path without extension, stem) that the mask file ``rel`` belongs to."""
    folder, name = os.path.split(rel)
    stem = name[:name.rfind(marker)] if marker in name else None
    return (os.path.join(folder, stem).replace(os.sep, "/") if stem else None), stem


def match_beside_folder(root: str, mask_pattern: str | None = "*_mask*") -> tuple[
        list[tuple[str, list[str]]], list[str], list[int] | None, list[str] | None]:
    """(pairs [(image id, [mask ids] or [] without a mask)], orphan mask ids, class index per image
    or None, class names or None) of masks lying beside their images. Classes are the sub-folders
    (as for classification) when there are >= 2 and no loose images in root. Missing and orphan
    masks are returned, not raised."""
    marker = _mask_marker(mask_pattern)
    images, masks = [], []
    for rel, name in _walk(root):
        if is_image_file(name):
            (masks if fnmatch.fnmatch(name, mask_pattern) else images).append(rel)
    if not masks:
        raise _no_masks(root)
    subdirs = [e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")]
    loose = any("/" not in rel for rel in images)
    labels = class_names = None
    if len(subdirs) >= 2 and not loose:
        from medpeft.data.folder import scan_image_folder

        images, labels, class_names = scan_image_folder(root, mask_pattern)  # sorted by class, then path
    image_of = _by_stem(images, "image", root)
    owned: dict[str, list[str]] = {}
    orphans = []
    for rel in masks:  # sorted: <stem>_mask before <stem>_mask_1
        key = _owner(rel, marker)[0]
        if key in image_of:
            owned.setdefault(key, []).append(rel)
        else:
            orphans.append(rel)
    return [(rel, owned.get(os.path.splitext(rel)[0], [])) for rel in images], orphans, labels, class_names


def scan_beside_folder(root: str, mask_pattern: str | None = "*_mask*"
                       ) -> tuple[list[tuple[str, list[str]]], list[int] | None, list[str] | None]:
    """(pairs [(image id, [mask ids])], class index per image or None, class names or None) of
    masks lying beside their images; DataError for a mask without an image or an image without a mask."""
    pairs, orphans, labels, class_names = match_beside_folder(root, mask_pattern)
    marker = _mask_marker(mask_pattern)
    if orphans:
        stem = _owner(orphans[0], marker)[1]
        raise DataError(f"mask {os.path.join(root, orphans[0])} has no image: expected {stem or '<stem>'}.<png|jpg|...> "
                        f"beside it (a mask '<stem>{marker}...' belongs to the image '<stem>')")
    missing = [image for image, masks in pairs if not masks]
    _report_missing(sorted(missing), lambda m: f"{os.path.splitext(os.path.basename(m))[0]}{marker}.png beside it",
                    root)
    return pairs, labels, class_names


def _foreground_strata(has_foreground: list[bool]) -> torch.Tensor:
    return torch.tensor([int(f) for f in has_foreground], dtype=torch.int64)


def _pool(root: str, pairs, cfg: DataConfig, class_names: list[str], labels, groups=None):
    files = [(os.path.join(root, image), [os.path.join(root, m) for m in masks]) for image, masks in pairs]
    images, masks, has_fg, hashes = load_pairs(files, cfg.image_size, len(class_names), cfg.dicom_window)
    strata = _foreground_strata(has_fg) if labels is None else torch.as_tensor(labels, dtype=torch.int64)
    ids = [image for image, _ in pairs]
    if groups is None:
        from medpeft.data.folder import _dicom_groups

        groups = _dicom_groups([f for f, _ in files])
    return ImageSet(images=images, labels=strata, ids=ids, groups=groups, masks=masks, files=[f for f, _ in files],
                    file_hashes=hashes)


def load_mask_folder(root: str, cfg: DataConfig) -> SegmentationSource:
    """Read a folder of images with masks (beside or paired layout) into one pool."""
    class_names = mask_class_names(cfg)
    layout = detect_layout(root, cfg.mask_pattern)
    if layout == "paired":
        pairs, labels, strata_names = scan_paired_folder(root), None, list(FOREGROUND_STRATA)
    else:
        pairs, labels, folder_classes = scan_beside_folder(root, cfg.mask_pattern)
        strata_names = list(folder_classes) if folder_classes else list(FOREGROUND_STRATA)
    from medpeft.data.groups import folder_groups

    # patients / video sequences the folder documents (CVC-ClinicDB: README.txt frame ranges)
    pool = _pool(root, pairs, cfg, class_names, labels, folder_groups(root, [image for image, _ in pairs])[0])
    return SegmentationSource(name=os.path.basename(os.path.normpath(root)), class_names=class_names, pool=pool,
                              split=None, strata_names=strata_names, layout=layout)


# ----------------------------------------------------------------------------- manifest
def load_mask_manifest(path: str, cfg: DataConfig) -> SegmentationSource:
    """A CSV manifest ``path,mask[,label][,split][,group]`` (mask paths like image paths: relative
    to the manifest's folder or cfg.root, never outside it). ``label`` (optional) is the stratum."""
    from medpeft.data.manifest import _read_rows, _require, manifest_files, manifest_groups, manifest_split

    class_names = mask_class_names(cfg)
    columns, rows = _read_rows(path)
    if not rows:
        raise DataError(f"manifest {path} has no rows; expected a header and one row per image")
    _require(columns, ["path", "mask"] + ([cfg.group_column] if cfg.group_column else []), path)
    root = os.path.expanduser(cfg.root) if cfg.root else os.path.dirname(os.path.abspath(path))
    root_real = os.path.realpath(root)
    if not os.path.isdir(root_real):
        raise DataError(f"data root of manifest {path} is not a folder: {root}")
    for line, row in rows:
        if not row["mask"]:
            raise DataError(f"{path} line {line}: image {row['path']!r} has no mask (empty 'mask' column); every "
                            "image needs a mask file (an all-zero mask for images without foreground)")
    images, ids = manifest_files(rows, root_real, path)
    masks, _ = manifest_files(rows, root_real, path, column="mask")
    split = manifest_split(rows, columns, path)
    groups = manifest_groups(rows, cfg.group_column or ("group" if "group" in columns else None), path)
    labels = strata_names = None
    if "label" in columns:
        raw = [row["label"] for _, row in rows]
        from medpeft.data.manifest import check_missing_labels

        check_missing_labels(rows, path)  # empty, NaN, NA, ...: give every row a label or drop the column
        try:
            strata_names = [str(v) for v in sorted({int(v) for v in raw})]
            index = {name: i for i, name in enumerate(strata_names)}
            labels = [index[str(int(v))] for v in raw]
        except ValueError:
            strata_names = sorted(set(raw))
            index = {name: i for i, name in enumerate(strata_names)}
            labels = [index[v] for v in raw]
    pairs = [(os.path.relpath(i, root_real), [os.path.relpath(m, root_real)]) for i, m in zip(images, masks)]
    pool = _pool(root_real, pairs, cfg, class_names, labels, groups)
    pool.ids = ids
    return SegmentationSource(name=os.path.splitext(os.path.basename(path))[0], class_names=class_names, pool=pool,
                              split=split, strata_names=strata_names or list(FOREGROUND_STRATA), layout="manifest")


def load_segmentation(kind: str, where: str, cfg: DataConfig) -> SegmentationSource:
    """Registry entry point: a folder (layout detected) or a ``.csv`` manifest with a mask column."""
    if kind == "folder":
        return load_mask_folder(where, cfg)
    if kind == "manifest":
        return load_mask_manifest(where, cfg)
    raise ConfigError(f"data set {where!r} ({kind}) has no segmentation masks; for task segmentation give a "
                      "folder (<stem>_mask.png beside each image, or images/ + masks/) or a CSV manifest with "
                      "path,mask columns")
