"""Text-to-image adaptation of Stable Diffusion (the generator's second kind; issue 18, part 3):
LoRA and the other PEFT methods on the UNet of a Stable Diffusion pipeline, conditioned on a
prompt made from the class name, as Dutt et al. adapt it to medical images.

    medpeft generator adapt PATH/TO/stable-diffusion-v1-5 --data breastmnist --method lora \\
        --prompt "a breast ultrasound image of a {label} lesion" --image-size 64 --out gen/sd-lora
    medpeft generator sample gen/sd-lora --per-class 500 --guidance 3 --out synth/
    medpeft generator tiny-sd gen/tiny-sd       # a tiny random pipeline: the offline smoke test

Model: a diffusers folder (``model_index.json``; ``unet``, ``vae``, ``text_encoder``,
``tokenizer``, ``scheduler``), always read from safetensors (nothing is unpickled); a Hub id
downloads only when medpeft is online. The VAE and the text encoder stay frozen: target images
(grayscale repeated to RGB) are encoded to latents once up front, each class's prompt
(``{label}``: its name, underscores as spaces) once. Training is the class-conditional
generator's loop (``generator.fit``: the same seeded batches, noise and timesteps, the same EMA)
with the pipeline's own noise schedule; sampling is DDIM (eta 0) in latent space, with
classifier-free guidance against the empty prompt when ``guidance > 1``, decoded by the VAE.
It runs on the GPU when there is one (the seeded noise is drawn on the CPU either way).

Methods on the UNet: ``full``, ``bitfit``, ``norm``, ``lora`` / ``dora`` (peft on the attention
projections to_q, to_k, to_v, to_out.0, the standard diffusers targets; optionally the ResNet
convolutions too; alpha = 2 rank). What is saved is only the trainable tensors (the unmerged
adapters for lora / dora, the whole UNet for full) with ``generator.json`` (``"kind":
"text2image"``); a folder loads strictly on top of its base weights (``--base`` when the base's
path was not recorded).
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
import time
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError

KIND = "text2image"
METHODS = ("full", "bitfit", "norm", "lora", "dora")
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
CONV_TARGETS = ("conv1", "conv2")
DEFAULT_PROMPT = "a medical image of {label}"
DEFAULT_IMAGE_SIZE = 64
SAMPLE_STEPS = 50
MODEL_INDEX, TRAINABLE_FILE = "model_index.json", "unet_trainable.safetensors"
# Stable Diffusion v1's noise schedule: used when a pipeline folder has no scheduler config
SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
                "steps_offset": 1, "prediction_type": "epsilon"}
_TRUE = ("1", "true", "yes", "on")


@dataclasses.dataclass
class TextToImage:
    """A Stable Diffusion pipeline's parts and what a text-to-image generator adds to them."""

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    scheduler_config: dict
    class_names: list = dataclasses.field(default_factory=list)
    prompt: str = DEFAULT_PROMPT
    channels: int = 3  # of the data set: 1 -> the mean of the decoded RGB
    image_size: int | None = None

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device) -> "TextToImage":
        for part in (self.unet, self.vae, self.text_encoder):
            part.to(device)
        return self


def is_pipeline(path) -> bool:
    """Whether ``path`` is a local diffusers pipeline folder (``model_index.json``)."""
    return path is not None and (Path(path).expanduser() / MODEL_INDEX).is_file()


def is_hub_id(path) -> bool:
    """Whether ``path`` names no local file and reads as a Hub id (``owner/name``)."""
    text = str(path)
    parts = text.split("/")
    return (not Path(text).expanduser().exists() and len(parts) == 2 and all(parts)
            and not text.startswith((".", "~")))


def _offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("MEDPEFT_OFFLINE", "HF_HUB_OFFLINE"))


def _device(device=None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _scheduler(cls, config: dict):
    """``cls`` from a scheduler config (only the keys it takes: a PNDM config makes a DDIM one)."""
    accepted = inspect.signature(cls.__init__).parameters
    return cls.from_config({k: v for k, v in config.items() if k in accepted})


def load_components(path) -> TextToImage:
    """The UNet, VAE, text encoder, tokenizer and noise schedule of a Stable Diffusion folder
    (diffusers' layout), safetensors only; a Hub id downloads unless medpeft is offline."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    local = Path(str(path)).expanduser()
    if local.is_dir():
        if not is_pipeline(local):
            raise ConfigError(f"{path} is not a Stable Diffusion folder: no {MODEL_INDEX} (diffusers' layout: "
                              "unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
        source, options = str(local), {"local_files_only": True}
    elif _offline():
        raise ConfigError(f"{path!r} is neither a generator folder nor a local Stable Diffusion folder, and medpeft "
                          "is offline (MEDPEFT_OFFLINE): the Stable Diffusion weights are needed locally, e.g. a "
                          "downloaded stable-diffusion-v1-5 folder ('medpeft generator tiny-sd OUT' writes a tiny "
                          "random one for a smoke test)")
    else:
        source, options = str(path), {}
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", use_safetensors=True, **options)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", use_safetensors=True, **options)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", use_safetensors=True,
                                                     **options)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **options)
    except OSError as error:
        raise ConfigError(f"cannot load Stable Diffusion weights from {path!r} (a diffusers folder or Hub id with "
                          f"safetensors weights; medpeft never unpickles .bin files): {error}") from error
    try:
        scheduler_config = dict(DDPMScheduler.load_config(source, subfolder="scheduler", **options))
    except OSError:
        scheduler_config = dict(SD_SCHEDULER)
    for part in (unet, vae, text_encoder):
        part.float()
    for part in (vae, text_encoder):  # frozen always
        part.eval().requires_grad_(False)
    return TextToImage(unet.eval(), vae, text_encoder, tokenizer, scheduler_config)


def _byte_characters() -> list[str]:
    """CLIP's (GPT-2's) byte-level alphabet: the unicode character each of the 256 bytes maps to."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    mapping = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    return [mapping[b] for b in range(256)]


def make_tiny_pipeline(folder, seed: int = 0) -> Path:
    """A tiny, randomly initialised Stable Diffusion folder built from configs alone (no weights
    downloaded): the offline test of the text-to-image path, not a real generator. 16 px images
    make 8 x 8 latents; image sizes must be multiples of 4."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    characters = _byte_characters()
    vocab = {c: i for i, c in enumerate(characters + [c + "</w>" for c in characters])}
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    (folder / "tokenizer").mkdir(exist_ok=True)
    (folder / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (folder / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"), model_max_length=77)
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                    block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32,
                                    attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                            block_out_channels=(32, 64), norm_num_groups=8, sample_size=16,
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, projection_dim=32, bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]))
    unet.save_pretrained(str(folder / "unet"), safe_serialization=True)
    vae.save_pretrained(str(folder / "vae"), safe_serialization=True)
    text_encoder.save_pretrained(str(folder / "text_encoder"))  # transformers writes safetensors
    DDIMScheduler(**SD_SCHEDULER).save_pretrained(str(folder / "scheduler"))
    from diffusers import __version__

    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": __version__,
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
             "feature_extractor": [None, None], "requires_safety_checker": False}
    (folder / MODEL_INDEX).write_text(json.dumps(index, indent=1))
    return folder


def size_factor(model: TextToImage) -> int:
    """What an image size must be a multiple of: the VAE's downsampling times the UNet's."""
    vae_factor = 2 ** (len(model.vae.config.block_out_channels) - 1)
    return vae_factor * 2 ** (len(model.unet.config.down_block_types) - 1)


def check_image_size(model: TextToImage, image_size: int) -> None:
    factor = size_factor(model)
    if image_size < factor or image_size % factor:
        raise ConfigError(f"text-to-image size {image_size} is not a multiple of {factor} (the VAE's downsampling "
                          f"times the UNet's), e.g. {max(factor, image_size // factor * factor)}")


def apply_method(unet: nn.Module, method: str, rank: int = 8, convs: bool = False) -> None:
    """Freeze the UNet and make the method's parameters trainable (generator.set_trainable; LoRA /
    DoRA on the attention projections, and the ResNet convolutions with ``convs``)."""
    from .generator import set_trainable

    if method not in METHODS:
        raise ConfigError(f"text-to-image method {method!r} is not one of {', '.join(METHODS)}")
    set_trainable(unet, method, rank, ATTENTION_TARGETS + (CONV_TARGETS if convs else ()))


def trainable_names(unet: nn.Module) -> list[str]:
    return [name for name, p in unet.named_parameters() if p.requires_grad]


def class_prompts(template: str, class_names) -> list[str]:
    """One prompt per class: ``{label}`` in the template replaced by the class name, underscores as spaces."""
    if "{label}" not in template:
        raise ConfigError(f"--prompt {template!r} has no {{label}}: it must name the class, e.g. {DEFAULT_PROMPT!r}")
    return [template.replace("{label}", str(name).replace("_", " ")) for name in class_names]


@torch.no_grad()
def encode_prompts(model: TextToImage, prompts: list[str]) -> torch.Tensor:
    """The frozen text encoder's last hidden states [len(prompts), tokens, dim] (padded to the tokenizer's length)."""
    tokens = model.tokenizer(prompts, padding="max_length", max_length=model.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
    return model.text_encoder(tokens.input_ids.to(model.device))[0]


def _latent_scale(vae) -> tuple[float, float]:
    return vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0


@torch.no_grad()
def encode_images(model: TextToImage, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """uint8 images [N, C, S, S] (C = 1 repeated to RGB) to the frozen VAE's scaled latents (on the CPU)."""
    scale, shift = _latent_scale(model.vae)
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].float() / 127.5 - 1.0
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        mean = model.vae.encode(x.to(model.device)).latent_dist.mean
        out.append(((mean - shift) * scale).cpu())
    return torch.cat(out)


def run_adapt(base, data: str, out, method: str = "lora", fraction: float | None = None, steps: int = 500,
              batch_size: int = 32, lr: float = 1e-4, rank: int = 8, seed: int = 0, root: str | None = None,
              log=print, prompt: str = DEFAULT_PROMPT, image_size: int = DEFAULT_IMAGE_SIZE, convs: bool = False,
              device=None) -> dict:
    """Adapt the Stable Diffusion UNet at ``base`` to ``data`` with ``method``; writes ``out``."""
    from diffusers import DDPMScheduler

    from .data.privacy import public_path
    from .generator import CONFIG_FILE, _training_images, fit

    if method not in METHODS:
        raise ConfigError(f"text-to-image method {method!r} is not one of {', '.join(METHODS)} "
                          "(a Stable Diffusion base is adapted, never trained from scratch)")
    prompt = prompt or DEFAULT_PROMPT
    class_prompts(prompt, [])  # the template names the class
    model = load_components(base)
    check_image_size(model, image_size)
    bundle = _training_images(data, image_size, fraction, seed, root)
    model.class_names, model.prompt = list(bundle.class_names), prompt
    model.channels, model.image_size = bundle.in_channels, image_size
    with torch.random.fork_rng(devices=[]):  # LoRA's A matrices are drawn
        torch.manual_seed(seed)
        apply_method(model.unet, method, rank, convs)
    names = trainable_names(model.unet)
    model.to(_device(device))
    latents = encode_images(model, bundle.train.images)
    context = encode_prompts(model, class_prompts(prompt, model.class_names))
    began = time.perf_counter()
    ema = fit(model.unet, latents, bundle.train.labels, steps, batch_size, lr, seed,
              lambda unet, noisy, t, y: unet(noisy, t, encoder_hidden_states=context[y]).sample,
              scheduler=_scheduler(DDPMScheduler, model.scheduler_config), log=log)
    train_seconds = time.perf_counter() - began
    meta = {"kind": KIND, "method": method, "rank": rank if method in ("lora", "dora") else None,
            "lora_convs": bool(convs) if method in ("lora", "dora") else None, "prompt": prompt,
            "class_names": model.class_names, "channels": bundle.in_channels, "image_size": image_size,
            "trainable": sum(p.numel() for p in model.unet.parameters() if p.requires_grad),
            "total": sum(p.numel() for p in model.unet.parameters()), "steps": steps, "batch_size": batch_size,
            "lr": lr, "seed": seed, "train_seconds": train_seconds, "data": public_path(data), "fraction": fraction,
            "n_train": len(bundle.train), "base": public_path(str(base))}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_trainable(out / TRAINABLE_FILE, ema, names)
    meta["adapter_bytes"] = (out / TRAINABLE_FILE).stat().st_size
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=1))
    return meta


def save_trainable(path, unet: nn.Module, names) -> None:
    """Only the trainable tensors (``names``) of ``unet``, as safetensors."""
    from safetensors.torch import save_file

    state = unet.state_dict()
    save_file({name: state[name].detach().cpu().contiguous() for name in names}, str(path))


def load(folder, base=None, device=None) -> tuple[TextToImage, dict]:
    """A text-to-image generator folder on top of its base weights (``base``, default the one it
    recorded), loaded strictly: every saved tensor must be one of the method's, and every one of
    them saved."""
    from safetensors.torch import load_file

    from .data.privacy import is_redacted
    from .generator import CONFIG_FILE

    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file() or not (folder / TRAINABLE_FILE).is_file():
        raise ConfigError(f"{folder} is not a text-to-image generator folder ({CONFIG_FILE} and {TRAINABLE_FILE} "
                          "written by 'medpeft generator adapt' on a Stable Diffusion base)")
    meta = json.loads((folder / CONFIG_FILE).read_text())
    if meta.get("kind") != KIND:
        raise ConfigError(f"{folder} is not a text-to-image generator (generator.json kind {meta.get('kind')!r})")
    base = base or meta.get("base")
    if not base or is_redacted(base):
        raise ConfigError(f"{folder}: the path of the Stable Diffusion weights it was adapted from was not recorded "
                          f"({meta.get('base')!r}: medpeft writes no absolute path); give their folder with --base, "
                          "or record full paths with MEDPEFT_RECORD_PATHS=1 when adapting")
    model = load_components(base)
    with torch.random.fork_rng(devices=[]):
        apply_method(model.unet, meta["method"], meta.get("rank") or 8, bool(meta.get("lora_convs")))
    total = sum(p.numel() for p in model.unet.parameters())
    if meta.get("total") not in (None, total):
        raise ConfigError(f"{folder} was adapted from a UNet of {meta['total']:,} parameters (with its method); "
                          f"the base {base!r} has {total:,}: give the Stable Diffusion weights it was made from")
    tensors = load_file(str(folder / TRAINABLE_FILE))
    expected = set(trainable_names(model.unet))
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ConfigError(f"{folder / TRAINABLE_FILE} does not hold the {meta['method']} tensors of its UNet: "
                          f"{len(missing)} missing ({', '.join(missing[:3])}), {len(unexpected)} unexpected "
                          f"({', '.join(unexpected[:3])})")
    try:
        model.unet.load_state_dict(tensors, strict=False)
    except RuntimeError as error:
        raise ConfigError(f"{folder / TRAINABLE_FILE} does not fit the base {base!r}: {error}") from error
    model.class_names, model.prompt = list(meta["class_names"]), meta["prompt"]
    model.channels, model.image_size = meta["channels"], meta["image_size"]
    model.unet.eval()  # the method's tensors keep requires_grad: trainable_names(model.unet) names them
    return model.to(_device(device)), meta


def merged(model: TextToImage) -> TextToImage:
    """A copy whose UNet has LoRA / DoRA folded into its weights (medpeft's merge walk)."""
    from .generator import merged as merged_unet

    return dataclasses.replace(model, unet=merged_unet(model.unet))


@torch.no_grad()
def sample(model: TextToImage, labels: torch.Tensor, seed: int = 0, steps: int = SAMPLE_STEPS, guidance: float = 1.0,
           batch_size: int = 16) -> torch.Tensor:
    """uint8 images [N, C, S, S] of the given classes (C: the data set's channels), DDIM (eta 0) in
    latent space from seeded noise; classifier-free guidance against the empty prompt when
    ``guidance > 1``."""
    from diffusers import DDIMScheduler

    if guidance < 1:
        raise ConfigError(f"--guidance {guidance}: expected >= 1 (1: no classifier-free guidance)")
    scheduler = _scheduler(DDIMScheduler, model.scheduler_config)
    scheduler.set_timesteps(steps)
    unet, vae, device = model.unet.eval(), model.vae, model.device
    size = model.image_size or unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    latent_size = size // 2 ** (len(vae.config.block_out_channels) - 1)
    context = encode_prompts(model, class_prompts(model.prompt, model.class_names))
    empty = encode_prompts(model, [""]) if guidance > 1 else None
    scale, shift = _latent_scale(vae)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, len(labels), batch_size):
        y = labels[start:start + batch_size].to(device)
        x = torch.randn((len(y), unet.config.in_channels, latent_size, latent_size), generator=gen)
        x = x.to(device) * scheduler.init_noise_sigma
        condition = context[y] if empty is None else torch.cat([empty.expand(len(y), -1, -1), context[y]])
        for t in scheduler.timesteps:
            inputs = scheduler.scale_model_input(x if empty is None else torch.cat([x, x]), t)
            noise = unet(inputs, t, encoder_hidden_states=condition).sample
            if empty is not None:
                unconditional, conditional = noise.chunk(2)
                noise = unconditional + guidance * (conditional - unconditional)
            x = scheduler.step(noise, t, x).prev_sample
        pixels = (vae.decode(x / scale + shift).sample.clamp(-1, 1) + 1) * 127.5
        if model.channels == 1:
            pixels = pixels.mean(1, keepdim=True)
        out.append(pixels.round().to(torch.uint8).cpu())
    return torch.cat(out)

