"""Selective, reparameterisation, scaling and TSA methods: trainable counts against the
formulas, and the numbers against the definitions / HF peft."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medpeft.backbones import create_backbone
from medpeft.errors import ConfigError
from medpeft.methods import apply_methods, build_configs, count_parameters, merge_methods
from medpeft.methods.lora import FusedQKVLoRA, LoraConfig, apply_lora_layers

NUM_CLASSES = 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def vit():
    torch.manual_seed(0)
    return create_backbone("tiny_vit", NUM_CLASSES, 32, pretrained=False)[0].eval()


def cnn():
    torch.manual_seed(0)
    return create_backbone("tiny_cnn", NUM_CLASSES, 32, pretrained=False)[0].eval()


def adapt(model, spec, family, **options):
    names = spec.split("+")
    return apply_methods(model, names, build_configs(names, options), family)


def trainable(model):
    return count_parameters(model)["trainable"]


def head_size(model):
    return sum(p.numel() for p in model.get_classifier().parameters())


def vit_dims(model):
    d = model.embed_dim
    return d, model.blocks[0].mlp.fc1.out_features, len(model.blocks)


def convs(model, kernel=None):
    out = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return [m for m in out if kernel is None or m.kernel_size == kernel]


def bns(model):
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def numel(module):
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- trainable counts: ViT


def test_vit_counts_match_the_formulas():
    d, h, depth = vit_dims(vit())
    head = d * NUM_CLASSES + NUM_CLASSES
    block = 2 * (2 * d) + (3 * d * d + 3 * d) + (d * d + d) + (d * h + h) + (h * d + d)
    r = 8
    expected = {
        # patch-embed bias, per block norm1/qkv/proj/norm2/fc1/fc2 biases, final norm bias
        "bitfit": d + depth * (d + 3 * d + d + d + h + d) + d,
        "partial": block + 2 * d,  # last block + final norm
        "norm": depth * 2 * (2 * d) + 2 * d,
        "attention": depth * (4 * d * d + 4 * d),
        "lora": depth * 2 * r * (d + d),  # q and v slices: A (r x d) and B (d x r) each
        "dora": depth * (r * (d + 3 * d) + 3 * d),  # peft on the whole qkv + one magnitude per output
        "ia3": depth * (2 * d + h),  # l_k, l_v, l_ff
        # patch embed, per block norm1 qkv proj norm2 fc1 fc2, final norm: gamma and beta each
        "ssf": 2 * (d + depth * (d + 3 * d + d + d + h + d) + d),
        "loha": depth * 2 * r * (d + 3 * d),  # two rank-r products of qkv's shape
        "oft": depth * (d // 8) * (8 * 7 // 2),  # d/b blocks of b(b-1)/2 free entries (b = 8)
        "vera": depth * (3 * d + 256),  # lambda_b (out) + lambda_d (r)
    }
    for method, count in expected.items():
        model = adapt(vit(), method, "vit")
        assert trainable(model) - head_size(model) == count, method


def test_partial_k_trains_last_k_blocks_and_checks_k():
    model = adapt(vit(), "partial", "vit", partial_k=2)
    assert all(p.requires_grad for p in model.blocks.parameters())
    assert not model.patch_embed.proj.weight.requires_grad and not model.pos_embed.requires_grad
    with pytest.raises(ConfigError, match="partial_k=3 exceeds the 2 blocks"):
        adapt(vit(), "partial", "vit", partial_k=3)
    with pytest.raises(ConfigError, match="k must be >= 1"):
        build_configs(["partial"], {"partial_k": 0})


def test_attention_trains_only_attention_layers():
    model = adapt(vit(), "attention", "vit")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {n for n, _ in model.named_parameters() if ".attn." in n or n.startswith("head.")}


# --------------------------------------------------------------------------- trainable counts: CNN


def test_cnn_counts_match_the_formulas():
    base = cnn()
    channels = sum(bn.num_features for bn in bns(base))
    pw = convs(base, (1, 1))
    spatial_stage_convs = [m for n, m in base.named_modules()
                           if isinstance(m, nn.Conv2d) and n.startswith("blocks.") and m.kernel_size != (1, 1)]
    assert all(m.groups == m.in_channels for m in spatial_stage_convs)  # tiny_cnn: depthwise only
    r = 8
    expected = {
        "bitfit": channels,  # BN biases (convs have none)
        "norm": 2 * channels,
        "ssf": 2 * channels,  # gamma, beta after every BN (same count as norm tuning)
        "partial": numel(base.blocks[-1]) + numel(base.conv_head) + numel(base.bn2),
        "ia3": sum(m.out_channels for m in pw),
        "lora": sum(r * (m.in_channels + m.out_channels) for m in pw),
        "dora": sum(r * (m.in_channels + m.out_channels) + m.out_channels for m in pw),
        "loha": sum(2 * r * (m.in_channels + m.out_channels) for m in pw),
        "oft": sum((m.in_channels // 8) * 28 for m in pw),
        "tsa": sum(m.out_channels for m in spatial_stage_convs),  # per-channel alpha on depthwise convs
    }
    for method, count in expected.items():
        model = adapt(cnn(), method, "cnn")
        assert trainable(model) - head_size(model) == count, method
    stage_convs = [m for n, m in base.named_modules() if isinstance(m, nn.Conv2d) and n.startswith("blocks.")]
    model = adapt(cnn(), "tsa", "cnn", tsa_convs="all")
    assert trainable(model) - head_size(model) == sum(m.out_channels * m.in_channels // m.groups for m in stage_convs)
    model = adapt(cnn(), "ia3", "cnn", ia3_cnn_targets="conv")
    assert trainable(model) - head_size(model) == sum(m.out_channels for m in convs(base))


def test_partial_on_cnn_trains_last_stages_and_top():
    model = adapt(cnn(), "partial", "cnn", partial_k=2)
    trained = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks.") else "")
               for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"blocks.1", "blocks.2", "conv_head", "bn2", "classifier"}
    with pytest.raises(ConfigError, match="exceeds the 3 stages"):
        adapt(cnn(), "partial", "cnn", partial_k=4)


# --------------------------------------------------------------------------- LoRA vs peft, conv guards


def _qkv():
    torch.manual_seed(0)
    return nn.Linear(16, 48)


def test_fused_qkv_lora_on_all_slots_equals_peft_lora_with_the_same_factors():
    import peft

    rank, alpha = 4, 8.0
    ours = FusedQKVLoRA(_qkv(), "qkv", rank, alpha)
    torch.manual_seed(1)
    a = torch.randn(rank, 16)
    b = torch.randn(48, rank)
    with torch.no_grad():
        for i, slot in enumerate("qkv"):
            ours.lora_A[slot].copy_(a)
            ours.lora_B[slot].copy_(b[i * 16:(i + 1) * 16])
    ref = nn.Sequential()
    ref.add_module("qkv", _qkv())
    peft.inject_adapter_in_model(peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["qkv"]), ref)
    with torch.no_grad():
        ref.qkv.lora_A["default"].weight.copy_(a)
        ref.qkv.lora_B["default"].weight.copy_(b)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours(x), _qkv()(x) + (x @ a.t() @ b.t()) * alpha / rank, rtol=1e-5, atol=1e-6)


def test_fused_qkv_lora_qv_leaves_the_k_slice_alone():
    layer = FusedQKVLoRA(_qkv(), "qv", 4, 8.0)
    with torch.no_grad():
        for slot in "qv":
            layer.lora_B[slot].normal_()
    assert set(layer.lora_A) == {"q", "v"}
    x = torch.randn(2, 5, 16)
    base, out = _qkv()(x), layer(x)
    assert torch.equal(out[..., 16:32], base[..., 16:32])  # k: exactly the base output
    for i, slot in ((0, "q"), (2, "v")):
        delta = x @ layer.lora_A[slot].t() @ layer.lora_B[slot].t() * 2.0
        torch.testing.assert_close(out[..., i * 16:(i + 1) * 16], base[..., i * 16:(i + 1) * 16] + delta)


def test_conv_lora_skips_depthwise_convs_and_guards_the_rank():
    model = adapt(cnn(), "lora", "cnn", lora_targets="conv", lora_rank=2)
    from peft.tuners.lora import LoraLayer

    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    depthwise = {n for n, m in cnn().named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}
    assert depthwise and not wrapped & depthwise
    assert "conv_stem" in wrapped and "blocks.1.0.conv_pw" in wrapped  # full convs, 3x3 and 1x1
    with pytest.raises(ConfigError, match=r"rank 16 exceeds the channels of conv .*\(8->8\)"):
        adapt(cnn(), "lora", "cnn", lora_rank=16)
    with pytest.raises(ConfigError, match="DoRA rank 16 exceeds|rank 16 exceeds"):
        adapt(cnn(), "dora", "cnn", dora_rank=16)


# --------------------------------------------------------------------------- DoRA


def test_dora_matches_its_definition():
    model = adapt(vit(), "dora", "vit", dora_rank=4, dora_alpha=8.0)
    layer = model.blocks[0].attn.qkv
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(std=0.5)
        layer.lora_magnitude_vector["default"].weight.mul_(torch.rand(96) + 0.5)
    w0, b0 = layer.base_layer.weight, layer.base_layer.bias
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    w = w0 + 2.0 * b @ a
    expected_weight = m[:, None] * w / w.norm(dim=1, keepdim=True)  # magnitude x unit-norm rows
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ expected_weight.t() + b0, rtol=1e-4, atol=1e-5)


def test_dora_refuses_layers_already_scaled_by_ssf_or_ia3():
    for spec in ("ssf+dora", "ia3+dora"):
        with pytest.raises(ConfigError, match="list DoRA first"):
            adapt(vit(), spec, "vit")
    adapt(cnn(), "ssf+dora", "cnn")  # SSF on a CNN hooks the BNs, not DoRA's convs


def test_dora_refuses_qv_slices():
    with pytest.raises(ConfigError, match="DoRA on q/v"):
        apply_lora_layers(vit(), LoraConfig(targets="qv"), use_dora=True)
    with pytest.raises(ConfigError, match="qv"):
        build_configs(["dora"], {"dora_targets": "qv"})
    with pytest.raises(ConfigError, match="do not apply to a CNN"):
        adapt(cnn(), "dora", "cnn", dora_targets="qkv")


# --------------------------------------------------------------------------- (IA)^3


def test_ia3_scales_only_k_and_v_and_the_fc2_input():
    base = vit()
    model = adapt(copy.deepcopy(base), "ia3", "vit")
    side = model.blocks[0].attn.ia3_qkv
    with torch.no_grad():
        side.scale_k.uniform_(0.5, 1.5)
        side.scale_v.uniform_(0.5, 1.5)
        model.blocks[0].mlp.ia3_fc2.scale.uniform_(0.5, 1.5)
    x = torch.randn(2, 5, 32)
    ref = base.blocks[0].attn.qkv(x)
    out = model.blocks[0].attn.qkv(x)
    d = 32
    assert torch.equal(out[..., :d], ref[..., :d])
    torch.testing.assert_close(out[..., d:2 * d], ref[..., d:2 * d] * side.scale_k)
    torch.testing.assert_close(out[..., 2 * d:], ref[..., 2 * d:] * side.scale_v)
    hidden = torch.randn(2, 5, 128)
    torch.testing.assert_close(model.blocks[0].mlp.fc2(hidden),
                               base.blocks[0].mlp.fc2(hidden * model.blocks[0].mlp.ia3_fc2.scale))
    merge_methods(model)
    torch.testing.assert_close(model.blocks[0].attn.qkv(x)[..., d:2 * d], ref[..., d:2 * d] * side.scale_k)


# --------------------------------------------------------------------------- SSF


def test_ssf_on_cnn_acts_between_bn_and_activation():
    base = cnn()
    model = adapt(copy.deepcopy(base), "ssf", "cnn")
    bn = model.blocks[1][0].bn1  # BatchNormAct2d with ReLU
    side = model.blocks[1][0].ssf_bn1
    with torch.no_grad():
        side.scale.fill_(-1.0)  # before the ReLU a sign flip matters; after it would not be folded
        side.shift.fill_(0.5)
    x = torch.randn(2, 24, 8, 8)
    ref = base.blocks[1][0].bn1
    pre_act = F.batch_norm(x, ref.running_mean, ref.running_var, ref.weight, ref.bias, False, 0.0, ref.eps)
    torch.testing.assert_close(bn(x), torch.relu(-pre_act + 0.5))


def test_ssf_on_vit_has_one_vector_pair_per_site():
    model = adapt(vit(), "ssf", "vit")
    from medpeft.methods.scaling import ScaleShift

    sites = [n for n, m in model.named_modules() if isinstance(m, ScaleShift)]
    assert len(sites) == 1 + 6 * len(model.blocks) + 1
    assert "patch_embed.ssf_proj" in sites and "ssf_norm" in sites
    assert {s.split(".")[-1] for s in sites if s.startswith("blocks.0.")} == {
        "ssf_norm1", "ssf_qkv", "ssf_proj", "ssf_norm2", "ssf_fc1", "ssf_fc2"}


def test_ssf_shift_is_not_a_bias_for_bitfit():
    from medpeft.methods.selective import apply_bitfit

    model = adapt(vit(), "ssf", "vit")
    for p in model.parameters():
        p.requires_grad_(False)
    apply_bitfit(model, None)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".ssf_" in n or n.startswith("ssf_"))
    assert model.blocks[0].attn.qkv.bias.requires_grad


def test_ssf_merge_into_a_linear_without_bias_adds_one():
    from medpeft.methods.scaling import ScaleShift

    layer = nn.Linear(4, 3, bias=False)
    side = ScaleShift("x", 3, -1)
    with torch.no_grad():
        side.scale.uniform_(0.5, 1.5)
        side.shift.normal_()
    x = torch.randn(5, 4)
    expected = side(layer(x))
    side.fold(layer)
    torch.testing.assert_close(layer(x), expected)


# --------------------------------------------------------------------------- TSA


class OneConv(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x)


def test_tsa_equals_the_papers_strided_1x1_on_same_padded_convs():
    model = OneConv(nn.Conv2d(6, 5, 3, stride=2, padding=1))
    from medpeft.methods.cnn_adapters import ResidualAdapter
    from medpeft.methods.scaling import attach

    side = ResidualAdapter("conv", model.conv, "zero")
    with torch.no_grad():
        side.alpha.normal_()
    attach(model, "conv", side)
    x = torch.randn(2, 6, 9, 9)
    expected = F.conv2d(x, model.conv.weight, model.conv.bias, stride=2, padding=1) + F.conv2d(x, side.alpha, stride=2)
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("size", [8, 9])
def test_tsa_merges_into_tf_same_padded_convs(size):
    from timm.layers import Conv2dSame

    from medpeft.methods.cnn_adapters import ResidualAdapter
    from medpeft.methods.merging import merge_layers
    from medpeft.methods.scaling import attach

    torch.manual_seed(0)
    model = OneConv(Conv2dSame(4, 4, 3, stride=2, groups=4, bias=False))  # depthwise, dynamic padding
    side = ResidualAdapter("conv", model.conv, "zero")
    assert side.alpha.shape == (4, 1, 1, 1)
    with torch.no_grad():
        side.alpha.normal_()
    attach(model, "conv", side)
    x = torch.randn(2, 4, size, size)
    unmerged = model(x)
    merge_layers(model)
    assert not hasattr(model, "tsa_conv") and not model.conv._forward_hooks
    torch.testing.assert_close(model(x), unmerged)


def test_tsa_eye_init_is_the_papers_scaled_identity_and_config_errors():
    model = adapt(cnn(), "tsa", "cnn", tsa_convs="all", tsa_init="eye")
    alpha = model.blocks[1][0].tsa_conv_pwl.alpha  # 24 -> 16 pointwise: rectangular identity x 1e-4
    torch.testing.assert_close(alpha[:, :, 0, 0], 1e-4 * torch.eye(16, 24))
    assert torch.all(model.blocks[1][0].tsa_conv_dw.alpha == 1e-4)  # depthwise: per-channel
    with pytest.raises(ConfigError, match="convs 'some' not one of"):
        build_configs(["tsa"], {"tsa_convs": "some"})


def test_attached_methods_work_inside_sequential_containers_of_a_resnet():
    """ResNet's downsample is an nn.Sequential(conv, bn): side modules must not become layers of it."""
    import timm

    torch.manual_seed(0)
    base = timm.create_model("resnet18", pretrained=False, num_classes=NUM_CLASSES).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = base(x)
    for spec in ("ssf", "tsa", "ia3"):
        model = adapt(copy.deepcopy(base), spec, "cnn")
        assert len(model.layer2[0].downsample) == 2
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref)
            for name, p in model.named_parameters():
                if p.requires_grad and not name.startswith("fc."):
                    p.add_(0.05 * torch.randn_like(p))
            unmerged = model(x)
            merge_methods(model)
            torch.testing.assert_close(model(x), unmerged, rtol=1e-4, atol=1e-4)
        assert set(model.state_dict()) == set(base.state_dict())
    model = adapt(copy.deepcopy(base), "ssf", "cnn")
    assert hasattr(model.layer2[0], "ssf_downsample_1")
    model = adapt(copy.deepcopy(base), "tsa", "cnn")  # the paper's setting: every 3x3 conv of layer1..4
    tsa = [n for n, _ in model.named_modules() if ".tsa_" in n]
    assert len(tsa) == 8 * 2 and all(n.endswith(("tsa_conv1", "tsa_conv2")) for n in tsa)
