"""BOFT (own code) against its definition and against HF peft's formula.

peft builds butterfly factors > 1 only with a CUDA extension (``FastBlockDiag``); the
reference here runs peft's own layer with that one op replaced by ``torch.block_diag``,
so every other line of the comparison (permutations, Cayley, order of the factors,
scale, merge convention) is peft's.
"""
import math
from unittest import mock

import peft
import pytest
import torch
from peft.tuners.boft import layer as peft_boft
from torch import nn

from medpeft.backbones import create_backbone
from medpeft.errors import ConfigError
from medpeft.methods import apply_methods, build_configs, count_parameters
from medpeft.methods.orthogonal import BoftConfig, BoftLayer, butterfly_permutation


class TorchBlockDiag:
    """peft's CUDA-only op: (N, D, b, b) blocks -> (N, D*b, D*b) block-diagonal matrices."""

    @staticmethod
    def apply(blocks):
        return torch.stack([torch.block_diag(*factor) for factor in blocks])


def peft_reference(base: nn.Module, block: int, factors: int):
    cfg = peft.BOFTConfig(boft_block_size=block, boft_n_butterfly_factor=factors, target_modules=["x"],
                          boft_dropout=0.0)
    cls = peft_boft.Linear if isinstance(base, nn.Linear) else peft_boft.Conv2d
    with mock.patch.object(peft_boft, "get_fbd_cuda", lambda: object()):
        return cls(base, "default", config=cfg)


def skew_of(layer: BoftLayer) -> torch.Tensor:
    m, nblocks, _ = layer.boft_angles.shape
    skew = torch.zeros(m, nblocks, layer.block, layer.block)
    skew[..., layer.rows, layer.cols] = layer.boft_angles.detach()
    return skew - skew.transpose(-1, -2)


@pytest.mark.parametrize("factors", [1, 2, 3])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_boft_matches_peft(kind, factors):
    torch.manual_seed(factors)
    if kind == "linear":
        base, x = nn.Linear(16, 12), torch.randn(5, 16)
    else:  # 4 channels x 2x2 kernel = 16 inputs per output
        base, x = nn.Conv2d(4, 6, 2, stride=2), torch.randn(2, 4, 6, 6)
    ref = peft_reference(nn.Linear(16, 12) if kind == "linear" else nn.Conv2d(4, 6, 2, stride=2), 4, factors)
    ref.base_layer.load_state_dict(base.state_dict())
    base_weight = base.weight.detach().clone()
    ours = BoftLayer(base, 4, factors, "x")
    with torch.no_grad():
        ours.boft_angles.normal_(0, 0.3)
        ours.boft_scale.normal_(1, 0.1)
        ref.boft_R["default"].copy_(skew_of(ours))
        ref.boft_s["default"].copy_(ours.boft_scale.view_as(ref.boft_s["default"]))
    with mock.patch.object(peft_boft, "FastBlockDiag", TorchBlockDiag):
        expected = ref(x)
        ref.merge()
    assert torch.allclose(ours(x), expected, atol=1e-5)
    ours.merge()
    assert torch.allclose(ours.get_base_layer().weight, ref.get_base_layer().weight, atol=1e-5)
    assert torch.allclose(ours(x), expected, atol=1e-5)  # merged: the base layer alone gives the same
    ours.unmerge()  # W = (W' / s) R restores the pretrained weight
    assert torch.allclose(ours.get_base_layer().weight, base_weight, atol=1e-5)
    assert torch.allclose(ours(x), expected, atol=1e-5)


def test_butterfly_permutation_pairs_half_blocks_2_to_the_level_apart():
    assert butterfly_permutation(8, 4, 0).tolist() == list(range(8))
    assert butterfly_permutation(8, 4, 1).tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    assert butterfly_permutation(16, 2, 2).tolist() == [0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15]
    for level in range(4):  # always a permutation
        assert sorted(butterfly_permutation(32, 4, level).tolist()) == list(range(32))


def test_rotation_is_orthogonal_and_butterflies_reach_every_input():
    torch.manual_seed(0)
    size, block = 32, 4
    full = int(math.log2(size // block)) + 1  # factors whose span b*2^(m-1) is the whole input
    for factors in (1, 2, full):
        layer = BoftLayer(nn.Linear(size, 8), block, factors, "x")
        with torch.no_grad():
            layer.boft_angles.normal_(0, 0.5)
        rotation = layer.rotation().detach()
        assert torch.allclose(rotation @ rotation.t(), torch.eye(size), atol=1e-5)
        span = block * 2 ** (factors - 1)
        nonzero = rotation.abs() > 1e-7
        for start in range(0, size, span):  # dims interact only inside spans of b*2^(m-1)
            window = slice(start, start + span)
            assert nonzero[window, window].all()
            assert nonzero[window].sum() == nonzero[window, window].sum()
    assert span == size


def test_boft_trainable_count_is_the_formula():
    def count(name, family, block, factors):
        torch.manual_seed(0)
        model = create_backbone(name, 3, 32, pretrained=False)[0]
        apply_methods(model, ["boft"], build_configs(["boft"], {"boft_block_size": block, "boft_factors": factors}), family)
        targets = [m.base for m in model.modules() if isinstance(m, BoftLayer)]
        formula = sum(factors * (t.weight[0].numel() // block) * block * (block - 1) // 2 + t.weight.shape[0]
                      for t in targets)
        head = sum(p.numel() for p in model.get_classifier().parameters())
        return count_parameters(model)["trainable"], formula + head, len(targets)

    trained, formula, n = count("tiny_vit", "vit", 4, 2)
    assert (trained, n) == (formula, 2)  # one fused qkv per block
    trained, formula, n = count("tiny_cnn", "cnn", 2, 3)
    assert (trained, n) == (formula, 8)  # every 1x1 conv


def test_boft_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="even"):
        BoftConfig(block_size=3, factors=2)
    with pytest.raises(ValueError, match="factors"):
        BoftConfig(factors=0)
    with pytest.raises(ConfigError, match="blocks.0.attn.qkv.*32.*64"):
        model = create_backbone("tiny_vit", 3, 32, pretrained=False)[0]
        apply_methods(model, ["boft"], build_configs(["boft"], {"boft_block_size": 8, "boft_factors": 4}), "vit")
    with pytest.raises(ConfigError, match="grouped"):
        BoftLayer(nn.Conv2d(8, 8, 3, groups=8), 4, 1, "dw")
