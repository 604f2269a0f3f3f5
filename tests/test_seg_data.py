"""Segmentation data (``task: segmentation``): layouts, masks, errors, splits, augmentation alignment."""
from __future__ import annotations

import csv
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medpeft.augment import OPS, Augment, build_augment
from medpeft.data import DataConfig, load_data
from medpeft.data.io import array_to_chw, read_image, resize_images
from medpeft.data.masks import detect_layout, read_mask
from medpeft.data.splits import concat_sets
from medpeft.errors import ConfigError, DataError

SHARED = Path(os.environ.get("MEDPEFT_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
KVASIR_DIR = SHARED / "Kvasir-SEG"
SIZE = 96  # not a divisor of Kvasir's 256 px: nearest-neighbour resizing is really exercised


def seg_config(name, **kw) -> DataConfig:
    return DataConfig(name=str(name), task="segmentation", image_size=kw.pop("image_size", SIZE), **kw)


def pil_nearest(mask: np.ndarray, size: int = SIZE) -> np.ndarray:
    return np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((size, size), Image.NEAREST))


def pool_of(bundle):
    pool = concat_sets([bundle.train, bundle.val, bundle.test])
    return pool, {image_id: row for row, image_id in enumerate(pool.ids)}


# ----------------------------------------------------------------------------- real data: BUSI
@pytest.fixture(scope="module")
def busi(busi_root):
    return load_data(seg_config(busi_root))


def test_busi_pool_classes_and_strata(busi):
    pool, _ = pool_of(busi)
    assert busi.task == "segmentation" and busi.class_names == ["background", "lesion"]
    assert len(pool) == 780 and pool.images.shape == (780, 3, SIZE, SIZE) and pool.images.dtype == torch.uint8
    assert pool.masks.shape == (780, SIZE, SIZE) and pool.masks.dtype == torch.uint8
    assert set(torch.unique(pool.masks).tolist()) == {0, 1}
    assert busi.split_info["strata"] == ["benign", "malignant", "normal"]
    # the stratum is the class folder of each image
    folders = [i.split("/")[0] for i in pool.ids]
    assert [busi.split_info["strata"][v] for v in pool.labels.tolist()] == folders
    assert Counter(folders) == {"benign": 437, "malignant": 210, "normal": 133}
    assert not any("_mask" in i for i in pool.ids)


def test_busi_normal_masks_empty_lesion_masks_not(busi):
    pool, _ = pool_of(busi)
    area = pool.masks.flatten(1).sum(1)
    normal = torch.tensor([i.startswith("normal/") for i in pool.ids])
    assert int(area[normal].max()) == 0
    assert int((area[~normal] > 0).sum()) >= 0.99 * int((~normal).sum())


def test_busi_multiple_masks_are_ored(busi, busi_root):
    pool, row = pool_of(busi)
    multi = sorted({p.name.split("_mask")[0] for p in busi_root.rglob("*_mask_1.png")})
    assert len(multi) == 17
    grew = 0
    for stem in multi:
        folder = stem.split(" (")[0]
        files = sorted((busi_root / folder).glob(f"{stem}_mask*.png"))
        assert len(files) >= 2
        parts = [np.asarray(Image.open(f).convert("L")) > 0 for f in files]
        union = pil_nearest(np.logical_or.reduce(parts).astype(np.uint8))  # OR at original size, then resized
        first = pil_nearest(parts[0].astype(np.uint8))
        got = pool.masks[row[f"{folder}/{stem}.png"]].numpy()
        assert got.sum() == union.sum() and np.array_equal(got, union), stem
        grew += union.sum() > first.sum()  # the extra lesions add pixels (one _mask_1 lies inside its _mask)
    assert grew >= 15


def test_busi_single_masks_match_the_files(busi, busi_root):
    pool, row = pool_of(busi)
    for image_id in pool.ids[::37]:
        mask = np.asarray(Image.open(busi_root / image_id.replace(".png", "_mask.png")).convert("L")) > 0
        if (busi_root / image_id.replace(".png", "_mask_1.png")).exists():
            continue
        assert np.array_equal(pool.masks[row[image_id]].numpy(), pil_nearest(mask.astype(np.uint8))), image_id
        image = resize_images(array_to_chw(read_image(busi_root / image_id)), SIZE)
        assert torch.equal(pool.images[row[image_id]], image.expand(3, -1, -1)), image_id


def test_busi_split_keeps_near_duplicates_together(busi):
    info = busi.split_info
    assert info["kind"] == "grouped" and info["groups_on_two_sides"] == 0
    assert sum(info["sizes"].values()) == 780
    for part in (busi.train, busi.val, busi.test):
        assert set(part.labels.tolist()) == {0, 1, 2}  # stratified: every class on every side
        assert part.masks.shape[0] == len(part)


def test_busi_split_does_not_depend_on_the_image_size(busi, busi_root):
    # near-duplicates are found on the files, not on the resized copies (whose hashes move with the
    # size): backbones run at different sizes in one sweep are tested on the same images
    small = load_data(seg_config(busi_root, image_size=56))
    for a, b in ((busi.train, small.train), (busi.val, small.val), (busi.test, small.test)):
        assert a.ids == b.ids
    assert small.split_info["test_ids_sha256"] == busi.split_info["test_ids_sha256"]
    assert small.split_info["groups_on_two_sides"] == 0


# ----------------------------------------------------------------------------- real data: Kvasir-SEG
@pytest.fixture(scope="module")
def kvasir_root() -> Path:
    if not (KVASIR_DIR / "images").is_dir():
        pytest.skip(f"Kvasir-SEG not found under {KVASIR_DIR}")
    return KVASIR_DIR


@pytest.fixture(scope="module")
def kvasir(kvasir_root):
    return load_data(seg_config(kvasir_root))


def test_kvasir_pairs_binary_and_aligned(kvasir, kvasir_root):
    pool, row = pool_of(kvasir)
    assert detect_layout(str(kvasir_root)) == "paired" and kvasir.split_info["layout"] == "paired"
    assert len(pool) == 998 and pool.images.shape == (998, 3, SIZE, SIZE)
    assert set(torch.unique(pool.masks).tolist()) == {0, 1}
    assert set(pool.labels.tolist()) == {1}  # every frame shows a polyp
    assert all(i.startswith("images/") and i.endswith(".jpg") for i in pool.ids)
    for image_id in sorted(pool.ids)[::50]:
        name = image_id.split("/", 1)[1]
        raw = np.asarray(Image.open(kvasir_root / "masks" / name).convert("L"))
        assert len(np.unique(raw)) > 2  # JPEG noise: the threshold matters
        expected = pil_nearest((raw > 127).astype(np.uint8))
        got = pool.masks[row[image_id]].numpy()
        assert np.array_equal(got, expected), image_id
        image = resize_images(array_to_chw(read_image(kvasir_root / image_id)), SIZE)
        assert torch.equal(pool.images[row[image_id]], image), image_id


def test_kvasir_split_and_fraction(kvasir, kvasir_root):
    sizes = kvasir.split_info["sizes"]
    assert sum(sizes.values()) == 998 and kvasir.split_info["groups_on_two_sides"] == 0
    assert abs(sizes["val"] - 150) <= 15 and abs(sizes["test"] - 150) <= 15
    assert not set(kvasir.train.ids) & set(kvasir.test.ids)
    small = load_data(seg_config(kvasir_root, fraction=0.25))
    assert small.split_info["n_train_before"] == sizes["train"]
    quarter = lambda n: int(np.floor(0.25 * n + 0.5))  # noqa: E731 - per stratum, all Kvasir frames are one
    assert len(small.train) == quarter(sizes["train"]) and len(small.val) == quarter(sizes["val"])
    assert set(small.train.ids) < set(kvasir.train.ids) and set(small.val.ids) < set(kvasir.val.ids)
    assert small.test.ids == kvasir.test.ids
    row = {i: k for k, i in enumerate(kvasir.train.ids)}
    for k, image_id in enumerate(small.train.ids):  # masks travel with their images
        assert torch.equal(small.train.masks[k], kvasir.train.masks[row[image_id]])


# ----------------------------------------------------------------------------- synthetic folders
def square(h=30, w=40, box=(5, 8, 15, 20), fg=255) -> tuple[np.ndarray, np.ndarray]:
    """A gray image with a bright rectangle and its mask (values 0/fg)."""
    image = np.full((h, w), 60, np.uint8)
    mask = np.zeros((h, w), np.uint8)
    r0, c0, r1, c1 = box
    image[r0:r1, c0:c1] = 220
    mask[r0:r1, c0:c1] = fg
    return image, mask


def busi_like(root: Path, n=6, classes=("benign", "normal")) -> Path:
    for cls in classes:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for k in range(1, n + 1):
            image, mask = square(box=(2 + k, 3, 12 + k, 15 + k))
            if cls == "normal":
                mask[:] = 0
            Image.fromarray(image).save(root / cls / f"{cls} ({k}).png")
            Image.fromarray(mask).convert("1").save(root / cls / f"{cls} ({k})_mask.png")
    return root


def paired(root: Path, n=6, mask_ext="png") -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for k in range(n):
        image, mask = square(box=(3 + k, 2 + k, 14 + k, 22))
        Image.fromarray(np.stack([image] * 3, -1)).save(root / "images" / f"f{k}.png")
        options = {"quality": 75} if mask_ext == "jpg" else {}
        Image.fromarray(mask).save(root / "masks" / f"f{k}.{mask_ext}", **options)
    return root


def test_synthetic_busi_like_folder(tmp_path):
    root = busi_like(tmp_path / "us")
    Image.fromarray(square(box=(20, 30, 25, 38))[1]).save(root / "benign" / "benign (1)_mask_1.png")
    bundle = load_data(seg_config(root, image_size=30, near_duplicates="ignore"))
    pool, row = pool_of(bundle)
    assert len(pool) == 12 and bundle.split_info["strata"] == ["benign", "normal"]
    union = square(box=(3, 3, 13, 16), fg=1)[1] | square(box=(20, 30, 25, 38), fg=1)[1]  # both mask files
    assert np.array_equal(pool.masks[row["benign/benign (1).png"]].numpy(), pil_nearest(union, 30))
    assert pool.masks[[row[i] for i in pool.ids if i.startswith("normal/")]].sum() == 0
    # classification on the same folder is unchanged: masks skipped, no mask targets
    cls = load_data(DataConfig(name=str(root), image_size=30, near_duplicates="ignore"))
    assert cls.task == "binary" and cls.train.masks is None and sum(cls.split_info["sizes"].values()) == 12


def test_flat_folder_with_masks_beside_stratifies_by_foreground(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    for k in range(8):
        image, mask = square(box=(2 + k, 3, 12 + k, 15))
        if k % 2:
            mask[:] = 0
        Image.fromarray(image).save(root / f"im{k}.png")
        Image.fromarray(mask).save(root / f"im{k}_mask.png")
    bundle = load_data(seg_config(root, image_size=30, near_duplicates="ignore"))
    pool, row = pool_of(bundle)
    assert bundle.split_info["strata"] == ["no foreground", "foreground"]
    assert [pool.labels[row[f"im{k}.png"]].item() for k in range(8)] == [1, 0] * 4


def test_image_without_mask_is_an_error_naming_it(tmp_path):
    root = busi_like(tmp_path / "us")
    os.remove(root / "benign" / "benign (2)_mask.png")
    with pytest.raises(DataError, match=r"benign \(2\)\.png.*benign \(2\)_mask\.png"):
        load_data(seg_config(root))
    # normal images need their (empty) mask file too
    root = busi_like(tmp_path / "us2")
    os.remove(root / "normal" / "normal (3)_mask.png")
    with pytest.raises(DataError, match=r"normal \(3\)\.png"):
        load_data(seg_config(root))
    root = paired(tmp_path / "pairs")
    os.remove(root / "masks" / "f4.png")
    with pytest.raises(DataError, match=r"images/f4\.png.*masks/f4"):
        load_data(seg_config(root))


def test_mask_without_image_is_an_error_naming_it(tmp_path):
    root = busi_like(tmp_path / "us")
    Image.fromarray(square()[1]).save(root / "benign" / "benign (99)_mask.png")
    with pytest.raises(DataError, match=r"benign \(99\)_mask\.png has no image"):
        load_data(seg_config(root))


def test_mask_of_another_size_is_an_error(tmp_path):
    root = busi_like(tmp_path / "us")
    Image.fromarray(np.zeros((31, 40), np.uint8)).save(root / "benign" / "benign (4)_mask.png")
    with pytest.raises(DataError, match=r"benign \(4\)_mask\.png is 40x31 px but its image .*benign \(4\)\.png "
                                        r"is 40x30"):
        load_data(seg_config(root))
    root = paired(tmp_path / "pairs")
    Image.fromarray(np.zeros((60, 80), np.uint8)).save(root / "masks" / "f2.png")
    with pytest.raises(DataError, match=r"f2\.png is 80x60 px"):
        load_data(seg_config(root))


@pytest.mark.parametrize("values", [(0, 128, 255), (0, 1, 255), (0, 2)])
def test_mask_with_unexpected_values_is_an_error(tmp_path, values):
    root = paired(tmp_path / "pairs")
    mask = np.zeros((30, 40), np.uint8)
    for k, v in enumerate(values):
        mask[k * 5:(k + 1) * 5] = v
    Image.fromarray(mask).save(root / "masks" / "f3.png")
    with pytest.raises(DataError, match=r"masks/f3\.png holds the values " + ", ".join(map(str, values))):
        load_data(seg_config(root))


def test_binary_png_masks_0_1_and_0_255_are_the_same(tmp_path):
    a = tmp_path / "a.png"
    b = tmp_path / "b.png"
    mask = square()[1]
    Image.fromarray(mask).save(a)
    Image.fromarray((mask > 0).astype(np.uint8)).save(b)
    assert np.array_equal(read_mask(a), read_mask(b)) and set(np.unique(read_mask(a))) == {0, 1}


def test_jpeg_masks_are_thresholded(tmp_path):
    root = paired(tmp_path / "pairs", mask_ext="jpg")
    raw = np.asarray(Image.open(root / "masks" / "f0.jpg").convert("L"))
    assert len(np.unique(raw)) > 2  # compression noise
    bundle = load_data(seg_config(root, image_size=40, near_duplicates="ignore"))
    pool, row = pool_of(bundle)
    assert set(torch.unique(pool.masks).tolist()) == {0, 1}
    assert np.array_equal(pool.masks[row["images/f0.png"]].numpy(), pil_nearest((raw > 127).astype(np.uint8), 40))
    # the bright rectangle is where the mask is (JPEG edges may blur a pixel row)
    truth = pil_nearest(square(box=(3, 2, 14, 22))[1], 40) > 0
    assert (pool.masks[row["images/f0.png"]].numpy().astype(bool) == truth).mean() > 0.98


def test_folder_without_masks_is_an_error(tmp_path):
    root = tmp_path / "cls"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for k in range(3):
            Image.fromarray(square()[0]).save(root / cls / f"{k}.png")
    with pytest.raises(DataError, match=r"no masks found in .*cls: expected <stem>_mask\.png beside each image "
                                        r"or images/ \+ masks/ folders"):
        load_data(seg_config(root))
    (root / "images").mkdir()
    (root / "masks").mkdir()
    with pytest.raises(DataError, match="no masks found in"):
        load_data(seg_config(root))


def test_unknown_task_and_medmnist_segmentation_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"task 'keypoints' is not one of classification, segmentation, detection"):
        load_data(DataConfig(name=str(tmp_path), task="keypoints"))
    with pytest.raises(ConfigError, match="no segmentation masks"):
        load_data(DataConfig(name="breastmnist", task="segmentation"))


# ----------------------------------------------------------------------------- manifests
def write_manifest(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def label_maps(root: Path, n=9, k=3) -> list[dict]:
    (root / "img").mkdir(parents=True)
    (root / "lab").mkdir()
    rows = []
    for i in range(n):
        image = np.full((24, 32), 40, np.uint8)
        mask = np.zeros((24, 32), np.uint8)
        for c in range(1, k):
            mask[2 * c + i % 3: 2 * c + 6 + i % 3, 4 * c: 4 * c + 5 + i] = c
        image[mask > 0] = 100 + 50 * mask[mask > 0]
        Image.fromarray(image).save(root / "img" / f"{i}.png")
        Image.fromarray(mask).save(root / "lab" / f"{i}.png")
        rows.append({"path": f"img/{i}.png", "mask": f"lab/{i}.png", "label": "ab"[i % 2],
                     "split": ("train", "train", "train", "val", "test")[i % 5] if i < 5 else "train"})
    return rows


def multiclass_config(path, classes=("background", "liver", "tumour"), **kw) -> DataConfig:
    cfg = seg_config(path, image_size=24, **kw)
    cfg.mask_classes = classes if isinstance(classes, str) else list(classes)  # DataConfig field (or attribute)
    return cfg


def test_manifest_multiclass_label_maps(tmp_path):
    rows = label_maps(tmp_path)
    path = write_manifest(tmp_path / "seg.csv", rows)
    for classes in (["background", "liver", "tumour"], "background, liver, tumour"):
        bundle = load_data(multiclass_config(path, classes))
        assert bundle.class_names == ["background", "liver", "tumour"] and bundle.split_info["layout"] == "manifest"
        assert bundle.split_info["kind"] == "official" and bundle.split_info["strata"] == ["a", "b"]
        pool, row = pool_of(bundle)
        assert set(torch.unique(pool.masks).tolist()) == {0, 1, 2}
        for i in range(9):
            raw = np.asarray(Image.open(tmp_path / "lab" / f"{i}.png"))
            assert np.array_equal(pool.masks[row[f"img/{i}.png"]].numpy(), pil_nearest(raw, 24))
            assert pool.labels[row[f"img/{i}.png"]].item() == i % 2
    assert {i for i in bundle.test.ids} == {"img/4.png"}
    # values beyond the classes, JPEG label maps, bad class lists
    Image.fromarray(np.full((24, 32), 3, np.uint8)).save(tmp_path / "lab" / "7.png")
    with pytest.raises(DataError, match=r"lab/7\.png holds the values 3; expected class indices 0\.\.2"):
        load_data(multiclass_config(path))
    rows[7]["mask"] = "lab/7.jpg"
    Image.fromarray(np.zeros((24, 32), np.uint8)).save(tmp_path / "lab" / "7.jpg")
    with pytest.raises(DataError, match=r"lab/7\.jpg is a JPEG file"):
        load_data(multiclass_config(write_manifest(tmp_path / "jpg.csv", rows)))
    with pytest.raises(ConfigError, match="mask_classes"):
        load_data(multiclass_config(path, ["background"]))


def test_manifest_binary_without_label_column(tmp_path):
    root = paired(tmp_path / "p", n=6)
    rows = [{"path": f"images/f{k}.png", "mask": f"masks/f{k}.png"} for k in range(6)]
    bundle = load_data(seg_config(write_manifest(root / "m.csv", rows), image_size=30, near_duplicates="ignore"))
    pool, _ = pool_of(bundle)
    assert bundle.class_names == ["background", "lesion"] and set(pool.labels.tolist()) == {1}
    assert sum(bundle.split_info["sizes"].values()) == 6


def test_manifest_mask_errors_name_the_file(tmp_path):
    root = paired(tmp_path / "p", n=6)
    rows = [{"path": f"images/f{k}.png", "mask": f"masks/f{k}.png"} for k in range(6)]
    rows[2]["mask"] = "../outside.png"
    with pytest.raises(DataError, match=r"line 4, column 'mask': path '\.\./outside\.png' resolves outside"):
        load_data(seg_config(write_manifest(root / "a.csv", rows)))
    rows[2]["mask"] = "masks/nope.png"
    with pytest.raises(DataError, match=r"1 listed mask file\(s\) do not exist .*masks/nope\.png"):
        load_data(seg_config(write_manifest(root / "b.csv", rows)))
    rows[2]["mask"] = ""
    with pytest.raises(DataError, match=r"line 4: image 'images/f2\.png' has no mask"):
        load_data(seg_config(write_manifest(root / "c.csv", rows)))
    with pytest.raises(DataError, match="no column 'mask'"):
        load_data(seg_config(write_manifest(root / "d.csv", [{"path": r["path"]} for r in rows])))


# ----------------------------------------------------------------------------- augmentation keeps masks aligned
GEOMETRIC = [name for name, op in OPS.items() if op.category == "geometric"]


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


@pytest.mark.parametrize("spec", GEOMETRIC + ["geometric", "medical"])
def test_augmentation_moves_masks_with_images(spec):
    """A bright shape drawn exactly where the mask is: after augmenting both with one generator,
    the mask still covers the bright pixels (IoU > 0.9) in every sample."""
    assert {"flip", "vflip", "rotation", "scale", "elastic"} <= set(GEOMETRIC)
    size, batch = 64, 16
    mask = torch.zeros(batch, size, size, dtype=torch.uint8)
    mask[:, 4:32, 30:60] = 1  # off-centre: flips and rotations move it
    mask[:, 38:58, 6:24] = 2
    image = (0.15 + 0.7 * (mask > 0).float())[:, None].expand(-1, 3, -1, -1).contiguous()
    aug = build_augment(spec) if spec in ("geometric", "medical") else Augment([(spec, 1.0)])
    gen = torch.Generator().manual_seed(3)
    out_image, out_mask = aug.apply_with_mask(image, mask, gen)
    assert out_mask.shape == mask.shape and out_mask.dtype == mask.dtype
    assert set(torch.unique(out_mask).tolist()) <= {0, 1, 2}  # nearest neighbour: no new values
    moved = 0
    for k in range(batch):
        moved += not torch.equal(out_mask[k], mask[k])
        assert iou(out_mask[k] > 0, out_image[k, 0] > 0.5) > 0.9, (spec, k)
    assert moved >= 2, f"{spec}: the augmentation never changed the geometry"


# ----------------------------------------------------------------------------- split groups a folder documents
def _sides(bundle) -> dict[str, set[str]]:
    """group -> the splits its images landed in."""
    sides: dict[str, set[str]] = {}
    for part in ("train", "val", "test"):
        subset = getattr(bundle, part)
        for group in subset.groups:
            sides.setdefault(group, set()).add(part)
    return sides


def numbered(root: Path, n=12) -> Path:
    """images/1.png ... images/n.png with masks, named by frame number like CVC-ClinicDB."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for k in range(1, n + 1):
        image, mask = square(box=(2 + k % 5, 3, 12 + k % 5, 15 + k % 7))
        image[0, 0] = k  # no two images are identical
        Image.fromarray(image).save(root / "images" / f"{k}.png")
        Image.fromarray(mask).save(root / "masks" / f"{k}.png")
    return root


def test_cvc_clinicdb_sequences_never_straddle_a_split():
    """CVC-ClinicDB's frames of one video sequence (its README.txt table) stay on one side of every split."""
    cvc = SHARED / "CVC-ClinicDB"
    if not (cvc / "README.txt").is_file():
        pytest.skip(f"CVC-ClinicDB not found under {cvc}")
    bundle = load_data(seg_config(cvc, image_size=32, near_duplicates="ignore"))
    sides = _sides(bundle)
    sequences = {g for g in sides if g.startswith("sequence-")}
    assert len(sequences) == 29 and len(sides) == 29  # every frame of the 609 is in a documented sequence
    assert all(len(parts) == 1 for parts in sides.values()), {g: p for g, p in sides.items() if len(p) > 1}
    assert bundle.split_info["groups_on_two_sides"] == 0


@pytest.mark.parametrize("split_seed", [0, 1, 2])
def test_readme_frame_ranges_and_groups_csv_keep_groups_on_one_side(tmp_path, split_seed):
    root = numbered(tmp_path / "seq", n=12)
    (root / "README.txt").write_text("Frame Number | Sequence\n|  1 to  4  | 1 |\n|  5 to 8 | 2 |\n 9 to 12 | 3\n")
    bundle = load_data(seg_config(root, image_size=32, near_duplicates="ignore", split_seed=split_seed,
                                  val_ratio=0.3, test_ratio=0.3))
    sides = _sides(bundle)
    assert set(sides) == {"sequence-1", "sequence-2", "sequence-3"}
    assert all(len(parts) == 1 for parts in sides.values())
    (root / "groups.csv").write_text("path,group\n" + "".join(f"images/{k}.png,patient-{k % 3}\n" for k in range(1, 13)))
    bundle = load_data(seg_config(root, image_size=32, near_duplicates="ignore", split_seed=split_seed))
    sides = _sides(bundle)  # groups.csv wins over the README; its values are hashed (they may be patient ids)
    assert len(sides) == 3 and not any("patient" in g for g in sides)
    assert sides.keys() != {"sequence-1", "sequence-2", "sequence-3"}
    assert all(len(parts) == 1 for parts in sides.values())


@pytest.mark.parametrize("content, message", [
    ("path,grp\nimages/1.png,a\n", "expected columns path,group"),
    ("path,group\nimages/99.png,a\n", "name no image of the folder, e.g. 'images/99.png'"),
    ("path,group\nimages/1.png,a\nimages/1.png,b\n", "'images/1.png' is given two groups"),
    ("path,group\nimages/1.png,\n", "line 2: empty path or group"),
])
def test_bad_groups_csv_is_an_error_naming_the_file(tmp_path, content, message):
    root = numbered(tmp_path / "seq", n=4)
    (root / "groups.csv").write_text(content)
    with pytest.raises(DataError, match="groups.csv") as err:
        load_data(seg_config(root, image_size=32))
    assert message in str(err.value)


# ----------------------------------------------------------------------------- hashing while loading
def test_loaders_hash_the_decoded_pixels_exactly_as_a_file_inspection(tmp_path):
    from medpeft.data.io import load_images_hashed
    from medpeft.data.near_duplicates import inspect_file

    rng = np.random.default_rng(0)
    files = []
    for name, array, options in [
        ("gray.png", rng.integers(0, 256, (40, 30), dtype=np.uint8), {}),
        ("rgb.jpg", rng.integers(0, 256, (33, 47, 3), dtype=np.uint8), {"quality": 80}),
        ("gray_as_rgb.png", np.repeat(rng.integers(0, 256, (20, 20, 1), dtype=np.uint8), 3, -1), {}),
        ("rgba.png", rng.integers(0, 256, (25, 25, 4), dtype=np.uint8), {}),
        ("deep.png", rng.integers(0, 65535, (30, 30), dtype=np.uint16), {}),
    ]:
        Image.fromarray(array).save(tmp_path / name, **options)
        files.append(str(tmp_path / name))
    images, hashes = load_images_hashed(files * 8, 16)  # 40 files: the threaded path
    assert images.shape[0] == 40 and len(hashes) == 40
    for path, got in zip(files * 8, hashes):
        info = inspect_file(path)
        assert got == (info.sha256, info.phash, info.dhash), path


def test_decoded_hashes_defer_to_the_file_where_its_own_pixels_differ():
    from medpeft.data.near_duplicates import LARGE_IMAGE_PIXELS, decoded_hashes

    small = np.zeros((8, 8), dtype=np.uint8)
    assert decoded_hashes("scan.dcm", small, "40,400") is None  # the user's window, not the file's
    assert decoded_hashes("scan.dcm", small, None) is not None and decoded_hashes("a.png", small, "40,400")
    assert decoded_hashes("big.png", np.zeros((LARGE_IMAGE_PIXELS // 4096 + 1, 4096), dtype=np.uint8)) is None


@pytest.mark.parametrize("kind", ["segmentation", "detection"])
def test_kvasir_loads_decode_each_file_once_and_split_as_before(kvasir_root, kind, monkeypatch):
    import medpeft.data.near_duplicates as nd

    inspected = []
    inspect_files = nd.inspect_files
    monkeypatch.setattr(nd, "inspect_files", lambda paths: inspected.extend(paths) or inspect_files(paths))
    cfg = dict(name=str(kvasir_root), task=kind, image_size=32)
    once = load_data(DataConfig(**cfg))
    assert inspected == []  # every file hashed while it was loaded: none decoded a second time
    monkeypatch.setattr(nd, "decoded_hashes", lambda *args: None)  # the earlier way: hash the files again
    again = load_data(DataConfig(**cfg))
    assert len(inspected) == len(once.train) + len(once.val) + len(once.test)
    for a, b in ((once.train, again.train), (once.val, again.val), (once.test, again.test)):
        assert a.ids == b.ids
    assert once.split_info["test_ids_sha256"] == again.split_info["test_ids_sha256"]
