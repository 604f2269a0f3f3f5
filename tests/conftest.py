import os

os.environ["MEDPEFT_OFFLINE"] = "1"  # tests never use the network (no hub downloads)

from pathlib import Path

import pytest

# ../shared/data beside the repository (CI and developers), or wherever MEDPEFT_SHARED_DATA points
SHARED_DATA = Path(os.environ.get("MEDPEFT_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
MEDMNIST_ROOT = SHARED_DATA / "medmnist"
BUSI_ROOT = SHARED_DATA / "Dataset_BUSI_with_GT"


@pytest.fixture(scope="session")
def medmnist_root() -> Path:
    if not (MEDMNIST_ROOT / "breastmnist.npz").is_file():
        pytest.skip(f"offline MedMNIST data not found under {MEDMNIST_ROOT}")
    return MEDMNIST_ROOT


@pytest.fixture(scope="session")
def busi_root() -> Path:
    if not BUSI_ROOT.is_dir():
        pytest.skip(f"BUSI data not found under {BUSI_ROOT}")
    return BUSI_ROOT
