"""``medpeft explain``: Grad-CAM overlays for CNN and ViT runs, unmerged and merged, that depend on
the class explained; segmentation runs get the prediction overlay.

Tiny random-weight backbones trained for two epochs on a toy folder (a bright square marks the
'lesion' class) keep every run to seconds.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from medpeft.cli import main
from medpeft.data.base import DataConfig
from medpeft.errors import ConfigError
from medpeft.explain import cam_target, explain_images
from medpeft.run import RunConfig, build_model, execute, load_run
from medpeft.train import TrainConfig
from toydata import make_toy

pytest.importorskip("pytorch_grad_cam")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("explain") / "toy", per_class=24, size=32)


def train_run(toy, out, backbone, method, task="classification", epochs=2):
    cfg = RunConfig(data=DataConfig(name=str(toy), image_size=32, audit="off", task=task),
                    train=TrainConfig(epochs=epochs, batch_size=16, seed=0), backbone=backbone, method=method,
                    n_boot=20)
    execute(cfg, out_dir=out)
    return out


@pytest.fixture(scope="module")
def runs(toy, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {bb: train_run(toy, root / bb, bb, "lora") for bb in ("tiny_cnn", "tiny_vit")}


@pytest.mark.parametrize("backbone", ["tiny_cnn", "tiny_vit"])
@pytest.mark.parametrize("merge", [False, True])
def test_gradcam_overlays_exist_are_not_flat_and_depend_on_the_class(runs, toy, tmp_path, backbone, merge):
    loaded = load_run(runs[backbone], merge=merge)
    assert bool(getattr(loaded.model, "medpeft_merged", False)) == merge
    images = [str(toy / "lesion" / "000.png"), str(toy / "normal" / "000.png")]
    per_class = {}
    for name in loaded.class_names:
        rows = explain_images(loaded, images, tmp_path / name, target_class=name, return_maps=True)
        assert [r["explained"] for r in rows] == [name, name]
        per_class[name] = rows
    for name, rows in per_class.items():
        for row in rows:
            overlay = np.asarray(Image.open(row["file"]))
            assert overlay.ndim == 3 and overlay.shape[2] == 3 and min(overlay.shape[:2]) >= 224
            assert overlay.std() > 1  # image + heatmap, not a blank picture
            assert row["map"].shape == (32, 32) and 0 <= row["map"].min() and row["map"].max() <= 1
    first, second = (per_class[n] for n in loaded.class_names)
    for a, b in zip(first, second):
        # Grad-CAM keeps positive evidence only (ReLU): a class with none has a flat map, never both
        assert max(a["map"].std(), b["map"].std()) > 0.05 and max(a["cam_max"], b["cam_max"]) > 0.99
        assert np.abs(a["map"] - b["map"]).mean() > 0.05, "Grad-CAM must depend on the class explained"


def test_layer_is_found_from_the_model_not_the_backbone_name():
    cnn, *_ = build_model("tiny_cnn", 2, 32, "lora", {}, pretrained=False)
    layer, reshape, where = cam_target(cnn, 32)
    assert layer is dict(cnn.named_modules())[cnn.feature_info[-1]["module"]] and reshape is None
    assert "4x4 map" in where
    # an input so small that the last stage is a 2x2 map: the deepest stage with 4x4 cells instead
    layer, _, where = cam_target(cnn, 16)
    finer = [e for e in cnn.feature_info if e["reduction"] == 4][-1]["module"]
    assert layer is dict(cnn.named_modules())[finer] and "the last is coarser" in where and "4x4 map" in where
    vit, *_ = build_model("tiny_vit", 2, 32, "vpt_deep", {}, pretrained=False)
    layer, reshape, where = cam_target(vit, 32)
    assert layer is vit.blocks[-1].norm1 and "8x8" in where
    # class token + prompt tokens before the 64 patch tokens: only the patches form the map
    tokens = torch.arange(2 * (1 + 5 + 64) * 3, dtype=torch.float32).reshape(2, 70, 3)
    grid = reshape(tokens)
    assert grid.shape == (2, 3, 8, 8) and torch.equal(grid[0, :, 0, 0], tokens[0, 6])


def test_unmerged_prompt_method_on_a_vit(toy, tmp_path):
    run = train_run(toy, tmp_path / "vpt", "tiny_vit", "vpt_deep", epochs=1)
    loaded = load_run(run)
    rows = explain_images(loaded, [str(toy / "lesion" / "001.png")], tmp_path / "cams", return_maps=True)
    assert rows[0]["map"].std() > 0.05 and rows[0]["explained"] == rows[0]["predicted"]


def test_cli_explain_prints_the_prediction_and_writes_overlays(runs, toy, tmp_path, capsys):
    images = [str(toy / "lesion" / "002.png"), str(toy / "normal" / "002.png")]
    assert main(["explain", str(runs["tiny_cnn"]), *images, "--out", str(tmp_path / "cams"),
                 "--target-class", "lesion"]) == 0
    out = capsys.readouterr().out
    assert "Grad-CAM on blocks.2" in out and out.count("predicted ") == 2 and "explained lesion" in out
    assert sorted(p.name for p in (tmp_path / "cams").iterdir()) == ["002-2_cam.png", "002_cam.png"]
    code = main(["explain", str(runs["tiny_cnn"]), images[0], "--out", str(tmp_path / "c2"),
                 "--target-class", "tumour"])
    err = capsys.readouterr().err
    assert code == 2 and "tumour" in err and "lesion" in err and "Traceback" not in err


def test_segmentation_run_explains_with_the_prediction_overlay(tmp_path, capsys):
    rng = np.random.default_rng(0)
    root = tmp_path / "discs"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    yy, xx = np.mgrid[:32, :32]
    for i in range(16):
        cy, cx = rng.integers(10, 22, 2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= 36
        img = np.clip(rng.normal(90, 20, (32, 32)) + 110 * disc, 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"{i:03d}.png")
        Image.fromarray((disc * 255).astype(np.uint8)).save(root / "masks" / f"{i:03d}.png")
    cfg = RunConfig(data=DataConfig(name=str(root), task="segmentation", image_size=32, audit="off"),
                    train=TrainConfig(steps=2, batch_size=8), backbone="tiny_cnn", method="lora", n_boot=10)
    execute(cfg, out_dir=tmp_path / "seg")
    assert main(["explain", str(tmp_path / "seg"), str(root / "images" / "000.png"), "--out",
                 str(tmp_path / "cams")]) == 0
    assert "the explanation is the prediction overlay" in capsys.readouterr().out
    assert (tmp_path / "cams" / "000_overlay.png").is_file() and (tmp_path / "cams" / "000_mask.png").is_file()


def test_missing_gradcam_is_a_clear_error(runs, toy, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)  # import fails as if not installed
    code = main(["explain", str(runs["tiny_cnn"]), str(toy / "normal" / "000.png"), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "pip install" in err and "grad-cam" in err
    with pytest.raises(ConfigError, match="grad-cam"):
        explain_images(load_run(runs["tiny_cnn"]), [str(toy / "normal" / "000.png")], tmp_path)
