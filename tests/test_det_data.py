"""Detection data: box readers (Kvasir json, masks, COCO, CSV), checks, resizing and box-aware augmentation."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from torchvision.ops import box_iou

from medpeft.box_augment import BoxAugment, BoxKeepRule, build_box_augment, clip_and_filter
from medpeft.data.boxes import (boxes_from_mask, check_boxes, image_size, read_box_csv, read_coco_boxes,
                                read_kvasir_boxes, read_mask_boxes, resize_boxes)
from medpeft.errors import ConfigError, DataError

SHARED = Path(os.environ.get("MEDPEFT_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
KVASIR_DIR = SHARED / "Kvasir-SEG"


def save_image(path: Path, width: int, height: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (width, height), 80).save(path)
    return path


def write_csv(path: Path, rows: list[list]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "x0", "y0", "x1", "y1", "label"])
        writer.writerows(rows)
    return path


# ----------------------------------------------------------------------------- geometry and checks
def test_resize_boxes_scales_each_axis():
    boxes = resize_boxes([[10, 20, 110, 60]], (200, 400), 100)  # 400 wide, 200 high -> 100 x 100
    np.testing.assert_allclose(boxes, [[2.5, 10, 27.5, 30]])
    assert boxes.dtype == np.float32
    np.testing.assert_allclose(resize_boxes([[10, 20, 110, 60]], (200, 400), (50, 800)), [[20, 5, 220, 15]])
    assert resize_boxes(np.zeros((0, 4)), (10, 10), 20).shape == (0, 4)


def test_check_boxes_clips_small_overshoot_and_counts_it():
    boxes, clipped = check_boxes([[-1, 0, 50, 101], [10, 10, 20, 20]], (100, 200), "f.json", clip_tolerance=0.02)
    np.testing.assert_array_equal(boxes, [[0, 0, 50, 100], [10, 10, 20, 20]])
    assert clipped == 1


@pytest.mark.parametrize("box, message", [
    ([10, 10, 10, 20], "zero or negative area"),
    ([30, 10, 20, 20], "zero or negative area"),
    ([10, 10, 20, 130], "reaches 30 px beyond the 200 x 100"),
    ([210, 10, 220, 20], "lies entirely outside"),
    ([float("nan"), 10, 20, 20], "non-finite"),
])
def test_check_boxes_errors_name_the_file_and_box(box, message):
    with pytest.raises(DataError, match=message) as info:
        check_boxes([box], (100, 200), "ann.json: entry 'x'")
    assert "ann.json: entry 'x'" in str(info.value)


# ----------------------------------------------------------------------------- masks
def test_mask_to_boxes_two_components_and_a_tiny_one_dropped():
    mask = np.zeros((40, 50), dtype=np.uint8)
    mask[5:15, 10:30] = 1  # rows 5..14, columns 10..29
    mask[20:36, 2:8] = 1
    mask[38, 45] = mask[39, 46] = 1  # 2 pixels joined diagonally: one component under 8-connectivity
    boxes, labels, dropped = boxes_from_mask(mask, min_size=3)
    np.testing.assert_array_equal(boxes, [[10, 5, 30, 15], [2, 20, 8, 36]])  # x1/y1 = last pixel + 1
    assert labels.tolist() == [1, 1] and dropped == 1
    boxes, _, dropped = boxes_from_mask(mask, min_size=2)
    assert dropped == 0 and [45, 38, 47, 40] in boxes.tolist()  # diagonal pixels are one object


def test_mask_to_boxes_keeps_class_values_and_empty_masks():
    mask = np.zeros((20, 20), dtype=np.uint8)
    mask[2:5, 2:5] = 2
    mask[10:12, 10:15] = 1
    boxes, labels, _ = boxes_from_mask(mask)
    assert labels.tolist() == [1, 2] and boxes.tolist() == [[10, 10, 15, 12], [2, 2, 5, 5]]
    boxes, labels, dropped = boxes_from_mask(np.zeros((8, 8)))
    assert boxes.shape == (0, 4) and labels.shape == (0,) and dropped == 0
    with pytest.raises(ConfigError, match="min_size"):
        boxes_from_mask(mask, min_size=0)


def test_read_mask_boxes_paired_folder(tmp_path):
    save_image(tmp_path / "images" / "a.png", 40, 30)
    save_image(tmp_path / "images" / "b.png", 40, 30)
    mask = np.zeros((30, 40), dtype=np.uint8)
    mask[3:10, 4:20] = 255
    mask[25, 35] = 255  # a 1-pixel speck
    (tmp_path / "masks").mkdir()
    Image.fromarray(mask).save(tmp_path / "masks" / "a.png")
    Image.fromarray(np.zeros((30, 40), dtype=np.uint8)).save(tmp_path / "masks" / "b.png")
    ann = read_mask_boxes(str(tmp_path), min_size=4)
    assert [i.image_id for i in ann.images] == ["images/a.png", "images/b.png"]
    assert ann.images[0].boxes.tolist() == [[4, 3, 20, 10]] and ann.images[0].size == (30, 40)
    assert ann.images[1].boxes.shape == (0, 4) and ann.num_negative_images == 1
    assert ann.corrections["dropped_small_components"] == 1 and ann.class_names == ["background", "lesion"]
    target = ann.images[0].target(size=20)
    # 40 x 30 -> 20 x 20: x halves, y scales by 2/3
    assert torch.allclose(target["boxes"], torch.tensor([[2.0, 2.0, 10.0, 20 / 3]]))
    assert target["labels"].dtype == torch.int64 and target["boxes"].dtype == torch.float32


# ----------------------------------------------------------------------------- Kvasir json
def kvasir_like(tmp_path: Path, entries: dict, images: dict) -> Path:
    for name, (w, h) in images.items():
        save_image(tmp_path / "images" / f"{name}.jpg", w, h)
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps(entries))
    return path


def test_kvasir_json_scaled_from_original_size(tmp_path):
    entries = {"a": {"height": 200, "width": 400, "bbox": [{"label": "polyp", "xmin": 40, "ymin": 20,
                                                            "xmax": 400, "ymax": 120}]},
               "b": {"height": 100, "width": 100, "bbox": []},
               "gone": {"height": 100, "width": 100, "bbox": []}}
    path = kvasir_like(tmp_path, entries, {"a": (100, 50), "b": (64, 64)})
    ann = read_kvasir_boxes(str(path))
    assert [i.image_id for i in ann.images] == ["a", "b"] and ann.skipped == ["gone"]
    np.testing.assert_allclose(ann.images[0].boxes, [[10, 5, 100, 30]])
    assert ann.images[1].boxes.shape == (0, 4)
    assert ann.corrections["skipped_missing_images"] == 1 and ann.corrections["rescaled_images"] == 2
    with pytest.raises(DataError, match=r"names 1 image\(s\) that do not exist: gone"):
        read_kvasir_boxes(str(path), missing="error")


@pytest.mark.parametrize("box, message", [
    ({"label": "polyp", "xmin": 50, "ymin": 20, "xmax": 50, "ymax": 60}, "zero or negative area"),
    ({"label": "polyp", "xmin": 10, "ymin": 20, "xmax": 300, "ymax": 60}, "beyond the 100 x 100"),
    ({"label": "adenoma", "xmin": 10, "ymin": 20, "xmax": 30, "ymax": 60}, "unknown class name 'adenoma'"),
    ({"label": "polyp", "xmin": "ten", "ymin": 20, "xmax": 30, "ymax": 60}, "'ten' is not a number"),
])
def test_kvasir_json_bad_boxes(tmp_path, box, message):
    path = kvasir_like(tmp_path, {"a": {"height": 100, "width": 100, "bbox": [box]}}, {"a": (50, 50)})
    with pytest.raises(DataError, match=message) as info:
        read_kvasir_boxes(str(path))
    assert str(path) in str(info.value) and "'a'" in str(info.value)


def test_kvasir_image_without_entry_is_an_error(tmp_path):
    path = kvasir_like(tmp_path, {"a": {"height": 100, "width": 100, "bbox": []}}, {"a": (50, 50), "b": (50, 50)})
    with pytest.raises(DataError, match="have no entry"):
        read_kvasir_boxes(str(path))


@pytest.fixture(scope="module")
def kvasir_boxes():
    if not (KVASIR_DIR / "kavsir_bboxes.json").is_file():
        pytest.skip(f"Kvasir-SEG not found under {KVASIR_DIR}")
    return read_kvasir_boxes(str(KVASIR_DIR / "kavsir_bboxes.json"))


def test_kvasir_real_json(kvasir_boxes):
    assert len(kvasir_boxes) == 998 and kvasir_boxes.class_names == ["background", "polyp"]
    assert sorted(kvasir_boxes.skipped) == ["cju1gkndf6yi10801o1qnje19", "cju2hqt33lmra0988fr5ijv8j"]
    assert kvasir_boxes.num_boxes == 1069 and kvasir_boxes.corrections["clipped"] == 0
    # counted in the json itself: 943 frames with one box, 55 with more (the data README says 945 / 53)
    assert sum(len(i.boxes) == 1 for i in kvasir_boxes.images) == 943
    assert all(i.size == (256, 256) for i in kvasir_boxes.images[:20])


def test_kvasir_json_boxes_match_the_masks(kvasir_boxes):
    """The scaled json boxes against the bounding boxes of the masks (thresholded at > 127)."""
    singles = [i for i in kvasir_boxes.images if len(i.boxes) == 1][:12]
    ious = []
    for item in singles:
        mask = np.asarray(Image.open(KVASIR_DIR / "masks" / f"{item.image_id}.jpg").convert("L")) > 127
        ys, xs = np.nonzero(mask)
        mask_box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
        ious.append(box_iou(torch.from_numpy(item.boxes), mask_box).item())
    assert min(ious) > 0.85 and np.mean(ious) > 0.95, ious


# ----------------------------------------------------------------------------- COCO json
def coco_file(tmp_path: Path, **changes) -> Path:
    save_image(tmp_path / "img" / "a.png", 100, 50)
    save_image(tmp_path / "img" / "b.png", 100, 50)
    data = {"images": [{"id": 1, "file_name": "img/a.png", "width": 200, "height": 100},
                       {"id": 2, "file_name": "img/b.png", "width": 100, "height": 50}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [20, 10, 100, 40]},
                            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [0, 0, 10, 10]}],
            "categories": [{"id": 7, "name": "polyp"}, {"id": 3, "name": "adenoma"}]}
    data.update(changes)
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_reader_labels_scaling_and_negatives(tmp_path):
    ann = read_coco_boxes(str(coco_file(tmp_path)))
    assert ann.class_names == ["background", "adenoma", "polyp"]  # categories in id order
    a, b = ann.images
    np.testing.assert_allclose(a.boxes, [[10, 5, 60, 25], [0, 0, 5, 5]])  # 200 x 100 recorded, 100 x 50 stored
    assert a.labels.tolist() == [2, 1] and b.boxes.shape == (0, 4)
    assert ann.corrections["rescaled_images"] == 1
    ann = read_coco_boxes(str(coco_file(tmp_path)), classes=["polyp", "adenoma"])
    assert ann.images[0].labels.tolist() == [1, 2]


@pytest.mark.parametrize("changes, message", [
    ({"categories": [{"id": 7, "name": "polyp"}]}, r"category_id 3 is not in 'categories'"),
    ({"annotations": [{"id": 1, "image_id": 9, "category_id": 7, "bbox": [0, 0, 5, 5]}]}, "image_id 9 is not in"),
    ({"annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [5, 5, 0, 5]}]}, "zero or negative area"),
    ({"annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [0, 0, 5, 5], "iscrowd": 1}]}, "crowd"),
    ({"annotations": [{"id": 1, "image_id": 2, "category_id": 7, "bbox": [90, 0, 30, 5]}]}, "beyond the 100 x 50"),
])
def test_coco_reader_errors(tmp_path, changes, message):
    path = coco_file(tmp_path, **changes)
    with pytest.raises(DataError, match=message) as info:
        read_coco_boxes(str(path))
    assert str(path) in str(info.value)


def test_coco_unknown_class_and_missing_image(tmp_path):
    path = coco_file(tmp_path)
    with pytest.raises(DataError, match="unknown class name 'adenoma'"):
        read_coco_boxes(str(path), classes=["polyp"])
    (tmp_path / "img" / "b.png").unlink()
    with pytest.raises(DataError, match=r"names 1 image\(s\) that do not exist: img/b.png"):
        read_coco_boxes(str(path))
    ann = read_coco_boxes(str(path), missing="skip")
    assert len(ann) == 1 and ann.skipped == ["img/b.png"]


# ----------------------------------------------------------------------------- CSV manifest
def test_csv_reader_boxes_negatives_and_order(tmp_path):
    save_image(tmp_path / "a.png", 60, 40)
    save_image(tmp_path / "sub" / "b.png", 60, 40)
    path = write_csv(tmp_path / "boxes.csv", [["sub/b.png", "", "", "", "", ""],
                                              ["a.png", 1, 2, 30, 20, "mass"],
                                              ["a.png", 40, 10, 61, 30, "cyst"]])
    ann = read_box_csv(str(path))
    assert ann.class_names == ["background", "cyst", "mass"]
    b, a = ann.images
    assert b.image_id == "sub/b.png" and b.boxes.shape == (0, 4)
    assert a.boxes.tolist() == [[1, 2, 30, 20], [40, 10, 60, 30]] and a.labels.tolist() == [2, 1]
    assert ann.corrections["clipped"] == 1  # 61 -> 60: within the 2 % tolerance


@pytest.mark.parametrize("row, message", [
    (["a.png", 1, 2, "", 20, "mass"], "box fields x1 are empty"),
    (["a.png", 10, 2, 5, 20, "mass"], "zero or negative area"),
    (["a.png", 1, 2, 30, 90, "mass"], "beyond the 60 x 40"),
    (["a.png", 1, 2, 30, 20, "tumour"], "unknown class name 'tumour'"),
    (["nope.png", 1, 2, 30, 20, "mass"], r"names 1 image\(s\) that do not exist: nope.png"),
    (["a.png", "x", 2, 30, 20, "mass"], "'x' is not a number"),
    (["../a.png", 1, 2, 30, 20, "mass"], "resolves outside the data root"),
])
def test_csv_reader_errors(tmp_path, row, message):
    save_image(tmp_path / "a.png", 60, 40)
    path = write_csv(tmp_path / "boxes.csv", [row])
    with pytest.raises(DataError, match=message) as info:
        read_box_csv(str(path), classes=["mass"])
    assert str(path) in str(info.value)


def test_csv_image_listed_with_and_without_boxes(tmp_path):
    save_image(tmp_path / "a.png", 60, 40)
    path = write_csv(tmp_path / "boxes.csv", [["a.png", "", "", "", "", ""], ["a.png", 1, 2, 30, 20, "mass"]])
    with pytest.raises(DataError, match="listed without boxes"):
        read_box_csv(str(path))


def test_image_size_reads_the_header(tmp_path):
    assert image_size(str(save_image(tmp_path / "x.png", 33, 21))) == (21, 33)
    with pytest.raises(DataError, match="not found"):
        image_size(str(tmp_path / "missing.png"))


# ----------------------------------------------------------------------------- augmentation
H, W = 96, 128
RECTS = [[20.0, 10.0, 60.0, 40.0], [70.0, 50.0, 110.0, 86.0]]  # x0, y0, x1, y1: pixels x0..x1-1


def rendered() -> torch.Tensor:
    image = torch.zeros(3, H, W)
    for x0, y0, x1, y1 in RECTS:
        image[:, int(y0):int(y1), int(x0):int(x1)] = 1.0
    return image


def bright_boxes(image: torch.Tensor) -> list[torch.Tensor]:
    """The extent of each bright connected region (> 0.5) of an augmented image."""
    components, n = ndimage.label(image[0].numpy() > 0.5)
    out = []
    for rows, cols in ndimage.find_objects(components):
        out.append(torch.tensor([cols.start, rows.start, cols.stop, rows.stop], dtype=torch.float32))
    return out


def best_ious(boxes: torch.Tensor, regions: list[torch.Tensor]) -> list[float]:
    return [max(box_iou(b[None], r[None]).item() for r in regions) for b in boxes]


@pytest.mark.parametrize("op", ["flip", "vflip"])
def test_flips_move_boxes_exactly(op):
    aug = build_box_augment(op, always=True)
    image, boxes, labels = aug(rendered(), torch.tensor(RECTS), torch.tensor([1, 2]), torch.Generator().manual_seed(0))
    regions = torch.stack(sorted(bright_boxes(image), key=lambda r: r[0].item()))
    assert torch.equal(torch.stack(sorted(boxes, key=lambda r: r[0].item())), regions)
    assert labels.tolist() == [1, 2]


@pytest.mark.parametrize("op", ["scale", "rotation", "elastic", "light"])
def test_geometric_augmentations_keep_boxes_on_their_objects(op):
    aug = build_box_augment(op, always=True)
    for seed in range(6):
        image, boxes, labels = aug(rendered(), torch.tensor(RECTS), torch.tensor([1, 2]),
                                   torch.Generator().manual_seed(seed))
        assert len(boxes) == len(labels) >= 1
        ious = best_ious(boxes, bright_boxes(image))
        assert min(ious) > 0.9, (op, seed, ious)


def test_strong_elastic_boxes_follow_the_bent_outline():
    # at strength 3 (displacement ~3 % of the size) boxes from the 4 corners alone (torchvision's
    # kernel) fell to IoU 0.81 with the warped rectangle; the outline keeps > 0.9
    aug = build_box_augment("elastic", strength=3.0, always=True)
    for seed in range(10):
        gen = torch.Generator().manual_seed(seed)
        image, boxes, _ = aug(rendered(), torch.tensor(RECTS), torch.tensor([1, 2]), gen)
        assert min(best_ious(boxes, bright_boxes(image))) > 0.9, seed


def test_intensity_and_artefact_operations_leave_boxes_alone():
    aug = build_box_augment("intensity,artefact", always=True)
    _, boxes, labels = aug(rendered(), torch.tensor(RECTS), torch.tensor([1, 2]), torch.Generator().manual_seed(0))
    assert torch.equal(boxes, torch.tensor(RECTS)) and labels.tolist() == [1, 2]


def test_augmentation_is_deterministic_and_leaves_the_global_rng():
    aug = build_box_augment("medical")
    state = torch.random.get_rng_state()
    first = aug(rendered(), torch.tensor(RECTS), torch.tensor([1, 2]), torch.Generator().manual_seed(5))
    second = aug(rendered(), torch.tensor(RECTS), torch.tensor([1, 2]), torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert torch.equal(torch.random.get_rng_state(), state)
    outputs = {tuple(aug(rendered(), torch.tensor(RECTS), torch.tensor([1, 2]),
                         torch.Generator().manual_seed(s))[1].flatten().tolist()) for s in range(6)}
    assert len(outputs) > 1  # seeds differ


def test_keep_rule_drops_mostly_cut_and_thin_boxes():
    boxes = torch.tensor([[-80.0, 0, 20, 10],  # 20 % inside: dropped
                          [-70.0, 20, 30, 30],  # 30 % inside: kept, clipped
                          [50.0, 50, 51.5, 70],  # 1.5 px wide: dropped
                          [10.0, 40, 40, 60]])
    kept, labels, dropped = clip_and_filter(boxes, torch.tensor([1, 2, 3, 4]), (100, 100))
    assert kept.tolist() == [[0, 20, 30, 30], [10, 40, 40, 60]] and labels.tolist() == [2, 4] and dropped == 2
    lenient = BoxKeepRule(min_visible=0.1, min_side=1)
    kept, _, _ = clip_and_filter(boxes, torch.tensor([1, 2, 3, 4]), (100, 100), lenient)
    assert len(kept) == 4
    with pytest.raises(ConfigError, match="min_visible"):
        BoxKeepRule(min_visible=1.5)


def test_crop_drops_boxes_that_leave_the_image():
    # a box in the corner is cut away by some strong crops: never returned outside the image
    aug = BoxAugment([("scale", 3.0)], always=True)
    corner = torch.tensor([[0.0, 0.0, 12.0, 12.0], [40.0, 30.0, 90.0, 70.0]])
    seen = set()
    for seed in range(20):
        _, boxes, labels = aug(rendered(), corner, torch.tensor([1, 2]), torch.Generator().manual_seed(seed))
        assert torch.all(boxes[:, :2] >= 0) and torch.all(boxes[:, 2] <= W) and torch.all(boxes[:, 3] <= H)
        assert torch.all(boxes[:, 2:] - boxes[:, :2] >= 2)
        seen.add(len(boxes))
    assert 1 in seen  # the corner box was dropped at least once


def test_batch_and_empty_targets():
    aug = build_box_augment("flip", always=True)
    images = torch.stack([rendered(), torch.zeros(3, H, W)])
    targets = [{"boxes": torch.tensor(RECTS), "labels": torch.tensor([1, 2]), "image_id": 0},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "image_id": 1}]
    out, new = aug.batch(images, targets, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and new[1]["boxes"].shape == (0, 4) and new[0]["image_id"] == 0
    assert torch.equal(new[0]["boxes"][:, 0], W - torch.tensor(RECTS)[:, 2])
    assert build_box_augment("none") is None
    with pytest.raises(ConfigError):
        build_box_augment("sideways")
    with pytest.raises(DataError, match="2 boxes but 1 labels"):
        aug(rendered(), torch.tensor(RECTS), torch.tensor([1]))
