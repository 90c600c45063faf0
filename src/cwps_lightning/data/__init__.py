from .base import DataConfigError, MultiTaskDataModule, TaskSplits
from .digits import DigitsDataModule

__all__ = ["DataConfigError", "DigitsDataModule", "MultiTaskDataModule", "TaskSplits"]
