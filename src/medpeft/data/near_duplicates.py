"""Near-duplicate images: perceptual hashes and the groups that keep near-duplicates on one side
of a split (the data layer's service; ``medpeft.audit`` reports on it).

Data set audit: duplicates, near-duplicates, images in two classes, leakage across splits,
unreadable files, class balance, image sizes and modes.

Near-duplicates are found with a 128-bit perceptual hash, the concatenation of a 64-bit DCT
hash (pHash: low 8x8 DCT coefficients of a 32x32 grayscale thumbnail against their median)
and a 64-bit difference hash (dHash: 8x9 thumbnail, each pixel brighter than its left
neighbour). Two images are near-duplicates when the Hamming distance of their hashes is at
most ``threshold`` bits; near-duplicate groups are the connected components of that relation
(union-find), exact duplicates (same decoded pixels) included.

Threshold ``"auto"`` (the default) = min(22, median - 4 * robust sd of the distances between
random image pairs of the data set itself). Why 22: on BUSI the pair distances have a clear
valley between about 13 and 25 bits (a few pairs each, all visibly the same scene) and the
unrelated pairs sit at 62 +- 7; rescaling changes a hash by 0-2 bits, a 3% crop on every side
by ~13. Why the data-based bound: images that all look alike (28 px chest X-rays: unrelated
pairs at 41 +- 9) would otherwise chain into giant false groups; there it falls to ~5 bits.

    groups = leak_free_groups(pool)            # one group id per image, for a grouped split
    compare_split_leakage(pool)                # naive vs leak-free split: test images with a twin in train
"""
from __future__ import annotations

import hashlib
import math
import os
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medpeft.data.base import DataBundle, ImageSet
from medpeft.errors import ConfigError, DataError

THRESHOLD_CAP = 22  # the most bits "auto" allows (see the module docstring)
DEFAULT_THRESHOLD = "auto"
AUTO_Z = 4.0  # auto threshold: this many robust sds below the median distance of random pairs
AUTO_MIN_IMAGES = 30  # below this the pair statistics are too noisy: auto uses the cap
HASH_BITS = 128
_LUMA = (0.299, 0.587, 0.114)


# ----------------------------------------------------------------------------- hashing
def _dct_matrix(n: int = 32) -> np.ndarray:
    """Orthonormal DCT-II matrix: coefficients = D @ block @ D.T."""
    k = np.arange(n)
    d = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n))
    d[0] /= np.sqrt(2.0)
    return d


_DCT32 = _dct_matrix(32)


def _bits_to_uint64(bits: np.ndarray) -> np.ndarray:
    """(N, 64) bools -> (N,) uint64, first bit most significant."""
    packed = np.packbits(bits.astype(np.uint8), axis=1)  # (N, 8)
    return packed.view(">u8")[:, 0].astype(np.uint64)


def phash_from_thumbnails(thumbs: np.ndarray) -> np.ndarray:
    """64-bit DCT hashes of (N, 32, 32) grayscale thumbnails."""
    coeffs = _DCT32 @ np.asarray(thumbs, dtype=np.float64) @ _DCT32.T
    low = coeffs[:, :8, :8].reshape(len(coeffs), 64)
    return _bits_to_uint64(low > np.median(low, axis=1, keepdims=True))


def dhash_from_thumbnails(small: np.ndarray) -> np.ndarray:
    """64-bit difference hashes of (N, 8, 9) grayscale thumbnails."""
    small = np.asarray(small, dtype=np.float64)
    return _bits_to_uint64((small[:, :, 1:] > small[:, :, :-1]).reshape(len(small), 64))


def _gray(images: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] (any dtype) -> float32 [N, 1, H, W] luminance."""
    x = images.float()
    if x.shape[1] == 3:
        w = torch.tensor(_LUMA, dtype=x.dtype).view(1, 3, 1, 1)
        x = (x * w).sum(1, keepdim=True)
    elif x.shape[1] != 1:
        x = x.mean(1, keepdim=True)
    return x


def _thumbnails(gray: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Area-averaged 32x32 and 8x9 thumbnails of [N, 1, H, W] images (sizes may be smaller)."""
    t32 = F.adaptive_avg_pool2d(gray, (32, 32))[:, 0].numpy()
    t89 = F.adaptive_avg_pool2d(gray, (8, 9))[:, 0].numpy()
    return t32, t89


def array_to_tensor(array: np.ndarray) -> torch.Tensor:
    """(H, W) or (H, W, C) pixels -> [1, C, H, W] tensor."""
    array = np.ascontiguousarray(array)
    t = torch.from_numpy(array if array.flags.writeable else array.copy())  # PIL arrays are read-only
    return t[None, None] if t.ndim == 2 else t.permute(2, 0, 1)[None]


def perceptual_hash(image: np.ndarray | torch.Tensor) -> tuple[int, int]:
    """(pHash, dHash) of one image: numpy (H, W) / (H, W, 3) or tensor [C, H, W]."""
    t = array_to_tensor(image) if isinstance(image, np.ndarray) else image[None]
    t32, t89 = _thumbnails(_gray(t))
    return int(phash_from_thumbnails(t32)[0]), int(dhash_from_thumbnails(t89)[0])


def pixel_sha256(array: np.ndarray) -> str:
    """SHA-256 of decoded pixels (shape included); RGB with three equal channels counts as gray."""
    array = np.ascontiguousarray(array)
    if array.ndim == 3 and array.shape[-1] == 3 and (array[..., 0] == array[..., 1]).all() \
            and (array[..., 1] == array[..., 2]).all():
        array = np.ascontiguousarray(array[..., 0])
    head = f"{array.dtype.str}{array.shape}".encode()
    return hashlib.sha256(head + array.tobytes()).hexdigest()


_POP8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def popcount64(x: np.ndarray) -> np.ndarray:
    """Number of set bits of each uint64."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return np.bitwise_count(x)
    return _POP8[np.ascontiguousarray(x).view(np.uint8)].reshape(*x.shape, 8).sum(-1).astype(np.uint8)


@dataclass
class ImageHashes:
    """Per image: pixel SHA-256 (None when unreadable) and the two 64-bit perceptual hashes."""

    sha256: list[str | None]
    phash: np.ndarray
    dhash: np.ndarray

    def __len__(self) -> int:
        return len(self.sha256)

    @property
    def valid(self) -> np.ndarray:
        return np.array([s is not None for s in self.sha256], dtype=bool)

    def distance(self, i: int, j: int) -> int:
        return int(popcount64(self.phash[i] ^ self.phash[j])) + int(popcount64(self.dhash[i] ^ self.dhash[j]))


def hash_images(images: torch.Tensor) -> ImageHashes:
    """Hashes of in-memory images uint8 [N, C, H, W] (e.g. an ImageSet's, already resized)."""
    if images.ndim != 4:
        raise DataError(f"expected images shaped [N, C, H, W], got {tuple(images.shape)}")
    chw = images.permute(0, 2, 3, 1).numpy()
    shas = [pixel_sha256(a[..., 0] if a.shape[-1] == 1 else a) for a in chw]
    phash, dhash = [], []
    for start in range(0, len(images), 1024):  # bounded memory for large sets
        t32, t89 = _thumbnails(_gray(images[start:start + 1024]))
        phash.append(phash_from_thumbnails(t32))
        dhash.append(dhash_from_thumbnails(t89))
    empty = np.zeros(0, dtype=np.uint64)
    return ImageHashes(shas, np.concatenate(phash) if phash else empty, np.concatenate(dhash) if dhash else empty)


@dataclass
class FileInfo:
    sha256: str | None = None
    phash: int = 0
    dhash: int = 0
    width: int | None = None
    height: int | None = None
    mode: str | None = None
    error: str | None = None


# Images above this many pixels are hashed from a reduced decode (a 12000 x 12000 PNG of 419 KB
# took 5.9 GB decoded in full, in float, on 8 threads): the pixel SHA-256 is taken band by band
# from the decoded image and the perceptual hashes from a copy reduced to <= REDUCED_SIDE px a side
# (PIL ``draft`` for JPEG, ``reduce`` otherwise), one such image at a time. Smaller images - every
# image of BUSI, Kvasir or MedMNIST - are hashed exactly as before.
LARGE_IMAGE_PIXELS = 4096 * 4096
REDUCED_SIDE = 1024
_LARGE_DECODES = threading.BoundedSemaphore(1)


def inspect_file(path: str) -> FileInfo:
    """Header facts (size, mode) and hashes of one image file; an unreadable file gives ``error``
    (one over the pixel budget of ``medpeft.data.io.pixel_budget`` included)."""
    from medpeft.data.io import open_image, read_image

    info = FileInfo()
    try:
        if path.lower().endswith(".dcm"):
            from medpeft.data.dicom import read_dataset

            ds = read_dataset(path, pixels=False, tags=["PhotometricInterpretation", "BitsStored"])
            info.mode = f"DICOM {ds.get('PhotometricInterpretation', '?')} {ds.get('BitsStored', '?')}-bit"
        else:
            with open_image(path) as image:  # lazy: reads the header only
                info.mode = image.mode
                large = image.size[0] * image.size[1] > LARGE_IMAGE_PIXELS and image.mode not in ("F", "I")
            if large:
                with _LARGE_DECODES:
                    return _inspect_large(path, info)
        array = read_image(path)
    except DataError as exc:
        info.error = str(exc)
        return info
    except Exception as exc:  # a decoder bug on one odd file must not stop the audit of the rest
        info.error = f"cannot read {path}: {type(exc).__name__}: {exc}"
        return info
    info.height, info.width = int(array.shape[0]), int(array.shape[1])
    info.sha256 = pixel_sha256(array)
    info.phash, info.dhash = perceptual_hash(array)
    return info


def _inspect_large(path: str, info: FileInfo) -> FileInfo:
    """``inspect_file`` of an image above LARGE_IMAGE_PIXELS without a full-size copy: the same
    pixel SHA-256 as ``pixel_sha256(read_image(path))``, computed over bands of rows (a JPEG is
    decoded at 1/2 to 1/8 scale in the DCT domain: its SHA is of those pixels), and the perceptual
    hashes of the image reduced to <= REDUCED_SIDE px a side (box average)."""
    from PIL import Image, ImageOps

    from medpeft.data.io import _pil_to_array, open_image

    with open_image(path) as image:
        orientation = image.getexif().get(0x0112, 1)
        swap = orientation in (5, 6, 7, 8)  # EXIF rotations by 90 / 270 degrees
        info.width, info.height = image.size[::-1] if swap else image.size  # the size read_image decodes
        if image.format == "JPEG":
            image.draft(image.mode, (REDUCED_SIDE, REDUCED_SIDE))
        image.load()
        if orientation != 1:  # (exif_transpose copies even an upright image: only when needed)
            image = ImageOps.exif_transpose(image)
        width, height = image.size
        factor = max(1, math.ceil(max(width, height) / REDUCED_SIDE))
        rows = factor * max(1, (1 << 22) // (width * factor))  # ~4M pixels per band, whole reduction boxes

        def bands():
            for top in range(0, height, rows):
                yield _pil_to_array(image.crop((0, top, width, min(top + rows, height))), path)

        gray3, small = True, []
        for band in bands():  # first pass: three equal channels? and the reduced copy
            if band.ndim == 3:
                gray3 = gray3 and bool((band[..., 0] == band[..., 1]).all() and (band[..., 1] == band[..., 2]).all())
            small.append(np.asarray(Image.fromarray(band).reduce(factor)))
        first = _pil_to_array(image.crop((0, 0, 1, 1)), path)
        shape = (height, width) if first.ndim == 2 or gray3 else (height, width, first.shape[-1])
        digest = hashlib.sha256(f"{np.dtype(np.uint8).str}{shape}".encode())
        for band in bands():  # second pass: the SHA-256 of exactly the pixels read_image decodes
            digest.update(np.ascontiguousarray(band[..., 0] if band.ndim == 3 and gray3 else band).data)
    info.sha256 = digest.hexdigest()
    info.phash, info.dhash = perceptual_hash(np.concatenate(small))
    return info


def decoded_hashes(path: str, pixels: np.ndarray, dicom_window: str | None = None) -> tuple[str, int, int] | None:
    """(pixel SHA-256, pHash, dHash) that ``inspect_file(path)`` gives, from the pixels a loader
    decoded with ``read_image(path, dicom_window)``: a loader hashes while it reads, so no file is
    decoded twice. None where ``inspect_file`` would hash other pixels: a DICOM file read with a
    window of the user's (it hashes the file's own window) or an image above LARGE_IMAGE_PIXELS (it
    hashes a reduced copy); ``hash_files`` then inspects that file itself."""
    if dicom_window is not None and path.lower().endswith(".dcm"):
        return None
    if pixels.shape[0] * pixels.shape[1] > LARGE_IMAGE_PIXELS:
        return None
    return (pixel_sha256(pixels), *perceptual_hash(pixels))


def inspect_files(paths: Sequence[str]) -> list[FileInfo]:
    workers = min(8, 2 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:  # decoding releases the GIL
        return list(pool.map(inspect_file, paths))


def hash_files(paths: Sequence[str], known: Sequence[tuple[str, int, int] | None] | None = None) -> ImageHashes:
    """Hashes of image files; ``known``: ``decoded_hashes`` per file from the loader (None entries,
    or no list, are inspected here)."""
    paths = list(paths)
    if known is not None and len(known) != len(paths):
        raise DataError(f"known hashes: {len(known)} entries for {len(paths)} files")
    known = list(known) if known is not None else [None] * len(paths)
    todo = [i for i, k in enumerate(known) if k is None]
    for i, info in zip(todo, inspect_files([paths[i] for i in todo])):
        known[i] = (info.sha256, info.phash, info.dhash)
    return ImageHashes([k[0] for k in known], np.array([k[1] for k in known], dtype=np.uint64),
                       np.array([k[2] for k in known], dtype=np.uint64))


def _hashes_of(infos: list[FileInfo]) -> ImageHashes:
    return ImageHashes([i.sha256 for i in infos], np.array([i.phash for i in infos], dtype=np.uint64),
                       np.array([i.dhash for i in infos], dtype=np.uint64))


# ----------------------------------------------------------------------------- grouping
class UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]  # path halving
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the smallest index is the root: group ids follow input order
            self.parent[max(ra, rb)] = min(ra, rb)

    def roots(self) -> list[int]:
        return [self.find(i) for i in range(len(self.parent))]


def near_pairs(hashes: ImageHashes, threshold: int | str = DEFAULT_THRESHOLD) -> list[tuple[int, int, int]]:
    """(i, j, distance) with i < j for every pair of readable images within ``threshold`` bits,
    exact pixel duplicates included (distance 0 even if a hash differs)."""
    threshold = resolve_threshold(hashes, threshold)[0]
    valid = np.flatnonzero(hashes.valid)
    ph, dh = hashes.phash[valid], hashes.dhash[valid]
    n = len(valid)
    pairs: list[tuple[int, int, int]] = []
    block = max(1, min(n, (1 << 22) // max(n, 1)))  # ~4M distances per step
    for start in range(0, n, block):
        dist = popcount64(ph[start:start + block, None] ^ ph[None, :]).astype(np.int16)
        dist += popcount64(dh[start:start + block, None] ^ dh[None, :])
        rows, cols = np.nonzero(dist <= threshold)
        rows_abs = rows + start
        keep = cols > rows_abs
        for r, c, d in zip(rows_abs[keep], cols[keep], dist[rows[keep], cols[keep]]):
            pairs.append((int(valid[r]), int(valid[c]), int(d)))
    by_sha: dict[str, list[int]] = defaultdict(list)
    for i, sha in enumerate(hashes.sha256):
        if sha is not None:
            by_sha[sha].append(i)
    seen = {(i, j) for i, j, _ in pairs}
    for members in by_sha.values():
        for other in members[1:]:
            if (members[0], other) not in seen:
                pairs.append((members[0], other, 0))
    return pairs


def check_threshold(threshold) -> int | str:
    """``"auto"`` or a whole number of bits in 0..128 (strings of digits accepted, for the CLI)."""
    if isinstance(threshold, str):
        text = threshold.strip().lower()
        if text == "auto":
            return "auto"
        if text.isdigit():
            threshold = int(text)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, np.integer)) \
            or not 0 <= int(threshold) <= HASH_BITS:
        raise ConfigError(f"near-duplicate threshold must be 'auto' or a whole number of bits in 0..{HASH_BITS}, "
                          f"got {threshold!r}")
    return int(threshold)


def pair_distance_stats(hashes: ImageHashes, sample: int = 2000, seed: int = 0) -> dict:
    """Median and robust sd (1.4826 MAD) of the distances between random pairs of readable images:
    where unrelated images of this data set lie."""
    valid = np.flatnonzero(hashes.valid)
    if len(valid) > sample:
        valid = np.sort(np.random.default_rng(seed).choice(valid, sample, replace=False))
    if len(valid) < 2:
        return {"pairs": 0, "median": None, "sd": None}
    ph, dh = hashes.phash[valid], hashes.dhash[valid]
    rows, cols = np.triu_indices(len(valid), 1)
    dist = popcount64(ph[rows] ^ ph[cols]).astype(np.int16) + popcount64(dh[rows] ^ dh[cols])
    median = float(np.median(dist))
    return {"pairs": int(len(dist)), "median": median,
            "sd": round(float(np.median(np.abs(dist - median)) * 1.4826), 3)}


def resolve_threshold(hashes: ImageHashes, threshold: int | str = DEFAULT_THRESHOLD) -> tuple[int, dict]:
    """(bits used, how it was chosen). ``auto``: min(22, median - 4 sd of random pairs), or 22
    for fewer than 30 images. A number is used as given."""
    threshold = check_threshold(threshold)
    n_valid = int(hashes.valid.sum())
    info: dict[str, Any] = {"requested": threshold, "cap": THRESHOLD_CAP, "z": AUTO_Z}
    if n_valid >= AUTO_MIN_IMAGES:
        stats = pair_distance_stats(hashes)
        bound = int(math.floor(stats["median"] - AUTO_Z * stats["sd"]))
        info.update({"random_pair_median": stats["median"], "random_pair_sd": stats["sd"],
                     "data_bound": max(0, bound)})
    else:
        info["data_bound"] = None  # too few images for pair statistics
    if threshold == "auto":
        used = THRESHOLD_CAP if info["data_bound"] is None else min(THRESHOLD_CAP, info["data_bound"])
    else:
        used = int(threshold)
    info["used"] = used
    return used, info


def _hashes_for(source) -> tuple[ImageHashes, list[str] | None]:
    """Hashes of a source, plus its existing groups (ImageSet / DataBundle) if any."""
    if isinstance(source, ImageHashes):
        return source, None
    if isinstance(source, DataBundle):
        source = _pool_of(source)
    if isinstance(source, ImageSet):
        return hash_images(source.images), source.groups
    if isinstance(source, torch.Tensor):
        return hash_images(source), None
    if isinstance(source, (list, tuple)) and all(isinstance(p, (str, os.PathLike)) for p in source):
        return hash_files([os.fspath(p) for p in source]), None
    raise ConfigError(f"cannot find near-duplicates in a {type(source).__name__}; expected an ImageSet, "
                      "a DataBundle, a uint8 image tensor [N, C, H, W] or a list of image files")


def _pool_of(bundle: DataBundle) -> ImageSet:
    sets = [bundle.train, bundle.val, bundle.test]
    groups = [g for s in sets for g in s.groups] if all(s.groups is not None for s in sets) else None
    return ImageSet(images=torch.cat([s.images for s in sets]), labels=torch.cat([s.labels for s in sets]),
                    ids=[i for s in sets for i in s.ids], groups=groups)


def near_duplicate_groups(source, threshold: int | str = DEFAULT_THRESHOLD) -> list[str]:
    """One group id per image (``nd<index of the group's first image>``): near-duplicates and exact
    duplicates share an id, every other image has its own. Source: ImageSet, DataBundle (train,
    val, test concatenated), uint8 tensor [N, C, H, W], list of files, or ImageHashes."""
    hashes, _ = _hashes_for(source)
    return _group_ids(hashes, threshold, None)


def leak_free_groups(source, threshold: int | str = DEFAULT_THRESHOLD,
                     existing: Sequence[str] | None = None) -> list[str]:
    """Split groups that keep near-duplicate clusters *and* existing groups (patients) whole.

    Give the result to a grouped split, e.g. ``pool.groups = leak_free_groups(pool)`` before
    ``medpeft.data.splits.split_pool(pool, cfg)``: no near-duplicate pair (and no patient) can then
    be on two sides. ``existing`` defaults to the ImageSet's own ``groups``."""
    hashes, own = _hashes_for(source)
    existing = own if existing is None else existing
    if existing is not None and len(existing) != len(hashes):
        raise DataError(f"existing groups: {len(existing)} entries for {len(hashes)} images")
    return _group_ids(hashes, threshold, existing)


def _group_ids(hashes: ImageHashes, threshold: int | str, existing: Sequence[str] | None) -> list[str]:
    uf = UnionFind(len(hashes))
    for i, j, _ in near_pairs(hashes, threshold):
        uf.union(i, j)
    if existing is not None:
        first: dict[str, int] = {}
        for i, g in enumerate(existing):
            uf.union(first.setdefault(g, i), i)
    return [f"nd{root:06d}" for root in uf.roots()]


# ----------------------------------------------------------------------------- split leakage
def twins_in(hashes: ImageHashes, queries: Sequence[int], reference: Sequence[int],
             threshold: int | str = DEFAULT_THRESHOLD) -> int:
    """How many ``queries`` images have an exact or near duplicate among ``reference`` images."""
    threshold = resolve_threshold(hashes, threshold)[0]
    reference = np.asarray(reference, dtype=np.int64)
    ref_valid = reference[hashes.valid[reference]] if len(reference) else reference
    ref_sha = {hashes.sha256[r] for r in ref_valid}
    count = 0
    for q in queries:
        if not hashes.valid[q]:
            continue
        if hashes.sha256[q] in ref_sha:
            count += 1
            continue
        d = popcount64(hashes.phash[q] ^ hashes.phash[ref_valid]).astype(np.int16) \
            + popcount64(hashes.dhash[q] ^ hashes.dhash[ref_valid])
        count += bool((d <= threshold).any())
    return count


def compare_split_leakage(source, labels=None, seed: int = 0, val_ratio: float = 0.15, test_ratio: float = 0.15,
                          threshold: int | str = DEFAULT_THRESHOLD) -> dict:
    """A naive stratified random split vs a leak-free (near-duplicate grouped) split of one pool.

    For each: how many test (and val) images have an exact or near duplicate in train. The
    naive count is the leak that inflates test scores; the leak-free count is 0 by construction.
    ``source``: ImageSet / DataBundle (pooled) / list of files (then ``labels`` is required).
    """
    from medpeft.data.splits import check_ratios, split_indices, stratum_keys

    check_ratios(val_ratio, test_ratio)
    hashes, existing = _hashes_for(source)
    if labels is None:
        if isinstance(source, DataBundle):
            source = _pool_of(source)
        if not isinstance(source, ImageSet):
            raise ConfigError("compare_split_leakage: give labels for a list of files")
        labels = source.labels
    keys = stratum_keys(labels)
    if len(keys) != len(hashes):
        raise DataError(f"compare_split_leakage: {len(keys)} labels for {len(hashes)} images")
    ratios = (1.0 - val_ratio - test_ratio, val_ratio, test_ratio)
    threshold = resolve_threshold(hashes, threshold)[0]
    groups = _group_ids(hashes, threshold, existing)
    out = {"seed": seed, "threshold": threshold, "ratios": list(ratios), "n_images": len(hashes),
           "n_groups": len(set(groups))}
    for name, split_groups in (("naive", None), ("leak_free", groups)):
        train, val, test = split_indices(keys, split_groups, ratios, seed)
        out[name] = {"sizes": [len(train), len(val), len(test)],
                     "test_with_twin_in_train": twins_in(hashes, test, train, threshold),
                     "val_with_twin_in_train": twins_in(hashes, val, train, threshold)}
    return out
