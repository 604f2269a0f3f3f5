"""The diffusion generator (issue 18, part 1): each adaptation method trains exactly its
parameters, merged == unmerged, save -> load gives identical samples, and samples feed --synthetic."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from medpeft import generator  # noqa: E402
from medpeft.data import load_data  # noqa: E402
from medpeft.data.base import DataConfig  # noqa: E402
from medpeft.errors import ConfigError  # noqa: E402
from toydata import make_toy  # noqa: E402


def tiny(num_classes=2):
    torch.manual_seed(0)
    return generator.build_unet(16, 1, num_classes, width=8)


@pytest.mark.parametrize("method", ["bitfit", "norm", "lora", "dora", "full"])
def test_each_method_trains_its_parameters_and_merges_exactly(method):
    unet = tiny()
    generator.apply_method(unet, method, rank=2)
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert any(n.startswith("class_embedding") for n in trainable)  # the class embedding always trains
    others = {n for n in trainable if not n.startswith("class_embedding")}
    if method == "bitfit":
        assert others and all(n.endswith(".bias") for n in others)
    elif method in ("lora", "dora"):
        assert others and all("lora_" in n for n in others)
    elif method == "norm":
        assert others and all("norm" in n for n in others)
    else:
        assert others == {n for n, _ in unet.named_parameters()} - {n for n in trainable if n.startswith("class_")}
    with torch.no_grad():  # as if trained: every trainable tensor moves
        for p in unet.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([10, 500]), torch.tensor([0, 1])
    with torch.no_grad():
        before = unet(x, t, class_labels=y).sample
        after = generator.merged(unet)(x, t, class_labels=y).sample
    assert torch.allclose(before, after, atol=1e-4)
    assert set(generator.merged(unet).state_dict()) == set(tiny().state_dict())  # plain UNet keys


def test_pretrain_adapt_sample_round_trip_and_synthetic_use(tmp_path):
    source = make_toy(tmp_path / "source", per_class=10, size=16)
    target = make_toy(tmp_path / "target", per_class=10, size=16)
    log = lambda *a: None  # noqa: E731
    generator.run_pretrain(str(source), tmp_path / "base", image_size=16, steps=2, batch_size=4, log=log)
    meta = generator.run_adapt(tmp_path / "base", str(target), tmp_path / "lora", method="lora", steps=2,
                               batch_size=4, rank=2, log=log)
    assert 0 < meta["trainable"] < meta["total"] and meta["method"] == "lora"
    unet, loaded = generator.load(tmp_path / "lora")
    labels = torch.tensor([0, 1])
    a, b = generator.sample(unet, labels, seed=3, steps=3), generator.sample(generator.load(tmp_path / "lora")[0],
                                                                              labels, seed=3, steps=3)
    assert a.dtype == torch.uint8 and a.shape == (2, 1, 16, 16) and torch.equal(a, b)  # save -> load: same samples
    manifest = generator.run_sample(tmp_path / "lora", tmp_path / "synth", per_class=3)
    mixed = load_data(DataConfig(name=str(target), image_size=16, audit="off", synthetic=manifest))
    assert mixed.split_info["synthetic"]["n_synthetic"] == 6
    with pytest.raises(ConfigError, match="not a generator folder"):
        generator.load(tmp_path)
    with pytest.raises(ConfigError, match="generator method 'ia3'"):
        generator.run_adapt(tmp_path / "base", str(target), tmp_path / "x", method="ia3")


def test_build_unet_refuses_a_size_its_two_downsamplings_cannot_take():
    with pytest.raises(ConfigError, match="generator image size 18 must be a multiple of 4"):
        generator.build_unet(18, 1, 2, width=8)
