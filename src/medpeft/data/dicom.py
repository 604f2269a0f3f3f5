"""DICOM files: pixels to uint8 the way a radiologist's viewer shows them, and split groups
that never reveal who the patient is.

Pixels: stored values -> Modality LUT (Rescale Slope/Intercept, in float, signed pixels kept)
-> VOI window (``window=(center, width)`` if given, else the file's Window Center/Width, else
the image's min-max) -> 0..255, inverted for MONOCHROME1. RGB (and YBR, converted by pydicom)
passes through. Multi-frame: the middle frame unless ``frame="all"`` or a frame index.

Identifiers: ``dicom_group_ids`` returns salted, truncated SHA-256 hashes of PatientID and
StudyInstanceUID. Nothing in this module logs, returns or raises with a patient attribute, and
pydicom's reading validation (whose warnings quote values such as a UID) is switched off.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np

from medpeft.errors import ConfigError, DataError

GROUP_SALT_ENV = "MEDPEFT_GROUP_SALT"
DEFAULT_GROUP_SALT = "medpeft-groups-v1"
HASH_HEX_CHARS = 16  # 64 bits: no collisions in practice, short enough for split files


def _pydicom():
    try:
        import pydicom
    except ImportError as exc:  # pydicom is a dependency; say how to fix a broken install
        raise DataError(f"DICOM support needs pydicom ({exc}); install it with: pip install pydicom") from None
    # pydicom's value validation on reading warns with the offending value itself ("Invalid value for
    # VR UI: '1.2.3.<site>...'", a patient name for VR PN) on stderr and in its log: medpeft reads only
    # pixels and hashes identifiers, so the check is switched off (a process-wide pydicom setting)
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    return pydicom


def parse_window(text: str | tuple | list | None) -> tuple[float, float] | None:
    """``"C,W"`` (e.g. ``"40,400"``) or a (center, width) pair -> (center, width); width must be > 0."""
    if text is None:
        return None
    if isinstance(text, str):
        parts = [p.strip() for p in text.replace(";", ",").split(",")]
    else:
        parts = list(text)
    try:
        if len(parts) != 2:
            raise ValueError
        center, width = float(parts[0]), float(parts[1])
    except (TypeError, ValueError):
        raise ConfigError(f"window {text!r} is not 'CENTER,WIDTH' (two numbers, e.g. 40,400)") from None
    if not (np.isfinite(center) and np.isfinite(width)) or width <= 0:
        raise ConfigError(f"window {text!r}: width must be a finite number > 0 (got center={center}, width={width})")
    return center, width


def read_dataset(path: str | os.PathLike, pixels: bool = True, tags: list[str] | None = None):
    """pydicom Dataset of ``path``; a file that is not DICOM -> DataError naming it."""
    pydicom = _pydicom()
    path = os.fspath(path)
    kwargs: dict[str, Any] = {"stop_before_pixels": not pixels}
    if tags is not None:
        kwargs["specific_tags"] = tags
    try:
        return pydicom.dcmread(path, **kwargs)
    except FileNotFoundError:
        raise DataError(f"DICOM file not found: {path}") from None
    except pydicom.errors.InvalidDicomError:
        pass  # maybe a DICOM file without the 128-byte preamble: try once more, then decide
    except Exception as exc:  # truncated / corrupt headers raise many different errors
        raise DataError(f"cannot read DICOM file {path}: {type(exc).__name__}: {exc}") from None
    try:
        ds = pydicom.dcmread(path, force=True, **kwargs)
    except Exception:
        ds = None
    if ds is None or "SOPClassUID" not in ds and "Rows" not in ds:
        raise DataError(f"{path} is not a DICOM file (no DICM header and no image attributes); "
                        "expected a DICOM (.dcm) image")
    return ds


def read_dicom(path: str | os.PathLike, window: tuple[float, float] | str | None = None,
               frame: str | int = "middle") -> np.ndarray:
    """Decode a DICOM image to uint8: (H, W) grayscale or (H, W, 3) RGB; with ``frame="all"``
    (F, H, W) / (F, H, W, 3). ``window=(center, width)`` overrides the file's VOI window."""
    path = os.fspath(path)
    window = parse_window(window)
    if not (frame in ("middle", "all") or (isinstance(frame, (int, np.integer)) and not isinstance(frame, bool))):
        raise ConfigError(f"frame {frame!r} is not 'middle', 'all' or a frame index")
    ds = read_dataset(path)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DataError(f"DICOM file {path} has no pixel data (not an image: e.g. a report or structured data)")
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # compressed syntax without a decoder plugin, truncated pixel data...
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", syntax) or "unknown transfer syntax"
        raise DataError(f"cannot decode the pixels of DICOM file {path} ({name}): {exc}; "
                        "compressed files may need pylibjpeg or gdcm installed") from None

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    color = photometric not in ("MONOCHROME1", "MONOCHROME2") or int(ds.get("SamplesPerPixel", 1)) > 1
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        pixels = apply_color_lut(pixels, ds)
    pixels = np.asarray(pixels)
    multi = n_frames > 1
    if not multi:
        pixels = pixels[None]  # (1, H, W[, 3]): one code path for single and multi-frame
    expected = 4 if color else 3
    if pixels.ndim != expected:
        raise DataError(f"DICOM file {path}: pixel array of shape {tuple(pixels.shape)} does not match "
                        f"{n_frames} frame(s) of {photometric}; expected a 2D image per frame")
    if frame == "middle":
        pixels = pixels[len(pixels) // 2][None]
    elif frame != "all":
        if not -len(pixels) <= int(frame) < len(pixels):
            raise ConfigError(f"frame {frame} out of range: DICOM file {path} has {len(pixels)} frame(s)")
        pixels = pixels[int(frame)][None]

    if color:
        out = _color_to_uint8(pixels, ds)
    else:
        values = _modality_lut(pixels, ds)
        center_width, function = (window, "LINEAR") if window else _file_window(ds)
        out = apply_window(values, center_width, function)
        if photometric == "MONOCHROME1":  # 0 means white: invert so bright is bright
            out = 255 - out
    return out if frame == "all" else out[0]


def _attribute(ds, name: str, sequence: str):
    """An attribute at top level, else in the (shared, then first per-frame) functional groups
    of enhanced multi-frame objects."""
    if name in ds:
        return ds.get(name)
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        try:
            item = ds[groups][0][sequence][0]
        except (KeyError, IndexError, TypeError):
            continue
        if name in item:
            return item.get(name)
    return None


def _first(value):
    """Window Center/Width may be multi-valued: the first one is the primary window."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _modality_lut(pixels: np.ndarray, ds) -> np.ndarray:
    """Stored values -> modality values (e.g. Hounsfield units), float64, nothing clipped."""
    values = pixels.astype(np.float64)
    slope = _first(_attribute(ds, "RescaleSlope", "PixelValueTransformationSequence"))
    intercept = _first(_attribute(ds, "RescaleIntercept", "PixelValueTransformationSequence"))
    if slope is not None and slope != 1.0:
        values *= slope
    if intercept:
        values += intercept
    return values


def _file_window(ds) -> tuple[tuple[float, float] | None, str]:
    center = _first(_attribute(ds, "WindowCenter", "FrameVOILUTSequence"))
    width = _first(_attribute(ds, "WindowWidth", "FrameVOILUTSequence"))
    function = str(_attribute(ds, "VOILUTFunction", "FrameVOILUTSequence") or "LINEAR").strip().upper()
    if center is None or width is None or not np.isfinite(center) or not np.isfinite(width) or width <= 0:
        return None, "LINEAR"  # absent or invalid window: min-max
    return (center, width), function


def apply_window(values: np.ndarray, center_width: tuple[float, float] | None,
                 function: str = "LINEAR") -> np.ndarray:
    """Modality values -> uint8 with a VOI window (DICOM PS3.3 C.11.2.1.2), or min-max when None.

    LINEAR:   x <= c - 0.5 - (w-1)/2 -> 0;  x > c - 0.5 + (w-1)/2 -> 255;
              else ((x - (c - 0.5)) / (w - 1) + 0.5) * 255.
    LINEAR_EXACT: (x - c) / w + 0.5, clipped.   SIGMOID: 255 / (1 + exp(-4 (x - c) / w)).
    Rounded half up.
    """
    values = np.asarray(values, dtype=np.float64)
    if center_width is None:
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if hi <= lo:
            return np.zeros(values.shape, dtype=np.uint8)
        scaled = (values - lo) * 255.0 / (hi - lo)  # this order keeps halves exact
    else:
        c, w = center_width
        if function == "SIGMOID":
            scaled = 255.0 / (1.0 + np.exp(-4.0 * (values - c) / w))
        elif function == "LINEAR_EXACT":
            scaled = ((values - c) / w + 0.5) * 255.0
        elif w <= 1:  # LINEAR with width 1 is a threshold
            scaled = np.where(values > c - 0.5, 255.0, 0.0)
        else:
            scaled = ((values - (c - 0.5)) / (w - 1) + 0.5) * 255.0
            scaled[values <= c - 0.5 - (w - 1) / 2] = 0.0
            scaled[values > c - 0.5 + (w - 1) / 2] = 255.0
    return np.floor(np.clip(scaled, 0.0, 255.0) + 0.5).astype(np.uint8)


def _color_to_uint8(pixels: np.ndarray, ds) -> np.ndarray:
    if pixels.dtype == np.uint8:
        return np.ascontiguousarray(pixels)
    if np.issubdtype(pixels.dtype, np.floating):
        return apply_window(pixels, None)
    bits = int(ds.get("BitsStored", 8 * pixels.dtype.itemsize) or 8)
    if pixels.dtype.itemsize == 2 and bits == 8:  # palette LUTs are 16-bit even for 8-bit data
        bits = 16
    top = float(2 ** bits - 1)
    return np.floor(np.clip(pixels.astype(np.float64), 0, top) * (255.0 / top) + 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------- identifiers
def hash_identifier(value: str, kind: str, salt: str | None = None) -> str:
    """``<kind>-`` + the first 16 hex digits of sha256(salt, kind, value): one-way, so the raw id
    never leaves this function. Set $MEDPEFT_GROUP_SALT to a private value so that ids cannot be
    recovered by hashing guesses (patient ids are often short numbers)."""
    salt = salt if salt is not None else os.environ.get(GROUP_SALT_ENV, DEFAULT_GROUP_SALT)
    digest = hashlib.sha256(f"{salt}\x1f{kind}\x1f{value}".encode("utf-8")).hexdigest()
    return f"{kind}-{digest[:HASH_HEX_CHARS]}"


def dicom_group_ids(path: str | os.PathLike, salt: str | None = None) -> dict[str, str | None]:
    """Hashed split groups of one DICOM file: ``{"patient": ..., "study": ..., "group": ...}``.

    ``group`` is the patient hash, else the study hash (None when the file has neither): use it
    as ``ImageSet.groups`` so no patient lands on two sides of a split. Raw ids are never returned.
    """
    ds = read_dataset(path, pixels=False, tags=["PatientID", "StudyInstanceUID"])
    out: dict[str, str | None] = {}
    for key, tag in (("patient", "PatientID"), ("study", "StudyInstanceUID")):
        value = str(ds.get(tag, "") or "").strip()
        out[key] = hash_identifier(value, key, salt) if value else None
    out["group"] = out["patient"] or out["study"]
    return out


def dicom_split_groups(paths, salt: str | None = None) -> list[str] | None:
    """One split group per file for a grouped split: the hashed patient (else study) of each
    DICOM file; a non-DICOM file or one without either id is its own group. None when no file
    has a patient or study id (then there is nothing to group by)."""
    groups, found = [], False
    for index, path in enumerate(paths):
        group = None
        if os.fspath(path).lower().endswith(".dcm"):
            group = dicom_group_ids(path, salt)["group"]
        found = found or group is not None
        groups.append(group or f"file-{index:06d}")
    return groups if found else None
