"""MedMNIST v2 (2D) data sets from their official ``.npz`` files, with the official splits."""
from __future__ import annotations

import os
import zipfile

import numpy as np
import torch

from medpeft.data.base import DataBundle, DataConfig, ImageSet
from medpeft.data.io import is_online, resize_images
from medpeft.data.privacy import public_path
from medpeft.data.splits import SPLITS, split_info_for
from medpeft.errors import ConfigError, DataError
from medpeft.metrics import resolve_positive_class

MEDMNIST_SIZES = (28, 64, 128, 224)
_TASKS = {"binary-class": "binary", "multi-class": "multiclass",
          "multi-label, binary-class": "multilabel", "ordinal-regression": "multiclass"}


# The clinically positive class (the finding a screen must not miss) of the binary 2D sets,
# spelled exactly as in medmnist.INFO[flag]["label"]. BreastMNIST's class 1 is "normal, benign",
# so index 1 (the generic default) would make "sensitivity" the recall of healthy cases.
# No other 2D MedMNIST set is binary; the binary 3D sets are not loaded by medpeft.
_CLINICAL_POSITIVE = {
    "breastmnist": "malignant",  # {0: "malignant", 1: "normal, benign"}
    "pneumoniamnist": "pneumonia",  # {0: "normal", 1: "pneumonia"}
}


def clinical_positive_class(flag: str) -> str | None:
    """Name of the clinically positive class of MedMNIST set ``flag``, or None where there is
    none (multiclass/multilabel sets) or it is not unambiguous."""
    return _CLINICAL_POSITIVE.get(str(flag).lower())


def _info() -> dict:
    import medmnist  # imported here: only MedMNIST runs pay for it

    return medmnist.INFO


def medmnist_names() -> list[str]:
    """The 2D MedMNIST flags (3D volumes are not images this tool handles)."""
    return sorted(flag for flag in _info() if not flag.endswith("3d"))


def medmnist_3d_names() -> list[str]:
    return sorted(flag for flag in _info() if flag.endswith("3d"))


def default_data_root() -> str:
    """$MEDPEFT_DATA if set, else the medmnist package's default (~/.medmnist)."""
    env = os.environ.get("MEDPEFT_DATA")
    if env:
        return os.path.expanduser(env)
    try:
        from medmnist.info import DEFAULT_ROOT
    except ImportError:  # pragma: no cover - older medmnist
        DEFAULT_ROOT = os.path.join("~", ".medmnist")
    return os.path.expanduser(DEFAULT_ROOT)


def file_name(flag: str, size: int) -> str:
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def expected_path(flag: str, root: str, size: int) -> str:
    return os.path.join(os.path.expanduser(root), file_name(flag, size))


def _check_size(size) -> int:
    size = 28 if size is None else size
    if isinstance(size, bool) or size not in MEDMNIST_SIZES:
        raise ConfigError(f"medmnist_size must be one of {', '.join(map(str, MEDMNIST_SIZES))}, got {size!r}")
    return int(size)


def _download(flag: str, root: str, size: int, path: str) -> None:
    import medmnist

    info = medmnist.INFO[flag]
    os.makedirs(root, exist_ok=True)
    dataset_class = getattr(medmnist, info["python_class"])
    try:
        dataset_class(split="train", root=root, download=True, size=None if size == 28 else size)
    except Exception as exc:  # medmnist raises bare RuntimeErrors on any failure
        url = info.get("url" if size == 28 else f"url_{size}", "")
        raise DataError(f"downloading {file_name(flag, size)} into {root} failed ({str(exc).strip()[:200]}); "
                        f"download it by hand from {url} to {path}") from None


def medmnist_file(flag: str, cfg: DataConfig) -> str:
    """Where set ``flag``'s npz file is (or is downloaded to); DataError when it is missing and
    cannot be downloaded (offline). Reads nothing: ``--dry-run`` checks data with it."""
    flag = flag.lower()
    size = _check_size(cfg.medmnist_size)
    root = os.path.expanduser(cfg.root) if cfg.root else default_data_root()
    path = expected_path(flag, root, size)
    if not os.path.isfile(path) and not is_online():
        info = _info()[flag]
        url = info.get("url" if size == 28 else f"url_{size}", "")
        raise DataError(f"MedMNIST file not found: {path} (offline, so not downloaded). "
                        f"Download {url} to that path, or point --data-root (or $MEDPEFT_DATA) "
                        f"at the folder holding {file_name(flag, size)}")
    return path


def load_medmnist(flag: str, cfg: DataConfig) -> DataBundle:
    info_all = _info()
    flag = flag.lower()
    info = info_all[flag]
    task = _TASKS.get(info["task"])
    if task is None:  # pragma: no cover - future medmnist task types
        raise DataError(f"{flag}: unsupported MedMNIST task {info['task']!r}")
    class_names = [info["label"][k] for k in sorted(info["label"], key=int)]
    # resolved before any file is read, so a typo in --positive-class fails at once
    positive = resolve_positive_class(class_names, task, cfg.positive_class,
                                      clinical_positive_class(flag))
    size = _check_size(cfg.medmnist_size)
    path = medmnist_file(flag, cfg)
    if not os.path.isfile(path):
        root = os.path.expanduser(cfg.root) if cfg.root else default_data_root()
        _download(flag, root, size, path)
    splits = _read_npz(path)
    sets = {}
    for split in SPLITS:
        images, labels = splits[split]
        sets[split] = ImageSet(images=_to_tensor(images, cfg.image_size),
                               labels=_labels(labels, task, path, split, class_names),
                               ids=[f"{split}/{i}" for i in range(len(labels))])
    split_info = split_info_for("official", sets["train"], sets["val"], sets["test"], seed=None,
                                source="medmnist", file=public_path(path), medmnist_size=size)
    return DataBundle(name=flag, task=task, class_names=class_names, train=sets["train"],
                      val=sets["val"], test=sets["test"], split_info=split_info, positive_class=positive)


def _read_npz(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels") if f"{s}_{k}" not in npz.files]
            if missing:
                raise DataError(f"corrupt MedMNIST file {path}: arrays {', '.join(missing)} are missing "
                                f"(found {', '.join(npz.files) or 'none'}); delete it and download it again")
            out = {s: (npz[f"{s}_images"], npz[f"{s}_labels"]) for s in SPLITS}
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise DataError(f"corrupt MedMNIST file {path}: {exc}; delete it and download it again") from None
    for split, (images, labels) in out.items():
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) != len(labels):
            raise DataError(f"corrupt MedMNIST file {path}: {split} has images {images.dtype}{list(images.shape)} "
                            f"and {len(labels)} labels; expected uint8 [N,H,W(,3)] with N labels")
        if images.ndim == 4 and images.shape[-1] not in (1, 3):
            raise DataError(f"{path}: {split}_images has {images.shape[-1]} channels per pixel "
                            f"{list(images.shape)}; expected grayscale [N,H,W] or RGB [N,H,W,3] (convert "
                            "RGBA/CMYK images to RGB before saving them)")
        if len(images) == 0:
            raise DataError(f"{path}: the {split} split is empty (0 images); every split (train, val, test) "
                            "needs images")
    return out


def _to_tensor(images: np.ndarray, image_size: int) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    tensor = tensor.unsqueeze(1) if tensor.ndim == 3 else tensor.permute(0, 3, 1, 2).contiguous()
    return resize_images(tensor, image_size)  # the whole split in one call


def _labels(labels: np.ndarray, task: str, path: str, split: str, class_names: list[str]) -> torch.Tensor:
    if task == "multilabel":
        values = labels.astype(np.float32).reshape(len(labels), -1)
        if values.shape[1] != len(class_names) or not np.isin(values, (0.0, 1.0)).all():
            raise DataError(f"{path}: {split}_labels has shape {labels.shape} with values "
                            f"{np.unique(values)[:10].tolist()}; expected (N, {len(class_names)}) of 0/1 (one "
                            f"column per label: {', '.join(class_names)})")
        return torch.from_numpy(values)
    if labels.ndim == 2 and labels.shape[1] != 1:
        raise DataError(f"corrupt MedMNIST file {path}: {split}_labels has shape {labels.shape}, expected (N, 1)")
    flat = labels.reshape(-1)
    if not np.issubdtype(flat.dtype, np.integer):
        whole = np.isfinite(flat) & (flat == np.round(flat)) if np.issubdtype(flat.dtype, np.floating) else \
            np.zeros(len(flat), dtype=bool)
        if not whole.all():
            rows = np.flatnonzero(~whole)
            raise DataError(f"{path}: {split}_labels holds {flat.dtype} values that are not class indices "
                            f"({', '.join(repr(flat[r].item()) for r in rows[:5])} in rows "
                            f"{', '.join(map(str, rows[:5]))}); expected integers 0..{len(class_names) - 1}")
    flat = flat.astype(np.int64)
    bad = np.flatnonzero((flat < 0) | (flat >= len(class_names)))
    if len(bad):
        raise DataError(f"{path}: {split}_labels holds {len(bad)} label(s) outside the {len(class_names)} classes "
                        f"0..{len(class_names) - 1} ({'; '.join(f'{k} = {n}' for k, n in enumerate(class_names))}): "
                        + ", ".join(f"row {r}: {flat[r]}" for r in bad[:5]) + ("" if len(bad) <= 5 else ", ..."))
    return torch.from_numpy(flat)
