"""Detection through the Task interface: boxes loaded at the run's image size, boxes that move
with their images in the loader, FCOS on the registry backbones with the methods on the backbone
only and the pyramid + head always trained and saved, save -> load -> identical detections,
merged == unmerged, the validation-chosen threshold, the run folder's outputs and predict.

Tiny random-weight backbones and a synthetic folder of bright squares (images/ + masks/, so
the boxes come from the masks; a CSV manifest and a COCO file for the other readers) keep it fast.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medpeft.batching import BatchLoader
from medpeft.box_augment import build_box_augment
from medpeft.cli import main
from medpeft.data import load_data
from medpeft.data.base import DataConfig
from medpeft.data.detection import padded_boxes, unpad
from medpeft.errors import ConfigError, DataError
from medpeft.methods import set_train_mode, trained_state_dict
from medpeft.run import RunConfig, build_model, execute, load_run
from medpeft.tasks import get_task
from medpeft.tasks.det_metrics import det_metrics
from medpeft.tasks.detection import DetectionModel, pad_detections, prediction_list, pyramid_plan, target_list
from medpeft.train import TrainConfig, predict_images

SIZE = 48  # stored images
RUN_SIZE = 32  # the model input


def make_box_folder(root, n=24, size=SIZE):
    """images/<i>.png with one or two bright squares on noise (every 6th image none: a negative),
    masks/<i>.png the squares (0/255); returns (root, {image: [(x0, y0, x1, y1), ...]})."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    truth = {}
    for i in range(n):
        img = rng.normal(80, 15, (size, size))
        mask = np.zeros((size, size), np.uint8)
        boxes = []
        for k in range(0 if i % 6 == 5 else 1 + (i % 3 == 0)):
            side = int(rng.integers(8, 14))
            x0 = int(rng.integers(1, size // 2 - side)) + k * size // 2
            y0 = int(rng.integers(1, size - side - 1))
            img[y0:y0 + side, x0:x0 + side] += 120
            mask[y0:y0 + side, x0:x0 + side] = 255
            boxes.append((x0, y0, x0 + side, y0 + side))
        rgb = np.repeat(np.clip(img, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
        Image.fromarray(rgb).save(root / "images" / f"{i:03d}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i:03d}.png")
        truth[f"images/{i:03d}.png"] = boxes
    return root, truth


@pytest.fixture(scope="module")
def box_folder(tmp_path_factory):
    return make_box_folder(tmp_path_factory.mktemp("det") / "squares")


def det_config(folder, method="lora", backbone="tiny_cnn", size=RUN_SIZE, **train) -> RunConfig:
    return RunConfig(data=DataConfig(name=str(folder), task="detection", image_size=size, audit="off", box_min_size=4),
                     train=TrainConfig(**{"steps": 4, "batch_size": 8, "seed": 0, **train}), backbone=backbone,
                     pretrained=False, method=method, n_boot=20)


# ---------------------------------------------------------------------- data


def test_boxes_come_from_the_masks_scaled_to_the_run_size(box_folder):
    folder, truth = box_folder
    bundle = load_data(DataConfig(name=str(folder), task="detection", image_size=RUN_SIZE, audit="off"))
    assert bundle.task == "detection" and bundle.class_names == ["background", "lesion"]
    assert bundle.split_info["layout"] == "masks"
    scale = RUN_SIZE / SIZE
    for part in (bundle.train, bundle.val, bundle.test):
        assert part.boxes.shape[1:] == (2, 5)  # padded to the most boxes of an image
        for ident, target, stratum in zip(part.ids, unpad(part.boxes), part.labels.tolist()):
            expected = sorted(truth[ident])
            got = sorted(tuple(b) for b in (target["boxes"] / scale).round().int().tolist())
            assert got == expected, ident
            assert target["labels"].tolist() == [1] * len(expected)
            assert stratum == int(bool(expected))  # splits stratify by "has an object"


def test_csv_manifest_and_coco_file_give_the_same_boxes(box_folder, tmp_path):
    folder, truth = box_folder
    rows = ["path,x0,y0,x1,y1,label"]
    images, annotations = [], []
    for k, (ident, boxes) in enumerate(sorted(truth.items())):
        images.append({"id": k, "file_name": ident, "width": SIZE, "height": SIZE})
        if not boxes:
            rows.append(f"{ident},,,,,")
        for x0, y0, x1, y1 in boxes:
            rows.append(f"{ident},{x0},{y0},{x1},{y1},polyp")
            annotations.append({"id": len(annotations), "image_id": k, "category_id": 7,
                                "bbox": [x0, y0, x1 - x0, y1 - y0]})
    (folder / "boxes.csv").write_text("\n".join(rows) + "\n")
    (folder / "coco.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                  "categories": [{"id": 7, "name": "polyp"}]}))
    try:
        bundles = [load_data(DataConfig(name=str(folder / "boxes.csv"), task="detection", image_size=RUN_SIZE,
                                        audit="off")),
                   load_data(DataConfig(name=str(folder), task="detection", boxes="coco.json", image_size=RUN_SIZE,
                                        audit="off"))]
    finally:
        (folder / "boxes.csv").unlink(), (folder / "coco.json").unlink()
    for bundle in bundles:
        assert bundle.class_names == ["background", "polyp"]
        got = {i: sorted(tuple(b) for b in (t["boxes"] * SIZE / RUN_SIZE).round().int().tolist())
               for part in (bundle.train, bundle.val, bundle.test) for i, t in zip(part.ids, unpad(part.boxes))}
        assert got == {i: sorted(b) for i, b in truth.items()}


def test_bad_box_input_is_named(box_folder, tmp_path):
    folder, _ = box_folder
    with pytest.raises(ConfigError, match="MedMNIST classification set: it has no boxes"):
        load_data(DataConfig(name="breastmnist", task="detection"))
    with pytest.raises(DataError, match="outside the data root"):
        load_data(DataConfig(name=str(folder), task="detection", boxes="../elsewhere.json", image_size=RUN_SIZE))
    with pytest.raises(DataError, match="boxes file 'nope.csv' not found"):
        load_data(DataConfig(name=str(folder), task="detection", boxes="nope.csv", image_size=RUN_SIZE))
    bad = tmp_path / "bad.csv"
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(tmp_path / "a.png")
    bad.write_text("path,x0,y0,x1,y1,label\na.png,10,10,10,20,polyp\n")
    with pytest.raises(DataError, match="bad.csv.*a.png"):
        load_data(DataConfig(name=str(bad), task="detection", image_size=RUN_SIZE))
    bad.write_text("path,x0,y0,x1,y1,label\nmissing.png,1,1,10,20,polyp\n")
    with pytest.raises(DataError, match="missing.png"):
        load_data(DataConfig(name=str(bad), task="detection", image_size=RUN_SIZE))
    with pytest.raises(ConfigError, match="box_min_size"):
        load_data(DataConfig(name=str(folder), task="detection", box_min_size=0))


def test_padding_round_trips():
    per_image = [(np.array([[1, 2, 3, 4], [5, 6, 7, 9]], np.float32), np.array([1, 2])),
                 (np.zeros((0, 4), np.float32), np.zeros(0, np.int64))]
    padded = padded_boxes(per_image)
    assert padded.shape == (2, 2, 5) and torch.isnan(padded[1]).all()
    back = unpad(padded)
    assert back[0]["boxes"].tolist() == per_image[0][0].tolist() and back[0]["labels"].tolist() == [1, 2]
    assert back[1]["boxes"].shape == (0, 4) and back[1]["labels"].dtype == torch.int64


@pytest.mark.parametrize("spec", ["flip", "light", "flip,vflip,scale,rotation"])
def test_boxes_move_with_their_images_in_the_loader(box_folder, spec):
    """Every training batch: the bright squares of the augmented image lie in the augmented boxes."""
    folder, _ = box_folder
    bundle = load_data(DataConfig(name=str(folder), task="detection", image_size=RUN_SIZE, audit="off"))
    loader = BatchLoader(bundle.train, 8, (0.5,) * 3, (0.5,) * 3, augment=build_box_augment(spec, 1.0, always=True),
                         targets=get_task("detection").targets)  # in order: batch k holds images 8k..8k+7
    covered, moved = [], False
    originals = iter(unpad(bundle.train.boxes))
    for x, y in loader:
        assert y.shape[1:] == bundle.train.boxes.shape[1:]
        for image, target, original in zip(x, unpad(y), originals):
            bright = image[0] > 0.6  # a square ~0.9 after normalisation, the noise ~-0.4
            inside = torch.zeros_like(bright)
            for x0, y0, x1, y1 in target["boxes"].tolist():
                inside[int(np.floor(y0)):int(np.ceil(y1)), int(np.floor(x0)):int(np.ceil(x1))] = True
            if bright.sum() > 10:
                covered.append(((bright & inside).sum() / bright.sum()).item())
            if len(target["boxes"]) == len(original["boxes"]) > 0:
                moved |= not torch.allclose(target["boxes"], original["boxes"])
    assert moved and np.mean(covered) > 0.9 and min(covered) > 0.6


# ---------------------------------------------------------------------- the model


@pytest.mark.parametrize("backbone", ["tiny_cnn", "tiny_vit"])
def test_model_returns_a_loss_in_training_and_padded_detections_in_eval(backbone):
    model, *_ = build_model(backbone, 2, RUN_SIZE, "lora", {}, pretrained=False, task="detection")
    assert isinstance(model, DetectionModel)
    task = get_task("detection")
    targets = padded_boxes([(np.array([[4, 5, 20, 22]], np.float32), np.array([1])),
                            (np.zeros((0, 4), np.float32), np.zeros(0, np.int64))])
    set_train_mode(model, True)
    loss = task.forward(model, torch.randn(2, 3, RUN_SIZE, RUN_SIZE), targets, {})
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.requires_grad
    model.eval()
    out = task.forward(model, torch.randn(2, 3, RUN_SIZE, RUN_SIZE), None, {})
    assert out.shape == (2, 100, 6)


def test_pyramid_plan_reads_feature_info():
    cnn = torch.nn.Module()
    cnn.feature_info = [dict(num_chs=c, reduction=r, module=f"s{r}") for c, r in ((8, 2), (16, 4), (24, 8),
                                                                                 (40, 16), (80, 16), (112, 32))]
    plan = pyramid_plan(cnn)
    assert plan["kind"] == "fpn" and plan["modules"] == ["s8", "s16", "s32"] and plan["channels"] == [24, 80, 112]
    assert plan["strides"] == [8, 16, 32, 64]
    vit = torch.nn.Module()
    vit.feature_info = [dict(num_chs=384, reduction=14, module=f"blocks.{i}") for i in range(12)]
    plan = pyramid_plan(vit)
    assert plan["kind"] == "simple" and plan["modules"] == ["blocks.11"] and plan["strides"] == [7, 14, 28, 56]
    with pytest.raises(ConfigError, match="no feature_info"):
        pyramid_plan(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("method", ["head", "lora", "bitfit", "ssf", "full"])
def test_methods_adapt_the_backbone_and_the_head_always_trains(method):
    model, *_ = build_model("tiny_cnn", 2, RUN_SIZE, method, {}, pretrained=False, task="detection")
    head = model.get_classifier()
    assert all(p.requires_grad for p in head.parameters())
    encoder_trainable = [n for n, p in model.encoder.named_parameters() if p.requires_grad]
    assert bool(encoder_trainable) == (method != "head")  # head: nothing of the backbone moves
    before = {k: v.clone() for k, v in model.state_dict().items()}
    targets = padded_boxes([(np.array([[4, 5, 20, 22]], np.float32), np.array([1]))] * 2)
    set_train_mode(model, True)
    get_task("detection").forward(model, torch.randn(2, 3, RUN_SIZE, RUN_SIZE), targets, {}).backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    allowed = set(trained_state_dict(model))
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert moved and set(moved) <= allowed
    assert any(k.startswith("head.") for k in moved) and any(k.startswith("backbone.pyramid.") for k in moved)
    assert any(k.startswith("backbone.encoder.") for k in moved) == (method != "head")


def test_head_init_follows_the_seed_and_keeps_the_focal_prior():
    a, *_ = build_model("tiny_cnn", 2, RUN_SIZE, "lora", {}, pretrained=False, task="detection", head_seed=1)
    b, *_ = build_model("tiny_cnn", 2, RUN_SIZE, "lora", {}, pretrained=False, task="detection", head_seed=1)
    c, *_ = build_model("tiny_cnn", 2, RUN_SIZE, "lora", {}, pretrained=False, task="detection", head_seed=2)
    wa, wb, wc = (m.head.classification_head.conv[0].weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    bias = a.head.classification_head.cls_logits.bias
    assert torch.allclose(torch.sigmoid(bias), torch.full_like(bias, 0.01), atol=1e-4)  # FCOS's prior


def test_mixing_is_refused_for_detection(box_folder):
    folder, _ = box_folder
    with pytest.raises(ConfigError, match="mix 'mixup'.*mix none"):
        execute(det_config(folder, mix="mixup"), save=False)


# ---------------------------------------------------------------------- metrics and threshold


def test_task_scores_match_the_metric_module_and_the_threshold_comes_from_validation():
    task = get_task("detection")
    targets = padded_boxes([(np.array([[0, 0, 10, 10]], np.float32), np.array([1])),
                            (np.array([[20, 20, 30, 30]], np.float32), np.array([1]))])
    det = [{"boxes": torch.tensor([[0., 0., 10., 10.], [40., 40., 50., 50.]]), "scores": torch.tensor([0.9, 0.8]),
            "labels": torch.tensor([1, 1])},
           {"boxes": torch.tensor([[21., 21., 30., 30.], [0., 30., 5., 35.]]), "scores": torch.tensor([0.7, 0.3]),
            "labels": torch.tensor([1, 1])}]
    preds = pad_detections(det).numpy()
    reference = det_metrics(prediction_list(preds), target_list(targets.numpy()), 0.5)
    scores = task.scores(targets.numpy(), preds, {"monitor": "map50"})
    assert scores["map50"] == pytest.approx(reference["map50"]) and scores["map50_95"] == pytest.approx(
        reference["map50_95"])
    fitted = task.fit_on_validation(targets.numpy(), preds, {})
    assert fitted == {"score_threshold": pytest.approx(0.7)}  # F1 1.0 at >= 0.7 (the 0.8 box is an FP)
    with_ci = task.metrics_with_ci(targets.numpy(), preds, {**fitted}, n_boot=50, seed=0)
    assert with_ci["precision"]["value"] == pytest.approx(2 / 3) and with_ci["recall"]["value"] == 1.0
    assert set(with_ci["froc"]) == {"value", "low", "high"} and with_ci["counts"]["fp"] == 1


# ---------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def det_run(box_folder, tmp_path_factory):
    folder, _ = box_folder
    out = tmp_path_factory.mktemp("detrun")
    cfg = det_config(folder)
    return cfg, execute(cfg, out_dir=out), out


def test_run_writes_detection_metrics_detections_and_per_image_csv(det_run):
    cfg, metrics, out = det_run
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["task"] == "detection" and saved["monitor"] == "map50"
    for name in ("map50", "map50_95", "precision", "recall", "f1", "mean_iou", "froc"):
        assert set(saved["test"][name]) >= {"value", "low", "high"}
    threshold = saved["fitted_on_validation"]["score_threshold"]
    assert saved["test"]["counts"]["n_images"] == saved["n_test"]
    detections = json.loads((out / "test_detections.json").read_text())
    assert len(detections["images"]) == saved["n_test"] and detections["score_threshold"] == threshold
    rows = (out / "test_per_image.csv").read_text().splitlines()
    assert len(rows) == saved["n_test"] + 1
    # every box has an area, even after 4 steps (torchvision's relu regression left half with none)
    boxes = np.array([d["box"] for im in detections["images"] for d in im["detections"]])
    assert len(boxes) and (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert (out / "test_cases.png").stat().st_size > 1000


def test_save_load_gives_identical_detections_and_merge_changes_nothing(det_run, box_folder):
    cfg, _, out = det_run
    bundle = load_data(cfg.data)
    saved = json.loads((out / "test_detections.json").read_text())["images"]
    loaded = load_run(out)
    again = prediction_list(predict_images(loaded.model, bundle.test, loaded.mean, loaded.std, "detection", 2))
    for entry, det in zip(saved, again):
        assert [r["score"] for r in entry["detections"]] == pytest.approx(det["scores"].tolist(), abs=1e-5)
        np.testing.assert_allclose(np.reshape([r["box"] for r in entry["detections"]], (-1, 4)), det["boxes"], atol=0.01)
    merged = load_run(out, merge=True)
    x = torch.randn(2, 3, RUN_SIZE, RUN_SIZE)
    task = get_task("detection")
    with torch.no_grad():
        a = task.forward(loaded.model.eval(), x, None, {})
        b = task.forward(merged.model.eval(), x, None, {})
    assert torch.allclose(torch.nan_to_num(a, -1.0), torch.nan_to_num(b, -1.0), atol=1e-3)


def test_predict_writes_boxes_in_image_pixels_and_an_overlay(det_run, box_folder, tmp_path):
    _, metrics, out = det_run
    folder, _ = box_folder
    files = [str(folder / "images" / "000.png"), str(folder / "images" / "001.png")]
    assert main(["predict", str(out), *files, "--out", str(tmp_path / "pred")]) == 0
    boxes = json.loads((tmp_path / "pred" / "000_boxes.json").read_text())
    assert boxes["score_threshold"] == metrics["fitted_on_validation"]["score_threshold"]
    loaded = load_run(out)
    raw = predict_images(loaded.model, _one(files[0]), loaded.mean, loaded.std, "detection", 2)
    expected = prediction_list(raw)[0]["boxes"] * SIZE / RUN_SIZE  # the image's own pixels
    np.testing.assert_allclose(np.reshape([d["box"] for d in boxes["detections"]], (-1, 4)), expected, atol=0.02)
    assert all(d["class"] == "lesion" for d in boxes["detections"])
    assert (tmp_path / "pred" / "001_overlay.png").is_file()
    assert main(["predict", str(out), *files]) == 2  # a folder is required


def _one(path):
    from medpeft.data.base import ImageSet
    from medpeft.data.io import load_images

    return ImageSet(load_images([path], RUN_SIZE), torch.zeros(1, dtype=torch.long), [path])


def test_detection_sweep_and_report_rank_by_map50_with_froc_and_cases(box_folder, tmp_path):
    from medpeft.bench.grid import Experiment
    from medpeft.bench.report import build_report

    from test_benchmark import run_local

    folder, _ = box_folder
    exp = Experiment.from_mapping(dict(data=[str(folder)], task="detection", backbones=["tiny_cnn"],
                                       methods=["full", "head", "lora"], fractions=[1.0], seeds=2, image_size=RUN_SIZE,
                                       data_options={"box_min_size": 4}, hpo={"trials": 0},
                                       train={"steps": 3, "batch_size": 8}, n_boot=20)).validate()
    summary = run_local(exp, tmp_path / "sweep", report=False)
    assert summary["store"]["done"] == 6 and summary["store"]["failed"] == 0
    report = build_report(tmp_path / "sweep")
    assert report["metric"] == "map50"
    text = open(report["markdown"]).read()
    assert "head" in text and "Test map50" in text and "Test froc (higher is better)" in text
    froc = [p for p in report["plots"] if p.endswith("_froc.png")]
    cases = [p for p in report["plots"] if p.endswith("_cases.png")]
    assert len(froc) == 1 and len(cases) == 1 and "FROC at fraction 1" in text
    rows = [r for r in report["summary"] if r["fraction"] == 1.0]
    assert sorted(r["method"] for r in rows) == ["full", "head", "lora"]


# ---------------------------------------------------------------------- every method, as in classification

from medpeft.methods import get_method, is_mergeable, list_methods, merge_methods, parse_method  # noqa: E402

FAMILY_BACKBONE = {"cnn": "tiny_cnn", "vit": "tiny_vit"}
DETECTION_CASES = [(m, f) for m in list_methods() for f in FAMILY_BACKBONE if f in get_method(m).families]


def _step_targets():
    return padded_boxes([(np.array([[4, 5, 20, 22]], np.float32), np.array([1])),
                         (np.array([[10, 2, 30, 12], [1, 20, 9, 30]], np.float32), np.array([1, 1]))])


@pytest.mark.parametrize("method, family", DETECTION_CASES, ids=[f"{m}-{f}" for m, f in DETECTION_CASES])
def test_every_method_adapts_only_the_backbone_merges_and_round_trips(method, family):
    """The classification contract on the detector: gradients reach exactly the trainable
    parameters (the method's, on the backbone, plus the pyramid and head), nothing frozen moves,
    the saved state reloads to identical detections, and mergeable methods merge to the same output."""
    from medpeft.methods import load_trained_state

    torch.set_num_threads(1)
    build = dict(backbone=FAMILY_BACKBONE[family], num_classes=2, image_size=RUN_SIZE, method=method,
                 method_options={}, pretrained=False, task="detection")
    torch.manual_seed(0)
    model, *_ = build_model(**build)
    task = get_task("detection")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    outside = [n for n in trainable if not n.startswith(("backbone.encoder.", "backbone.pyramid.", "head."))]
    assert not outside, outside
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, RUN_SIZE, RUN_SIZE, generator=torch.Generator().manual_seed(0))
    set_train_mode(model, True)
    task.forward(model, x, _step_targets(), {}).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable, (sorted(with_grad - trainable)[:3], sorted(trainable - with_grad)[:3])
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    allowed = set(trained_state_dict(model))
    moved = [k for k, v in model.state_dict().items() if k not in allowed and not torch.equal(v, before[k])]
    assert not moved, moved[:5]
    model.eval()
    with torch.no_grad():
        expected = task.forward(model, x, None, {})
    torch.manual_seed(123)  # another init of the method's own weights: the saved state must override it
    fresh, *_ = build_model(**build)
    load_trained_state(fresh, {k: v.clone() for k, v in trained_state_dict(model).items()})
    with torch.no_grad():
        assert torch.equal(torch.nan_to_num(task.forward(fresh.eval(), x, None, {}), -1.0),
                           torch.nan_to_num(expected, -1.0))
    if is_mergeable(parse_method(method)):
        merge_methods(model)  # the one generic walk, on the backbone inside the detector
        with torch.no_grad():
            merged = task.forward(model.eval(), x, None, {})
        top = ~torch.isnan(expected[..., 4])
        assert torch.equal(top, ~torch.isnan(merged[..., 4]))
        assert torch.allclose(merged[top], expected[top], atol=1e-3)


def test_export_merges_detection_weights_and_refuses_onnx_by_name(det_run, tmp_path):
    pytest.importorskip("onnx")
    _, _, out = det_run
    assert main(["export", str(out), str(tmp_path / "merged.safetensors")]) == 0
    from safetensors.torch import load_file

    merged = load_file(str(tmp_path / "merged.safetensors"))
    assert any(k.startswith("head.") for k in merged) and not any("lora_" in k for k in merged)
    assert main(["export", str(out), str(tmp_path / "model.onnx")]) == 2
    assert not (tmp_path / "model.onnx").exists()


def test_detection_options_leave_older_store_keys_unchanged():
    """Sweeps stored before detection existed resume without rerunning: the new data options are
    left out of a run's config (hence its store key) at their defaults, and kept otherwise."""
    plain = RunConfig(data=DataConfig(name="breastmnist"), backbone="tiny_cnn").to_dict()
    assert "boxes" not in plain["data"] and "box_min_size" not in plain["data"]
    custom = RunConfig(data=DataConfig(name="x", task="detection", boxes="coco.json", box_min_size=4)).to_dict()
    assert custom["data"]["boxes"] == "coco.json" and custom["data"]["box_min_size"] == 4
    back = RunConfig.from_dict(custom)
    assert back.data.boxes == "coco.json" and back.data.box_min_size == 4
    assert RunConfig.from_dict(plain).data.box_min_size == 10


def test_a_mask_derived_external_set_is_checked_before_training_and_mapped_with_mask_classes(box_folder, tmp_path,
                                                                                               monkeypatch):
    """Kvasir-SEG's box file says 'polyp', boxes drawn from CVC-ClinicDB's masks say 'lesion': a
    clear error before any training, and mask_classes names the mask class so the two match."""
    import medpeft.run as run_module

    folder, truth = box_folder
    home = folder / "polyp_boxes.csv"  # the same images with boxes named 'polyp' (as a box file would)
    rows = ["path,x0,y0,x1,y1,label"] + [f"{i},{x0},{y0},{x1},{y1},polyp" if boxes else f"{i},,,,,"
                                          for i, boxes in sorted(truth.items()) for x0, y0, x1, y1 in (boxes or [(0,) * 4])]
    home.write_text("\n".join(rows) + "\n")
    away, _ = make_box_folder(tmp_path / "other_centre", n=12)
    cfg = det_config(home)
    cfg.external_test = [str(away)]
    real_train = run_module.train_model
    monkeypatch.setattr(run_module, "train_model", lambda *a, **k: pytest.fail("trained before the check"))
    try:
        with pytest.raises(ConfigError, match=r"external test set 'other_centre' has classes \['background', "
                                              r"'lesion'\]; the run's are \['background', 'polyp'\].*"
                                              r"--mask-classes background,polyp"):
            execute(cfg, save=False)
        monkeypatch.setattr(run_module, "train_model", real_train)
        cfg.data.mask_classes = ["background", "polyp"]
        metrics = execute(cfg, save=False)
    finally:
        home.unlink()
    entry = metrics["external"]["other_centre"]
    assert entry["n_images"] == 12 and 0.0 <= entry["map50"]["value"] <= 1.0


def test_a_sweep_with_an_external_set_in_another_label_space_fails_at_its_config_check(tmp_path):
    """benchmark --dry-run / the sweep's first check: Kvasir-style box names against boxes drawn from
    another centre's masks fail before any job, and the mask_classes mapping passes."""
    from medpeft.bench.grid import Experiment

    home, truth = make_box_folder(tmp_path / "polyp_home", n=6)
    entries = {Path(path).stem: {"height": SIZE, "width": SIZE, "bbox": [
        {"label": "polyp", "xmin": x0, "ymin": y0, "xmax": x1, "ymax": y1} for x0, y0, x1, y1 in boxes]}
        for path, boxes in truth.items()}
    (home / "kavsir_bboxes.json").write_text(json.dumps(entries))  # Kvasir-SEG's box file names 'polyp'
    away, _ = make_box_folder(tmp_path / "other_centre", n=6)
    spec = dict(data=[str(home)], task="detection", backbones=["tiny_cnn"], methods=["lora"], fractions=[1.0],
                seeds=1, external_test=[str(away)], data_options={})
    with pytest.raises(ConfigError, match=r"data 'polyp_home': external test set 'other_centre' has classes "
                                          r"\['background', 'lesion'\]; the run's are \['background', 'polyp'\]"):
        Experiment.from_mapping(spec).validate()
    spec["data_options"]["mask_classes"] = ["background", "polyp"]
    assert Experiment.from_mapping(spec).validate().external_test == [str(away)]


def test_box_regression_keeps_a_gradient_and_an_area_when_its_outputs_turn_negative():
    """The regression is exp(s * x) (the FCOS paper), not torchvision's relu(x): a side pushed
    negative in training still learns and still has a length (relu: gradient 0, width 0)."""
    torch.manual_seed(0)
    model, *_ = build_model("tiny_cnn", 2, RUN_SIZE, "lora", {}, pretrained=False, task="detection")
    reg = model.head.regression_head
    with torch.no_grad():
        reg.bbox_reg.bias.fill_(-8.0)  # every side far below 0 before the activation
    targets = padded_boxes([(np.array([[4, 5, 20, 22]], np.float32), np.array([1]))] * 2)
    set_train_mode(model, True)
    get_task("detection").forward(model, torch.randn(2, 3, RUN_SIZE, RUN_SIZE), targets, {}).backward()
    assert reg.bbox_reg.bias.grad.abs().min() > 0 and reg.scales.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        distances, _ = reg([torch.randn(1, reg.bbox_reg.in_channels, 4, 4)])
    assert (distances > 0).all()
    # saved and restored with the head (the per-level scales are head weights)
    assert any(k.endswith("regression_head.scales") for k in trained_state_dict(model))


def test_a_collapsed_box_regression_is_reported_on_validation():
    """Detections of zero size (a collapsed box regression) give mAP 0 silently; the fit on
    validation warns, and sound detections do not."""
    task = get_task("detection")
    truth = padded_boxes([(np.array([[4.0, 4.0, 20.0, 20.0]]), np.array([1]))] * 3)
    sound = pad_detections([{"boxes": torch.tensor([[5.0, 5.0, 19.0, 21.0]]), "scores": torch.tensor([0.9]),
                             "labels": torch.tensor([1])}] * 3)
    collapsed = pad_detections([{"boxes": torch.tensor([[12.0, 12.0, 12.0, 12.0], [5.0, 5.0, 19.0, 5.0]]),
                                 "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 1])}] * 3)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert task.fit_on_validation(truth, sound.numpy(), {})["score_threshold"] <= 0.9
    with pytest.warns(UserWarning, match=r"100% of the validation detections have zero width or height"):
        task.fit_on_validation(truth, collapsed.numpy(), {})
