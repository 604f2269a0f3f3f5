"""The synthetic classification folder the run, sweep, export and explain tests share."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_toy(root: Path, per_class: int = 30, size: int = 16) -> Path:
    """Two classes of grayscale noise; class 'lesion' has a bright square somewhere (5 px at
    16 px, 10 px on larger images)."""
    small = size <= 16
    noise, side, gain, low, high = (30, 5, 80, 1, 10) if small else (25, 10, 90, 2, size - 12)
    rng = np.random.default_rng(0)
    for name in ("normal", "lesion"):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.normal(100, noise, (size, size))
            if name == "lesion":
                x, y = rng.integers(low, high, 2)
                img[y:y + side, x:x + side] += gain
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / name / f"{i:03d}.png")
    return root
