"""ImageNet-to-Sketch (``data=imagenet_sketch``): the five fine-grained / cross-domain tasks of
Piggyback, PackNet and TAPS, on top of an ImageNet-pretrained T0.

Layout (as those projects distribute it)::

    <root>/cubs_cropped/{train,test}/<class>/<image>           200 classes
    <root>/stanford_cars_cropped/{train,test}/<class>/<image>  196 classes
    <root>/flowers/{train,test}/<class>/<image>                102 classes
    <root>/wikiart/{train,test}/<class>/<image>                195 classes
    <root>/sketches/{train,test}/<class>/<image>               250 classes

Task names are the folder names. Labels are the sorted class folder names of the train split.
Transforms (``data.transform=auto``): the ``*_cropped`` sets are resized to
``image_size`` x ``image_size`` (+ flip when training); the others resize to 256, then random
resized crop 224 + flip for training and centre crop 224 for test (TAPS' ``datasets.py``).
``data.transform=resize`` treats every set like the cropped ones (the CWPS paper's wording:
"resized all images to 224 and applied random horizontal flipping").
"""

from __future__ import annotations

from pathlib import Path

from .image_tasks import ImageTasksDataModule, TaskSource
from .scan import check_folder_task, folder_task_source

#: (classes, train images, test images) of the reference dataset (Piggyback, Table 1)
REFERENCE_COUNTS = {
    "flowers": (102, 2040, 6149),
    "wikiart": (195, 42129, 10628),
    "sketches": (250, 16000, 4000),
    "stanford_cars_cropped": (196, 8144, 8041),
    "cubs_cropped": (200, 5994, 5794),
}


class ImageNetSketchDataModule(ImageTasksDataModule):
    # the order of the paper's Table 1 columns: Flowers, WikiArt, Sketch, Cars, CUB
    default_tasks = ("flowers", "wikiart", "sketches", "stanford_cars_cropped", "cubs_cropped")
    pretrain_task = None  # T0 is an ImageNet-pretrained backbone (model.pretrained / weights)
    benchmark = "ImageNet-to-Sketch"
    layout = "<root>/{" + ",".join(default_tasks) + "}/{train,test}/<class>/<image>"
    obtain = ("it is the layout Piggyback, PackNet and TAPS distribute (docs/datasets.md, "
              "'ImageNet-to-Sketch'); python -m cwps_lightning.data check "
              "+experiment=imagenet_sketch data.root=<dir> checks a copy")
    element = "<class>/<image>"

    def policy_for(self, task: str) -> str:
        if self.transform != "auto":
            return self.transform
        return "resize" if task.endswith("_cropped") else "crop"

    def task_dir(self, task: str) -> Path:
        return self.root / task

    def load_source(self, task: str) -> TaskSource:
        d = self.task_dir(task)
        if not d.is_dir():
            raise self.layout_error(f"no folder {task}/")
        if not (d / "train").is_dir() and not (d / "test").is_dir():
            inside = sorted(p.name for p in d.iterdir())[:5]
            raise self.layout_error(f"{task}/ has no train/ and test/ folders (it holds "
                                    f"{inside or 'nothing'})")
        return folder_task_source(task, d / "train", d / "test", self.policy_for(task),
                                  f"{d}/{{train,test}}/{self.element}")

    def check_dataset(self, report) -> None:
        paths: list[str] = []
        if not any(self.task_dir(t).is_dir() for t in self.tasks_requested):
            report.error("layout", str(self.layout_error(
                f"none of the task folders {', '.join(t + '/' for t in self.tasks_requested)}")))
            return
        for task in self.tasks_requested:
            d = self.task_dir(task)
            if not d.is_dir():
                report.error("layout", f"missing task folder {d} (expected {self.layout})",
                             task=task)
                continue
            paths += check_folder_task(report, task, d / "train", d / "test",
                                       f"{d}/{{train,test}}/{self.element}",
                                       reference=REFERENCE_COUNTS.get(task))
        report.decode_all(paths)
