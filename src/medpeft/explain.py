"""``medpeft explain``: what a trained run looked at, as Grad-CAM overlays (pytorch-grad-cam).

Classification runs get Grad-CAM (Selvaraju et al. 2017) of one class per image, from the
gradients of that class's logit:

- CNN backbones: the last feature stage timm lists in ``model.feature_info`` (the deepest
  feature map before global pooling; the last 2-d convolution when a model lists none). At
  small inputs, where that map is coarser than 4x4 (64 px through stride 32 is 2x2: a map that
  can only say "upper left"), the last stage that still has at least 4x4 cells is used; the
  command prints which.
- ViT backbones: the tokens entering the last transformer block (``blocks[-1].norm1``) when
  the class token (or attention pooling) makes the prediction: the last block's *output*
  patch tokens never reach a class token, so their gradients are zero. With average pooling
  the last block's output is used. Only the patch tokens are kept, reshaped to the patch
  grid: they are the last ``h * w`` tokens of the sequence (class/register tokens, timm's
  ``num_prefix_tokens``, come first and visual-prompt tokens follow them).

Unmerged methods (LoRA wrappers, hooks, adapters, prompts) and ``--merge``d models are
explained alike: the Grad-CAM hooks sit on the layer outputs the methods produce.

Segmentation runs have no single class score to explain: the prediction overlay (the mask
``medpeft predict`` writes) is the explanation.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import ConfigError

DISPLAY_MIN = 224  # overlays of small images (28 px MedMNIST) are upscaled to at least this many pixels
MIN_CAM_GRID = 4  # CNN: the deepest feature stage with at least this many cells per side


def require_gradcam():
    try:
        import pytorch_grad_cam  # noqa: F401
    except ImportError:
        raise ConfigError("medpeft explain needs pytorch-grad-cam: pip install 'medpeft[deploy]' "
                          "(or pip install grad-cam)") from None
    return pytorch_grad_cam


def add_explain_parser(sub) -> None:
    p = sub.add_parser(
        "explain", help="Grad-CAM overlays of what a trained run looked at (segmentation: the prediction overlay)",
        description="Grad-CAM (pytorch-grad-cam) on the last feature stage of a CNN or the last block's patch "
                    "tokens of a ViT; writes <stem>_cam.png (image + heatmap) per image into --out and prints "
                    "the predicted class. Segmentation runs: the prediction overlay is the explanation "
                    "(<stem>_overlay.png and <stem>_mask.png, as 'medpeft predict' writes them).")
    p.add_argument("run", help="run folder written by 'medpeft run' (or its adapter.safetensors)")
    p.add_argument("images", nargs="+", help="image files (png, jpg, dcm, ...)")
    p.add_argument("--out", required=True, help="folder for the overlays (created if missing)")
    p.add_argument("--target-class", default=None,
                   help="class to explain, by name or index (default: each image's predicted class)")
    p.add_argument("--merge", action="store_true", help="merge the method into the backbone first")
    p.add_argument("--weights", default=None, help="backbone weights file, if the run used one")
    p.add_argument("--window", default=None, help="DICOM window CENTER,WIDTH (default: each file's own)")


def cmd_explain(args) -> int:
    from .run import load_run

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out} is a file; give a folder for the overlays")
    require_gradcam()
    loaded = load_run(args.run, weights=args.weights, merge=args.merge)
    if loaded.task == "segmentation":
        print(explain_segmentation(loaded, list(args.images), args.out, args.window))
        return 0
    rows = explain_images(loaded, list(args.images), args.out, target_class=args.target_class, window=args.window)
    print(f"Grad-CAM on {rows[0]['layer']} ({'merged' if args.merge else 'unmerged'} {loaded.method}; "
          f"heatmap: evidence for the explained class, red = most)")
    width = max(len(r["image"]) for r in rows)
    for r in rows:
        note = "" if r["cam_max"] > 0 else "  (no positive evidence for this class: flat map)"
        print(f"{r['image']:<{width}}  predicted {r['predicted']} (p={r['probability']:.3f}, uncalibrated)  "
              f"explained {r['explained']}  -> {r['file']}{note}")
    return 0


def explain_segmentation(loaded, paths: list[str], out: str, window: str | None = None) -> str:
    """The prediction overlay of each image (the same files as ``medpeft predict --out``)."""
    from .data.base import ImageSet
    from .data.io import load_images
    from .tasks import get_task
    from .train import predict_images

    if loaded.metadata.get("prompt", "none") == "box":
        raise ConfigError("this segmentation run was trained with box prompts: use "
                          "'medpeft predict RUN IMAGES --boxes CSV --out FOLDER' for its prediction overlays")
    stacked = load_images(paths, loaded.image_size, window)
    images = ImageSet(stacked, torch.zeros(len(paths), dtype=torch.long), list(paths))
    predictions = predict_images(loaded.model, images, loaded.mean, loaded.std, loaded.task,
                                 len(loaded.class_names))
    written = get_task(loaded.task).write_user_predictions(paths, predictions, loaded.class_names, loaded.task, out)
    return ("segmentation run: the explanation is the prediction overlay (the predicted region tinted red over "
            f"each image; Grad-CAM explains one class score, a segmenter predicts every pixel): {written}")


# --------------------------------------------------------------------------- the target layer


def _feature_entries(model: nn.Module) -> list[dict]:
    info = getattr(model, "feature_info", None)
    if info is None:
        return []
    return [dict(e) for e in getattr(info, "info", info)]  # a list of dicts, or timm's FeatureInfo


def cam_target(model: nn.Module, image_size: int):
    """(layer, reshape_transform or None, description) of the layer Grad-CAM reads, found from the
    model itself: timm's ``feature_info`` (the last entry), a ViT's blocks and patch grid."""
    from .backbones import backbone_family

    modules = dict(model.named_modules())
    entries = [e for e in _feature_entries(model) if e.get("module") in modules]
    if backbone_family(model) == "vit":
        name = entries[-1]["module"] if entries else f"blocks.{len(model.blocks) - 1}"
        block = modules[name]
        pool = getattr(model, "global_pool", "token")
        reads_patches = pool in ("avg", "avgmax", "max") and not getattr(model, "attn_pool", None)
        if not reads_patches and isinstance(getattr(block, "norm1", None), nn.Module):
            layer, name = block.norm1, name + ".norm1"  # patch tokens reach the class token only here
        else:
            layer = block
        grid = _patch_grid(model, image_size)
        return layer, _token_reshape(grid, int(getattr(model, "num_prefix_tokens", 0))), \
            f"{name} (patch tokens, {grid[0]}x{grid[1]} grid)"
    if entries:
        chosen = entries[-1]
        fine = [e for e in entries if e.get("reduction") and -(-image_size // int(e["reduction"])) >= MIN_CAM_GRID]
        if chosen not in fine and fine:
            chosen = fine[-1]  # the last stage is too coarse at this input size
        name, stride = chosen["module"], chosen.get("reduction")
        grid = f", {-(-image_size // int(stride))}x{-(-image_size // int(stride))} map" if stride else ""
        kind = "last feature stage" if chosen is entries[-1] else \
            f"deepest feature stage with >= {MIN_CAM_GRID}x{MIN_CAM_GRID} cells; the last is coarser"
        return modules[name], None, f"{name} ({kind}, stride {stride or '?'}{grid})"
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    head = {id(m) for m in classifier.modules()} if isinstance(classifier, nn.Module) else set()
    convs = [(n, m) for n, m in convs if id(m) not in head]
    if not convs:
        raise ConfigError(f"cannot find a convolutional feature map in {type(model).__name__} for Grad-CAM")
    return convs[-1][1], None, f"{convs[-1][0]} (last convolution)"


def _patch_grid(model: nn.Module, image_size: int) -> tuple[int, int]:
    embed = model.patch_embed
    if hasattr(embed, "dynamic_feat_size"):
        h, w = embed.dynamic_feat_size((image_size, image_size))
    else:
        patch = embed.patch_size if isinstance(embed.patch_size, (tuple, list)) else (embed.patch_size,) * 2
        h, w = image_size // patch[0], image_size // patch[1]
    return int(h), int(w)


def _token_reshape(grid: tuple[int, int], num_prefix: int):
    h, w = grid

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 3:
            return tokens
        if tokens.shape[1] < num_prefix + h * w:
            raise ConfigError(f"expected at least {num_prefix} prefix + {h * w} patch tokens, got {tokens.shape[1]}")
        patches = tokens[:, -h * w:]  # prefix (class/register) and prompt tokens come before the patches
        return patches.reshape(tokens.shape[0], h, w, tokens.shape[2]).permute(0, 3, 1, 2)

    return reshape


# --------------------------------------------------------------------------- Grad-CAM


def class_index(target: str | int | None, class_names: list[str]) -> int | None:
    if target is None:
        return None
    if str(target) in class_names:
        return class_names.index(str(target))
    if str(target).lstrip("-").isdigit() and 0 <= int(target) < len(class_names):
        return int(target)
    raise ConfigError(f"--target-class {target!r} is not a class of this run; expected one of {class_names} "
                      f"or an index 0..{len(class_names) - 1}")


def gradcam_maps(loaded, inputs: torch.Tensor, targets: list[int]) -> tuple[np.ndarray, str]:
    """Grad-CAM maps [N, S, S] in [0, 1] (each scaled by its own maximum) of ``targets[i]`` for
    ``inputs[i]`` (normalised model inputs); returns (maps, layer description)."""
    require_gradcam()
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from .methods import set_train_mode

    model = loaded.model
    set_train_mode(model, False)
    for param in model.parameters():  # frozen (or merged) weights still pass gradients to the feature maps
        param.requires_grad_(True)
    layer, reshape, where = cam_target(model, loaded.image_size)
    cam = GradCAM(model=model, target_layers=[layer], reshape_transform=reshape)
    try:
        maps = [cam(input_tensor=inputs[i:i + 1], targets=[ClassifierOutputTarget(int(t))])[0]
                for i, t in enumerate(targets)]
    finally:
        cam.activations_and_grads.release()
        model.zero_grad(set_to_none=True)
    return np.stack(maps).astype(np.float32), where


def model_inputs(loaded, paths: list[str], window: str | None = None) -> torch.Tensor:
    """Normalised float inputs [N, 3, S, S]: the decoding, resizing and normalisation of training."""
    from .batching import BatchLoader
    from .data.base import ImageSet
    from .data.io import load_images

    stacked = load_images(paths, loaded.image_size, window)
    images = ImageSet(stacked, torch.zeros(len(paths), dtype=torch.long), list(paths))
    loader = BatchLoader(images, max(len(paths), 1), loaded.mean, loaded.std)
    x = loader.to_input(loader.images)
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x


def explain_images(loaded, paths: list[str], out: str | Path, target_class=None, window: str | None = None,
                   return_maps: bool = False) -> list[dict]:
    """Write ``<stem>_cam.png`` per image into ``out``; one row per image: predicted class and its
    probability, the explained class, the overlay file, the layer (``map``: the Grad-CAM array
    when ``return_maps``)."""
    from .tasks.segmentation import _safe_name

    if not paths:
        raise ConfigError("no images to explain")
    target = class_index(target_class, loaded.class_names)
    x = model_inputs(loaded, paths, window)
    with torch.no_grad():
        logits = loaded.model(x).float()
    probs = torch.sigmoid(logits) if loaded.task == "multilabel" else torch.softmax(logits, dim=-1)
    predicted = logits.argmax(dim=-1).tolist()
    targets = [p if target is None else target for p in predicted]
    maps, where = gradcam_maps(loaded, x, targets)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    rows, used = [], set()
    for i, path in enumerate(paths):
        stem = _safe_name(Path(path).stem)
        name, k = f"{stem}_cam.png", 1
        while name in used:  # two images with one stem (from different folders)
            k += 1
            name = f"{stem}-{k}_cam.png"
        used.add(name)
        write_overlay(path, maps[i], folder / name, window)
        row = {"image": str(path), "predicted": loaded.class_names[predicted[i]],
               "probability": float(probs[i, predicted[i]]), "explained": loaded.class_names[targets[i]],
               "file": str(folder / name), "layer": where, "cam_max": float(maps[i].max())}
        if return_maps:
            row["map"] = maps[i]
        rows.append(row)
    return rows


def write_overlay(path: str, cam: np.ndarray, target: Path, window: str | None = None) -> None:
    """The image (its own aspect ratio, small images upscaled) with the Grad-CAM heatmap blended in."""
    from PIL import Image
    from pytorch_grad_cam.utils.image import show_cam_on_image

    from .data.io import read_image

    array = read_image(path, window)
    if array.ndim == 3 and array.shape[2] > 3:
        array = array[..., :3]
    rgb = Image.fromarray(array).convert("RGB")
    scale = max(1.0, DISPLAY_MIN / min(rgb.size))
    if scale > 1:
        rgb = rgb.resize((round(rgb.width * scale), round(rgb.height * scale)), Image.BICUBIC)
    heat = Image.fromarray(cam.astype(np.float32)).resize(rgb.size, Image.BILINEAR)
    image = np.asarray(rgb, dtype=np.float32) / 255.0
    overlay = show_cam_on_image(image, np.clip(np.asarray(heat), 0, 1), use_rgb=True, image_weight=0.5)
    Image.fromarray(overlay).save(target)


__all__ = ["add_explain_parser", "cmd_explain", "cam_target", "explain_images", "gradcam_maps"]
