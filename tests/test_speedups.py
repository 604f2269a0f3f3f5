"""The speed-ups are equivalent to the plain path: frozen-trunk / frozen-prefix caching, no
gradients or optimizer state for frozen weights, no backward through the frozen prefix, fused
AdamW, fused input normalisation, torch.compile as an option, SDPA attention in every ViT method."""
import pytest
import torch
import torch.nn.functional as F

from medpeft import trunk_cache
from medpeft.batching import BatchLoader
from medpeft.data.base import DataBundle, ImageSet
from medpeft.errors import ConfigError
from medpeft.methods import get_method, list_methods, set_train_mode
from medpeft.run import build_model
from medpeft.train import TrainConfig, make_adamw, prepare_training, train_epoch, train_model

SIZES = {"tiny_vit": 16, "tiny_cnn": 32}


def synthetic_bundle(size: int, n_train=40, n_eval=12, channels=1, seed=0) -> DataBundle:
    gen = torch.Generator().manual_seed(seed)

    def split(n):
        return ImageSet(torch.randint(0, 256, (n, channels, size, size), generator=gen, dtype=torch.uint8),
                        torch.randint(0, 2, (n,), generator=gen), [str(i) for i in range(n)])

    return DataBundle("synthetic", "binary", ["a", "b"], split(n_train), split(n_eval), split(n_eval))


def model_for(backbone, method, options=None):
    model, info, _, _ = build_model(backbone, 2, SIZES[backbone], method, options or {})
    return model, info


def train(backbone, method, options=None, epochs=2, **cfg):
    torch.manual_seed(0)
    model, info = model_for(backbone, method, options)
    bundle = synthetic_bundle(SIZES[backbone])
    cfg = TrainConfig(**{"epochs": epochs, "batch_size": 8, "eval_batch_size": 16, "seed": 0, "patience": 99, **cfg})
    result = train_model(model, bundle, info.mean, info.std, cfg, lr=1e-3)
    return model, result


# --------------------------------------------------------------------------- prefix / suffix split


@pytest.mark.parametrize("backbone", ["tiny_vit", "tiny_cnn"])
def test_partial_split_composes_to_the_model(backbone):
    model, _ = model_for(backbone, "partial", {"partial_k": 1})
    split = trunk_cache.split_frozen_trunk(model)
    n_units = len(model.blocks)
    assert split.kind == "prefix" and (split.frozen_units, split.total_units) == (n_units - 1, n_units)
    # the prefix holds no trainable parameter, the suffix's blocks all of them except the head
    x = torch.randn(3, 3, SIZES[backbone], SIZES[backbone])
    set_train_mode(model, False)
    with torch.no_grad():
        assert torch.allclose(split.suffix(split.prefix(x)), model(x), atol=1e-6)
    assert trunk_cache.check_split(model, split, x) is None


@pytest.mark.parametrize("backbone,method,options", [
    ("tiny_vit", "partial", {"partial_k": 1}), ("tiny_cnn", "partial", {"partial_k": 1}),
    ("tiny_cnn", "partial", {"partial_k": 2}), ("tiny_vit", "linear", {}), ("tiny_cnn", "linear", {}),
])
def test_cached_training_matches_the_plain_loop(backbone, method, options):
    """Same batches, same loss curve, same validation metrics, same trained weights and test probs."""
    trunk_cache.memo_clear()
    plain_model, plain = train(backbone, method, options, augment="none", cache_features="off")
    cached_model, cached = train(backbone, method, options, augment="none", cache_features="auto")
    assert not plain.feature_cache and cached.feature_cache
    assert "cached" in cached.feature_cache_note
    for a, b in zip(plain.history, cached.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5, abs=1e-6)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5, abs=1e-6)
    assert torch.allclose(torch.as_tensor(plain.test_probs), torch.as_tensor(cached.test_probs), atol=1e-5)
    cached_state = dict(cached_model.named_parameters())
    for name, p in plain_model.named_parameters():
        assert torch.allclose(p, cached_state[name], atol=1e-5), name
    # BatchNorm statistics of trained stages move the same way
    cached_buffers = dict(cached_model.named_buffers())
    for name, buf in plain_model.named_buffers():
        if buf.is_floating_point():
            assert torch.allclose(buf, cached_buffers[name], atol=1e-5), name


def test_partial_k_matches_the_prefix_length():
    model, _ = model_for("tiny_cnn", "partial", {"partial_k": 2})
    assert trunk_cache.split_frozen_trunk(model).frozen_units == len(model.blocks) - 2


def test_augmentation_invalidates_the_cache_and_says_so():
    _, result = train("tiny_vit", "partial", {"partial_k": 1}, epochs=1, augment="light", cache_features="auto")
    assert not result.feature_cache
    assert "augment='light'" in result.feature_cache_note and "stale" in result.feature_cache_note
    with pytest.raises(ConfigError, match="stale"):
        train("tiny_vit", "partial", {"partial_k": 1}, epochs=1, augment="light", cache_features="on")


@pytest.mark.parametrize("method", ["lora", "bitfit", "full"])
def test_no_cache_when_the_first_block_trains(method):
    _, result = train("tiny_vit", method, epochs=1, augment="none", cache_features="auto")
    assert not result.feature_cache and "no frozen block" in result.feature_cache_note
    with pytest.raises(ConfigError, match="cannot be cached"):
        train("tiny_vit", method, epochs=1, augment="none", cache_features="on")


def test_stochastic_prefix_is_not_cached():
    from medpeft.backbones import create_backbone
    from medpeft.methods import apply_methods, build_configs

    model, _ = create_backbone("tiny_vit", num_classes=2, image_size=16, proj_drop_rate=0.5)
    apply_methods(model, ["partial"], build_configs(["partial"], {"partial_k": 1}), "vit")
    split = trunk_cache.split_frozen_trunk(model)
    assert "stochastic" in trunk_cache.check_split(model, split, torch.randn(4, 3, 16, 16))


def test_patched_forward_is_not_split():
    model, _ = model_for("tiny_vit", "partial", {"partial_k": 1})
    model.forward_features = lambda x: x  # an instance-level override: structure unknown
    assert trunk_cache.split_frozen_trunk(model) is None


def test_hidden_trainable_parameter_in_the_prefix_is_caught():
    """A trainable tensor used inside block 0 but registered elsewhere: the graph check finds it."""
    model, _ = model_for("tiny_vit", "partial", {"partial_k": 1})
    scale = torch.nn.Parameter(torch.ones(()))
    model.blocks[-1].register_parameter("hidden_scale", scale)  # registered in the suffix ...
    model.blocks[0].register_forward_hook(lambda mod, inp, out: out * scale)  # ... acting in the prefix
    split = trunk_cache.split_frozen_trunk(model)
    assert "trainable parameter acts inside" in trunk_cache.check_split(model, split, torch.randn(2, 3, 16, 16))


def test_cache_is_memoised_per_weights_and_images():
    trunk_cache.memo_clear()
    before = dict(trunk_cache.MEMO_STATS)
    train("tiny_vit", "partial", {"partial_k": 1}, epochs=1, augment="none", seed=0)
    train("tiny_vit", "partial", {"partial_k": 1}, epochs=1, augment="none", seed=1)  # other seed, same prefix
    hits = trunk_cache.MEMO_STATS["hits"] - before["hits"]
    misses = trunk_cache.MEMO_STATS["misses"] - before["misses"]
    assert (misses, hits) == (3, 3)  # train/val/test extracted once, reused by the second run
    # other frozen weights: a different key
    model, info = model_for("tiny_vit", "partial", {"partial_k": 1})
    split = trunk_cache.split_frozen_trunk(model)
    images = synthetic_bundle(16).train.images
    loader = BatchLoader(synthetic_bundle(16).train, 16, info.mean, info.std)
    key = trunk_cache.memo_key(split, images, loader, None)
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.add_(1.0)
    assert trunk_cache.memo_key(trunk_cache.split_frozen_trunk(model), images, loader, None) != key
    other_images = images.clone()
    other_images[0, 0, 0, 0] ^= 1
    assert trunk_cache.memo_key(split, other_images, loader, None) != key


def test_cache_over_budget_falls_back(monkeypatch):
    monkeypatch.setattr(trunk_cache, "MAX_CACHE_BYTES", 1000)
    _, result = train("tiny_vit", "partial", {"partial_k": 1}, epochs=1, augment="none")
    assert not result.feature_cache and "budget" in result.feature_cache_note


# --------------------------------------------------------------------------- frozen weights cost nothing


def _setup(backbone, method, options=None, **cfg):
    torch.manual_seed(0)
    model, info = model_for(backbone, method, options)
    bundle = synthetic_bundle(SIZES[backbone])
    cfg = TrainConfig(epochs=1, batch_size=8, seed=0, augment=cfg.pop("augment", "light"), **cfg)
    return model, prepare_training(model, bundle, info.mean, info.std, cfg, lr=1e-3)


@pytest.mark.parametrize("backbone,method", [("tiny_vit", "lora"), ("tiny_cnn", "lora"), ("tiny_vit", "partial"),
                                             ("tiny_cnn", "bitfit")])
def test_frozen_parameters_get_no_gradient_and_no_optimizer_state(backbone, method):
    model, setup = _setup(backbone, method)
    train_epoch(setup, max_steps=2)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)
    in_optimizer = {id(p) for group in setup.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == trainable
    assert {id(p) for p in setup.optimizer.state} <= trainable and len(setup.optimizer.state) == len(trainable)


def _saved_tensor_count(fn) -> int:
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.sum().backward()
    return count


@pytest.mark.parametrize("backbone", ["tiny_vit", "tiny_cnn"])
def test_no_backward_through_the_frozen_prefix(backbone):
    """Autograd saves nothing for the frozen prefix: the plain forward saves exactly what the
    suffix alone saves (and far less than full fine-tuning)."""
    model, _ = model_for(backbone, "partial", {"partial_k": 1})
    split = trunk_cache.split_frozen_trunk(model)
    set_train_mode(model, True)
    x = torch.randn(4, 3, SIZES[backbone], SIZES[backbone])
    with torch.no_grad():
        mid = split.prefix(x)
    plain = _saved_tensor_count(lambda: model(x))
    suffix_only = _saved_tensor_count(lambda: split.suffix(mid))
    assert plain == suffix_only > 0
    full, _ = model_for(backbone, "full")
    set_train_mode(full, True)
    assert _saved_tensor_count(lambda: full(x)) > plain


def test_linear_probe_saves_only_for_the_head():
    model, _ = model_for("tiny_vit", "linear")
    set_train_mode(model, True)
    head_alone = _saved_tensor_count(lambda: model.get_classifier()(torch.randn(4, 32)))
    assert _saved_tensor_count(lambda: model(torch.randn(4, 3, 16, 16))) == head_alone


# --------------------------------------------------------------------------- optimizer, inputs, compile


def test_fused_adamw_matches_foreach():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 32)), torch.nn.Parameter(torch.randn(32))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fused = make_adamw(params, 1e-2, 1e-4, torch.device("cpu"))
    plain = torch.optim.AdamW(twins, lr=1e-2, weight_decay=1e-4, foreach=True)
    assert fused.defaults.get("fused") is True  # this torch has a fused CPU AdamW
    for step in range(5):
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(params, twins, grads):
            p.grad, q.grad = g.clone(), g.clone()
        fused.step()
        plain.step()
    for p, q in zip(params, twins):
        assert torch.allclose(p, q, atol=1e-6)


@pytest.mark.parametrize("switch", [{"channels_last": "on"}, {"fused_adamw": False}])
def test_switchable_speedups_follow_the_same_loss_curve(switch):
    """channels_last (auto: on for CNNs) and the fused AdamW change kernels, not the math."""
    base_model, base = train("tiny_cnn", "lora", augment="none")
    other = {"channels_last": "off"} if "channels_last" in switch else switch
    other_model, changed = train("tiny_cnn", "lora", augment="none", **other)
    for a, b in zip(base.history, changed.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    assert torch.allclose(torch.as_tensor(base.test_probs), torch.as_tensor(changed.test_probs), atol=1e-4)


def test_channels_last_auto_is_on_for_cnns_only():
    from medpeft.train import use_channels_last

    cpu = torch.device("cpu")
    assert use_channels_last(model_for("tiny_cnn", "lora")[0], TrainConfig(), cpu)
    assert not use_channels_last(model_for("tiny_vit", "lora")[0], TrainConfig(), cpu)
    assert not use_channels_last(model_for("tiny_cnn", "lora")[0], TrainConfig(channels_last="off"), cpu)
    _, setup = _setup("tiny_cnn", "lora")
    x, _ = next(iter(setup.train_loader))
    assert x.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ConfigError, match="channels_last"):
        TrainConfig(channels_last="yes")


@pytest.mark.parametrize("channels", [1, 3])
def test_batched_normalisation_matches_the_definition(channels):
    bundle = synthetic_bundle(8, n_train=10, channels=channels)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    loader = BatchLoader(bundle.train, 4, mean, std)
    x, _ = next(iter(loader))
    expected = bundle.train.images[:4].float().div(255).expand(-1, 3, -1, -1)
    expected = (expected - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert x.shape == (4, 3, 8, 8) and torch.allclose(x, expected, atol=1e-5)


def test_grayscale_batches_are_augmented_as_one_channel_with_the_same_result():
    """LightAugment treats channels alike: augmenting 1 channel then broadcasting to 3 (a third of
    the work) gives what augmenting the 3-channel copy gave before."""
    from medpeft.batching import LightAugment

    bundle = synthetic_bundle(16, n_train=8, channels=1)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    loader = BatchLoader(bundle.train, 8, mean, std, shuffle=True, augment=LightAugment(), seed=3)
    x, _ = next(iter(loader))
    gen = torch.Generator().manual_seed(3 * 100_003)  # the loader's first-epoch generator
    order = torch.randperm(8, generator=gen)
    three = bundle.train.images[order].float().div(255).expand(-1, 3, -1, -1)
    expected = (LightAugment()(three, gen) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert x.shape == (8, 3, 16, 16) and torch.allclose(x, expected, atol=1e-5)
    assert not torch.allclose(x, loader.to_input(bundle.train.images[order]), atol=1e-3)  # it did augment


def test_compile_option_wraps_the_trained_network(monkeypatch):
    compiled = []

    def fake_compile(module, **kw):
        compiled.append(module)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    model, setup = _setup("tiny_cnn", "lora", compile=True)
    assert compiled == [setup.net] and setup.step_net is setup.net
    _, plain = _setup("tiny_cnn", "lora")
    assert plain.step_net is plain.net and len(compiled) == 1


def test_speedup_cli_flags():
    from medpeft.cli import build_parser, run_config_from_args

    args = build_parser().parse_args(["run", "--data", "breastmnist", "--compile", "--channels-last", "off",
                                      "--no-fused-adamw"])
    train = run_config_from_args(args).train
    assert (train.compile, train.channels_last, train.fused_adamw) == (True, "off", False)
    train = run_config_from_args(build_parser().parse_args(["run", "--data", "breastmnist"])).train
    assert (train.compile, train.channels_last, train.fused_adamw) == (False, "auto", True)


@pytest.mark.slow
def test_compiled_training_matches_eager():
    """Real torch.compile (inductor) on the tiny CNN: same losses as eager within float tolerance."""
    losses = []
    for flag in (False, True):
        _, result = train("tiny_cnn", "lora", epochs=1, augment="none", compile=flag)
        losses.append(result.history[0]["train_loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_every_vit_method_attends_with_sdpa(monkeypatch):
    """timm's fused attention path (F.scaled_dot_product_attention: flash / memory-efficient
    kernels on a GPU) stays on under every ViT method: one call per block and forward."""
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    checked = []
    for name in list_methods():
        if "vit" not in get_method(name).families:
            continue
        try:
            model, _ = model_for("tiny_vit", name)
        except ConfigError:  # an option default that does not fit the tiny ViT (e.g. a rank)
            continue
        calls.clear()
        model.eval()
        with torch.no_grad():
            model(torch.randn(2, 3, 16, 16))
        assert len(calls) == len(model.blocks), name
        checked.append(name)
    assert {"lora", "full", "partial"} <= set(checked)
