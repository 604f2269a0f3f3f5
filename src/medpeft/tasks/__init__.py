"""Tasks: classification, segmentation and detection, each one plug-in (``Task``) that run, train, the
sweep and the report ask for targets, model head/decoder, loss, predictions and metrics."""
from __future__ import annotations

from ..errors import ConfigError
from .base import Task
from .classification import ClassificationTask
from .detection import DetectionTask
from .segmentation import SegmentationTask

TASKS: dict[str, Task] = {"classification": ClassificationTask(), "segmentation": SegmentationTask(),
                          "detection": DetectionTask()}
# the data layer's task kinds -> the task that handles them
KIND_TO_TASK = {"binary": "classification", "multiclass": "classification", "multilabel": "classification",
                "segmentation": "segmentation", "detection": "detection"}


def get_task(name: str) -> Task:
    """A task by its name (classification, segmentation) or by a data set's kind (binary, ...)."""
    key = KIND_TO_TASK.get(name, name)
    if key not in TASKS:
        raise ConfigError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
    return TASKS[key]


__all__ = ["Task", "TASKS", "get_task"]
