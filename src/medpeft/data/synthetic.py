"""Synthetic training images (``--synthetic MANIFEST``): a CSV manifest ``path,label`` (e.g.
written by a generator) whose images join the **training split only** - never validation or
test, so selection and the test stay on real images. Labels are class names of the real data
(a name the data does not have is an error); ``synthetic_only`` trains on them alone (the
"synthetic only" arm of a downstream-utility study). Recorded in ``split.synthetic``."""
from __future__ import annotations

import dataclasses

import torch

from medpeft.data.base import DataBundle, DataConfig
from medpeft.errors import ConfigError


def add_synthetic(bundle: DataBundle, cfg: DataConfig) -> None:
    from medpeft.data.manifest import load_manifest
    from medpeft.data.privacy import public_path
    from medpeft.data.splits import concat_sets

    if bundle.task not in ("binary", "multiclass"):
        raise ConfigError(f"--synthetic adds labelled images to single-label classification; this data set is "
                          f"{bundle.task}")
    manifest = load_manifest(cfg.synthetic, dataclasses.replace(cfg, name=cfg.synthetic, root=None, label_columns=None,
                                                                group_column=None))
    unknown = sorted(set(manifest.class_names) - set(bundle.class_names))
    if unknown:
        raise ConfigError(f"synthetic manifest {cfg.synthetic}: classes {unknown} are not classes of the data "
                          f"({', '.join(bundle.class_names)})")
    index = {name: i for i, name in enumerate(bundle.class_names)}
    synth = manifest.pool
    synth.labels = torch.tensor([index[manifest.class_names[int(k)]] for k in synth.labels], dtype=torch.int64)
    synth.ids = [f"synthetic/{i}" for i in synth.ids]
    synth.groups = None
    if synth.images.shape[1] != bundle.train.images.shape[1]:
        from medpeft.data.external import convert_channels

        synth.images = convert_channels(synth.images, bundle.train.images.shape[1])
    n_real = len(bundle.train)
    train = synth if cfg.synthetic_only else concat_sets([dataclasses.replace(bundle.train, groups=None), synth])
    bundle.train = train
    bundle.split_info["synthetic"] = {"manifest": public_path(cfg.synthetic), "n_synthetic": len(synth),
                                      "n_real_train": 0 if cfg.synthetic_only else n_real,
                                      "per_class": [int((synth.labels == k).sum()) for k in range(bundle.num_classes)]}
