"""Continued self-supervised pre-training on unlabelled images: ``medpeft pretrain``.

    medpeft pretrain --data pneumoniamnist --backbone dinov2_vits14 --ssl mae --image-size 112 --out w.safetensors
    medpeft run --data pneumoniamnist --weights w.safetensors --method lora --fraction 0.01

Objectives:

* ``mae`` (ViTs; He et al., CVPR 2022): each image's patches are masked at random (``mask_ratio``,
  0.75 as in the paper); the encoder sees only the visible patch tokens (and its class / register
  tokens); a light decoder (``DECODER_DEPTH`` transformer blocks of width ``DECODER_DIM``) fills
  in mask tokens and predicts every patch's pixels; the loss is the mean squared error on the
  masked patches only, against each patch's pixels normalised by their own mean and variance
  (the paper's better target).
* ``simclr`` (CNNs and ViTs; Chen et al., ICML 2020): two augmented views per image (the
  ``medical`` augmentation preset at strength 1.5: crops, flips, rotation, intensity, artefacts),
  pooled backbone features through a 2-layer projection head, NT-Xent with temperature 0.2 over
  the 2B views of a batch.

The pool is the training split of a data source (labels ignored), or a plain folder of images;
validation and test images - and, by the split's grouping, their near-duplicates - are never in
it. Every step's batch and augmentation come from a generator seeded by (seed, step), so a run
killed and resumed from its last checkpoint (``--checkpoint-every``, ``--resume``) ends exactly
where an uninterrupted run ends. ``--monitor-every``: k-NN accuracy (k = 20, cosine) of the
validation split's features against the training split's, when the source has labels. Output: the
backbone's state dict (timm naming, no head) as safetensors with its provenance in the metadata;
``medpeft run --weights`` loads it strictly (another architecture: an error naming both).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, DataError

OBJECTIVES = ("mae", "simclr")
DECODER_DIM, DECODER_DEPTH = 128, 2
TEMPERATURE = 0.2
PROJECTION_DIM = 128


@dataclass
class PretrainConfig:
    data: str
    backbone: str = "dinov2_vits14"
    ssl: str = "mae"
    image_size: int = 112
    steps: int = 200
    batch_size: int = 32
    lr: float = 1.5e-4
    weight_decay: float = 0.05
    mask_ratio: float = 0.75
    seed: int = 0
    data_root: str | None = None
    checkpoint_every: int = 50
    monitor_every: int = 0
    threads: int | None = None
    # parameter-efficient continued pre-training: a mergeable method (lora, bitfit, norm, ...) is the
    # only part of the encoder that moves, and is merged into the weights written; full: everything
    method: str = "full"

    def check(self) -> None:
        if self.ssl not in OBJECTIVES:
            raise ConfigError(f"--ssl {self.ssl!r} is not one of {', '.join(OBJECTIVES)}")
        if not 0.0 < float(self.mask_ratio) < 1.0:
            raise ConfigError(f"--mask-ratio {self.mask_ratio!r}: expected a fraction in (0, 1)")
        for name in ("steps", "batch_size", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {value!r}: expected a whole number >= 1")
        if self.method != "full":
            from .methods import is_mergeable, parse_method

            if not is_mergeable(parse_method(self.method)):
                raise ConfigError(f"--method {self.method!r} cannot be merged into the weights a pre-training run "
                                  "writes; use a mergeable method (lora, bitfit, norm, ssf, ...) or full")
        if self.batch_size < 2 and self.ssl == "simclr":
            raise ConfigError("simclr needs --batch-size >= 2 (the other images are its negatives)")


# ----------------------------------------------------------------------------- losses
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """SimCLR's NT-Xent: for each of the 2B normalised projections, cross-entropy of its positive
    (the other view of its image) against the other 2B - 2 views, mean over the 2B anchors."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))  # an anchor is not its own negative
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, positives)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, patch * patch * C] in row-major patch order (the ViT's token order)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def mae_target(images: torch.Tensor, patch: int) -> torch.Tensor:
    """Each patch's pixels normalised by their own mean and variance (MAE's norm_pix_loss target)."""
    target = patchify(images, patch)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    return (target - mean) / (var + 1e-6) ** 0.5


def random_masking(n_tokens: int, batch: int, ratio: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices of the visible tokens [B, n_keep] in ascending order, mask [B, N] with 1 = masked);
    exactly round(N * (1 - ratio)) tokens stay visible in every image."""
    keep = max(1, int(round(n_tokens * (1 - ratio))))
    noise = torch.rand(batch, n_tokens, generator=gen)
    visible = noise.argsort(dim=1)[:, :keep].sort(dim=1).values
    mask = torch.ones(batch, n_tokens)
    mask.scatter_(1, visible, 0.0)
    return visible, mask


# ----------------------------------------------------------------------------- models
class MaeModel(nn.Module):
    """A timm ViT encoder (run on the visible tokens only) and MAE's light decoder."""

    def __init__(self, encoder: nn.Module, patch: int, n_tokens: int, in_chans: int = 3):
        super().__init__()
        self.encoder = encoder
        dim = encoder.embed_dim
        self.patch, self.n_tokens = patch, n_tokens
        self.prefix = int(getattr(encoder, "num_prefix_tokens", 1))
        self.embed = nn.Linear(dim, DECODER_DIM)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, DECODER_DIM))
        self.pos = nn.Parameter(torch.zeros(1, n_tokens, DECODER_DIM))
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.normal_(self.pos, std=0.02)
        from timm.models.vision_transformer import Block

        self.blocks = nn.Sequential(*[Block(DECODER_DIM, 4, mlp_ratio=4.0) for _ in range(DECODER_DEPTH)])
        self.norm = nn.LayerNorm(DECODER_DIM)
        self.head = nn.Linear(DECODER_DIM, patch * patch * in_chans)
        self.visible_seen = 0  # tokens the encoder's blocks saw in the last forward (tests)

    def encode_visible(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        e = self.encoder
        tokens = e._pos_embed(e.patch_embed(x))  # prefix tokens first, then the patch grid
        prefix, patches = tokens[:, :self.prefix], tokens[:, self.prefix:]
        kept = torch.gather(patches, 1, visible[..., None].expand(-1, -1, patches.shape[-1]))
        h = e.norm_pre(torch.cat([prefix, kept], dim=1))
        self.visible_seen = h.shape[1]
        return e.norm(e.blocks(h))

    def forward(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        h = self.embed(self.encode_visible(x, visible)[:, self.prefix:])
        b = x.shape[0]
        full = self.mask_token.expand(b, self.n_tokens, -1).clone()
        full.scatter_(1, visible[..., None].expand(-1, -1, h.shape[-1]), h)
        return self.head(self.norm(self.blocks(full + self.pos)))  # [B, N, patch * patch * C]


class SimclrModel(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        dim = encoder.num_features
        self.projection = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, PROJECTION_DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder.forward_head(self.encoder.forward_features(x), pre_logits=True)
        return self.projection(features.flatten(1))


# ----------------------------------------------------------------------------- data
def unlabelled_pool(cfg: PretrainConfig):
    """(pool ImageSet, validation ImageSet or None, training ImageSet with labels or None, source name)."""
    from .data.base import DataConfig, ImageSet
    from .data.registry import load_data, resolve_source

    data = DataConfig(name=cfg.data, root=cfg.data_root, image_size=cfg.image_size, audit="off")
    kind, where = resolve_source(data)
    if kind == "folder" and not any(os.scandir(where)):
        raise DataError(f"--data {cfg.data!r}: the folder is empty; expected unlabelled images")
    try:
        bundle = load_data(data)
        return bundle.train, bundle.val, bundle.train, bundle.name
    except (DataError, ConfigError) as err:
        if kind != "folder":
            raise
        from .adapt import load_target_images

        try:  # a plain folder of images (no class sub-folders): every image, no labels
            pool = load_target_images(where, cfg.image_size, 3)
        except DataError:
            raise err from None
        return ImageSet(images=pool.images, labels=pool.labels, ids=pool.ids), None, None, Path(where).name


# ----------------------------------------------------------------------------- training
def _batch(pool, cfg: PretrainConfig, step: int, mean, std, augment=None):
    """The step's images (seeded by (seed, step): the same after a resume), normalised."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    index = torch.randint(0, len(pool), (cfg.batch_size,), generator=gen)
    x = pool.images[index].float() / 255
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    views = [x] if augment is None else [augment(x.clone(), gen), augment(x.clone(), gen)]
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return [(v - m) / s for v in views], gen


@torch.no_grad()
def knn_accuracy(encoder: nn.Module, train, val, mean, std, k: int = 20) -> float:
    from .forgetting import pooled_features

    a = F.normalize(torch.from_numpy(pooled_features(encoder, train, mean, std)), dim=1)
    b = F.normalize(torch.from_numpy(pooled_features(encoder, val, mean, std)), dim=1)
    neighbours = (b @ a.T).topk(min(k, len(a)), dim=1).indices
    votes = train.labels[neighbours]
    predicted = torch.mode(votes, dim=1).values
    return float((predicted == val.labels).float().mean())


def pretrain(cfg: PretrainConfig, out: str | Path, resume: bool = False, stop_after: int | None = None,
             log=print) -> dict:
    """Pre-train; writes ``out`` (safetensors) and ``out.ckpt`` checkpoints; returns a summary."""
    from safetensors.torch import save_file

    from .augment import build_augment
    from .backbones import backbone_info, create_backbone

    cfg.check()
    out = Path(out)
    checkpoint = out.with_name(out.name + ".ckpt")
    if out.exists() and not resume:
        raise ConfigError(f"{out} exists; choose another file or continue with --resume")
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    info = backbone_info(cfg.backbone)
    if cfg.ssl == "mae" and info.family != "vit":
        raise ConfigError(f"--ssl mae needs a ViT backbone; {cfg.backbone} is a {info.family.upper()}: use --ssl simclr")
    pool, val, labelled, source = unlabelled_pool(cfg)
    if len(pool) < 2:
        raise DataError(f"--data {cfg.data!r}: {len(pool)} image(s) to pre-train on; expected at least 2")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        encoder, info = create_backbone(cfg.backbone, num_classes=0, image_size=cfg.image_size)
        if cfg.method != "full":  # only the method's parameters of the encoder train
            from .methods import apply_methods, build_configs, parse_method

            names = parse_method(cfg.method)
            apply_methods(encoder, names, build_configs(names), info.family)
        if cfg.ssl == "mae":
            patch = int(info.patch_size)
            if cfg.image_size % patch:
                raise ConfigError(f"--image-size {cfg.image_size} is not a multiple of {cfg.backbone}'s patch {patch}")
            model = MaeModel(encoder, patch, (cfg.image_size // patch) ** 2)
        else:
            model = SimclrModel(encoder)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    start = 0
    if resume and checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)  # tensors and numbers only
        if state["config"] != json.dumps(asdict(cfg), sort_keys=True):
            raise ConfigError(f"{checkpoint} was written with other settings; delete it or repeat them")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
        log(f"resumed from step {start} ({checkpoint.name})")
    augment = build_augment("medical", 1.5) if cfg.ssl == "simclr" else None
    model.train()
    began, losses, monitor = time.perf_counter(), [], []
    for step in range(start, cfg.steps):
        lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))  # cosine, a function of the step alone
        for group in optimizer.param_groups:
            group["lr"] = lr
        views, gen = _batch(pool, cfg, step, info.mean, info.std, augment)
        if cfg.ssl == "mae":
            visible, mask = random_masking(model.n_tokens, cfg.batch_size, cfg.mask_ratio, gen)
            predicted = model(views[0], visible)
            per_patch = ((predicted - mae_target(views[0], model.patch)) ** 2).mean(-1)
            loss = (per_patch * mask).sum() / mask.sum()  # masked patches only
        else:
            loss = nt_xent(model(views[0]), model(views[1]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            tmp = checkpoint.with_name(checkpoint.name + ".tmp")
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": done,
                        "config": json.dumps(asdict(cfg), sort_keys=True)}, tmp)
            os.replace(tmp, checkpoint)
        if cfg.monitor_every and done % cfg.monitor_every == 0 and val is not None and labelled is not None:
            accuracy = knn_accuracy(encoder, labelled, val, info.mean, info.std)
            monitor.append([done, accuracy])
            model.train()
            log(f"step {done}: k-NN validation accuracy {accuracy:.4f}")
        if done % max(1, cfg.steps // 10) == 0:
            rate = (done - start) * cfg.batch_size / max(time.perf_counter() - began, 1e-9)
            log(f"step {done}/{cfg.steps}  loss {loss.item():.4f}  {rate:.1f} img/s")
        if stop_after is not None and done >= stop_after:  # tests: an interruption right after a step
            return {"stopped_at": done}
    from .data.privacy import public_path

    if cfg.method != "full":  # the method folded into the weights: a plain state dict, as any backbone's
        from .methods import merge_methods

        merge_methods(encoder)
    state = {k: v.detach().contiguous().clone() for k, v in encoder.state_dict().items()}
    meta = {"medpeft_pretrain": json.dumps({"backbone": cfg.backbone, "ssl": cfg.ssl, "steps": cfg.steps,
                                            "batch_size": cfg.batch_size, "seed": cfg.seed, "method": cfg.method,
                                            "image_size": cfg.image_size, "mask_ratio": cfg.mask_ratio,
                                            "data": public_path(cfg.data), "n_images": len(pool),
                                            "pool": "training split (labels ignored)" if labelled is not None
                                            else "folder"})}
    tmp = out.with_name(out.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, out)
    return {"out": str(out), "steps": cfg.steps, "final_loss": losses[-1] if losses else None, "monitor": monitor,
            "n_images": len(pool), "source": source, "seconds": time.perf_counter() - began}
