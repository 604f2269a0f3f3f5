"""HPO per cell: Optuna's seeded TPE sampler and successive-halving (ASHA-style) pruning.

Determinism is the design constraint: a sweep that is killed and resumed must make the same
choices as one that never stopped, and a trial may run on any Ray worker. So no Optuna study
lives across trials. For trial ``n`` a fresh in-memory study is built from the finished
trials it may see (all trials of earlier batches, from the results store) and a sampler
seeded by (hpo seed, cell, n); its ``ask`` gives trial ``n``'s parameters. The worker that
trains trial ``n`` rebuilds the same history in its own study to decide, epoch by epoch,
whether the trial is pruned. Same history in, same parameters and pruning decisions out.

Trial 0 of every cell is the method's defaults (enqueued), so the search never chooses
something that validates worse than no search. The choice uses validation only: the
objective is the best validation score of the monitored metric; trials never touch the
test split (``execute(..., evaluate_test=False)``).
"""
from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field

import optuna
from optuna.distributions import BaseDistribution, distribution_to_json, json_to_distribution
from optuna.trial import TrialState

optuna.logging.set_verbosity(logging.WARNING)

STATES = {"complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED, "failed": TrialState.FAIL}


@dataclass
class HpoSettings:
    seed: int = 0
    startup_trials: int = 4
    parallel: int = 1  # trials sampled per batch: trial n sees trials < n - n % parallel
    prune_min_epochs: int = 2
    reduction_factor: int = 3

    def to_dict(self) -> dict:
        return dict(seed=self.seed, startup_trials=self.startup_trials, parallel=self.parallel,
                    prune_min_epochs=self.prune_min_epochs, reduction_factor=self.reduction_factor)


@dataclass
class TrialRecord:
    """A finished trial as the store keeps it (JSON-able)."""

    number: int
    params: dict
    distributions: dict  # name -> optuna distribution JSON
    state: str  # complete | pruned | failed
    value: float | None
    intermediate: dict = field(default_factory=dict)  # epoch -> validation score
    system_attrs: dict = field(default_factory=dict)  # the pruner's rung bookkeeping

    def frozen(self) -> optuna.trial.FrozenTrial:
        value = self.value if self.state == "complete" else None
        return optuna.trial.create_trial(
            state=STATES[self.state], value=value, params=self.params,
            distributions={k: json_to_distribution(v) for k, v in self.distributions.items()},
            intermediate_values={int(k): float(v) for k, v in self.intermediate.items()},
            system_attrs=dict(self.system_attrs),
        )

    def to_dict(self) -> dict:
        return dict(number=self.number, params=self.params, distributions=self.distributions, state=self.state,
                    value=self.value, intermediate=self.intermediate, system_attrs=self.system_attrs)

    @classmethod
    def from_dict(cls, data: dict) -> "TrialRecord":
        return cls(**data)


def visible_history(history: list[TrialRecord], number: int, parallel: int) -> list[TrialRecord]:
    """The trials trial ``number`` may learn from: every trial of the earlier batches."""
    cutoff = number - number % max(parallel, 1)
    return sorted((t for t in history if t.number < cutoff), key=lambda t: t.number)


def trial_seed(settings: HpoSettings, cell_id: str, number: int) -> int:
    digest = hashlib.sha256(f"{settings.seed}|{cell_id}|{number}".encode()).hexdigest()
    return int(digest[:8], 16)


def _study(history: list[TrialRecord], sampler=None, pruner=None) -> optuna.Study:
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)
    for record in history:
        study.add_trial(record.frozen())
    return study


def sample_params(space: dict[str, BaseDistribution], history: list[TrialRecord], number: int,
                  settings: HpoSettings, cell_id: str, defaults: dict) -> dict:
    """Parameters of trial ``number``: the defaults for trial 0, else seeded TPE over the visible history."""
    if not space:
        return {}
    sampler = optuna.samplers.TPESampler(seed=trial_seed(settings, cell_id, number),
                                         n_startup_trials=settings.startup_trials)
    study = _study(visible_history(history, number, settings.parallel), sampler=sampler)
    if number == 0:
        study.enqueue_trial(defaults)
    trial = study.ask(fixed_distributions=space)
    return dict(trial.params)


def make_pruner(settings: HpoSettings) -> optuna.pruners.BasePruner:
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=settings.prune_min_epochs,
                                                  reduction_factor=settings.reduction_factor,
                                                  min_early_stopping_rate=0)


def monitor_score(row: dict, monitor: str) -> float:
    """The epoch's validation score, higher is better, as the trainer ranks it (NaN AUROC -> accuracy)."""
    if "score" in row:  # the trainer's own score, in the task's direction
        return float(row["score"])
    if monitor == "loss":
        return -float(row["val_loss"])
    value = row.get(f"val_{monitor}", float("nan"))
    value = float("nan") if value is None else float(value)
    return float(row.get("val_acc", float("nan"))) if math.isnan(value) else value


class PruningReporter:
    """``progress(epoch, row)`` callback for a trial: reports the score, raises TrialPruned.

    Builds a study holding the trial's visible history (with their rung values) and one live
    trial with the given parameters, so the pruner compares exactly as it would have in one study.

    Rungs are in units of the configured epoch budget (``budget_epochs``): when the trainer
    stretches a tiny label fraction to more, shorter epochs (``min_steps``; the row's
    ``epochs_total``), epoch e is reported as unit floor(e * budget / epochs_total), at the
    first epoch that reaches it, so "rung at epoch 2" means a third of a 6-epoch training for
    every label fraction, not two optimizer steps of a 5-image subset.
    """

    def __init__(self, history: list[TrialRecord], params: dict, settings: HpoSettings, monitor: str,
                 budget_epochs: int | None = None):
        self.monitor = monitor
        self.budget_epochs = budget_epochs
        self.study = _study(history, pruner=make_pruner(settings))
        self.trial = self.study.ask()
        self.intermediate: dict[int, float] = {}  # reported unit -> validation score
        self.best_score = -math.inf  # over every epoch, reported or not

    def unit(self, epoch: int, row: dict) -> int:
        total = row.get("epochs_total")
        if not self.budget_epochs or not total:
            return int(epoch)
        return int(epoch) * int(self.budget_epochs) // int(total)

    def __call__(self, epoch: int, row: dict) -> None:
        score = monitor_score(row, self.monitor)
        if not math.isnan(score):
            self.best_score = max(self.best_score, score)
        unit = self.unit(epoch, row)
        if unit < 1 or unit in self.intermediate:
            return
        self.intermediate[unit] = score
        self.trial.report(score, unit)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch} (budget unit {unit}; validation {score:.4f})")

    def system_attrs(self) -> dict:
        frozen = self.study._storage.get_trial(self.trial._trial_id)
        return {k: v for k, v in frozen.system_attrs.items() if k.startswith("completed_rung_")}


def choose(history: list[TrialRecord]) -> TrialRecord | None:
    """The completed trial with the best validation value (ties: the earlier trial); None if none completed."""
    done = [t for t in history if t.state == "complete" and t.value is not None and not math.isnan(t.value)]
    if not done:
        return None
    return max(done, key=lambda t: (t.value, -t.number))


def space_to_json(space: dict[str, BaseDistribution]) -> dict:
    return {k: distribution_to_json(v) for k, v in space.items()}
