"""Plain data types shared by every data source.

Images are decoded once, resized once to the run's image size and kept in memory as
uint8 tensors; normalisation and augmentation happen per batch (see ``loader.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

Task = Literal["binary", "multiclass", "multilabel", "segmentation", "detection"]


@dataclass
class ImageSet:
    """One split held in memory.

    images: uint8 [N, C, H, W], C = 1 (grayscale) or 3 (RGB), already at the run's image size.
    labels: int64 [N] for binary/multiclass, float32 [N, L] (0/1) for multilabel.
           For segmentation: the image-level stratum (the image's class where the data has one,
           else 1 if the mask has foreground, 0 if not), used to stratify splits and subsets.
    ids:    one string per image (relative file name or ``split/index``) - never patient data.
    groups: optional group per image (patient id hash, near-duplicate cluster) for leak-free splits.
    masks:  segmentation targets: uint8 [N, H, W] class index per pixel (0 = background), at the
            run's image size; None for classification.
    boxes:  detection targets: float32 [N, M, 5] rows (x0, y0, x1, y1, label) in pixels of the
            run's image size, NaN rows as padding (``data.detection``); None for other tasks.
    files:  the image files a loader read (a pool's only, never carried by ``subset`` or written
            out): near-duplicates are found on them at their own resolution, so an automatic split
            does not depend on the run's image size.
    file_hashes: the near-duplicate hashes of ``files`` (``near_duplicates.decoded_hashes``), taken
            while the loader decoded them, so grouping decodes no file twice (a pool's only).
    """

    images: torch.Tensor
    labels: torch.Tensor
    ids: list[str]
    groups: list[str] | None = None
    masks: torch.Tensor | None = None
    boxes: torch.Tensor | None = None
    files: list[str] | None = field(default=None, repr=False)
    # (pixel SHA-256, pHash, dHash) per file, hashed while the loader decoded it (None: not hashed)
    file_hashes: list | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index) -> "ImageSet":
        index = torch.as_tensor(index, dtype=torch.long)
        idx = index.tolist()
        return ImageSet(
            images=self.images[index],
            labels=self.labels[index],
            ids=[self.ids[i] for i in idx],
            groups=None if self.groups is None else [self.groups[i] for i in idx],
            masks=None if self.masks is None else self.masks[index],
            boxes=None if self.boxes is None else self.boxes[index],
        )


@dataclass
class DataBundle:
    """A data set ready for training: three splits plus what the task is."""

    name: str
    task: Task
    class_names: list[str]
    train: ImageSet
    val: ImageSet
    test: ImageSet
    # How the splits/subsets were made (official / stratified by seed / grouped, fraction, shots...).
    split_info: dict = field(default_factory=dict)
    # index of the clinically positive class of a binary task (sensitivity/F1 follow it); None: class 1
    positive_class: int | None = None
    # injected label noise: {"summary", "flipped": [(split, id, clean, noisy), ...]} (data/noise.py)
    label_noise: dict | None = None
    # the training images the label budget left unlabelled (labels blanked to -1): the pool of
    # semi-supervised training (semi.py); never validation or test images
    unlabelled: ImageSet | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_channels(self) -> int:
        return int(self.train.images.shape[1])


@dataclass
class DataConfig:
    """What to load and how. Plain values only: this is written to the run's config YAML."""

    name: str = "breastmnist"  # a MedMNIST flag, a folder of class sub-folders, or a CSV manifest
    task: str = "classification"  # classification | segmentation (images with masks) | detection (boxes)
    # segmentation: names of the mask values 0..K-1 (0 = background; a list or "a,b,c");
    # None: binary ["background", "lesion"]
    mask_classes: list[str] | None = None
    root: str | None = None  # data root; MedMNIST default: $MEDPEFT_DATA or medmnist's default
    image_size: int = 64  # size the images are resized to (square)
    medmnist_size: int | None = None  # which MedMNIST file variant (28/64/128/224); None: 28
    fraction: float | None = None  # label fraction of the training split, 0 < f <= 1
    shots: int | None = None  # k examples per class from the training split
    subset_seed: int = 0  # seed of the fraction/shots subset (nested across fractions)
    # labels used for model selection: "follow" subsamples the validation split with the training
    # split's fraction/shots rule (a user with 5 labelled images has no 78 more to select with);
    # "full" keeps every validation label (the literature's protocol: optimistic)
    val_labels: str = "follow"
    positive_class: str | None = None  # binary tasks: the clinically positive class (name or index)
    split_seed: int = 0  # seed of the train/val/test split when there is no official one
    val_ratio: float = 0.15
    test_ratio: float = 0.15
    # detection: the box file (COCO or Kvasir JSON, or CSV path,x0,y0,x1,y1,label) inside the data
    # folder; None: kavsir_bboxes.json if present, else one box per connected mask component
    boxes: str | None = None
    box_min_size: int = 10  # detection from masks: components of fewer pixels (speckle) give no box
    mask_pattern: str = "*_mask*"  # files excluded from image folders (BUSI masks)
    group_column: str | None = None  # manifest column with patient ids for grouped splits
    label_columns: list[str] | None = None  # manifest multi-label columns
    split_file: str | None = None  # JSON file recording a split to reuse
    # near-duplicate images (perceptual hash) are kept on one side of automatic splits ("group"),
    # or split like any other image ("ignore": the naive split, leaks on data such as BUSI)
    near_duplicates: str = "group"
    near_duplicate_threshold: int | str = "auto"  # Hamming bits, or auto (chosen per data set)
    dicom_window: str | None = None  # "C,W" overrides the DICOM files' own Window Center/Width
    audit: str = "warn"  # audit before training: warn | strict (error on leakage) | off
    # classification: noise injected into the training (and validation) labels, e.g. symmetric:0.4,
    # asymmetric:0.2, matrix:[[0.9,0.1],[0.3,0.7]] (data/noise.py); the test split stays clean
    label_noise: str | None = None
    clean_validation: bool = False  # keep the validation labels clean (default: as noisy as training)
    noise_seed: int | None = None  # seed of the noise draw; None: subset_seed
    # a CSV manifest path,label of synthetic images added to the training split only (data/synthetic.py)
    synthetic: str | None = None
    synthetic_only: bool = False  # train on the synthetic images alone (validation and test stay real)
