"""Data set audit of segmentation folders: images/ + masks/ and BUSI-style masks beside the images;
every mask check caught on a tiny synthetic folder, the JSON section, --strict, real Kvasir-SEG."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medpeft.audit import NO_MASK, add_audit_parser, audit_dataset
from medpeft.errors import ConfigError, DataError

SHARED = Path(os.environ.get("MEDPEFT_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
KVASIR_DIR = SHARED / "Kvasir-SEG"
H, W = 30, 40


def texture(seed: int) -> np.ndarray:
    """A smooth random grayscale image, uint8 (H, W): unrelated seeds are never near-duplicates."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((6, 8)) * 255).astype(np.uint8))
    return np.asarray(coarse.resize((W, H), Image.BICUBIC))


def lesion(k: int, value: int = 255) -> np.ndarray:
    """A rectangular lesion of (k + 2) * 4 pixels."""
    mask = np.zeros((H, W), np.uint8)
    mask[2:6, 3:5 + k] = value
    return mask


def save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def paired(root: Path, n: int = 8) -> Path:
    for k in range(n):
        save(root / "images" / f"f{k}.png", texture(k))
        save(root / "masks" / f"f{k}.png", lesion(k))
    return root


def busi_like(root: Path) -> Path:
    for k in range(4):
        for c, cls in enumerate(("benign", "malignant", "normal")):
            save(root / cls / f"{cls} ({k}).png", texture(100 + 10 * k + c))
            save(root / cls / f"{cls} ({k})_mask.png", np.zeros((H, W), np.uint8) if cls == "normal" else lesion(k))
    return root


def _cli(argv):
    parser = argparse.ArgumentParser()
    add_audit_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


# ----------------------------------------------------------------------------- paired layout
def test_paired_folder_is_detected_and_masks_is_never_a_class(tmp_path):
    report = audit_dataset(str(paired(tmp_path / "seg")))
    m = report.masks
    assert report.n_images == 8 and all(i.startswith("images/") for g in report.near_duplicates for i in g["files"])
    assert report.class_names == ["no foreground", "foreground"]  # the class is "has foreground", not a folder
    assert report.class_balance == {"all": {"no foreground": 0, "foreground": 8}}
    assert m["layout"] == "paired" and m["mask_files"] == 8 and m["mask_classes"] == ["background", "lesion"]
    assert set(m["counts"].values()) == {0} and report.problems() == []
    assert m["value_sets"] == {"0, 255": 8}
    shares = [(k + 2) * 4 / (H * W) for k in range(8)]
    assert m["foreground_fraction"] == {"images": 8, "min": round(min(shares), 5),
                                        "median": round(float(np.median(shares)), 5), "max": round(max(shares), 5)}
    assert m["lesion_classes"] is None  # no image classes: empty masks are not judged
    assert "masks (paired layout, 8 mask files" in report.summary_text()
    with pytest.raises(DataError, match="images/ and masks/ sub-folders, a segmentation layout"):
        audit_dataset(str(tmp_path / "seg"), task="classification")


def test_every_mask_problem_is_caught_and_named_relative(tmp_path):
    root = paired(tmp_path / "seg")
    os.remove(root / "masks" / "f0.png")  # image without a mask
    save(root / "masks" / "zz.png", lesion(1))  # mask without an image
    (root / "masks" / "f1.png").write_bytes(b"not a png")  # unreadable
    save(root / "masks" / "f2.png", np.zeros((H + 1, W), np.uint8))  # another size
    three = lesion(3)
    three[10:12, 10:12] = 128
    save(root / "masks" / "f3.png", three)  # 0/128/255: not a binary mask
    save(root / "masks" / "f4.png", np.zeros((H, W), np.uint8))  # empty: counted, not judged (no classes)
    report = audit_dataset(str(root))
    m = report.masks
    assert m["missing"] == ["images/f0.png"] and m["orphan"] == ["masks/zz.png"]
    assert [u["file"] for u in m["unreadable"]] == ["masks/f1.png"]
    assert m["size_mismatch"] == [{"file": "masks/f2.png", "image": "images/f2.png", "mask_size": [W, H + 1],
                                   "image_size": [W, H]}]
    assert [(u["file"], u["values"]) for u in m["unexpected_values"]] == [("masks/f3.png", "0, 128, 255")]
    assert m["empty"] == ["images/f2.png", "images/f4.png"] and m["empty_where_lesion_expected"] == []
    assert m["counts"] == {"missing": 1, "orphan": 1, "unreadable": 1, "size_mismatch": 1, "unexpected_values": 1,
                           "empty_where_lesion_expected": 0, "empty": 2}
    problems = " ".join(report.problems())
    for what in ("without a mask", "without an image", "unreadable mask", "another size", "unexpected values"):
        assert what in problems
    # images whose mask is missing or broken are their own stratum
    assert report.class_balance["all"] == {"no foreground": 2, "foreground": 3, NO_MASK: 3}
    text, data = report.summary_text(), report.to_json()
    assert "masks/f3.png holds the values 0, 128, 255" in text and "masks/f1.png" in text
    assert str(tmp_path) not in text and str(tmp_path) not in data  # relative paths only
    assert json.loads(data)["masks"]["counts"]["orphan"] == 1


def test_label_maps_need_mask_classes(tmp_path):
    root = paired(tmp_path / "seg", n=4)
    for k in range(4):
        save(root / "masks" / f"f{k}.png", lesion(k, value=1))
    labels = lesion(0, value=1)
    labels[20:25, 20:30] = 2
    save(root / "masks" / "f1.png", labels)
    binary = audit_dataset(str(root)).masks  # a binary mask holds 0/1 or 0/255, never 2
    assert [(u["file"], u["values"]) for u in binary["unexpected_values"]] == [("masks/f1.png", "0, 1, 2")]
    m = audit_dataset(str(root), mask_classes="background,polyp,tool").masks
    assert m["counts"]["unexpected_values"] == 0 and m["value_sets"] == {"0, 1": 3, "0, 1, 2": 1}
    assert m["mask_classes"] == ["background", "polyp", "tool"]
    save(root / "masks" / "f2.png", lesion(2, value=3))  # class 3 of 3 classes (0..2)
    assert [u["file"] for u in audit_dataset(str(root), mask_classes="a,b,c").masks["unexpected_values"]] == \
        ["masks/f2.png"]


# ----------------------------------------------------------------------------- masks beside the images
def test_busi_like_folder_flags_empty_benign_masks_not_normal_ones(tmp_path):
    root = busi_like(tmp_path / "us")
    save(root / "benign" / "benign (2)_mask.png", np.zeros((H, W), np.uint8))  # a benign image without lesion
    second = np.zeros((H, W), np.uint8)
    second[20:25, 30:35] = 255
    save(root / "malignant" / "malignant (1)_mask_1.png", second)  # a second lesion: OR-ed
    plain = audit_dataset(str(root))  # default: classification, masks skipped
    assert plain.masks is None and plain.class_names == ["benign", "malignant", "normal"] and plain.n_images == 12
    report = audit_dataset(str(root), task="segmentation")
    m = report.masks
    assert report.class_names == ["benign", "malignant", "normal"] and m["layout"] == "beside"
    assert m["mask_files"] == 13 and m["lesion_classes"] == ["benign", "malignant"]
    assert m["empty_where_lesion_expected"] == ["benign/benign (2).png"]
    assert sorted(m["empty"]) == ["benign/benign (2).png"] + [f"normal/normal ({k}).png" for k in range(4)]
    assert "1 empty mask(s) in a class that has lesions" in report.problems()
    assert m["foreground_fraction"]["max"] == round((3 * 4 + 25) / (H * W), 5)  # both lesions of malignant (1)
    # stating the classes overrides the majority rule; a typo is an error, not silence
    stated = audit_dataset(str(root), task="segmentation", lesion_classes=["malignant"]).masks
    assert stated["empty_where_lesion_expected"] == []
    with pytest.raises(ConfigError, match="lesion classes Benign are not image classes"):
        audit_dataset(str(root), task="segmentation", lesion_classes=["Benign"])


def test_busi_like_orphan_and_missing_masks(tmp_path):
    root = busi_like(tmp_path / "us")
    os.remove(root / "normal" / "normal (3)_mask.png")  # normal images need their empty mask too
    save(root / "benign" / "benign (99)_mask.png", lesion(1))
    m = audit_dataset(str(root), task="segmentation").masks
    assert m["missing"] == ["normal/normal (3).png"] and m["orphan"] == ["benign/benign (99)_mask.png"]


def test_manifest_with_mask_column(tmp_path):
    root = paired(tmp_path / "m", n=4)
    (root / "data.csv").write_text("path,mask\nimages/f0.png,masks/f0.png\nimages/f1.png,\n"
                                   "images/f2.png,masks/nope.png\nimages/f3.png,masks/f3.png\n")
    report = audit_dataset(str(root / "data.csv"))
    m = report.masks
    assert m["layout"] == "manifest" and m["missing"] == ["images/f1.png"]
    assert m["unreadable"] == [{"file": "masks/nope.png", "error": "mask file not found: masks/nope.png"}]
    with pytest.raises(DataError, match="no column 'mask'"):
        (root / "plain.csv").write_text("path,label\nimages/f0.png,x\nimages/f1.png,y\n")
        audit_dataset(str(root / "plain.csv"), task="segmentation")


# ----------------------------------------------------------------------------- CLI
def test_cli_segmentation_json_and_strict(tmp_path, capsys):
    root = paired(tmp_path / "seg")
    out = tmp_path / "audit.json"
    assert _cli(["audit", "--task", "segmentation", str(root), "--json", str(out), "--strict"]) == 0
    data = json.loads(out.read_text())
    assert data["masks"]["counts"]["missing"] == 0 and data["problems"] == []
    os.remove(root / "masks" / "f5.png")
    assert _cli(["audit", str(root), "--strict"]) == 1
    assert "strict failed: 1 image(s) without a mask" in capsys.readouterr().out
    busi = busi_like(tmp_path / "us")
    save(busi / "malignant" / "malignant (0)_mask.png", np.zeros((H, W), np.uint8))
    assert _cli(["audit", str(busi), "--strict"]) == 0  # classification: masks are not checked
    assert _cli(["audit", "--task", "segmentation", str(busi), "--strict"]) == 1
    assert _cli(["audit", "--task", "segmentation", str(busi), "--strict", "--lesion-classes", "benign"]) == 0


# ----------------------------------------------------------------------------- real data
@pytest.mark.slow
@pytest.mark.skipif(not (KVASIR_DIR / "masks").is_dir(), reason=f"Kvasir-SEG not found under {KVASIR_DIR}")
def test_kvasir_seg_audit():
    report = audit_dataset(str(KVASIR_DIR), leak_seed=None)
    m = report.masks
    assert report.n_images == 998 and report.counts["unreadable"] == 0 and m["mask_files"] == 998
    assert report.class_names == ["no foreground", "foreground"]
    assert report.class_balance == {"all": {"no foreground": 0, "foreground": 998}}  # every frame holds a polyp
    assert set(m["counts"].values()) == {0} and m["value_sets"] == {"JPEG, threshold > 127": 998}
    assert 0 < m["foreground_fraction"]["min"] < m["foreground_fraction"]["median"] < m["foreground_fraction"]["max"] < 1
    assert report.sizes["distinct"] == 1 and report.modes == {"RGB": 998}
