"""Reading images from disk and turning many of them into one uint8 tensor.

Every image is decoded to uint8 (H, W) or (H, W, 3) and resized once to the run's
square image size; the stacked result is uint8 [N, C, H, W] with C = 1 when every
image is grayscale and C = 3 otherwise (grayscale images are promoted when mixed).
"""
from __future__ import annotations

import functools
import os
import re
import socket
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from medpeft.errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm")
# PIL warns about images between MAX_IMAGE_PIXELS and twice that ("could be decompression bomb DOS
# attack") and refuses larger ones; medpeft refuses the larger ones itself with a clear error
# (``pixel_budget``) and decodes the others as asked, so the warning says nothing useful here
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not os.path.basename(name).startswith(".")


def is_online(host: str = "zenodo.org", port: int = 443, timeout: float = 1.5) -> bool:
    """False when MEDPEFT_OFFLINE=1, else whether a TCP connection to ``host`` opens quickly."""
    if os.environ.get("MEDPEFT_OFFLINE", "").strip().lower() in ("1", "true", "yes"):
        return False
    return _probe(host, port, timeout)


@functools.lru_cache(maxsize=8)
def _probe(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def to_uint8(array: np.ndarray, source: str = "image") -> np.ndarray:
    """Bring decoded pixels to uint8: 16-bit by /257, other ints clipped, floats by min-max."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        if array.dtype.itemsize == 1:
            return np.clip(array, 0, 255).astype(np.uint8)
        # 16-bit range (PIL "I;16" and "I" modes, 16-bit DICOM): 65535 / 257 = 255 exactly.
        scaled = np.rint(np.clip(array, 0, 65535).astype(np.float32) / 257.0)
        return scaled.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        array = np.nan_to_num(array.astype(np.float32))
        if array.size == 0 or float(array.max()) <= float(array.min()):
            return np.zeros(array.shape, dtype=np.uint8)
        lo, hi = float(array.min()), float(array.max())
        return np.rint((array - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    raise DataError(f"{source}: unsupported pixel type {array.dtype}; expected integer or float pixels")


def _pil_to_array(image: Image.Image, path: str) -> np.ndarray:
    mode = image.mode
    if mode == "1":
        return np.asarray(image.convert("L"))
    if mode == "L":
        return np.asarray(image)
    if mode == "LA":
        return np.asarray(image.convert("L"))
    if mode.startswith("I;16") or mode in ("I", "F"):
        return to_uint8(np.asarray(image), path)
    if mode == "P":
        # A palette may carry transparency; convert through RGBA so it is dropped like RGBA's.
        image = image.convert("RGBA") if "transparency" in image.info else image
    # RGB, RGBA (alpha dropped), P, CMYK, YCbCr, LAB, HSV ...
    return np.asarray(image.convert("RGB"))


def pixel_budget() -> int | None:
    """The most pixels an image file may have: PIL's decompression-bomb limit, 2 x
    ``PIL.Image.MAX_IMAGE_PIXELS`` (178,956,970 pixels, about 13,377 x 13,377); None when PIL's
    check is switched off (``PIL.Image.MAX_IMAGE_PIXELS = None``)."""
    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else 2 * int(limit)


def over_budget(path: str, exc: Exception | None = None) -> DataError:
    """The error for an image file with more pixels than ``pixel_budget()`` (``exc``: PIL's
    DecompressionBombError, whose message holds the pixel count)."""
    found = re.search(r"\((\d+) pixels\)", str(exc or ""))
    what = f"{int(found.group(1)):,} pixels" if found else "more pixels than that"
    return DataError(f"image {path} has {what}, over the pixel budget of {pixel_budget():,} pixels per image "
                     "(PIL's decompression-bomb limit: decoding it could exhaust the memory); downscale it first "
                     "(medpeft resizes every image to the model's input size anyway)")


def open_image(path: str) -> Image.Image:
    """``PIL.Image.open`` (reads the header only); a file over the pixel budget -> DataError naming it."""
    try:
        return Image.open(path)
    except Image.DecompressionBombError as exc:
        raise over_budget(path, exc) from None


def read_image(path: str | os.PathLike, dicom_window: str | None = None) -> np.ndarray:
    """Decode one image file to uint8 (H, W) or (H, W, 3). Unreadable file, or one over the pixel
    budget (``pixel_budget()``) -> DataError naming it."""
    path = os.fspath(path)
    if path.lower().endswith(".dcm"):
        return _read_dicom(path, dicom_window)
    try:
        with open_image(path) as image:
            image.load()  # decode now so truncated files fail here, inside the try
            image = ImageOps.exif_transpose(image)
            array = _pil_to_array(image, path)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}") from None
    except Image.DecompressionBombError as exc:  # formats whose size is only known while decoding
        raise over_budget(path, exc) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot read image {path}: {exc}; expected a readable "
                        f"{'/'.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)} file") from None
    if array.ndim not in (2, 3) or array.size == 0:
        raise DataError(f"cannot read image {path}: decoded shape {array.shape} is not an image")
    return np.ascontiguousarray(array)


def parse_window(text: str | None) -> tuple[float, float] | None:
    """"C,W" -> (center, width); None stays None."""
    if text is None:
        return None
    try:
        center, width = (float(v) for v in str(text).split(","))
    except ValueError:
        raise ConfigError(f"DICOM window {text!r} is not 'CENTER,WIDTH' (e.g. 40,400)") from None
    if width <= 0:
        raise ConfigError(f"DICOM window width must be > 0, got {width}")
    return center, width


def _read_dicom(path: str, window: str | None = None) -> np.ndarray:
    try:
        from medpeft.data.dicom import read_dicom  # lazy: pydicom is optional at import time
    except ImportError as exc:
        raise DataError(f"cannot read {path}: DICOM support is missing ({exc}); "
                        "install pydicom (pip install pydicom)") from None
    array = np.asarray(read_dicom(path, window=parse_window(window)))
    array = to_uint8(array, path)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
        raise DataError(f"cannot read {path}: DICOM pixels of shape {array.shape}; "
                        "expected one 2D grayscale or RGB frame")
    return array


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 [N, C, H, W] (or [C, H, W]) to size x size, bilinear with antialias, in one call."""
    if images.shape[-2:] == (size, size):
        return images
    return TF.resize(images, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)


def array_to_chw(array: np.ndarray) -> torch.Tensor:
    """(H, W) or (H, W, 3) uint8 -> [C, H, W] uint8 tensor."""
    array = np.ascontiguousarray(array)
    with warnings.catch_warnings():
        # PIL's arrays are read-only; nothing writes to them (resize and stack make new tensors)
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.from_numpy(array)
    return tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()


def load_images(paths: Iterable[str], size: int, dicom_window: str | None = None) -> torch.Tensor:
    """Decode and resize every file right away (only the small copies are kept): uint8 [N, C, S, S]."""
    return load_images_hashed(paths, size, dicom_window, hashes=False)[0]


def load_images_hashed(paths: Iterable[str], size: int, dicom_window: str | None = None,
                       hashes: bool = True) -> tuple[torch.Tensor, list | None]:
    """``load_images`` plus each file's near-duplicate hashes taken from the pixels just decoded
    (``near_duplicates.decoded_hashes``; None where those would differ from a file's own)."""
    from medpeft.data.near_duplicates import decoded_hashes

    paths = list(paths)
    parse_window(dicom_window)  # a malformed window fails even when no file is a DICOM one

    def one(path: str):
        pixels = read_image(path, dicom_window)
        return (resize_images(array_to_chw(pixels), size),
                decoded_hashes(path, pixels, dicom_window) if hashes else None)

    if len(paths) < 32:
        results = [one(p) for p in paths]
    else:  # PIL decoding, hashing and torch resizing release the GIL: a few threads overlap the work
        workers = min(8, 2 * (os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(one, paths))
    return stack_mixed_channels([r[0] for r in results]), ([r[1] for r in results] if hashes else None)


def stack_mixed_channels(images: list[torch.Tensor]) -> torch.Tensor:
    """Stack [C, S, S] tensors; if some are RGB, grayscale ones are promoted to 3 channels."""
    if not images:
        raise DataError("no images to stack")
    if any(img.shape[0] == 3 for img in images):
        images = [img.expand(3, -1, -1) if img.shape[0] == 1 else img for img in images]
    return torch.stack(images).contiguous()
