"""ViT-side methods (VPT, prefix, adapters, AdaptFormer, FacT): trainable sets and counts against
the papers' formulas, identity at init, reference forwards written out here from the papers'
definitions, hybrids, save/load, FacT merge, dynamic image sizes, and the real DINOv2 backbone."""
from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer

from medpeft.backbones import create_backbone
from medpeft.errors import ConfigError
from medpeft.methods import (apply_methods, build_configs, count_parameters, get_method, load_trained_state,
                             merge_methods, trained_state_dict)

D, DEPTH, HEADS = 32, 2, 2  # tiny_vit: patch 4, width 32, 2 blocks, 2 heads, mlp ratio 4
METHODS = ["vpt_shallow", "vpt_deep", "prefix", "adapter", "pfeiffer", "adaptformer", "fact"]
IDENTITY = ["adapter", "pfeiffer", "adaptformer", "fact"]
HEAD = {"head.weight", "head.bias"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small matmuls on a shared 2-core machine: extra threads only spin (ViT-S forward 26 ms vs ~0.9 s)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_base():
    torch.manual_seed(0)
    model, _ = create_backbone("tiny_vit", num_classes=2, image_size=32, pretrained=False)
    return model.eval()


def tiny_vit(**kwargs) -> VisionTransformer:
    """tiny ViT variants: LayerScale, register tokens, average pooling, no class token."""
    torch.manual_seed(1)
    args = dict(img_size=32, patch_size=4, embed_dim=D, depth=DEPTH, num_heads=HEADS, num_classes=2,
                dynamic_img_size=True)
    return VisionTransformer(**{**args, **kwargs}).eval()


def adapted(base, names, options=None, seed=0):
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    apply_methods(model, names, build_configs(names, options or {}), "vit")
    return model.eval()


def images(size=32, n=3, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def randomize_trainable(model, seed=0):
    """Stand-in for training: every trained tensor gets a visible, reproducible change."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))


# --------------------------------------------------------------------------- trainable sets and counts

P, R = 10, 8  # defaults: prompt/prefix tokens, bottleneck / FacT rank
ADAPTER = 2 * D * R + R + D  # down (D*r + r) + up (r*D + D)
SLOTS = 4 + 2 * 4  # FacT: q, k, v, proj + 4 fc1 chunks + 4 fc2 chunks (mlp ratio 4)


def _per_block(template):
    return {template.format(i=i) for i in range(DEPTH)}


def _adapter_names(slot, method):
    return set().union(*(_per_block(f"blocks.{{i}}.{slot}.{method}.{lin}.{t}") for lin in ("down", "up")
                         for t in ("weight", "bias")))


EXPECTED = {
    # name, options: (trainable names besides the head, count from the paper's formula)
    ("vpt_shallow", None): ({"blocks.0.prompt.tokens"}, P * D),
    ("vpt_deep", None): (_per_block("blocks.{i}.prompt.tokens"), DEPTH * P * D),
    ("prefix", None): (_per_block("blocks.{i}.attn.prefix.key") | _per_block("blocks.{i}.attn.prefix.value"),
                       DEPTH * 2 * P * D),
    ("prefix", "reparam"): ({"prefix_encoder.embedding", "prefix_encoder.mlp.0.weight", "prefix_encoder.mlp.0.bias",
                             "prefix_encoder.mlp.2.weight", "prefix_encoder.mlp.2.bias"},
                            P * D + D * 512 + 512 + 512 * DEPTH * 2 * D + DEPTH * 2 * D),
    ("adapter", None): (_adapter_names("after_attn", "adapter") | _adapter_names("after_mlp", "adapter"),
                        DEPTH * 2 * ADAPTER),
    ("pfeiffer", None): (_adapter_names("after_mlp", "pfeiffer"), DEPTH * ADAPTER),
    ("adaptformer", None): (_adapter_names("parallel_mlp", "adaptformer"), DEPTH * ADAPTER),
    ("fact", None): ({"fact.u", "fact.v", "fact.cores"}, 2 * D * R + DEPTH * SLOTS * R * R),
    ("fact", "tk"): ({"fact.u", "fact.v", "fact.core", "fact.factor"}, 2 * D * R + R ** 3 + DEPTH * SLOTS * R),
}
OPTIONS = {"reparam": {"prefix_reparam": True}, "tk": {"fact_format": "tk"}, None: {}}


@pytest.mark.parametrize("name,variant", list(EXPECTED), ids=[f"{n}-{v}" if v else n for n, v in EXPECTED])
def test_only_method_params_get_gradients_and_count_matches_formula(tiny_base, name, variant):
    model = adapted(tiny_base, [name], OPTIONS[variant])
    names, count = EXPECTED[(name, variant)]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == names | HEAD
    assert count_parameters(model)["trainable_without_head"] == count
    assert not names & set(tiny_base.state_dict()), "a method must not train backbone weights"

    model.train()
    F.cross_entropy(model(images()), torch.tensor([0, 1, 1])).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == names | HEAD


def test_registry_flags_and_families():
    for name in METHODS:
        spec = get_method(name)
        assert spec.families == ("vit",)
        assert spec.identity_at_init == (name in IDENTITY), name
        assert spec.mergeable == (name == "fact"), name


# --------------------------------------------------------------------------- identity / activity at init


@pytest.mark.parametrize("name", IDENTITY + ["fact-tk"])
def test_identity_methods_give_base_logits_at_init(name):
    base = tiny_vit(init_values=0.5, reg_tokens=1)  # LayerScale and a register token (DINOv2-like)
    method, variant = (name.split("-") + [None])[:2]
    model = adapted(base, [method], OPTIONS[variant])
    for size in (32, 48):
        x = images(size)
        assert (model(x) - base(x)).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", ["vpt_shallow", "vpt_deep", "prefix"])
def test_prompt_methods_change_the_logits(tiny_base, name):
    model = adapted(tiny_base, [name])
    assert (model(images()) - tiny_base(images())).abs().max().item() > 1e-4


# --------------------------------------------------------------------------- VPT against its definition


def vpt_reference(model, x, prompt_list, offset):
    """VPT written out (Jia et al. 2022): insert after the prefix tokens before block 0; deep prompts
    replace the previous ones before each later block; prompts dropped before the final norm."""
    h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    p = prompt_list[0].shape[0]
    for i, block in enumerate(model.blocks):
        if i < len(prompt_list):
            tokens = prompt_list[i].unsqueeze(0).expand(h.shape[0], -1, -1)
            skip = 0 if i == 0 else p
            h = torch.cat([h[:, :offset], tokens, h[:, offset + skip:]], dim=1)
        h = Block.forward(block, h)  # timm's own block forward
    h = torch.cat([h[:, :offset], h[:, offset + p:]], dim=1)
    return model.forward_head(model.norm(h))


@pytest.mark.parametrize("deep", [False, True])
@pytest.mark.parametrize("variant", [dict(), dict(global_pool="avg", reg_tokens=2),
                                     dict(global_pool="avg", class_token=False), dict(init_values=0.3)],
                         ids=["token", "avg+reg", "avg-nocls", "layerscale"])
def test_vpt_matches_reference_forward(deep, variant):
    base = tiny_vit(**variant)
    model = adapted(base, ["vpt_deep" if deep else "vpt_shallow"], {"vpt_deep_num_tokens": 3,
                                                                    "vpt_shallow_num_tokens": 3})
    prompt_list = [b.prompt.tokens for b in model.blocks if b.prompt is not None]
    assert len(prompt_list) == (DEPTH if deep else 1)
    x = images()
    with torch.no_grad():
        expected = vpt_reference(model, x, prompt_list, base.num_prefix_tokens)
        assert (model(x) - expected).abs().max().item() < 1e-5
        # and the prompts matter (a reference that ignored them would differ)
        assert (model(x) - base(x)).abs().max().item() > 1e-4


@pytest.mark.parametrize("name", ["vpt_shallow", "vpt_deep"])
def test_vpt_sequence_lengths_and_prompt_positions(tiny_base, name):
    model = adapted(tiny_base, [name], {f"{name}_num_tokens": 5})
    seen = {}
    # block 1's first layer: after block 1 placed its prompts (deep) or carried block 0's (shallow)
    model.blocks[1].norm1.register_forward_pre_hook(lambda m, args: seen.__setitem__("block1", args[0]))
    model.norm.register_forward_pre_hook(lambda m, args: seen.__setitem__("norm", args[0]))
    for size in (32, 48):  # dynamic_img_size: two grids
        n = 1 + (size // 4) ** 2
        with torch.no_grad():
            assert model(images(size)).shape == (3, 2)
        assert seen["block1"].shape[1] == n + 5
        assert seen["norm"].shape[1] == n  # prompts gone before the final norm / pooling
    tokens = seen["block1"][:, 1:6]
    if name == "vpt_deep":  # block 1 sees its own fresh prompts ...
        assert torch.equal(tokens, model.blocks[1].prompt.tokens.expand_as(tokens))
    else:  # ... shallow prompts are block 0's outputs
        assert not torch.allclose(tokens, model.blocks[0].prompt.tokens.expand_as(tokens))


def test_vpt_init_follows_the_vpt_bound(tiny_base):
    model = adapted(tiny_base, ["vpt_deep"], {"vpt_deep_num_tokens": 200})
    bound = math.sqrt(6.0 / (3 * 4 * 4 + D))
    tokens = torch.stack([b.prompt.tokens for b in model.blocks])
    assert tokens.abs().max() <= bound and tokens.abs().max() > 0.9 * bound


# --------------------------------------------------------------------------- prefix against its definition


def attention_reference(attn, h, key, value):
    """softmax(q [Pk; K]^T / sqrt(d)) [Pv; V] per head, written out."""
    B, N, C = h.shape
    qkv = F.linear(h, attn.qkv.weight, attn.qkv.bias).reshape(B, N, 3, attn.num_heads, attn.head_dim)
    heads = []
    for j in range(attn.num_heads):
        q, k, v = qkv[:, :, 0, j], qkv[:, :, 1, j], qkv[:, :, 2, j]
        pk, pv = key[:, j * attn.head_dim:(j + 1) * attn.head_dim], value[:, j * attn.head_dim:(j + 1) * attn.head_dim]
        k = torch.cat([pk.expand(B, -1, -1), k], dim=1)
        v = torch.cat([pv.expand(B, -1, -1), v], dim=1)
        weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(attn.head_dim), dim=-1)
        heads.append(weights @ v)
    return F.linear(torch.cat(heads, dim=-1), attn.proj.weight, attn.proj.bias)


def test_prefix_matches_reference_attention(tiny_base):
    model = adapted(tiny_base, ["prefix"], {"prefix_num_tokens": 4})
    h = torch.randn(2, 17, D)
    for block in model.blocks:
        attn = block.attn
        with torch.no_grad():
            got = attn(h)
            assert (got - attention_reference(attn, h, attn.prefix.key, attn.prefix.value)).abs().max() < 1e-5
            assert (got - tiny_base.blocks[0].attn(h)).abs().max() > 1e-4


def test_prefix_reparam_is_an_mlp_of_one_embedding(tiny_base):
    model = adapted(tiny_base, ["prefix"], {"prefix_reparam": True, "prefix_num_tokens": 4})
    enc = model.prefix_encoder
    with torch.no_grad():
        full = enc.mlp(enc.embedding).reshape(4, DEPTH, 2, D)  # Li & Liang: all layers from one MLP
        h = torch.randn(2, 17, D)
        for i, block in enumerate(model.blocks):
            got = block.attn(h)
            assert (got - attention_reference(block.attn, h, full[:, i, 0], full[:, i, 1])).abs().max() < 1e-5


def test_prefix_with_attention_mask_lets_every_query_see_the_prefixes(tiny_base):
    model = adapted(tiny_base, ["prefix"], {"prefix_num_tokens": 4})
    attn, h = model.blocks[0].attn, torch.randn(2, 17, D)
    with torch.no_grad():
        full = attn(h)
        assert (attn(h, attn_mask=torch.ones(17, 17, dtype=torch.bool)) - full).abs().max() < 1e-6
        assert (attn(h, attn_mask=torch.zeros(17, 17)) - full).abs().max() < 1e-6


# --------------------------------------------------------------------------- adapters against their definitions


def test_adapters_match_their_equations():
    base = tiny_vit(init_values=0.5)
    model = adapted(base, ["adapter", "adaptformer"])
    randomize_trainable(model)
    gelu, relu = torch.nn.GELU(), torch.nn.ReLU()
    block = model.blocks[0]
    houlsby_a, houlsby_m = block.after_attn["adapter"], block.after_mlp["adapter"]
    af = block.parallel_mlp["adaptformer"]

    def bottleneck(ad, h, act, s):
        return s * F.linear(act(F.linear(h, ad.down.weight, ad.down.bias)), ad.up.weight, ad.up.bias)

    x = torch.randn(2, 17, D)
    with torch.no_grad():
        a = block.attn(block.norm1(x))
        a = a + bottleneck(houlsby_a, a, gelu, 1.0)  # Houlsby: after the attention output
        x1 = x + block.ls1(a)
        h = block.norm2(x1)
        m = block.mlp(h)
        m = m + bottleneck(houlsby_m, m, gelu, 1.0)  # Houlsby: after the MLP output
        m = m + bottleneck(af, h, relu, 0.1)  # AdaptFormer: parallel, fed LN(x'), scale s = 0.1
        expected = x1 + block.ls2(m)
        assert (block(x) - expected).abs().max() < 1e-5
        assert (expected - Block.forward(base.blocks[0], x)).abs().max() > 1e-3


def test_pfeiffer_changes_only_the_mlp_branch(tiny_base):
    model = adapted(tiny_base, ["pfeiffer"])
    randomize_trainable(model)
    block = model.blocks[0]
    assert len(block.after_attn) == 0 and list(block.after_mlp) == ["pfeiffer"]
    x = torch.randn(2, 17, D)
    with torch.no_grad():
        x1 = x + block.attn(block.norm1(x))
        m = block.mlp(block.norm2(x1))
        ad = block.after_mlp["pfeiffer"]
        m = m + ad.up(F.gelu(ad.down(m)))
        assert (block(x) - (x1 + m)).abs().max() < 1e-5


# --------------------------------------------------------------------------- FacT


def test_fact_tt_matches_reference_structure(tiny_base):
    """The reference code's TT layers: per-block Linear(r, r) cores for q/k/v/proj, Linear(r, 4r) for
    fc1 (output read as 4 chunks), Linear(4r, r) for fc2 (input = 4 chunks through U)."""
    model = adapted(tiny_base, ["fact"], {"fact_scale": 2.0})
    randomize_trainable(model)
    fact = model.fact.eval()
    u, v, s = fact.u, fact.v, 2.0
    x, hid = torch.randn(2, 5, D), torch.randn(2, 5, 4 * D)
    with torch.no_grad():
        for i in range(DEPTH):
            c = fact.cores[i]
            qkv = torch.cat([(x @ u.t() @ c[j].t()) @ v.t() for j in range(3)], dim=-1) * s
            proj = (x @ u.t() @ c[3].t()) @ v.t() * s
            fc1_core = torch.cat(list(c[4:8]), dim=0)  # (4r, r)
            fc1 = ((x @ u.t() @ fc1_core.t()).reshape(2, 5, 4, R) @ v.t()).reshape(2, 5, 4 * D) * s
            fc2_core = torch.cat(list(c[8:12]), dim=1)  # (r, 4r)
            fc2 = ((hid.reshape(2, 5, 4, D) @ u.t()).reshape(2, 5, 4 * R) @ fc2_core.t()) @ v.t() * s
            for which, inp, want in (("qkv", x, qkv), ("proj", x, proj), ("fc1", x, fc1), ("fc2", hid, fc2)):
                assert (fact.delta(i, inp, which) - want).abs().max() < 1e-5, which
                assert (inp @ fact.weight_delta(i, which).t() - want).abs().max() < 1e-5, which


def test_fact_tk_cores_come_from_one_shared_tensor(tiny_base):
    model = adapted(tiny_base, ["fact"], {"fact_format": "tk"})
    randomize_trainable(model)
    fact = model.fact
    with torch.no_grad():
        for i in range(DEPTH):
            for slot in range(SLOTS):
                p = fact.factor[:, i * SLOTS + slot]
                m = sum(fact.core[:, :, c] * p[c] for c in range(R))  # C x_3 p
                assert (fact.layer_cores(i)[slot] - m).abs().max() < 1e-6


@pytest.mark.parametrize("names,options", [(["fact"], {}), (["fact"], {"fact_format": "tk"}),
                                           (["lora", "fact"], {"lora_targets": "qv"}),
                                           (["fact", "lora"], {"lora_targets": "all"})],
                         ids=["tt", "tk", "lora-qv+fact", "fact+lora-all"])
def test_fact_merge_after_training_steps(tiny_base, names, options):
    model = adapted(tiny_base, names, options)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(3):
        opt.zero_grad()
        F.cross_entropy(model(images(seed=step)), torch.tensor([0, 1, 0])).backward()
        opt.step()
    model.eval()
    x = images(seed=9)
    with torch.no_grad():
        before = model(x)
        assert (before - tiny_base(x)).abs().max() > 1e-4  # training changed something
        merge_methods(model)
        after = model(x)
    assert (after - before).abs().max().item() < 1e-4
    assert set(model.state_dict()) == set(tiny_base.state_dict())
    assert not hasattr(model, "fact")
    assert {type(m) for m in model.modules()} <= {type(m) for m in tiny_base.modules()}


def test_fact_merge_refuses_a_layer_another_method_hooks(tiny_base):
    """A hook that is not a method's acts on the layer's output after the weight: adding FacT's delta
    to that weight would put it under the hook, so merging must be refused (methods' own hooks are
    folded first by the walk)."""
    model = adapted(tiny_base, ["fact"])
    randomize_trainable(model)
    model.blocks[1].mlp.fc2.register_forward_hook(lambda module, args, out: out * 2)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"blocks\.1\.mlp\.fc2.*hook that is not a medpeft"):
        merge_methods(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())  # nothing half-merged


@pytest.mark.parametrize("name", METHODS)
def test_dynamic_image_sizes(tiny_base, name):
    model = adapted(tiny_base, [name])
    randomize_trainable(model)
    for size in (24, 32, 48):
        out = model(images(size))
        assert out.shape == (3, 2) and torch.isfinite(out).all()


# --------------------------------------------------------------------------- hybrids, save/load, copies

HYBRIDS = [["lora", "vpt_deep"], ["adapter", "prefix"], ["lora", "adaptformer"], ["adapter", "pfeiffer", "fact"],
           ["prefix", "vpt_shallow", "adaptformer"]]


@pytest.mark.parametrize("names", HYBRIDS, ids="+".join)
def test_hybrids_train_the_union(tiny_base, names):
    model = adapted(tiny_base, names)
    union = set()
    for name in names:
        alone = adapted(tiny_base, [name])
        union |= {n for n, p in alone.named_parameters() if p.requires_grad}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == union
    model.train()
    F.cross_entropy(model(images()), torch.tensor([0, 1, 1])).backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == union
    if "lora" in names:
        assert type(model.blocks[0].attn.qkv).__name__ == "FusedQKVLoRA"


ROUND_TRIPS = {m: ([m], {}) for m in METHODS} | {
    "prefix-reparam": (["prefix"], {"prefix_reparam": True}), "fact-tk": (["fact"], {"fact_format": "tk"}),
    "lora+vpt_deep": (["lora", "vpt_deep"], {}), "adapter+prefix": (["adapter", "prefix"], {})}


@pytest.mark.parametrize("names,options", list(ROUND_TRIPS.values()), ids=list(ROUND_TRIPS))
def test_save_load_round_trip(tiny_base, names, options):
    model = adapted(tiny_base, names, options, seed=0)
    randomize_trainable(model)
    state = {k: v.clone() for k, v in trained_state_dict(model).items()}
    fresh = adapted(tiny_base, names, options, seed=123)  # other init, same base weights
    x = images()
    assert (fresh(x) - model(x)).abs().max() > 1e-6
    load_trained_state(fresh, state)
    assert torch.equal(fresh(x), model(x))


def test_vpt_shallow_and_deep_cannot_be_combined(tiny_base):
    with pytest.raises(ConfigError, match="cannot be combined"):
        adapted(tiny_base, ["vpt_shallow", "vpt_deep"])


@pytest.mark.parametrize("names", [["fact"], ["prefix"], ["adapter", "vpt_deep"]], ids="+".join)
def test_deepcopy_and_pickle_keep_shared_factors_shared(tiny_base, names):
    model = adapted(tiny_base, names, {"prefix_reparam": True})
    randomize_trainable(model)
    x = images()
    before = model(x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(clone(x), model(x))
        with torch.no_grad():  # changing the clone's trained tensors changes the clone only
            for p in clone.parameters():
                if p.requires_grad and p.dim() > 0 and p.shape != (2, D) and p.shape != (2,):
                    p.mul_(1.5)
        assert (clone(x) - model(x)).abs().max() > 1e-6
        assert torch.equal(model(x), before)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", METHODS)
def test_cnn_backbone_is_refused(name):
    cnn, _ = create_backbone("tiny_cnn", num_classes=2, image_size=32, pretrained=False)
    with pytest.raises(ConfigError, match="does not apply to a CNN"):
        apply_methods(cnn, [name], build_configs([name]), "cnn")


@pytest.mark.parametrize("options", [{"adapter_dim": 0}, {"adapter_dropout": 1.0}, {"fact_format": "cp"},
                                     {"fact_rank": 2.5}, {"vpt_deep_num_tokens": -1}, {"prefix_reparam": "maybe"},
                                     {"adaptformer_scale": float("nan")}])
def test_bad_options_are_config_errors(options):
    (key,) = options
    method = next(m for m in METHODS if key.startswith(m + "_"))
    with pytest.raises(ConfigError, match=method):
        build_configs([method], options)


def test_non_timm_blocks_are_refused():
    model = tiny_vit()
    model.blocks[1] = torch.nn.Identity()
    with pytest.raises(ConfigError, match="block 1 is Identity"):
        apply_methods(model, ["adapter"], build_configs(["adapter"]), "vit")


# --------------------------------------------------------------------------- real backbone


DINO_DIM, DINO_DEPTH = 384, 12
DINO_COUNTS = {  # the formulas above with ViT-S/14 dims (width 384, 12 blocks, mlp ratio 4)
    "vpt_shallow": P * DINO_DIM, "vpt_deep": DINO_DEPTH * P * DINO_DIM, "prefix": DINO_DEPTH * 2 * P * DINO_DIM,
    "adapter": DINO_DEPTH * 2 * (2 * DINO_DIM * R + R + DINO_DIM),
    "pfeiffer": DINO_DEPTH * (2 * DINO_DIM * R + R + DINO_DIM),
    "adaptformer": DINO_DEPTH * (2 * DINO_DIM * R + R + DINO_DIM),
    "fact": 2 * DINO_DIM * R + DINO_DEPTH * SLOTS * R * R,
}


@pytest.mark.slow
def test_every_method_on_real_dinov2():
    """Every method on the real (offline) DINOv2 ViT-S/14, as three hybrids to keep CPU time low:
    counts = sum of the formulas, every trained tensor gets a gradient, identity ones keep the logits."""
    base, info = create_backbone("dinov2_vits14", num_classes=2, image_size=56)
    assert info.weights_source.startswith("offline:")
    base.eval()
    x, y = torch.randn(1, 3, 56, 56), torch.tensor([1])
    groups = [["adapter", "pfeiffer", "adaptformer", "fact"], ["vpt_shallow"], ["vpt_deep", "prefix"]]
    for i, names in enumerate(groups):
        model = base if i == len(groups) - 1 else copy.deepcopy(base)
        apply_methods(model, names, build_configs(names), "vit")
        assert count_parameters(model)["trainable_without_head"] == sum(DINO_COUNTS[n] for n in names), names
        if all(get_method(n).identity_at_init for n in names):
            with torch.no_grad():
                assert (model(x) - base(x)).abs().max().item() < 1e-4, names
        model.train()
        F.cross_entropy(model(x), y).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all()
                   for p in model.parameters() if p.requires_grad), names
