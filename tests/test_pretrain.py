"""Self-supervised pre-training (issue 17, part 1): MAE's masking and target against the paper's
definitions, the encoder sees only visible tokens, NT-Xent against a reference loop, resumption
equals an uninterrupted run, the weights load into run and change the features, bad input named."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medpeft.errors import ConfigError, DataError
from medpeft.pretrain import (MaeModel, PretrainConfig, mae_target, nt_xent, patchify, pretrain, random_masking)
from toydata import make_toy


def test_random_masking_keeps_exactly_the_unmasked_share():
    visible, mask = random_masking(16, 3, 0.75, torch.Generator().manual_seed(0))
    assert visible.shape == (3, 4) and torch.all(visible[:, 1:] > visible[:, :-1])  # 4 = 16 x 0.25, ascending
    assert torch.all(mask.sum(1) == 12) and torch.all(mask.gather(1, visible) == 0)


def test_patch_order_and_normalised_pixel_target():
    image = torch.arange(2 * 4 * 4, dtype=torch.float32).view(1, 2, 4, 4)  # 2 channels, 2x2 patches of 2 px
    patches = patchify(image, 2)
    assert patches.shape == (1, 4, 8)
    assert patches[0, 1].tolist() == [2, 18, 3, 19, 6, 22, 7, 23]  # patch (0, 1): rows 0-1, cols 2-3, channels last
    target = mae_target(image, 2)[0, 1]
    raw = patches[0, 1]
    assert torch.allclose(target, (raw - raw.mean()) / (raw.var() + 1e-6).sqrt())


def test_nt_xent_matches_a_reference_loop():
    gen = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    total = 0.0
    for i in range(8):
        positive = (i + 4) % 8
        logits = [float(z[i] @ z[j]) / 0.2 for j in range(8) if j != i]
        target = float(z[i] @ z[positive]) / 0.2
        total += -target + math.log(sum(math.exp(v) for v in logits))
    assert nt_xent(z1, z2, 0.2).item() == pytest.approx(total / 8, rel=1e-5)


def test_the_encoder_sees_only_the_visible_tokens():
    from medpeft.backbones import create_backbone

    encoder, info = create_backbone("tiny_vit", num_classes=0, image_size=32, pretrained=False)
    patch = int(info.patch_size)
    n = (32 // patch) ** 2
    model = MaeModel(encoder, patch, n)
    visible, _ = random_masking(n, 2, 0.75, torch.Generator().manual_seed(1))
    out = model(torch.randn(2, 3, 32, 32), visible)
    assert out.shape == (2, n, patch * patch * 3)
    assert model.visible_seen == model.prefix + visible.shape[1]  # prefix tokens + the visible quarter


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("ssl") / "toy", per_class=16, size=32)


def config(folder, **kw):
    return PretrainConfig(**{"data": str(folder), "backbone": "tiny_vit", "ssl": "mae", "image_size": 32, "steps": 6,
                             "batch_size": 4, "checkpoint_every": 3, "lr": 1e-3, **kw})


@pytest.mark.parametrize("ssl", ["mae", "simclr"])
def test_a_killed_run_resumes_to_the_same_weights(folder, tmp_path, ssl):
    from safetensors.torch import load_file

    whole = pretrain(config(folder, ssl=ssl), tmp_path / "whole.safetensors", log=lambda *a: None)
    assert whole["steps"] == 6 and math.isfinite(whole["final_loss"])
    cut = tmp_path / "cut.safetensors"
    assert pretrain(config(folder, ssl=ssl), cut, stop_after=3, log=lambda *a: None) == {"stopped_at": 3}
    assert not cut.exists() and cut.with_name(cut.name + ".ckpt").exists()  # only the checkpoint so far
    pretrain(config(folder, ssl=ssl), cut, resume=True, log=lambda *a: None)
    a, b = load_file(str(tmp_path / "whole.safetensors")), load_file(str(cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_weights_load_into_run_and_change_the_features(folder, tmp_path):
    from medpeft.backbones import create_backbone

    out = tmp_path / "w.safetensors"
    pretrain(config(folder), out, log=lambda *a: None)
    loaded, info = create_backbone("tiny_vit", num_classes=2, image_size=32, weights=str(out))
    fresh, _ = create_backbone("tiny_vit", num_classes=2, image_size=32, pretrained=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(loaded.eval().forward_features(x), fresh.eval().forward_features(x))
    assert info.weights_source.startswith("file:")
    with pytest.raises(ConfigError, match="do not fit"):  # weights of another architecture
        create_backbone("tiny_cnn", num_classes=2, image_size=32, weights=str(out))


def test_bad_input_is_named(folder, tmp_path):
    with pytest.raises(ConfigError, match="mask-ratio 1.2"):
        pretrain(config(folder, mask_ratio=1.2), tmp_path / "x.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        pretrain(config(tmp_path / "empty"), tmp_path / "y.safetensors")
    with pytest.raises(ConfigError, match="--ssl mae needs a ViT backbone"):
        pretrain(config(folder, backbone="tiny_cnn"), tmp_path / "z.safetensors")
    with pytest.raises(ConfigError, match="cannot be merged"):
        pretrain(config(folder, method="adapter"), tmp_path / "w.safetensors")


def test_parameter_efficient_pretraining_moves_only_the_method(folder, tmp_path):
    from safetensors.torch import load_file

    from medpeft.backbones import create_backbone

    out = tmp_path / "bitfit.safetensors"
    pretrain(config(folder, method="bitfit"), out, log=lambda *a: None)
    torch.manual_seed(0)
    start, _ = create_backbone("tiny_vit", num_classes=0, image_size=32)
    before, after = start.state_dict(), load_file(str(out))
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    assert moved and all(k.endswith("bias") for k in moved)  # BitFit: the biases alone moved


def test_a_sweep_uses_pretrained_weights_per_backbone(folder, tmp_path):
    from medpeft.bench.grid import Experiment

    from test_benchmark import run_local, store_rows

    out = tmp_path / "ssl.safetensors"
    pretrain(config(folder, steps=2), out, log=lambda *a: None)
    exp = Experiment.from_mapping(dict(data=[str(folder)], backbones=["tiny_vit"], methods=["linear"], fractions=[1.0],
                                       seeds=1, image_size=32, hpo={"trials": 0}, train={"epochs": 1, "batch_size": 8},
                                       n_boot=20, weights={"tiny_vit": str(out)})).validate()
    run_local(exp, tmp_path / "sweep", report=False)
    final = next(r for r in store_rows(tmp_path / "sweep") if r["kind"] == "final")
    assert final["result"]["metrics"]["weights_source"].startswith("file:")
    with pytest.raises(ConfigError, match="weights for tiny_vit: file"):
        Experiment.from_mapping(dict(data=[str(folder)], backbones=["tiny_vit"], methods=["linear"], fractions=[1.0],
                                     seeds=1, image_size=32, weights={"tiny_vit": str(tmp_path / "nope")})).validate()
