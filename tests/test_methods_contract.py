"""The contract every registered method (and the hybrids) must keep, on tiny_vit and tiny_cnn.

The cases are generated from ``list_methods()``, so a method registered later is checked
too: gradients reach exactly the trainable parameters, frozen weights/statistics never
move, identity at init, merge == unmerged with the base architecture restored, exact
save/load round trips, family errors, and loss going down on real data.
"""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medpeft.backbones import create_backbone
from medpeft.errors import ConfigError
from medpeft.methods import (
    apply_methods,
    build_configs,
    count_parameters,
    get_method,
    is_mergeable,
    list_methods,
    load_trained_state,
    merge_methods,
    parse_method,
    set_train_mode,
    trained_state_dict,
)
from medpeft.methods.base import head_parameters

BACKBONES = {"vit": "tiny_vit", "cnn": "tiny_cnn"}
FAMILIES = tuple(BACKBONES)
HYBRIDS = ("ssf+bitfit", "lora+ssf", "lora+bitfit", "ssf+lora", "bitfit+lora", "ia3+lora",
           "tsa+ssf", "dora+ssf", "dora+ia3", "lora+vpt_deep", "ssf+adapter",  # with the ViT modules, if registered
           # a tap (FacT) and a wrapper (BOFT) under / over hooks, in both orders: the one merge walk
           # folds from the inside out, whatever order the methods were listed in
           "fact+ssf", "ssf+fact", "boft+ssf", "ssf+boft", "fact+lora")
NUM_CLASSES = 3

METHOD_CASES = [(m, f) for m in list_methods() for f in FAMILIES if f in get_method(m).families]
HYBRID_CASES = [(h, f) for h in HYBRIDS if all(n in list_methods() for n in h.split("+")) for f in FAMILIES
                if all(f in get_method(n).families for n in parse_method(h))]
ALL_CASES = METHOD_CASES + HYBRID_CASES
UNSUPPORTED = [(m, f) for m in list_methods() for f in FAMILIES if f not in get_method(m).families]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models on a shared 2-core machine: extra threads only add contention (10-100x slower)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ids(cases):
    return [f"{spec}-{family}" for spec, family in cases]


@torch.no_grad()
def _perturb(model):
    """Non-trivial norm affines and BN statistics, so folding into them is really tested."""
    gen = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm)):
            module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=gen))
            module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=gen))
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=gen))
            module.running_var.uniform_(0.5, 1.5, generator=gen)


_BASES = {}


def base_model(family):
    """The same random base weights every time (built once per family, copied per test)."""
    if family not in _BASES:
        torch.manual_seed(0)
        model, _ = create_backbone(BACKBONES[family], NUM_CLASSES, 32, pretrained=False)
        _perturb(model)
        _BASES[family] = model.eval()
    return copy.deepcopy(_BASES[family])


def adapted(spec, family, seed=0):
    names = parse_method(spec)
    model = base_model(family)
    torch.manual_seed(seed)  # the methods' own random init (LoRA A, prompts, ...)
    return apply_methods(model, names, build_configs(names), family)


def batch(n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=gen), torch.arange(n) % NUM_CLASSES


def train_steps(model, steps=3, lr=1e-2, bn_stats="frozen"):
    x, y = batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    set_train_mode(model, True, bn_stats)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    set_train_mode(model, False)


@torch.no_grad()
def logits(model, x):
    model.eval()
    return model(x)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("spec,family", ALL_CASES, ids=_ids(ALL_CASES))
def test_gradients_reach_exactly_the_trainable_parameters(spec, family):
    model = adapted(spec, family)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head = {id(p) for p in head_parameters(model)}
    assert all(p.requires_grad for p in model.parameters() if id(p) in head), "head must be trained"
    if parse_method(spec) not in (["linear"], ["decoder"], ["head"]):  # head-only baselines
        assert len(trainable) > len(head), f"{spec} trains nothing besides the head"

    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    x, y = batch()
    set_train_mode(model, True)
    F.cross_entropy(model(x), y).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable, (
        f"grad but frozen: {sorted(with_grad - trainable)[:5]}; "
        f"trainable without grad: {sorted(trainable - with_grad)[:5]}")

    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    changed_allowed = set(trained_state_dict(model))  # trainable params + stats of trained BNs
    after = model.state_dict()
    moved = [k for k, v in after.items() if k not in changed_allowed and not torch.equal(v, before[k])]
    assert not moved, f"frozen weights/buffers changed: {moved[:5]}"
    assert any(not torch.equal(after[k], before[k]) for k in changed_allowed), "the optimizer step changed nothing"


# --------------------------------------------------------------------------- identity at init


@pytest.mark.parametrize("spec,family", ALL_CASES, ids=_ids(ALL_CASES))
def test_identity_at_init(spec, family):
    if not all(get_method(n).identity_at_init for n in parse_method(spec)):
        pytest.skip(f"{spec} is not identity at init")
    x, _ = batch()
    diff = (logits(adapted(spec, family), x) - logits(base_model(family), x)).abs().max().item()
    assert diff < 1e-5, f"{spec} changes the base model's output at init by {diff}"


def test_methods_declared_identity_really_differ_from_those_that_are_not():
    # a sanity check of the identity test itself: VPT-style prompts change the output
    x, _ = batch()
    nonidentity = [m for m, f in METHOD_CASES if f == "vit" and not get_method(m).identity_at_init
                   and m not in ("full", "linear")]
    for m in nonidentity:
        diff = (logits(adapted(m, "vit"), x) - logits(base_model("vit"), x)).abs().max().item()
        assert diff > 1e-6, f"{m} is identity at init but not declared so"


# --------------------------------------------------------------------------- merge


MERGE_CASES = [c for c in ALL_CASES if is_mergeable(parse_method(c[0]))]


@pytest.mark.parametrize("spec,family", MERGE_CASES, ids=_ids(MERGE_CASES))
def test_merge_matches_unmerged_and_restores_the_base_architecture(spec, family):
    model = adapted(spec, family)
    train_steps(model)
    x, _ = batch(seed=1)
    unmerged = logits(model, x)
    assert (unmerged - logits(base_model(family), x)).abs().max() > 1e-4, "training did not change the model"
    merge_methods(model)
    merged = logits(model, x)
    diff = (merged - unmerged).abs().max().item()
    assert diff < 1e-4, f"merged {spec} differs from unmerged by {diff}"
    base = base_model(family)
    assert set(model.state_dict()) == set(base.state_dict())
    assert {n for n, _ in model.named_modules()} == {n for n, _ in base.named_modules()}
    for key, value in model.state_dict().items():
        assert value.shape == base.state_dict()[key].shape, key
    # no hook left behind: a merged model gives the same output after a state_dict round trip into a clean base
    clean = base_model(family)
    clean.load_state_dict(model.state_dict())
    assert torch.allclose(logits(clean, x), merged, atol=1e-6)


WRAPPER_METHODS = ("lora", "dora", "loha", "lokr", "oft", "vera", "boft")  # replace layers (peft's or ours)
WRAPPER_CASES = [c for c in MERGE_CASES if c[0] in WRAPPER_METHODS]


@pytest.mark.parametrize("spec,family", WRAPPER_CASES, ids=_ids(WRAPPER_CASES))
def test_wrapper_layers_merge_and_unmerge_in_place(spec, family):
    """The tuner-layer protocol every wrapper speaks (peft's and medpeft's): merge() folds the change
    into the base weight and keeps the output; unmerge() gives the pretrained weight back."""
    from medpeft.methods.base import is_wrapper_layer

    model = adapted(spec, family)
    train_steps(model)
    wrappers = [m for m in model.modules() if is_wrapper_layer(m)]
    assert wrappers, f"{spec} adds no wrapper layer"
    x, _ = batch(seed=1)
    before = logits(model, x)
    weights = [w.get_base_layer().weight.detach().clone() for w in wrappers]
    for wrapper in wrappers:
        wrapper.merge()
    assert any(not torch.equal(w.get_base_layer().weight, old) for w, old in zip(wrappers, weights))
    torch.testing.assert_close(logits(model, x), before, atol=1e-4, rtol=1e-4)
    for wrapper in wrappers:
        wrapper.unmerge()
    for wrapper, old in zip(wrappers, weights):
        torch.testing.assert_close(wrapper.get_base_layer().weight, old, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(model, x), before, atol=1e-4, rtol=1e-4)


def test_not_mergeable_methods_refuse_to_merge():
    refused = []
    for m, f in METHOD_CASES:  # every one of them, not just the first
        if not get_method(m).mergeable:
            with pytest.raises(ConfigError, match=m):
                merge_methods(adapted(m, f))
            refused.append(m)
    assert {"adapter", "vpt_deep", "prefix"} <= set(refused)


# --------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("spec,family", ALL_CASES, ids=_ids(ALL_CASES))
def test_trained_state_round_trip_is_exact(spec, family):
    model = adapted(spec, family)
    train_steps(model)
    x, _ = batch(seed=2)
    expected = logits(model, x)
    state = {k: v.detach().clone() for k, v in trained_state_dict(model).items()}
    assert all(k in state for k, p in model.named_parameters() if p.requires_grad)

    fresh = adapted(spec, family, seed=123)  # other random init of the method's own weights
    load_trained_state(fresh, state)
    assert torch.equal(logits(fresh, x), expected)


@pytest.mark.parametrize("method", ["full", "norm", "bitfit"])
def test_bn_statistics_stay_frozen_by_default(method):
    model = adapted(method, "cnn")
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    train_steps(model)
    after = model.state_dict()
    assert before and all(torch.equal(v, after[k]) for k, v in before.items())
    assert any(not torch.equal(p, base_model("cnn").state_dict()[n]) for n, p in model.state_dict().items()
               if n in base_model("cnn").state_dict() and "running_" not in n and "num_batches" not in n
               and "classifier" not in n)  # the trained weights did move


def test_norm_tuning_on_cnn_saves_and_reloads_bn_running_stats():
    """With bn_stats="update", trained BatchNorm layers update their statistics, which are saved."""
    model = adapted("norm", "cnn")
    base_state = base_model("cnn").state_dict()
    train_steps(model, bn_stats="update")
    state = trained_state_dict(model)
    stats = [k for k in state if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    bns = [n for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(stats) == 3 * len(bns)
    assert all(not torch.equal(state[k], base_state[k]) for k in stats if k.endswith("running_mean"))
    fresh = adapted("norm", "cnn")
    load_trained_state(fresh, state)
    for k in stats:
        assert torch.equal(fresh.state_dict()[k], state[k])
    # without the statistics the reload would not reproduce the trained model
    partial = {k: v for k, v in state.items() if k not in stats}
    other = adapted("norm", "cnn")
    other.load_state_dict(partial, strict=False)
    x, _ = batch()
    assert not torch.equal(logits(other, x), logits(fresh, x))
    assert torch.equal(logits(fresh, x), logits(model, x))


def test_frozen_bn_statistics_stay_fixed_for_methods_that_do_not_train_bn():
    model = adapted("ssf", "cnn")
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    train_steps(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not any("running" in k for k in trained_state_dict(model))


def test_load_trained_state_rejects_a_state_from_another_method():
    state = trained_state_dict(adapted("ssf", "vit"))
    with pytest.raises(ConfigError, match="missing"):
        load_trained_state(adapted("lora", "vit"), state)


# --------------------------------------------------------------------------- families


@pytest.mark.parametrize("spec,family", UNSUPPORTED, ids=_ids(UNSUPPORTED))
def test_method_on_an_unsupported_family_is_a_config_error(spec, family):
    with pytest.raises(ConfigError, match=family.upper()) as err:
        adapted(spec, family)
    assert spec in str(err.value)


# --------------------------------------------------------------------------- hybrids


def _trainable(spec, family):
    model = adapted(spec, family)
    return count_parameters(model)["trainable"], sum(p.numel() for p in head_parameters(model))


@pytest.mark.parametrize("spec,family", HYBRID_CASES, ids=_ids(HYBRID_CASES))
def test_hybrid_trains_the_union_of_its_methods(spec, family):
    first, second = parse_method(spec)
    n_first, head = _trainable(first, family)
    n_second, _ = _trainable(second, family)
    n_hybrid, _ = _trainable(spec, family)
    # the methods of these hybrids train disjoint sets; the head is counted once
    assert n_hybrid == n_first + n_second - head
    model = adapted(spec, family)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    if "bitfit" in spec:
        assert any(n.endswith(".bias") and "head" not in n for n in names)
    if "ssf" in spec:
        assert any(".ssf_" in n for n in names)
    if "lora" in spec:
        assert any("lora_" in n for n in names)
    if "tsa" in spec:
        assert any(".tsa_" in n for n in names)


# --------------------------------------------------------------------------- real data


REAL_SPECS = [m for m in list_methods()] + ["lora+ssf", "ssf+bitfit"]


@pytest.mark.slow
def test_every_method_overfits_one_breastmnist_batch(medmnist_root):
    """8 AdamW steps at each method's default lr on one fixed batch of 16 real images: loss goes down."""
    data = np.load(medmnist_root / "breastmnist.npz")
    rng = np.random.default_rng(0)
    labels = data["train_labels"][:, 0]
    idx = np.concatenate([rng.choice(np.flatnonzero(labels == c), 8, replace=False) for c in (0, 1)])
    x = torch.from_numpy(data["train_images"][idx]).float().div(255).unsqueeze(1)
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x = (x - 0.5) / 0.5
    y = torch.from_numpy(labels[idx].astype(np.int64))
    failures = []
    for spec in REAL_SPECS:
        names = parse_method(spec)
        for family in FAMILIES:
            if not all(family in get_method(n).families for n in names):
                continue
            torch.manual_seed(0)
            model, _ = create_backbone(BACKBONES[family], 2, 32, pretrained=False)
            apply_methods(model, names, build_configs(names), family)
            lr = max(get_method(n).default_lr for n in names)
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
            set_train_mode(model, True)
            losses = []
            for _ in range(8):
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                losses.append(loss.item())
            if not np.mean(losses[-2:]) < np.mean(losses[:2]):
                failures.append(f"{spec}/{family}: {[round(v, 4) for v in losses]}")
    assert not failures, "loss did not go down: " + "; ".join(failures)
