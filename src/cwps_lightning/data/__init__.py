from .base import DataConfigError, MultiTaskDataModule, TaskSplits
from .colour_digits import ColourDigitsDataModule
from .digits import DigitsDataModule
from .domainnet import DomainNetDataModule
from .folders import FoldersDataModule
from .image_tasks import ImageTasksDataModule
from .imagenet_sketch import ImageNetSketchDataModule

#: the benchmarks, by their ``data=`` config name
BENCHMARKS = {
    "digits": DigitsDataModule,
    "colour_digits": ColourDigitsDataModule,
    "imagenet_sketch": ImageNetSketchDataModule,
    "domainnet": DomainNetDataModule,
    "folders": FoldersDataModule,
}

__all__ = [
    "BENCHMARKS",
    "ColourDigitsDataModule",
    "DataConfigError",
    "DigitsDataModule",
    "DomainNetDataModule",
    "FoldersDataModule",
    "ImageNetSketchDataModule",
    "ImageTasksDataModule",
    "MultiTaskDataModule",
    "TaskSplits",
]
