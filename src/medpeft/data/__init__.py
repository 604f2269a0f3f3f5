"""Data sources (MedMNIST, image folders, CSV manifests), splits and label-scarcity subsets.

    from medpeft.data import DataConfig, load_data
    bundle = load_data(DataConfig(name="breastmnist", image_size=64, fraction=0.1))
"""
from medpeft.data.base import DataBundle, DataConfig, ImageSet, Task
from medpeft.data.io import is_online, read_image
from medpeft.data.medmnist_source import default_data_root, medmnist_names
from medpeft.data.registry import load_data, resolve_source
from medpeft.data.splits import save_split, subset_train

__all__ = [
    "DataBundle", "DataConfig", "ImageSet", "Task",
    "load_data", "default_data_root", "medmnist_names", "resolve_source",
    "read_image", "is_online", "save_split", "subset_train",
]
