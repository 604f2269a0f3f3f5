"""The experiment: what a sweep runs, from the CLI, a YAML file or a preset, validated.

An experiment is a grid data sets x backbones x methods x label fractions x seeds plus the
settings every run shares (image size, training schedule, HPO budget). ``Experiment.cells()``
expands it into cells (data, backbone, method, fraction): HPO runs once per cell, then the
chosen configuration runs once per seed.

Every bad value is a ``ConfigError`` that names the key, the value and what was expected.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path

import yaml

from ..errors import ConfigError
from ..train import TrainConfig

# YAML layout (nested sections are flattened into Experiment fields)
HPO_KEYS = {"trials": "hpo_trials", "parallel": "hpo_parallel", "seed": "hpo_seed", "subsets": "hpo_subsets",
            "prune": "hpo_prune",
            "startup_trials": "hpo_startup_trials", "prune_min_epochs": "prune_min_epochs",
            "reduction_factor": "prune_reduction_factor", "trial_n_boot": "trial_n_boot"}
TOP_KEYS = ("data", "data_root", "medmnist_size", "backbones", "methods", "fractions", "seeds", "image_size",
            "hpo", "train", "method_options", "n_boot", "keep_adapters", "val_labels", "margin", "task",
            "data_options", "external_test", "corruptions", "align", "weights")
RUN_KEYS = ("out", "executor", "address")  # how to run it, not what: allowed in a YAML file too
# TrainConfig fields a sweep sets itself per run
TRAIN_RESERVED = ("seed",)
# DataConfig fields a sweep sets itself (from its own keys, per run)
DATA_RESERVED = ("name", "root", "image_size", "medmnist_size", "fraction", "shots", "subset_seed", "val_labels",
                 "task", "noise_seed")


@dataclass(frozen=True)
class Cell:
    """One HPO unit: a method on a backbone on a data set at one label fraction."""

    data: str
    backbone: str
    method: str
    fraction: float
    image_size: int

    @property
    def id(self) -> str:
        return f"{self.data}|{self.backbone}|{self.method}|{self.fraction:g}"

    @property
    def public_id(self) -> str:
        """The id as the store and the report record it: an absolute data path is not written
        (``medpeft.data.privacy``), only its last part and a hash."""
        return public_cell_id(self.id, self.data)


def public_cell_id(cell_id: str, data: str) -> str:
    from ..data.privacy import public_path

    return str(public_path(data)) + cell_id[len(data):] if cell_id.startswith(f"{data}|") else cell_id


def public_experiment(values):
    """``Experiment.to_dict()`` as the store records it: every absolute path in it (data sets, data
    root, split file, external test sets, the DANN target folder, ...) replaced as
    ``medpeft.data.privacy`` says; anything else unchanged (a relative path or a name passes)."""
    from ..data.privacy import public_path

    if isinstance(values, dict):
        return {k: public_experiment(v) for k, v in values.items()}
    if isinstance(values, (list, tuple)):
        return [public_experiment(v) for v in values]
    return public_path(values) if isinstance(values, str) else values


@dataclass
class Experiment:
    data: list[str] = field(default_factory=lambda: ["breastmnist"])
    data_root: str | None = None
    medmnist_size: int | None = None
    backbones: list[str] = field(default_factory=lambda: ["efficientnet_lite0"])
    methods: list[str] = field(default_factory=lambda: ["all"])
    fractions: list[float] = field(default_factory=lambda: [1.0])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    image_size: int | dict | None = None  # one size, {backbone: size}, or None: 64 px fitted to each backbone
    hpo_trials: int = 0  # 0: each method's defaults, no search
    hpo_parallel: int = 1  # trials of a cell sampled as one batch (run side by side on Ray)
    hpo_seed: int = 0
    # label subsets a trial's objective averages over where the fraction is below 1 (the subsets of
    # the first seeds): one subset would tune to seed 0's few images
    hpo_subsets: int = 2
    # successive-halving pruning: off by default, so every method gets the same number of
    # *completed* trials; on, the budget is in trials started (compute) and the report says so
    hpo_prune: bool = False
    hpo_startup_trials: int = 4  # trials before TPE models the history (trial 0 = the defaults)
    prune_min_epochs: int = 2  # first successive-halving rung (epoch 1 is warm-up, too noisy)
    prune_reduction_factor: int = 3
    trial_n_boot: int = 100  # bootstrap resamples for a trial's validation CIs (not used to choose)
    train: dict = field(default_factory=dict)  # TrainConfig overrides shared by every run
    method_options: dict = field(default_factory=dict)  # fixed method options, e.g. {"lora_targets": "qv"}
    n_boot: int = 1000
    keep_adapters: bool = False  # keep each final run's adapter.safetensors (else only its size is kept)
    val_labels: str = "follow"  # selection labels: follow the label budget, or full (optimistic)
    task: str = "classification"  # classification | segmentation (what the data's targets are)
    margin: float = 0.02  # equivalence margin of the report's TOST, in units of the metric
    # DataConfig options shared by every run (split ratios and seed, mask classes, ...), e.g.
    # {val_ratio: 0.1, test_ratio: 0.1} for the literature's 80/10/10 split of Kvasir-SEG
    data_options: dict = field(default_factory=dict)
    # external test sets every final run is evaluated on after its home test (never trials: selection
    # and HPO see the home validation split only)
    external_test: list = field(default_factory=list)
    corruptions: str | None = None  # a corruption suite every final run's test split is evaluated under
    align: list = field(default_factory=list)  # style alignments of the external sets (align.ALIGNMENTS)
    # backbone -> local weights file (e.g. in-domain self-supervised weights from medpeft pretrain)
    weights: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list, compare=False)  # filled by validate()

    # ------------------------------------------------------------------ building

    @classmethod
    def from_mapping(cls, values: dict, where: str = "experiment") -> "Experiment":
        """From the YAML layout (``hpo:`` and ``train:`` sections); unknown keys are errors."""
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: expected a mapping of keys (data, backbones, methods, ...), "
                              f"got {type(values).__name__}")
        unknown = sorted(set(values) - set(TOP_KEYS) - set(RUN_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; expected some of {list(TOP_KEYS + RUN_KEYS)}")
        flat = {k: v for k, v in values.items() if k in TOP_KEYS and k != "hpo"}
        hpo = values.get("hpo") or {}
        if not isinstance(hpo, dict):
            raise ConfigError(f"{where}: 'hpo' must be a mapping like {{trials: 8}}, got {hpo!r}")
        bad = sorted(set(hpo) - set(HPO_KEYS))
        if bad:
            raise ConfigError(f"{where}: unknown key(s) {bad} in 'hpo'; expected some of {sorted(HPO_KEYS)}")
        for key, value in hpo.items():
            flat[HPO_KEYS[key]] = value
        exp = cls()
        for key, value in flat.items():
            setattr(exp, key, value)
        return exp

    def updated(self, **overrides) -> "Experiment":
        """A copy with the given (not None) fields replaced; ``train`` and ``method_options`` merge."""
        exp = dataclasses.replace(self, train=dict(self.train), method_options=dict(self.method_options),
                                  data_options=dict(self.data_options), notes=[])
        for key, value in overrides.items():
            if value is None:
                continue
            if key in ("train", "method_options", "data_options"):
                getattr(exp, key).update(value)
            elif key in {f.name for f in dataclasses.fields(self)}:
                setattr(exp, key, value)
            else:
                raise ConfigError(f"unknown experiment setting {key!r}")
        return exp

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("notes")
        if self.image_size is None:  # record the sizes the default resolved to
            out["image_size"] = {name: self.size_for(name) for name in self.backbones}
        return out

    # ------------------------------------------------------------------ validation

    def validate(self, where: str = "experiment") -> "Experiment":
        """Normalise and check every value in place; returns self. Also fills ``notes``."""
        self.data = _names(self.data, "data", where)
        self.backbones = _names(self.backbones, "backbones", where)
        self.methods = _names(self.methods, "methods", where)
        self.fractions = _fractions(self.fractions, where)
        self.seeds = _seeds(self.seeds, where)
        for key, low in (("hpo_trials", 0), ("hpo_parallel", 1), ("hpo_startup_trials", 1),
                         ("prune_min_epochs", 1), ("prune_reduction_factor", 2), ("trial_n_boot", 10),
                         ("n_boot", 10)):
            setattr(self, key, _int(getattr(self, key), key, where, low))
        self.hpo_seed = _int(self.hpo_seed, "hpo_seed", where, 0)
        if self.medmnist_size is not None and self.medmnist_size not in (28, 64, 128, 224):
            raise ConfigError(f"{where}: medmnist_size {self.medmnist_size!r} is not one of 28, 64, 128, 224")
        if self.data_root is not None and not isinstance(self.data_root, (str, Path)):
            raise ConfigError(f"{where}: data_root must be a folder path, got {self.data_root!r}")
        if not isinstance(self.keep_adapters, bool):
            raise ConfigError(f"{where}: keep_adapters must be true or false, got {self.keep_adapters!r}")
        if not isinstance(self.hpo_prune, bool):
            raise ConfigError(f"{where}: hpo.prune must be true or false, got {self.hpo_prune!r}")
        self.hpo_subsets = _int(self.hpo_subsets, "hpo_subsets", where, 1)
        if self.external_test:
            from ..data.external import check_external_names

            self.external_test = _names(self.external_test, "external_test", where)
            check_external_names(self.external_test)
        else:
            self.external_test = []
        self.align = _names(self.align, "align", where) if self.align else []
        if not isinstance(self.weights, dict) or any(b not in self.backbones for b in self.weights):
            raise ConfigError(f"{where}: weights must map backbones of the sweep to weights files, got {self.weights!r}")
        for backbone, path in self.weights.items():
            if not Path(str(path)).expanduser().is_file():
                raise ConfigError(f"{where}: weights for {backbone}: file {path!r} not found")
        from ..align import ALIGNMENTS

        if any(a not in ALIGNMENTS for a in self.align) or (self.align and not self.external_test):
            raise ConfigError(f"{where}: align {self.align!r}: expected some of {', '.join(ALIGNMENTS)}, with "
                              "external_test sets to align")
        if self.corruptions is not None:
            from ..corruptions import get_suite

            try:
                get_suite(self.corruptions)
            except ConfigError as err:
                raise ConfigError(f"{where}: {err}") from None
        from ..tasks import TASKS

        if self.task not in TASKS:
            raise ConfigError(f"{where}: task {self.task!r} is not one of {', '.join(TASKS)}")
        try:  # a monitor of another task (auroc for segmentation) fails before any job starts
            TASKS[self.task].resolve_monitor((self.train or {}).get("monitor", "auto") if isinstance(self.train, dict)
                                             else "auto")
        except ConfigError as err:
            raise ConfigError(f"{where}: train: {err}") from None
        if self.val_labels not in ("follow", "full"):
            raise ConfigError(f"{where}: val_labels {self.val_labels!r} is not one of follow, full")
        if isinstance(self.margin, bool) or not isinstance(self.margin, Real) or not 0 < float(self.margin) < 1:
            raise ConfigError(f"{where}: margin {self.margin!r} must be a number in (0, 1) (metric units, e.g. 0.02)")
        self.margin = float(self.margin)
        if not isinstance(self.method_options, dict):
            raise ConfigError(f"{where}: method_options must be a mapping like {{lora_targets: qv}}, "
                              f"got {self.method_options!r}")
        self._check_train(where)
        self._check_backbones_and_sizes(where)
        self._check_methods(where)
        self._check_data(where)
        return self

    def _check_train(self, where: str) -> None:
        if not isinstance(self.train, dict):
            raise ConfigError(f"{where}: train must be a mapping of training options, got {self.train!r}")
        known = {f.name for f in dataclasses.fields(TrainConfig)} - set(TRAIN_RESERVED)
        unknown = sorted(set(self.train) - known)
        if unknown:
            hint = " (seeds come from 'seeds')" if "seed" in unknown else ""
            raise ConfigError(f"{where}: unknown key(s) {unknown} in 'train'{hint}; expected some of {sorted(known)}")
        defaults = TrainConfig()
        for key, value in self.train.items():
            default = getattr(defaults, key)
            if value is None or default is None:
                continue
            kind = type(default)
            ok = isinstance(value, bool) if kind is bool else (
                isinstance(value, Integral) and not isinstance(value, bool) if kind is int else
                isinstance(value, Real) and not isinstance(value, bool) if kind is float else isinstance(value, kind))
            if not ok:
                raise ConfigError(f"{where}: train.{key} = {value!r} should be of type {kind.__name__} "
                                  f"(like the default {default!r})")
        try:
            TrainConfig(**self.train)
        except ConfigError as err:
            raise ConfigError(f"{where}: train: {err}") from None

    def _check_backbones_and_sizes(self, where: str) -> None:
        from ..backbones import backbone_info, check_image_size, resolution_warning

        sizes = self.image_size
        if sizes is None:  # the default size, fitted to each backbone (cannot fail the check below)
            sizes = {name: self.size_for(name) for name in self.backbones}
        if isinstance(sizes, dict):
            extra = sorted(set(sizes) - set(self.backbones))
            missing = [b for b in self.backbones if b not in sizes]
            if missing or extra:
                raise ConfigError(f"{where}: image_size lists {sorted(sizes)}; expected exactly the backbones "
                                  f"{self.backbones} (missing {missing}, extra {extra})")
        for name in self.backbones:
            info = backbone_info(name)
            size = sizes[name] if isinstance(sizes, dict) else sizes
            size = _int(size, f"image_size ({name})" if isinstance(sizes, dict) else "image_size", where, 1)
            try:
                check_image_size(info, size)
            except ConfigError as err:
                raise ConfigError(f"{where}: image_size: {err}; give one size per backbone as "
                                  "{backbone: size} when the backbones need different sizes") from None
            coarse = resolution_warning(info, size)
            if coarse:  # allowed (CPU budgets), but the report must say what the numbers test
                self.notes.append(coarse)

    def _check_methods(self, where: str) -> None:
        from ..methods import build_configs, list_methods, parse_method

        for spec in self.methods:
            if spec != "all":
                try:
                    parse_method(spec)
                except ConfigError as err:
                    raise ConfigError(f"{where}: methods: {err}") from None
        names = set(list_methods())
        for key in self.method_options:
            prefix = key.split("_", 1)[0]
            owners = [n for n in names if key.startswith(n + "_")]
            if not owners:
                raise ConfigError(f"{where}: method_options key {key!r} names no method ({prefix!r} unknown); "
                                  f"expected <method>_<option>, e.g. lora_rank")
        for owner in sorted(names):  # values are checked by the method's own config class
            build_configs([owner], {k: v for k, v in self.method_options.items() if k.startswith(owner + "_")})

    def _check_data(self, where: str) -> None:
        from ..data import DataConfig

        if not isinstance(self.data_options, dict):
            raise ConfigError(f"{where}: data_options must be a mapping like {{val_ratio: 0.1}}, got {self.data_options!r}")
        known = {f.name for f in dataclasses.fields(DataConfig)} - set(DATA_RESERVED)
        unknown = sorted(set(self.data_options) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown} in 'data_options'; expected some of {sorted(known)} "
                              f"(the sweep sets {', '.join(DATA_RESERVED)} itself)")
        from ..data.external import check_class_names, external_name
        from ..data.registry import check_source
        from ..errors import DataError

        listed = {}  # class names where the files list them (class folders, box files, mask classes)
        for name in [*self.data, *self.external_test]:  # external test sets: checked the same way
            try:
                cfg = DataConfig(name=name, root=self.data_root, task=self.task, medmnist_size=self.medmnist_size,
                                 **self.data_options)
                # option values (ratios, names) and the data itself - the MedMNIST file, the class folders,
                # the manifest's rows and files - fail here (and in --dry-run), before any job starts
                listed[name] = check_source(cfg).class_names
            except (ConfigError, DataError) as err:
                raise ConfigError(f"{where}: data: {err}") from None
            except TypeError as err:
                raise ConfigError(f"{where}: data_options: {err}") from None
        for home in self.data:  # an external set in another label space fails here, not after training
            for other in self.external_test:
                if listed[home] is not None and listed[other] is not None:
                    try:
                        check_class_names(external_name(other), listed[other], listed[home], self.task)
                    except ConfigError as err:
                        raise ConfigError(f"{where}: data {external_name(home)!r}: {err}") from None

    # ------------------------------------------------------------------ expansion

    def size_for(self, backbone: str) -> int:
        if self.image_size is None:
            from ..backbones import default_image_size

            return default_image_size(backbone)
        return int(self.image_size[backbone] if isinstance(self.image_size, dict) else self.image_size)

    def cells(self) -> list[Cell]:
        """Grid order: data, backbone, fraction, method (so a data subset stays cached across methods).

        ``all`` expands to every registered method that applies to the backbone's family; any method
        that does not apply is skipped with a note in ``self.notes``.
        """
        from ..backbones import backbone_info
        from ..methods import get_method, list_methods, parse_method

        cells, notes = [], []
        for backbone in self.backbones:
            family = backbone_info(backbone).family
            chosen: list[str] = []
            for spec in self.methods:
                candidates = list_methods() if spec == "all" else [spec]
                for method in candidates:
                    if method in chosen:
                        continue
                    parts = parse_method(method)
                    wrong = [p for p in parts if family not in get_method(p).families]
                    if wrong:
                        fams = "/".join(f.upper() for f in get_method(wrong[0]).families)
                        notes.append(f"{method} skipped on {backbone} ({family.upper()}): "
                                     f"{wrong[0]} applies to {fams} backbones only")
                        continue
                    chosen.append(method)
            for data in self.data:
                for fraction in self.fractions:
                    for method in chosen:
                        cells.append(Cell(data, backbone, method, fraction, self.size_for(backbone)))
        cells.sort(key=lambda c: (self.data.index(c.data), self.backbones.index(c.backbone),
                                  self.fractions.index(c.fraction)))
        self.notes = list(dict.fromkeys(self.notes + notes))  # validate()'s notes stay
        return cells

# ---------------------------------------------------------------------- helpers


def _names(value, key: str, where: str) -> list[str]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",")]
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{where}: {key} must be a non-empty list of names (or one comma-separated string), "
                          f"got {value!r}")
    out = []
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise ConfigError(f"{where}: {key} entry {item!r} is not a name")
        if item.strip() not in out:
            out.append(item.strip())
    return out


def _fractions(value, where: str) -> list[float]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{where}: fractions must be a non-empty list of label fractions in (0, 1], got {value!r}")
    out = []
    for item in value:
        try:
            f = float(item)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: fractions entry {item!r} is not a number; expected a fraction in (0, 1]") from None
        if isinstance(item, bool) or not (0 < f <= 1) or math.isnan(f):
            raise ConfigError(f"{where}: fractions entry {item!r} is not in (0, 1] (1.0 = all training labels)")
        if f not in out:
            out.append(f)
    return sorted(out)


def _seeds(value, where: str) -> list[int]:
    if isinstance(value, str):
        text = value.strip()
        value = int(text) if text.isdigit() else [v.strip() for v in text.split(",") if v.strip()]
    if isinstance(value, Integral) and not isinstance(value, bool):
        if value < 1:
            raise ConfigError(f"{where}: seeds = {value}; expected a count >= 1 or a list of seeds")
        return list(range(int(value)))
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{where}: seeds must be a count (3 -> seeds 0,1,2) or a list of integers, got {value!r}")
    out = []
    for item in value:
        try:
            seed = int(item)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: seeds entry {item!r} is not an integer") from None
        if isinstance(item, bool) or isinstance(item, float) or seed < 0:
            raise ConfigError(f"{where}: seeds entry {item!r} must be an integer >= 0")
        if seed not in out:
            out.append(seed)
    return out


def _int(value, key: str, where: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ConfigError(f"{where}: {key} = {value!r} must be a whole number >= {low}")
    if value < low:
        raise ConfigError(f"{where}: {key} = {value} must be >= {low}")
    return int(value)


def load_experiment_file(path: str | Path) -> tuple[dict, dict]:
    """(experiment mapping, run options {out, executor, address}) from a YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file {path} not found; expected a YAML file (see docs: medpeft benchmark --help)")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"experiment file {path} is not valid YAML: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"experiment file {path}: expected a mapping (data:, backbones:, methods:, ...), "
                          f"got {type(values).__name__}")
    run = {k: values.pop(k) for k in RUN_KEYS if k in values}
    return values, run
