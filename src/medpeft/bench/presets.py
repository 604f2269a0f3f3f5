"""Named experiments, in the YAML layout (``medpeft benchmark --preset NAME``; options given on
the command line override them).

- ``quick``: the README's main job. A real comparison (five methods on the offline CNN, two
  label fractions, two seeds) that finishes on 2 CPU cores in under 10 minutes (6m54s for
  ``make demo`` in a clean clone, set-up already done, on a 2-core machine running three other
  trainings): 64 px, 6 epochs, no HPO, the protocol's defaults (selection labels follow the budget).
- ``full``: the whole study at a larger scale: BreastMNIST and PneumoniaMNIST, both offline
  backbones, nine methods (eight on both families), fractions 1% / 10% / 100%, 3 seeds,
  4 HPO trials per cell (714 jobs). Estimated ~24 CPU-hours on a loaded 2-core machine
  (DINOv2 on PneumoniaMNIST at 100% labels is two thirds of it): run it in resumable chunks
  (``--resume --max-jobs N``), on a Ray cluster, or on a GPU.
"""
from __future__ import annotations

import copy

from ..errors import ConfigError

PRESETS: dict[str, dict] = {
    "quick": {
        "data": ["breastmnist"],
        "backbones": ["efficientnet_lite0"],
        "methods": ["full", "linear", "bitfit", "lora", "ssf"],
        "fractions": [0.1, 1.0],
        "seeds": 2,
        "image_size": 64,
        "hpo": {"trials": 0},
        "train": {"epochs": 6, "patience": 6},
        "n_boot": 500,
        "out": "runs/benchmark-quick",
    },
    "full": {
        "data": ["breastmnist", "pneumoniamnist"],
        "backbones": ["efficientnet_lite0", "dinov2_vits14"],
        # eight methods on both families (baselines, selective, reparameterised, scaling) + VPT-deep on the ViT
        "methods": ["full", "linear", "bitfit", "norm", "partial", "lora", "ia3", "ssf", "vpt_deep"],
        "fractions": [0.01, 0.1, 1.0],
        "seeds": 3,
        "image_size": {"efficientnet_lite0": 64, "dinov2_vits14": 42},
        "hpo": {"trials": 4, "prune_min_epochs": 2, "reduction_factor": 3},
        "train": {"epochs": 12, "patience": 4},
        "out": "runs/benchmark-full",
    },
}


def preset(name: str) -> dict:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
