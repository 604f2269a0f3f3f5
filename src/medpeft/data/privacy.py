"""Data paths in what medpeft writes: never an absolute path unless asked for.

Absolute paths name users and hospitals (``/home/alice/st-marys-busi/...``). Everything a run
or a sweep writes (``config.yaml``, ``metrics.json``, ``results.db`` and the report's CSV files)
therefore stores a data path relative to its data root, and an absolute path as its last part
plus a short hash of the whole path: ``<redacted>/Dataset_BUSI#3f9a1c2e``. The hash tells two
folders of the same name apart (two sites' ``busi``) without revealing either; paths given
relative to the working directory are kept as given.

A ``config.yaml`` whose data root was not recorded fails with a message saying which folder to
give (``--data-root``, or ``data.root`` in the file). Set ``MEDPEFT_RECORD_PATHS=1`` to record
full paths instead (a private machine, a run that must be repeated from its config alone).
"""
from __future__ import annotations

import hashlib
import os

from medpeft.errors import ConfigError

RECORD_PATHS_ENV = "MEDPEFT_RECORD_PATHS"
REDACTED = "<redacted>/"  # prefix of a path that was not recorded
HASH_CHARS = 8


def record_paths() -> bool:
    """Whether full paths are written ($MEDPEFT_RECORD_PATHS=1)."""
    return os.environ.get(RECORD_PATHS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def is_redacted(path) -> bool:
    return isinstance(path, str) and path.startswith(REDACTED)


def _absolute(path) -> bool:
    return isinstance(path, (str, os.PathLike)) and os.path.isabs(os.path.expanduser(os.fspath(path)))


def public_path(path):
    """``path`` as written out: unchanged when relative (or full paths are recorded), else
    ``<redacted>/<last part>#<hash of the absolute path>``. Anything that is not a path passes."""
    if path is None or record_paths() or not _absolute(path) or is_redacted(path):
        return path
    full = os.path.normpath(os.path.expanduser(os.fspath(path)))
    digest = hashlib.sha256(full.encode("utf-8", "surrogateescape")).hexdigest()[:HASH_CHARS]
    return f"{REDACTED}{os.path.basename(full) or 'root'}#{digest}"


def public_text(text):
    """A string that may carry a path after a ``kind:`` prefix (``file:/x/w.pth``), made public."""
    if not isinstance(text, str):
        return text
    kind, sep, rest = text.partition(":")
    if sep and _absolute(rest) and "/" not in kind:
        return f"{kind}:{public_path(rest)}"
    return public_path(text)


def public_data_config(data: dict) -> dict:
    """A DataConfig dict as written out: an absolute data path becomes relative to its data root
    (the root itself is not recorded), an absolute root or split file is redacted."""
    if record_paths() or not isinstance(data, dict):
        return data
    out = dict(data)
    name, root = out.get("name"), out.get("root")
    if _absolute(name) and root is None:  # the folder/manifest's own parent plays the data root
        full = os.path.normpath(os.path.expanduser(os.fspath(name)))
        out["name"], out["root"] = os.path.basename(full), public_path(os.path.dirname(full))
    else:
        out["name"], out["root"] = public_path(name), public_path(root)
    out["split_file"] = public_path(out.get("split_file"))
    if out.get("synthetic"):
        out["synthetic"] = public_path(out["synthetic"])
    return out


def public_run_config(config: dict) -> dict:
    """A RunConfig dict (``RunConfig.to_dict()``) as written out: data paths and the weights file."""
    if record_paths() or not isinstance(config, dict):
        return config
    out = dict(config)
    if isinstance(out.get("data"), dict):
        out["data"] = public_data_config(out["data"])
    if "weights" in out:
        out["weights"] = public_path(out["weights"])
    if out.get("external_test"):  # external test sets and the DANN target folder: no absolute path either
        out["external_test"] = [public_path(p) for p in out["external_test"]]
    if isinstance(out.get("train"), dict) and out["train"].get("target_unlabelled"):
        out["train"] = {**out["train"], "target_unlabelled": public_path(out["train"]["target_unlabelled"])}
    return out


def check_recorded(name, root, split_file=None, what: str = "data") -> None:
    """ConfigError when a data path read back from a written config was not recorded."""
    for key, value in (("data", name), ("data root", root), ("split file", split_file)):
        if is_redacted(value):
            field = {"data": "data.name", "data root": "data.root", "split file": "data.split_file"}[key]
            hint = f"the folder holding {name!r}" if key == "data root" and not is_redacted(name) else "its path"
            raise ConfigError(
                f"{what}: the {key} was not recorded ({value!r}: medpeft writes data paths relative to the data "
                f"root, never an absolute path); set {field} in the config file to {hint} ('medpeft calibrate': "
                f"--data-root), or record full paths with {RECORD_PATHS_ENV}=1 when training")


def check_weights_recorded(weights) -> None:
    """ConfigError when a run config's weights file was not recorded (a config.yaml run again)."""
    if is_redacted(weights):
        name = weights[len(REDACTED):].rsplit("#", 1)[0]
        raise ConfigError(f"the weights file was not recorded ({weights!r}: medpeft writes no absolute path); set "
                          f"weights in the config file to the path of {name}, or record full paths with "
                          f"{RECORD_PATHS_ENV}=1 when training")
