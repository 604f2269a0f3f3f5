"""The Stable Diffusion text-to-image generator (issue 18, part 3), on a tiny random pipeline built
from configs (no weights downloaded): each method trains exactly its UNet parameters, merged ==
unmerged, adapt -> save -> load gives identical samples from only the trainable tensors, samples
feed --synthetic, bad input fails with a clear error, and the CLI runs end to end."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from medpeft import generator, text2image  # noqa: E402
from medpeft.cli import main  # noqa: E402
from medpeft.data import load_data  # noqa: E402
from medpeft.data.base import DataConfig  # noqa: E402
from medpeft.errors import ConfigError  # noqa: E402
from toydata import make_toy  # noqa: E402

QUIET = lambda *a: None  # noqa: E731


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return text2image.make_tiny_pipeline(tmp_path_factory.mktemp("sd") / "tiny-sd")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("toy") / "target", per_class=6, size=16)


@pytest.fixture(scope="module")
def adapted(tiny_sd, toy, tmp_path_factory):
    """A LoRA text-to-image generator (its base path redacted, as medpeft writes absolute paths)."""
    out = tmp_path_factory.mktemp("gen") / "sd-lora"
    meta = generator.run_adapt(tiny_sd, str(toy), out, method="lora", steps=2, batch_size=4, rank=2, image_size=16,
                               prompt="an ultrasound image of a {label} breast", log=QUIET)
    return out, meta


def components(tiny_sd):
    model = text2image.load_components(tiny_sd)
    model.class_names, model.image_size, model.channels = ["lesion", "normal"], 16, 1
    return model


def unet_output(model, unet=None):
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([10, 500])
    context = text2image.encode_prompts(model, text2image.class_prompts(model.prompt, model.class_names))
    with torch.no_grad():
        return (unet or model.unet)(x, t, encoder_hidden_states=context).sample


@pytest.mark.parametrize("method", text2image.METHODS)
def test_each_method_trains_its_unet_parameters_and_merges_exactly(tiny_sd, method):
    model = components(tiny_sd)
    plain_keys = set(model.unet.state_dict())
    names = [n for n, _ in model.unet.named_parameters()]
    torch.manual_seed(0)
    text2image.apply_method(model.unet, method, rank=2)
    trainable = set(text2image.trainable_names(model.unet))
    assert trainable
    assert not any(p.requires_grad for p in model.vae.parameters())  # VAE and text encoder: frozen always
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    if method == "bitfit":
        assert trainable == {n for n in names if n.endswith(".bias")}
    elif method == "norm":
        norms = {f"{path}.{n}" for path, module in model.unet.named_modules()
                 if isinstance(module, (nn.GroupNorm, nn.LayerNorm)) for n, _ in module.named_parameters()}
        assert trainable == norms
    elif method == "full":
        assert trainable == set(names)
    else:
        assert all("lora_" in n for n in trainable)
        adapted_layers = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
        assert adapted_layers == {"to_q", "to_k", "to_v", "0"}  # the attention projections (to_out.0) only
        assert any(".to_out.0.lora_" in n for n in trainable) and not any("conv" in n for n in trainable)
        convs = components(tiny_sd)
        text2image.apply_method(convs.unet, method, rank=2, convs=True)
        assert any(".conv1.lora_" in n for n in text2image.trainable_names(convs.unet))
    with torch.no_grad():  # as if trained: every trainable tensor moves
        for p in model.unet.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    plain = text2image.merged(model)
    assert torch.allclose(unet_output(model), unet_output(model, plain.unet), atol=1e-4)
    assert set(plain.unet.state_dict()) == plain_keys  # plain UNet2DConditionModel keys
    if method in ("lora", "dora"):
        a = text2image.sample(model, torch.tensor([0, 1]), seed=2, steps=2)
        b = text2image.sample(plain, torch.tensor([0, 1]), seed=2, steps=2)
        assert (a.int() - b.int()).abs().max() <= 1


def test_adapt_save_load_gives_identical_samples_from_only_the_trainable_tensors(adapted, tiny_sd):
    from safetensors.torch import load_file

    folder, meta = adapted
    assert meta["kind"] == "text2image" and meta["method"] == "lora" and meta["image_size"] == 16
    assert meta["channels"] == 1 and meta["class_names"] == ["lesion", "normal"]
    assert meta["base"].startswith("<redacted>/") and meta["data"].startswith("<redacted>/")
    model, loaded = text2image.load(folder, base=tiny_sd)
    tensors = load_file(str(folder / text2image.TRAINABLE_FILE))
    assert set(tensors) == set(text2image.trainable_names(model.unet)) and all("lora_" in k for k in tensors)
    state = model.unet.state_dict()
    assert all(torch.equal(state[k], v) for k, v in tensors.items())  # what was saved is what is used
    assert meta["adapter_bytes"] == (folder / text2image.TRAINABLE_FILE).stat().st_size
    assert 0 < meta["trainable"] < meta["total"] and meta["adapter_bytes"] < 0.05 * 4 * meta["total"]
    labels = torch.tensor([0, 1, 1])
    a = text2image.sample(model, labels, seed=3, steps=2)
    b = text2image.sample(text2image.load(folder, base=tiny_sd)[0], labels, seed=3, steps=2)
    assert a.dtype == torch.uint8 and a.shape == (3, 1, 16, 16) and torch.equal(a, b)
    assert not torch.equal(a, text2image.sample(model, labels, seed=4, steps=2))  # the seed matters
    guided = text2image.sample(model, labels, seed=3, steps=2, guidance=3.0)
    assert guided.shape == a.shape and torch.equal(guided, text2image.sample(model, labels, seed=3, steps=2,
                                                                             guidance=3.0))


def test_full_fine_tuning_saves_the_whole_unet(tiny_sd, toy, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setenv("MEDPEFT_RECORD_PATHS", "1")  # the base path recorded: load needs no --base
    meta = text2image.run_adapt(tiny_sd, str(toy), tmp_path / "full", method="full", steps=1, batch_size=2,
                                image_size=16, log=QUIET)
    model, _ = text2image.load(tmp_path / "full")
    plain = text2image.load_components(tiny_sd).unet
    assert set(load_file(str(tmp_path / "full" / text2image.TRAINABLE_FILE))) == {n for n, _ in
                                                                                 plain.named_parameters()}
    assert meta["trainable"] == meta["total"] == sum(p.numel() for p in plain.parameters())


def test_samples_feed_synthetic_and_classes_selects(adapted, tiny_sd, toy, tmp_path):
    folder, _ = adapted
    with pytest.raises(ConfigError, match="--base"):  # its base path was redacted
        generator.run_sample(folder, tmp_path / "x", per_class=1)
    manifest = generator.run_sample(folder, tmp_path / "synth", per_class=2, base=tiny_sd, guidance=2.0)
    mixed = load_data(DataConfig(name=str(toy), image_size=16, audit="off", synthetic=manifest))
    assert mixed.split_info["synthetic"]["n_synthetic"] == 4
    only = generator.run_sample(folder, tmp_path / "only", per_class=2, base=tiny_sd, classes="normal")
    assert (tmp_path / "only" / "manifest.csv").read_text().split() == ["path,label", "sample_00000.png,normal",
                                                                       "sample_00001.png,normal"]
    assert only.endswith("manifest.csv")


def test_bad_input_fails_clearly(adapted, tiny_sd, toy, tmp_path):
    folder, _ = adapted
    with pytest.raises(ConfigError, match="size 18 is not a multiple of 4"):
        generator.run_adapt(tiny_sd, str(toy), tmp_path / "x", steps=1, image_size=18, log=QUIET)
    with pytest.raises(ConfigError, match="has no {label}"):
        generator.run_adapt(tiny_sd, str(toy), tmp_path / "x", steps=1, image_size=16, prompt="a scan", log=QUIET)
    with pytest.raises(ConfigError, match="'scratch' is not one of"):
        generator.run_adapt(tiny_sd, str(toy), tmp_path / "x", method="scratch", steps=1, image_size=16)
    with pytest.raises(ConfigError, match="needed locally"):  # a Hub id, offline (conftest)
        generator.run_adapt("someone/stable-diffusion", str(toy), tmp_path / "x", steps=1)
    with pytest.raises(ConfigError, match="'tumour' is not a class of this generator; it knows lesion, normal"):
        generator.run_sample(folder, tmp_path / "x", per_class=1, base=tiny_sd, classes="lesion,tumour")
    # the base not recorded at all, then a weights file that lacks one of the method's tensors
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    meta = json.loads((broken / "generator.json").read_text())
    (broken / "generator.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "base"}))
    with pytest.raises(ConfigError, match="give their folder with --base"):
        text2image.load(broken)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(broken / text2image.TRAINABLE_FILE))
    save_file(dict(list(tensors.items())[1:]), str(broken / text2image.TRAINABLE_FILE))
    with pytest.raises(ConfigError, match=f"{broken.name}.*1 missing"):
        text2image.load(broken, base=tiny_sd)
    # the class-conditional kind: unknown classes and text-to-image options refused too
    unet_folder = tmp_path / "unet"
    torch.manual_seed(0)
    generator.save(unet_folder, generator.build_unet(16, 1, 2, width=8),
                   {"image_size": 16, "channels": 1, "class_names": ["lesion", "normal"], "width": 8})
    with pytest.raises(ConfigError, match="'cyst' is not a class of this generator; it knows lesion, normal"):
        generator.run_sample(unet_folder, tmp_path / "x", per_class=1, classes="cyst")
    with pytest.raises(ConfigError, match="--guidance is for text-to-image"):
        generator.run_sample(unet_folder, tmp_path / "x", per_class=1, guidance=3.0)
    with pytest.raises(ConfigError, match="--prompt is for a Stable Diffusion base"):
        generator.run_adapt(unet_folder, str(toy), tmp_path / "x", prompt="a {label}")
    with pytest.raises(ConfigError, match="is a text2image generator"):
        generator.load(folder)


def test_cli_tiny_sd_adapt_sample_end_to_end(toy, tmp_path, capsys):
    sd, gen, synth = tmp_path / "tiny-sd", tmp_path / "gen", tmp_path / "synth"
    assert main(["generator", "tiny-sd", str(sd)]) == 0
    assert text2image.is_pipeline(sd)
    assert main(["generator", "adapt", str(sd), "--data", str(toy), "--method", "dora", "--rank", "2", "--steps", "2",
                 "--batch-size", "4", "--image-size", "16", "--prompt", "a scan of {label}", "--out", str(gen)]) == 0
    assert json.loads((gen / "generator.json").read_text())["prompt"] == "a scan of {label}"
    assert main(["generator", "sample", str(gen), "--base", str(sd), "--per-class", "2", "--classes", "lesion",
                 "--guidance", "2", "--seed", "1", "--out", str(synth)]) == 0
    assert (synth / "manifest.csv").read_text().count("lesion") == 2 and (synth / "sample_00001.png").is_file()
    assert "wrote" in capsys.readouterr().out
    assert main(["generator", "sample", str(gen), "--base", str(sd), "--classes", "cyst", "--out", str(synth)]) == 2
    assert "'cyst' is not a class" in capsys.readouterr().err
