"""Augmentation suite: every operation, mask alignment, determinism, presets, MixUp/CutMix."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision import tv_tensors

from medpeft.augment import (AUGMENT_NAMES, OPS, PRESETS, Augment, MixConfig, apply_with_mask, build_augment,
                             check_augment, describe_augment, line_kernel, mix_batch, parse_augment_spec)
from medpeft.batching import BatchLoader, LightAugment
from medpeft.data.base import ImageSet
from medpeft.errors import ConfigError

GEOMETRIC = [n for n, op in OPS.items() if op.category == "geometric"]
PIXEL_ONLY = [n for n, op in OPS.items() if op.category != "geometric"]


def square_image(size=32, lo=8, hi=20, channels=1):
    """Mid-grey textured background with a bright square; the mask marks the square."""
    g = torch.Generator().manual_seed(0)
    img = 0.3 + 0.1 * torch.rand(channels, size, size, generator=g)
    img[:, lo:hi, lo + 6:hi + 6] = 0.95
    mask = torch.zeros(1, size, size, dtype=torch.uint8)
    mask[:, lo:hi, lo + 6:hi + 6] = 1
    return img, mask


@pytest.mark.parametrize("name", list(OPS))
def test_each_operation_changes_pixels_keeps_shape_and_range(name):
    img, _ = square_image()
    transform = OPS[name].build(2.0, 32, 32)  # the bare transform (no probability gate)
    torch.manual_seed(1)
    out = transform(tv_tensors.Image(img)).as_subclass(torch.Tensor)
    assert out.shape == img.shape and out.dtype == img.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.allclose(out, img, atol=1e-4), f"{name} left the image unchanged"


@pytest.mark.parametrize("name", GEOMETRIC)
def test_geometric_operations_move_the_mask_with_the_image(name):
    img, mask = square_image()
    aug = Augment([(name, 3.0)])
    moved = 0
    for seed in range(12):
        out_img, out_mask = aug.apply_with_mask(img, mask, torch.Generator().manual_seed(seed))
        assert out_mask.dtype == torch.uint8 and out_mask.shape == mask.shape
        assert set(out_mask.unique().tolist()) <= {0, 1}  # nearest neighbour: still a label map
        bright = out_img[0] > 0.7
        m = out_mask[0].bool()
        iou = (bright & m).sum() / (bright | m).sum()
        assert iou > 0.75, f"{name}: mask no longer on the square (IoU {iou:.2f})"  # edges: bilinear vs nearest
        moved += int(not torch.equal(out_mask, mask))
    assert moved >= 1  # and the transform did move things at least once


@pytest.mark.parametrize("name", PIXEL_ONLY)
def test_intensity_and_artefact_operations_leave_the_mask_alone(name):
    img, mask = square_image()
    aug = Augment([(name, 2.0)])
    changed = 0
    for seed in range(40):  # some operations apply to only 10% of the samples
        out_img, out_mask = aug.apply_with_mask(img, mask, torch.Generator().manual_seed(seed))
        assert torch.equal(out_mask, mask)
        changed += int(not torch.allclose(out_img, img))
    assert changed >= 1


def test_flip_moves_square_exactly():
    img, mask = square_image()
    # flipped or not, per sample (p = 0.5), always pairing image and mask the same way
    imgs, masks = img.expand(16, -1, -1, -1), mask.expand(16, -1, -1, -1)
    out_i, out_m = apply_with_mask(Augment([("flip", 1.0)]), imgs, masks, torch.Generator().manual_seed(3))
    kinds = []
    for i in range(16):
        f = torch.equal(out_m[i], mask.flip(-1))
        assert torch.equal(out_i[i], img.flip(-1) if f else img)
        kinds.append(f)
    assert any(kinds) and not all(kinds)


def test_determinism_per_sample_randomness_and_global_rng_untouched():
    aug = build_augment("medical")
    x = torch.rand(6, 3, 24, 24)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = aug(x, torch.Generator().manual_seed(7))
    assert torch.equal(torch.random.get_rng_state(), before)
    b = aug(x, torch.Generator().manual_seed(7))
    c = aug(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    same = aug(x[:1].expand(6, -1, -1, -1), torch.Generator().manual_seed(7))
    assert not all(torch.equal(same[0], same[i]) for i in range(1, 6))  # each sample its own draw
    assert a.shape == x.shape and 0 <= a.min() and a.max() <= 1
    img, mask = square_image()
    first = aug.apply_with_mask(img, mask, torch.Generator().manual_seed(5))
    second = aug.apply_with_mask(img, mask, torch.Generator().manual_seed(5))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_grayscale_in_three_channels_stays_gray():
    x = torch.rand(4, 1, 20, 20).expand(-1, 3, -1, -1)
    out = build_augment("noise,speckle,brightness,rotation")(x, torch.Generator().manual_seed(0))
    assert out.shape == (4, 3, 20, 20)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])


def test_presets_and_specs_build_and_record():
    assert build_augment("none") is None and build_augment("light", 0) is None
    light = build_augment("light")
    assert isinstance(light, LightAugment) and light == LightAugment()  # strength 1: the existing defaults
    assert build_augment("light", 0.5).degrees == 5.0
    for name in AUGMENT_NAMES[2:]:
        aug = build_augment(name)
        assert [op for op, _ in aug.ops] == PRESETS[name]
        assert aug(torch.rand(2, 3, 16, 16), torch.Generator().manual_seed(0)).shape == (2, 3, 16, 16)
    assert parse_augment_spec("noise, flip=0.5 ,intensity") == [
        ("flip", 0.5), ("brightness", 1.0), ("contrast", 1.0), ("gamma", 1.0), ("noise", 1.0)]
    info = describe_augment("flip,rotation=2", strength=0.5)
    assert info["strength"] == 0.5 and [(o["name"], o["strength"]) for o in info["ops"]] == [("flip", 0.5),
                                                                                           ("rotation", 1.0)]
    assert describe_augment("none")["ops"] == []
    for bad in ("medicl", "light,flip", "flip=abc", "rotation=-1"):
        with pytest.raises(ConfigError):
            check_augment(bad)
    with pytest.raises(ConfigError, match="strength"):
        build_augment("medical", strength=-0.1)


def test_augment_plugs_into_batch_loader():
    data = ImageSet(images=torch.randint(0, 256, (10, 1, 16, 16), dtype=torch.uint8),
                    labels=torch.arange(10) % 2, ids=[str(i) for i in range(10)])
    kw = dict(mean=(0.5,) * 3, std=(0.25,) * 3, shuffle=True, seed=3, augment=build_augment("medical"))
    first = [x for x, _ in BatchLoader(data, 4, **kw)]
    again = [x for x, _ in BatchLoader(data, 4, **kw)]
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and first[0].shape == (4, 3, 16, 16)


def test_line_kernel():
    k = line_kernel(5, 0.0)
    assert k.shape == (5, 5) and torch.allclose(k[2], torch.full((5,), 0.2)) and k.sum().item() == pytest.approx(1)
    assert torch.allclose(line_kernel(5, 90.0), k.T)
    assert line_kernel(1, 30.0).tolist() == [[1.0]]


# ----------------------------------------------------------------------------- MixUp / CutMix
def _constant_batch(b=8, size=16):
    """Sample i is the constant image i, label i: a mixed image reveals its mixing weights."""
    x = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, size, size).contiguous()
    return x, torch.arange(b)


@pytest.mark.parametrize("mode", ["mixup", "cutmix", "mixup+cutmix"])
def test_mix_soft_targets_sum_to_one_and_match_the_pixels(mode):
    x, y = _constant_batch()
    for seed in range(5):
        mixed, soft = mix_batch(x, y, num_classes=8, gen=torch.Generator().manual_seed(seed), config=mode)
        assert soft.shape == (8, 8) and torch.allclose(soft.sum(1), torch.ones(8))
        assert torch.equal(x, _constant_batch()[0])  # input untouched
        classes = torch.arange(8, dtype=torch.float32)
        # mixup: every pixel is sum_k w_k * k; cutmix: the share of pixels of value k is w_k
        mean_value = mixed.mean(dim=(1, 2, 3))
        assert torch.allclose(mean_value, soft @ classes, atol=1e-4)
        if mode == "cutmix":
            for i in range(8):
                share = torch.stack([(mixed[i] == k).float().mean() for k in range(8)])
                assert torch.allclose(share, soft[i], atol=1e-6)


def test_mix_is_deterministic_and_loss_accepts_soft_targets():
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    a = mix_batch(x, y, 3, torch.Generator().manual_seed(4), MixConfig("mixup+cutmix"))
    b = mix_batch(x, y, 3, torch.Generator().manual_seed(4), MixConfig("mixup+cutmix"))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    logits = torch.randn(6, 3, requires_grad=True)
    loss = F.cross_entropy(logits, a[1])
    manual = -(a[1] * F.log_softmax(logits, dim=1)).sum(1).mean()
    assert torch.allclose(loss, manual)
    loss.backward()
    assert logits.grad is not None
    weighted = F.cross_entropy(logits, a[1], weight=torch.tensor([1.0, 2.0, 0.5]))
    assert torch.isfinite(weighted)


def test_mix_none_multilabel_and_config_errors():
    x, y = _constant_batch(4)
    same, soft = mix_batch(x, y, 4, torch.Generator().manual_seed(0), "none")
    assert same is x and torch.equal(soft, torch.eye(4))
    never = mix_batch(x, y, 4, torch.Generator().manual_seed(0), MixConfig("mixup", prob=0.0))
    assert torch.equal(never[1], torch.eye(4))
    ml = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.float32)
    _, mixed = mix_batch(x, ml, 3, torch.Generator().manual_seed(1), "mixup")
    assert mixed.shape == (4, 3) and mixed.min() >= 0 and mixed.max() <= 1
    assert not torch.equal(mixed, ml)
    for bad in (dict(mode="mixdown"), dict(mode="mixup", mixup_alpha=0), dict(mode="cutmix", prob=2)):
        with pytest.raises(ConfigError):
            MixConfig(**bad)


# ----------------------------------------------------------------------------- in training
@pytest.mark.parametrize("augment,mix", [("medical", "mixup+cutmix"), ("flip,gamma=0.5", "cutmix")])
def test_training_with_augment_suite_and_mixing(medmnist_root, tmp_path, augment, mix):
    import yaml

    from medpeft.data.base import DataConfig
    from medpeft.run import RunConfig, execute
    from medpeft.train import TrainConfig

    cfg = RunConfig(data=DataConfig(name="breastmnist", root=str(medmnist_root), image_size=32, fraction=0.3),
                    train=TrainConfig(epochs=1, batch_size=16, augment=augment, augment_strength=0.7, mix=mix,
                                      threads=1),
                    backbone="tiny_cnn", method="full", n_boot=50)
    metrics = execute(cfg, out_dir=tmp_path)
    assert 0 <= metrics["test"]["acc"]["value"] <= 1 and metrics["augment"] == augment
    recorded = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert recorded["train"]["augment"] == augment and recorded["train"]["mix"] == mix
    assert recorded["train"]["augment_strength"] == 0.7
    with pytest.raises(ConfigError, match="mix"):
        TrainConfig(mix="mixdown")
    with pytest.raises(ConfigError, match="augmentation"):
        TrainConfig(augment="medicl")


@pytest.mark.parametrize("name", ["flip", "vflip", "rotation", "scale", "elastic"])
def test_masks_stay_aligned_with_their_images_to_a_fraction_of_a_pixel(name):
    """The image of a binary mask, thresholded at 0.5 after bilinear resampling, and the mask resampled
    by nearest neighbour must have the same centroid: torchvision's 'nearest' for masks in
    RandomResizedCrop samples at pixel corners and shifted masks by ~0.3-0.45 px."""
    aug = Augment([(name, 1.0)])
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")

    def centroid(m):
        return torch.stack([(ys * m).sum(), (xs * m).sum()]) / m.sum()

    offsets = []
    for seed in range(30):
        mask = torch.zeros(1, 64, 64, dtype=torch.uint8)
        mask[:, 16:40, 14:40] = 1  # off-centre: every flip moves it
        out_img, out_mask = aug.apply_with_mask(mask.float().expand(3, -1, -1).clone(), mask,
                                                torch.Generator().manual_seed(seed))
        if not torch.equal(out_mask, mask):
            offsets.append(centroid(out_mask[0].float()) - centroid((out_img[0] > 0.5).float()))
    assert offsets, f"{name} never moved the mask"
    offsets = torch.stack(offsets)
    assert offsets.mean(0).abs().max() < 0.05, f"{name}: mean mask offset {offsets.mean(0).tolist()} px"
    assert offsets.abs().max() < 0.5, f"{name}: worst mask offset {offsets.abs().max():.2f} px"
