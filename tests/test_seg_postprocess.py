"""Connected-component post-processing of segmentation masks (tasks/seg_postprocess.py): what each
setting removes, that the choice is made on validation Dice (ties keep the raw masks), and that a
run's test metrics, mask files and predict all apply the validation-chosen setting."""
from __future__ import annotations

import json

import numpy as np
import pytest

from medpeft.errors import ConfigError
from medpeft.run import execute, load_run
from medpeft.tasks import seg_postprocess as pp
from medpeft.tasks.seg_metrics import seg_metrics_with_ci
from medpeft.train import TrainConfig, predict_images
from test_segmentation import make_seg_folder, seg_config


def blobs(size=40):
    """One image: a 10x10 lesion (100 px), a 3x3 speck (9 px) and a 6x6 blob (36 px) of class 1."""
    m = np.zeros((1, size, size), np.uint8)
    m[0, 5:15, 5:15] = 1
    m[0, 30:33, 30:33] = 1
    m[0, 20:26, 30:36] = 1
    return m


def test_min_area_drops_small_components_and_largest_keeps_one():
    m = blobs()
    assert pp.apply(m, pp.NOTHING) is m  # nothing to do: the input itself
    small_gone = pp.apply(m, {"largest_component": False, "min_area": 10 / 1600})  # < 10 px
    assert small_gone.sum() == 136 and small_gone[0, 31, 31] == 0 and m.sum() == 145  # input untouched
    only_big = pp.apply(m, {"largest_component": True, "min_area": 0.0})
    assert only_big.sum() == 100 and only_big[0, 10, 10] == 1
    # per class: the largest of each class stays; diagonal neighbours are one component (8-connected)
    two = np.zeros((1, 20, 20), np.uint8)
    two[0, 0:4, 0:4], two[0, 10:12, 10:12], two[0, 12, 12] = 2, 1, 1
    two[0, 16:18, 16:18] = 1
    out = pp.apply(two, {"largest_component": True, "min_area": 0.0})
    assert (out == 2).sum() == 16 and (out == 1).sum() == 5 and out[0, 16, 16] == 0


def test_choice_is_made_on_validation_dice_and_a_tie_keeps_the_raw_masks():
    truth = np.zeros((4, 40, 40), np.uint8)
    truth[:, 5:15, 5:15] = 1
    noisy = truth.copy()
    noisy[:, 30:33, 30:33] = 1  # a false-positive speck on every image
    chosen = pp.choose(truth, noisy, 2)
    assert chosen["val_dice"] == pytest.approx(1.0) and chosen["val_dice_raw"] < 1.0
    assert chosen["largest_component"] or chosen["min_area"] > 0
    exact = pp.choose(truth, truth, 2)
    assert {k: exact[k] for k in pp.NOTHING} == pp.NOTHING  # nothing beats the raw masks: keep them


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_seg_folder(tmp_path_factory.mktemp("pp") / "discs")


def test_a_run_tests_saves_and_predicts_with_the_validation_choice(folder, tmp_path, monkeypatch):
    from PIL import Image

    from medpeft.data import load_data
    from medpeft.tasks import get_task

    cfg = seg_config(folder, steps=30, lr=3e-3)  # trained enough to find the discs (test Dice ~0.9)
    real_choose = pp.choose
    seen = {}

    def choose(targets, predictions, num_classes):  # what the run fits on, and a setting that shows
        seen["n"] = len(targets)  # validation images only
        return {**real_choose(targets, predictions, num_classes), "min_area": 0.5}  # empties every mask

    monkeypatch.setattr(pp, "choose", choose)
    execute(cfg, out_dir=tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    setting = saved["fitted_on_validation"]["postprocess"]
    assert setting["min_area"] == 0.5 and seen["n"] == saved["n_val"]
    assert setting["val_dice_raw"] > 0.5  # the raw masks were good
    bundle = load_data(cfg.data)
    loaded = load_run(tmp_path / "run")
    raw = predict_images(loaded.model, bundle.test, loaded.mean, loaded.std, "segmentation", 2)
    assert raw.sum() > 0 and pp.apply(raw, setting).sum() == 0
    truth = bundle.test.masks.numpy()
    assert saved["test"]["dice"]["value"] == pytest.approx(
        seg_metrics_with_ci(pp.apply(raw, setting), truth, 2, n_boot=20, seed=0)["dice"]["value"])
    assert seg_metrics_with_ci(raw, truth, 2, n_boot=20, seed=0)["dice"]["value"] > 0.5  # so the setting applied
    assert all(np.asarray(Image.open(p)).sum() == 0 for p in (tmp_path / "run" / "test_masks").glob("*.png"))
    # predict: the run's metadata carries the setting and the written masks have it applied
    task = get_task("segmentation")
    assert task.predict_settings(loaded.metadata, 32)["fitted"]["postprocess"] == setting
    image = tmp_path / "one.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(image)
    task.write_user_predictions([str(image)], blobs(40), ["background", "lesion"], "segmentation",
                                str(tmp_path / "p"), fitted={"postprocess": {"largest_component": True,
                                                                             "min_area": 0.0}})
    assert (np.asarray(Image.open(tmp_path / "p" / "one_mask.png")) // 255).sum() == 100
    monkeypatch.setattr(pp, "choose", real_choose)
    execute(seg_config(folder, seg_postprocess="none"), out_dir=tmp_path / "raw")
    assert json.loads((tmp_path / "raw" / "metrics.json").read_text())["fitted_on_validation"] == {
        "postprocess": pp.NOTHING}


def test_an_unknown_mode_is_named():
    with pytest.raises(ConfigError, match="seg_postprocess 'biggest' is not one of auto, none"):
        TrainConfig(seg_postprocess="biggest")
