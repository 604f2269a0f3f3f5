"""A class-conditional diffusion generator (diffusers) pre-trained on a large source and adapted to a
small target with the generative analogue of each PEFT method: ``medpeft generator``.

    medpeft generator pretrain --data pneumoniamnist --image-size 32 --out gen/cxr-base
    medpeft generator adapt gen/cxr-base --data breastmnist --method lora --fraction 0.1 --out gen/breast-lora
    medpeft generator sample gen/breast-lora --per-class 500 --out synth/        # PNGs + manifest.csv
    medpeft generator eval gen/breast-lora --data breastmnist                     # FD-DINOv2, KID, P/R, copies
    medpeft run --data breastmnist --fraction 0.1 --synthetic synth/manifest.csv --method lora

Model: diffusers' ``UNet2DModel`` (two resolutions, self-attention at the lower one) with a class
embedding (``num_class_embeds``), trained with DDPM's noise-prediction loss (1000 steps, linear
betas) and an exponential moving average of the weights (decay min(0.999, (1 + t) / (10 + t)) as diffusers'
EMA warm-up; what is saved and sampled);
sampling with DDIM (50 steps, eta 0). Every training step's batch, noise and timesteps come from a
generator seeded by (seed, step).

Adaptation methods (the generator's trainable parameters; the class embedding is always re-made
for the target's classes and trained, like a classifier head):

* ``full`` - every weight; ``bitfit`` - the biases; ``norm`` - the GroupNorm / LayerNorm affines;
* ``lora`` / ``dora`` - peft's LoRA (DoRA) on the attention projections (to_q, to_k, to_v, to_out)
  and the ResNet blocks' 3x3 convolutions, rank ``rank`` (alpha = 2 rank);
* ``scratch`` - no pre-training: a fresh UNet trained on the target (the baseline).

What is saved is the merged UNet (LoRA / DoRA folded in by medpeft's one merge walk) as
safetensors with ``generator.json`` (size, channels, classes, method, trainable count, steps,
seed, data) beside it; a folder loads strictly.

A Stable Diffusion folder (or Hub id) as ``adapt``'s base makes the second kind, a text-to-image
generator prompted with the class name (``medpeft/text2image.py``); it shares this module's
method helper (``set_trainable``) and training loop (``fit``). ``sample`` and ``eval`` read
either kind (generator.json's ``kind``: absent for this one, ``text2image`` for that one).
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

METHODS = ("full", "bitfit", "norm", "lora", "dora", "scratch")
TRAIN_TIMESTEPS = 1000
SAMPLE_STEPS = 50
EMA_DECAY = 0.999
WEIGHTS_FILE, CONFIG_FILE = "unet.safetensors", "generator.json"


def build_unet(image_size: int, channels: int, num_classes: int, width: int = 32) -> nn.Module:
    from diffusers import UNet2DModel

    if image_size % 4:
        raise ConfigError(f"generator image size {image_size} must be a multiple of 4 (two downsamplings)")
    return UNet2DModel(sample_size=image_size, in_channels=channels, out_channels=channels, layers_per_block=1,
                       block_out_channels=(width, 2 * width, 2 * width),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                       num_class_embeds=num_classes, norm_num_groups=8)


def new_class_embedding(unet: nn.Module, num_classes: int, seed: int) -> None:
    """A fresh class embedding for the target's classes (seeded), trainable."""
    dim = unet.class_embedding.embedding_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.class_embedding = nn.Embedding(num_classes, dim)


LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")


def set_trainable(model: nn.Module, method: str, rank: int = 8, targets=LORA_TARGETS) -> None:
    """Freeze ``model`` and make the method's parameters trainable: full / scratch every weight,
    bitfit the biases, norm the GroupNorm / LayerNorm affines, lora / dora peft adapters on the
    modules named ``targets`` (rank ``rank``, alpha = 2 rank). Shared by both kinds of generator."""
    if method in ("full", "scratch"):
        for p in model.parameters():
            p.requires_grad_(True)
        return
    for p in model.parameters():
        p.requires_grad_(False)
    if method == "bitfit":
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.requires_grad_(True)
    elif method == "norm":
        for module in model.modules():
            if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
                for p in module.parameters():
                    p.requires_grad_(True)
    elif method in ("lora", "dora"):
        from peft import LoraConfig, inject_adapter_in_model

        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets),
                                           use_dora=method == "dora", init_lora_weights=True), model)
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
    else:
        raise ConfigError(f"generator method {method!r} is not one of {', '.join(METHODS)}")


def apply_method(unet: nn.Module, method: str, rank: int = 8) -> None:
    """Freeze the UNet and make the method's parameters (and the class embedding) trainable."""
    if method not in METHODS:
        raise ConfigError(f"generator method {method!r} is not one of {', '.join(METHODS)}")
    set_trainable(unet, method, rank)
    for p in unet.class_embedding.parameters():
        p.requires_grad_(True)


def merged(unet: nn.Module) -> nn.Module:
    """A copy with any LoRA / DoRA folded into the base weights (plain UNet2DModel keys)."""
    from .methods.merging import merge_layers

    plain = copy.deepcopy(unet)
    merge_layers(plain)
    return plain


def train(unet: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int, batch_size: int, lr: float,
          seed: int, log=print) -> nn.Module:
    """DDPM training of the trainable parameters; returns the EMA model (what is saved)."""
    x_all = images.float() / 127.5 - 1.0  # [-1, 1]
    return fit(unet, x_all, labels, steps, batch_size, lr, seed,
               lambda model, noisy, t, y: model(noisy, t, class_labels=y).sample, log=log)


def fit(model: nn.Module, x_all: torch.Tensor, conditions: torch.Tensor, steps: int, batch_size: int, lr: float,
        seed: int, predict, scheduler=None, log=print) -> nn.Module:
    """The training loop both kinds of generator share: DDPM noise prediction (or v-prediction, as
    ``scheduler`` says) of ``model``'s trainable parameters on ``x_all`` (pixels or latents) with
    per-image ``conditions`` (labels); ``predict(model, noisy, t, conditions)`` is the model's
    output. Each step's batch, noise and timesteps come from a generator seeded by (seed, step),
    drawn on the CPU whatever the model's device. Returns the EMA model."""
    from diffusers import DDPMScheduler

    scheduler = scheduler or DDPMScheduler(num_train_timesteps=TRAIN_TIMESTEPS)
    num_timesteps, target_kind = scheduler.config.num_train_timesteps, scheduler.config.prediction_type
    if target_kind not in ("epsilon", "v_prediction"):
        raise ConfigError(f"the noise scheduler predicts {target_kind!r}; medpeft trains 'epsilon' or 'v_prediction'")
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    began = time.perf_counter()
    model.train()
    for step in range(steps):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        index = torch.randint(0, len(x_all), (batch_size,), generator=gen)
        x0, y = x_all[index].to(device), conditions[index].to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, num_timesteps, (batch_size,), generator=gen).to(device)
        noisy = scheduler.add_noise(x0, noise, t)
        target = noise if target_kind == "epsilon" else scheduler.get_velocity(x0, noise, t)
        loss = F.mse_loss(predict(model, noisy, t, y), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        decay = min(EMA_DECAY, (1 + step) / (10 + step))  # diffusers' EMA warm-up: early weights count less
        with torch.no_grad():  # frozen tensors are equal in both already
            for e, p in zip(ema.parameters(), model.parameters()):
                if p.requires_grad:
                    e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        if (step + 1) % max(1, steps // 10) == 0:
            log(f"step {step + 1}/{steps}  loss {loss.item():.4f}  "
                f"{(step + 1) * batch_size / max(time.perf_counter() - began, 1e-9):.1f} img/s")
    return ema


@torch.no_grad()
def sample(unet: nn.Module, labels: torch.Tensor, seed: int = 0, steps: int = SAMPLE_STEPS,
           batch_size: int = 64) -> torch.Tensor:
    """uint8 images [N, C, S, S] of the given classes, DDIM (eta 0), seeded."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=TRAIN_TIMESTEPS)
    scheduler.set_timesteps(steps)
    unet.eval()
    size, channels = unet.config.sample_size, unet.config.in_channels
    out = []
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, len(labels), batch_size):
        y = labels[start:start + batch_size]
        x = torch.randn((len(y), channels, size, size), generator=gen)
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t, class_labels=y).sample, t, x).prev_sample
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    return torch.cat(out)


def save(folder: str | Path, unet: nn.Module, meta: dict) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plain = merged(unet)
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=1))


def load(folder: str | Path) -> tuple[nn.Module, dict]:
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = json.loads((folder / CONFIG_FILE).read_text()) if (folder / CONFIG_FILE).is_file() else {}
    if meta.get("kind") is not None:
        raise ConfigError(f"{folder} is a {meta['kind']} generator, not a class-conditional UNet "
                          "(medpeft.text2image.load reads it)")
    if not meta or not (folder / WEIGHTS_FILE).is_file():
        raise ConfigError(f"{folder} is not a generator folder ({CONFIG_FILE} and {WEIGHTS_FILE} written by "
                          "'medpeft generator pretrain' or 'adapt')")
    unet = build_unet(meta["image_size"], meta["channels"], len(meta["class_names"]), meta.get("width", 32))
    unet.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=True)
    return unet.eval(), meta


def load_any(folder: str | Path, base=None, guidance: float | None = None):
    """(kind, model, meta) of either kind of generator folder (generator.json's ``kind``: absent
    for the class-conditional UNet, ``text2image`` for Stable Diffusion); ``base`` and
    ``guidance`` are the text-to-image generator's only."""
    from . import text2image

    path = Path(folder) / CONFIG_FILE
    kind = json.loads(path.read_text()).get("kind") if path.is_file() else None
    if kind == text2image.KIND:
        model, meta = text2image.load(folder, base)
        return kind, model, meta
    if kind is not None:
        raise ConfigError(f"{folder}: unknown generator kind {kind!r} in {CONFIG_FILE}")
    unet, meta = load(folder)
    if guidance not in (None, 1, 1.0):
        raise ConfigError(f"--guidance is for text-to-image generators; {folder} is a class-conditional one "
                          "(trained without an unconditional class)")
    if base is not None:
        raise ConfigError(f"--base is for text-to-image generators (where the Stable Diffusion weights are); "
                          f"{folder} is a class-conditional one and holds all its weights")
    return "unet", unet, meta


def class_labels(class_names, per_class: int, classes=None) -> torch.Tensor:
    """``per_class`` labels of each class, or of ``classes`` only (names, or one comma-separated string)."""
    names = list(class_names)
    if classes is None:
        chosen = list(range(len(names)))
    else:
        wanted = [c.strip() for c in classes.split(",")] if isinstance(classes, str) else list(classes)
        unknown = [c for c in wanted if c not in names]
        if unknown or not wanted:
            raise ConfigError(f"--classes: {unknown[0] if unknown else 'nothing'!r} is not a class of this "
                              f"generator; it knows {', '.join(map(str, names))}")
        chosen = [names.index(c) for c in dict.fromkeys(wanted)]
    return torch.tensor(chosen, dtype=torch.long).repeat_interleave(per_class)


def _generate(kind: str, model, labels: torch.Tensor, seed: int, guidance: float | None) -> torch.Tensor:
    from . import text2image

    if kind == text2image.KIND:
        return text2image.sample(model, labels, seed=seed, guidance=1.0 if guidance is None else guidance)
    return sample(model, labels, seed=seed)


def _training_images(data: str, image_size: int, fraction: float | None, seed: int, root: str | None):
    from .data import load_data
    from .data.base import DataConfig

    bundle = load_data(DataConfig(name=data, root=root, image_size=image_size, fraction=fraction, subset_seed=seed,
                                  audit="off"))
    if bundle.task not in ("binary", "multiclass"):
        raise ConfigError(f"the generator is class-conditional: {data!r} is a {bundle.task} set")
    return bundle


def run_pretrain(data: str, out, image_size: int = 32, steps: int = 2000, batch_size: int = 32, lr: float = 2e-4,
                 seed: int = 0, root: str | None = None, width: int = 32, log=print) -> dict:
    from .data.privacy import public_path

    bundle = _training_images(data, image_size, None, seed, root)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = build_unet(image_size, bundle.in_channels, bundle.num_classes, width)
    apply_method(unet, "full")
    ema = train(unet, bundle.train.images, bundle.train.labels, steps, batch_size, lr, seed, log)
    meta = {"image_size": image_size, "channels": bundle.in_channels, "class_names": bundle.class_names,
            "method": "pretrain", "steps": steps, "seed": seed, "data": public_path(data),
            "n_train": len(bundle.train), "trainable": sum(p.numel() for p in unet.parameters()), "width": width}
    save(out, ema, meta)
    return meta


def run_adapt(base, data: str, out, method: str = "lora", fraction: float | None = None, steps: int = 500,
              batch_size: int = 32, lr: float = 1e-4, rank: int = 8, seed: int = 0, root: str | None = None,
              log=print, prompt: str | None = None, image_size: int | None = None) -> dict:
    """Adapt ``base`` to ``data``: a generator folder (the class-conditional UNet), or a Stable
    Diffusion folder / Hub id (text-to-image, ``text2image.run_adapt``: ``prompt`` and ``image_size``)."""
    from . import text2image
    from .data.privacy import public_path

    if text2image.is_pipeline(base) or (method != "scratch" and base is not None and text2image.is_hub_id(base)):
        return text2image.run_adapt(base, data, out, method, fraction, steps, batch_size, lr, rank, seed, root, log,
                                    prompt=prompt or text2image.DEFAULT_PROMPT,
                                    image_size=image_size or text2image.DEFAULT_IMAGE_SIZE)
    if prompt is not None:
        raise ConfigError(f"--prompt is for a Stable Diffusion base (a folder with model_index.json); {base} is a "
                          "class-conditional generator")
    if method not in METHODS:
        raise ConfigError(f"generator method {method!r} is not one of {', '.join(METHODS)}")
    if method == "scratch":
        base_meta = json.loads((Path(base) / CONFIG_FILE).read_text()) if base else {}
        size = base_meta.get("image_size", 32)
    else:
        unet, base_meta = load(base)
        size = base_meta["image_size"]
    if image_size is not None and image_size != size:
        raise ConfigError(f"--image-size {image_size}: a class-conditional generator adapts at its own size "
                          f"({size}); --image-size is for a Stable Diffusion base")
    bundle = _training_images(data, size, fraction, seed, root)
    if bundle.in_channels != base_meta.get("channels", bundle.in_channels):
        raise ConfigError(f"{data!r} has {bundle.in_channels}-channel images; the base generator makes "
                          f"{base_meta['channels']}-channel ones")
    if method == "scratch":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = build_unet(size, bundle.in_channels, bundle.num_classes, base_meta.get("width", 32))
    else:
        new_class_embedding(unet, bundle.num_classes, seed)
    apply_method(unet, method, rank)
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    began = time.perf_counter()
    ema = train(unet, bundle.train.images, bundle.train.labels, steps, batch_size, lr, seed, log)
    meta = {"image_size": size, "channels": bundle.in_channels, "class_names": bundle.class_names, "method": method,
            "rank": rank if method in ("lora", "dora") else None, "steps": steps, "seed": seed,
            "data": public_path(data), "fraction": fraction, "n_train": len(bundle.train), "trainable": trainable,
            "total": sum(p.numel() for p in unet.parameters()), "train_seconds": time.perf_counter() - began,
            "base": None if method == "scratch" else public_path(str(base)), "width": base_meta.get("width", 32),
            # what storing the adaptation alone takes (float32 trainable tensors; the folder keeps the merged UNet)
            "adapter_bytes": 4 * trainable}
    save(out, ema, meta)
    return meta


def run_sample(folder, out, per_class: int = 100, seed: int = 0, classes=None, guidance: float | None = None,
               base=None) -> str:
    """PNGs of ``per_class`` samples of each class (or of ``classes``) and their manifest.csv
    (path,label) under ``out``; either kind of generator."""
    from PIL import Image

    kind, model, meta = load_any(folder, base, guidance)
    labels = class_labels(meta["class_names"], per_class, classes)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = _generate(kind, model, labels, seed, guidance)
    rows = ["path,label"]
    for i, (image, label) in enumerate(zip(images, labels.tolist())):
        array = image.permute(1, 2, 0).numpy()
        name = f"sample_{i:05d}.png"
        Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(out / name)
        rows.append(f"{name},{meta['class_names'][label]}")
    (out / "manifest.csv").write_text("\n".join(rows) + "\n")
    return str(out / "manifest.csv")


def run_eval(folder, data: str, per_class: int = 100, seed: int = 0, root: str | None = None,
             feature_backbone: str = "dinov2_vits14", guidance: float | None = None, base=None) -> dict:
    """FD and KID on the feature backbone's pooled features (DINOv2: FD-DINOv2), k-NN precision /
    recall, and memorisation in pixel space, of samples against the target's training images."""
    from .backbones import create_backbone
    from .data.base import ImageSet
    from .forgetting import pooled_features
    from .gen_metrics import frechet_distance, kernel_inception_distance, memorisation, precision_recall

    kind, model, meta = load_any(folder, base, guidance)
    bundle = _training_images(data, meta["image_size"], None, seed, root)
    labels = class_labels(meta["class_names"], per_class)
    generated = _generate(kind, model, labels, seed, guidance)
    size = max(56, meta["image_size"])
    encoder, info = create_backbone(feature_backbone, num_classes=0, image_size=size)

    def features(images):
        resized = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
        return pooled_features(encoder, ImageSet(resized.round().clamp(0, 255).to(torch.uint8),
                                                 torch.zeros(len(images), dtype=torch.long),
                                                 [str(i) for i in range(len(images))]), info.mean, info.std)

    real_f, gen_f = features(bundle.train.images), features(generated)
    copies = memorisation(generated.flatten(1).float().numpy(), bundle.train.images.flatten(1).float().numpy())
    result = {"feature_space": feature_backbone, "n_real": len(bundle.train), "n_generated": len(generated),
              "fd": frechet_distance(real_f, gen_f), "kid": kernel_inception_distance(real_f, gen_f, seed=seed),
              **precision_recall(real_f, gen_f),
              "memorisation": {k: copies[k] for k in ("threshold", "flagged_fraction", "flagged")}}
    (Path(folder) / "eval.json").write_text(json.dumps(result, indent=1))
    return result
