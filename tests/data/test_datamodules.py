"""The on-disk DataModules: classes and labels, validation split, loaders, bad input."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from cwps_lightning.data import (
    DataConfigError,
    DigitsDataModule,
    DomainNetDataModule,
    FoldersDataModule,
    ImageNetSketchDataModule,
)
from cwps_lightning.data.images import ImageListDataset

from .helpers import (
    CLASSES,
    DOMAINS,
    I2S_TASKS,
    make_domainnet,
    make_folder_task,
    make_imagenet_sketch,
    write_corrupt,
    write_image,
    write_truncated,
)

SMALL = dict(image_size=32, num_workers=0, batch_size=4)


def paths(ds) -> list[str]:
    return [str(p) for p in ds.paths]


# -- ImageNet-to-Sketch ------------------------------------------------------------------------
def test_imagenet_sketch_tasks_classes_and_labels(i2s_root):
    dm = ImageNetSketchDataModule(root=str(i2s_root), **SMALL)
    assert dm.task_names == list(I2S_TASKS)  # the paper's Table 1 order
    for task in I2S_TASKS:
        s = dm.splits[task]
        assert s.num_classes == 3
        assert len(s.train) + len(s.val) == 12 and len(s.test) == 6
        # labels are the sorted class folder names
        for p, y in zip(paths(s.test), s.test.labels, strict=True):
            assert CLASSES[y] == os.path.basename(os.path.dirname(p))
    dm.use("flowers")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and y.dtype == torch.int64


def test_imagenet_sketch_transform_policy_per_task(i2s_root):
    dm = ImageNetSketchDataModule(root=str(i2s_root), **SMALL)
    assert dm.policy_for("cubs_cropped") == "resize"
    assert dm.policy_for("stanford_cars_cropped") == "resize"
    assert dm.policy_for("flowers") == "crop"
    cropped = [type(t).__name__ for t in dm.splits["cubs_cropped"].train.transform.transforms]
    other = [type(t).__name__ for t in dm.splits["flowers"].train.transform.transforms]
    assert "RandomResizedCrop" not in cropped and "RandomHorizontalFlip" in cropped
    assert "RandomResizedCrop" in other
    assert "CenterCrop" in [type(t).__name__ for t in dm.splits["flowers"].test.transform.transforms]
    everything_resized = ImageNetSketchDataModule(root=str(i2s_root), transform="resize", **SMALL)
    assert everything_resized.policy_for("flowers") == "resize"


def test_a_resize_size_no_task_uses_is_refused(i2s_root, tmp_path):
    """data.resize_size only sets the shorter side before a crop; where every task is resized
    to image_size x image_size it would change nothing (it was ignored without a word)."""
    resized = dict(root=str(i2s_root), transform="resize", resize_size=40, **SMALL)
    with pytest.raises(DataConfigError, match=r"data\.resize_size=40 is not used: every task's "
                                              r"transform is 'resize'.*leave data\.resize_size "
                                              r"null.*crop, rrc"):
        ImageNetSketchDataModule(**resized).check_settings()
    # the *_cropped tasks alone are resized under transform=auto: the same
    with pytest.raises(DataConfigError, match=r"data\.resize_size=40 is not used"):
        ImageNetSketchDataModule(root=str(i2s_root), tasks=["cubs_cropped"], resize_size=40,
                                 **SMALL).check_settings()
    # the build does not check: evaluate rebuilds a run's config for some of its tasks
    assert ImageNetSketchDataModule(root=str(i2s_root), tasks=["cubs_cropped"], resize_size=40,
                                    **SMALL).task_names == ["cubs_cropped"]
    # used by one task, or left at its default: fine
    dm = ImageNetSketchDataModule(root=str(i2s_root), tasks=["cubs_cropped", "flowers"],
                                  resize_size=40, **SMALL)
    assert dm.task_names == ["cubs_cropped", "flowers"]
    test_steps = dm.splits["flowers"].test.transform.transforms
    assert [t.size for t in test_steps if type(t).__name__ == "Resize"] == [40]
    assert ImageNetSketchDataModule(root=str(i2s_root), transform="resize",
                                    **SMALL).task_names == list(I2S_TASKS)
    # a folders entry's own transform counts
    for task in ("a", "b"):
        make_folder_task(tmp_path / task, classes=("x", "y"), n_train=2, n_test=1)
    folders = [{"name": "a", "train": "a/train", "test": "a/test", "transform": "resize"},
               {"name": "b", "train": "b/train", "test": "b/test", "transform": "resize"}]
    with pytest.raises(DataConfigError, match=r"data\.resize_size=40 is not used"):
        FoldersDataModule(root=str(tmp_path), folders=folders, resize_size=40,
                          **SMALL).check_settings()
    folders[1]["transform"] = "crop"
    FoldersDataModule(root=str(tmp_path), folders=folders, resize_size=40,
                      **SMALL).check_settings()


def test_task_order_is_configurable(i2s_root):
    dm = ImageNetSketchDataModule(root=str(i2s_root), tasks=["sketches", "flowers"], **SMALL)
    assert dm.task_names == ["sketches", "flowers"]
    assert set(dm.splits) == {"sketches", "flowers"}
    with pytest.raises(DataConfigError, match="unknown task"):
        _ = ImageNetSketchDataModule(root=str(i2s_root), tasks=["cifar"], **SMALL).task_names


def test_validation_split_is_deterministic_and_disjoint(i2s_root):
    def split(seed):
        s = ImageNetSketchDataModule(root=str(i2s_root), seed=seed, **SMALL).splits["wikiart"]
        return paths(s.train), paths(s.val)

    train_a, val_a = split(0)
    train_b, val_b = split(0)
    assert (train_a, val_a) == (train_b, val_b)
    assert not set(train_a) & set(val_a)
    assert len(val_a) == 1 and len(train_a) == 11  # round(0.1 * 12)
    others = {tuple(split(seed)[1]) for seed in range(1, 8)}
    assert len(others | {tuple(val_a)}) > 1  # the seed decides which images
    # the test split never feeds validation
    s = ImageNetSketchDataModule(root=str(i2s_root), **SMALL).splits["wikiart"]
    assert not set(paths(s.test)) & set(paths(s.val))


def test_validation_fraction(i2s_root):
    s = ImageNetSketchDataModule(root=str(i2s_root), val_fraction=0.5, **SMALL).splits["flowers"]
    assert len(s.val) == 6 and len(s.train) == 6
    with pytest.raises(DataConfigError, match="data.val_fraction"):
        _ = ImageNetSketchDataModule(root=str(i2s_root), val_fraction=0, **SMALL).task_names


# -- DomainNet ---------------------------------------------------------------------------------
def test_domainnet_labels_come_from_split_files(dn_root):
    dm = DomainNetDataModule(root=str(dn_root), **SMALL)
    assert dm.task_names == ["real", "painting", "quickdraw", "clipart", "infograph", "sketch"]
    assert all(dm.num_classes(d) == 345 for d in DOMAINS)
    s = dm.splits["clipart"]
    assert len(s.train) + len(s.val) == 12 and len(s.test) == 6
    for p, y in zip(paths(s.test), s.test.labels, strict=True):
        assert CLASSES[y] == os.path.basename(os.path.dirname(p))


def test_domainnet_missing_class_does_not_shift_labels(tmp_path):
    root = make_domainnet(tmp_path / "dn", domains=("clipart", "sketch"),
                          drop={("clipart", "train"): {"bee"}, ("clipart", "test"): {"bee"}})
    dm = DomainNetDataModule(root=str(root), tasks=["clipart", "sketch"], num_classes=None,
                             **SMALL)
    assert dm.num_classes("clipart") == 3  # largest label + 1 over every split file
    clip = dm.splits["clipart"]
    labels = {y for ds in (clip.train, clip.val, clip.test) for y in ds.labels.tolist()}
    assert labels == {0, 2}  # cat keeps label 2 though bee (1) is absent
    for ds in (clip.train, clip.val, clip.test):
        for p, y in zip(paths(ds), ds.labels, strict=True):
            assert CLASSES[y] == os.path.basename(os.path.dirname(p))


def test_domainnet_last_class_missing_keeps_the_head_size(tmp_path):
    root = make_domainnet(tmp_path / "dn", domains=("clipart", "sketch"),
                          drop={("clipart", "train"): {"cat"}, ("clipart", "test"): {"cat"}})
    dm = DomainNetDataModule(root=str(root), tasks=["clipart"], num_classes=None, **SMALL)
    assert dm.num_classes("clipart") == 3  # sketch's files still name label 2


def test_domainnet_split_file_naming_a_missing_image(dn_root):
    (dn_root / "real" / "bee" / "real_bee_train1.jpg").unlink()
    with pytest.raises(DataConfigError) as err:
        _ = DomainNetDataModule(root=str(dn_root), tasks=["real"], **SMALL).task_names
    msg = str(err.value)
    assert "real_train.txt" in msg and "line 6" in msg and "real/bee/real_bee_train1.jpg" in msg
    assert "\n" not in msg


def test_domainnet_bad_lines_and_labels(dn_root):
    with open(dn_root / "real_train.txt", "a") as f:
        f.write("real/apple/x.jpg notalabel\n")
    with pytest.raises(DataConfigError, match=r"real_train.txt:13: expected"):
        _ = DomainNetDataModule(root=str(dn_root), tasks=["real"], **SMALL).task_names
    make_domainnet(dn_root)  # rewrites the split files
    with pytest.raises(DataConfigError, match=r"outside \[0, 2\)"):
        _ = DomainNetDataModule(root=str(dn_root), tasks=["real"], num_classes=2, **SMALL).task_names
    text = (dn_root / "sketch_test.txt").read_text().replace("sketch/apple/sketch_apple_test0.jpg 0",
                                                               "sketch/apple/sketch_apple_test0.jpg 1")
    (dn_root / "sketch_test.txt").write_text(text)
    with pytest.raises(DataConfigError, match="disagree on labels"):
        _ = DomainNetDataModule(root=str(dn_root), tasks=["real"], **SMALL).task_names


def test_domainnet_transforms_follow_taps(dn_root):
    dm = DomainNetDataModule(root=str(dn_root), tasks=["real"], **SMALL)
    train = [type(t).__name__ for t in dm.splits["real"].train.transform.transforms]
    test = [type(t).__name__ for t in dm.splits["real"].test.transform.transforms]
    assert train[:2] == ["RandomResizedCrop", "RandomHorizontalFlip"]
    assert test[:2] == ["Resize", "CenterCrop"]


# -- folders -----------------------------------------------------------------------------------
def test_folders_explicit_list(tmp_path):
    make_folder_task(tmp_path / "birds", classes=("a", "b"))
    make_folder_task(tmp_path / "elsewhere" / "cars", classes=("x", "y", "z", "w"))
    dm = FoldersDataModule(
        root=str(tmp_path),
        folders=[{"name": "cars", "train": str(tmp_path / "elsewhere/cars/train"),
                  "test": str(tmp_path / "elsewhere/cars/test"), "num_classes": 4},
                 {"name": "birds", "train": "birds/train", "test": "birds/test",
                  "val_fraction": 0.5}],
        **SMALL,
    )
    assert dm.task_names == ["cars", "birds"]
    assert dm.num_classes("cars") == 4 and dm.num_classes("birds") == 2
    assert len(dm.splits["birds"].val) == 4  # its own val_fraction


def test_folders_discovery_and_val_folder(tmp_path):
    make_folder_task(tmp_path / "t2", classes=("a", "b"))
    make_folder_task(tmp_path / "t1", classes=("a", "b", "c"))
    dm = FoldersDataModule(root=str(tmp_path), **SMALL)
    assert dm.task_names == ["t1", "t2"] and dm.num_classes("t1") == 3
    for cls in ("a", "b"):
        write_image(tmp_path / "t2" / "val" / cls / "v.jpg")
    dm = FoldersDataModule(root=str(tmp_path), folders=[
        {"name": "t2", "train": "t2/train", "test": "t2/test", "val": "t2/val"}], **SMALL)
    s = dm.splits["t2"]
    assert len(s.val) == 2 and len(s.train) == 8  # the val folder, no carving


def test_a_task_may_not_take_the_pretrained_models_name(tmp_path):
    """The kernel bank and the store keep the pretrained model under "T0": a task folder of
    that name would take its place (its entry overwrites T0's), so it is refused up front."""
    make_folder_task(tmp_path / "T0", classes=("a", "b"))
    make_folder_task(tmp_path / "t1", classes=("a", "b"))
    dm = FoldersDataModule(root=str(tmp_path), **SMALL)
    with pytest.raises(DataConfigError, match="a task is named 'T0', the name the kernel bank"):
        _ = dm.splits
    dm = FoldersDataModule(root=str(tmp_path), folders=[
        {"name": "T0", "train": "t1/train", "test": "t1/test"}], **SMALL)
    with pytest.raises(DataConfigError, match="rename that task"):
        dm.validate_tasks()
    assert FoldersDataModule(root=str(tmp_path), folders=[  # any other name is fine
        {"name": "t0", "train": "T0/train", "test": "T0/test"}], **SMALL).splits["t0"]


def test_folders_class_count_disagreements(tmp_path):
    make_folder_task(tmp_path / "t", classes=("a", "b"))
    with pytest.raises(DataConfigError, match="num_classes=3 disagrees with the 2 class folders"):
        _ = FoldersDataModule(root=str(tmp_path), folders=[
            {"name": "t", "train": "t/train", "test": "t/test", "num_classes": 3}], **SMALL
        ).task_names
    write_image(tmp_path / "t" / "test" / "zebra" / "z.jpg")
    with pytest.raises(DataConfigError, match=r"zebra of the test split .* missing from the train split"):
        _ = FoldersDataModule(root=str(tmp_path), **SMALL).task_names


def test_folders_bad_entries(tmp_path):
    make_folder_task(tmp_path / "t")
    with pytest.raises(DataConfigError, match=r"data.folders\[0\] must have keys"):
        _ = FoldersDataModule(root=str(tmp_path), folders=[{"name": "t"}], **SMALL).task_names
    with pytest.raises(DataConfigError, match="unknown key"):
        _ = FoldersDataModule(root=str(tmp_path), folders=[
            {"name": "t", "train": "t/train", "test": "t/test", "colour": 1}], **SMALL).task_names


def test_folders_discovery_sorts_the_task_folders_and_skips_the_others(tmp_path):
    names = ["m", "c", "x", "a", "q", "f", "b", "k"]
    for name in names:
        make_folder_task(tmp_path / name, classes=("a", "b"), n_train=2, n_test=1)
    make_folder_task(tmp_path / ".trash" / "old", classes=("a", "b"), n_train=2, n_test=1)
    make_folder_task(tmp_path / ".hidden", classes=("a", "b"), n_train=2, n_test=1)
    write_image(tmp_path / "no_train" / "test" / "a" / "x.jpg")  # not a task: no train folder
    (tmp_path / "README.txt").write_text("my tasks")
    assert FoldersDataModule(root=str(tmp_path), **SMALL).task_names == sorted(names)


def test_folders_discovery_without_any_task_folder(tmp_path):
    make_folder_task(tmp_path / ".hidden", classes=("a", "b"), n_train=2, n_test=1)
    write_image(tmp_path / "t" / "test" / "a" / "x.jpg")
    with pytest.raises(DataConfigError) as err:
        _ = FoldersDataModule(root=str(tmp_path), **SMALL).task_names
    msg = str(err.value)
    assert "does not look like the folders layout" in msg and "no <task>/train folder" in msg
    assert "found there: t/" in msg


@pytest.mark.parametrize(("folders", "needle"), [
    ("t/train", "data.folders must be a non-empty list of {name, train, test} entries (or "
                "null), got 't/train'"),
    ([], "data.folders must be a non-empty list of {name, train, test} entries (or null), "
         "got []"),
    ([{"name": "t", "train": "t/train"}], "data.folders[0] must have keys name, train and test, "
                                          "got {'name': 't', 'train': 't/train'}"),
    ([{"name": "t", "train": "t/train", "test": "t/test"},
      {"name": "t", "train": "u/train", "test": "u/test"}], "data.folders names task 't' twice"),
])
def test_folders_that_are_not_a_list_of_distinct_entries(tmp_path, folders, needle):
    make_folder_task(tmp_path / "t", classes=("a", "b"), n_train=2, n_test=1)
    make_folder_task(tmp_path / "u", classes=("a", "b"), n_train=2, n_test=1)
    dm = FoldersDataModule(root=str(tmp_path), folders=folders, **SMALL)
    with pytest.raises(DataConfigError) as err:
        dm.check_settings()
    assert str(err.value) == needle


def test_a_folders_task_named_by_a_number(tmp_path):
    """Hydra reads ``name: 2019`` as an integer; it names the task "2019"."""
    make_folder_task(tmp_path / "t", classes=("a", "b"), n_train=2, n_test=1)
    dm = FoldersDataModule(root=str(tmp_path), folders=[
        {"name": 2019, "train": "t/train", "test": "t/test"}], **SMALL)
    assert dm.task_names == ["2019"] and dm.num_classes("2019") == 2


def test_folders_paths_under_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    make_folder_task(tmp_path / "t", classes=("a", "b"), n_train=2, n_test=1)
    dm = FoldersDataModule(root=str(tmp_path / "nowhere"), folders=[
        {"name": "t", "train": "~/t/train", "test": "~/t/test"}], **SMALL)
    assert dm.num_classes("t") == 2 and dm.check_root() is None  # (not under data.root)


def test_folders_transform_of_one_entry(tmp_path):
    for task in ("a", "b"):
        make_folder_task(tmp_path / task, classes=("x", "y"), n_train=2, n_test=1)
    dm = FoldersDataModule(root=str(tmp_path), folders=[
        {"name": "a", "train": "a/train", "test": "a/test", "transform": "resize"},
        {"name": "b", "train": "b/train", "test": "b/test"}], **SMALL)
    assert dm.policy_for("a") == "resize" and dm.policy_for("b") == "crop"  # (the default)
    resized = [type(t).__name__ for t in dm.splits["a"].train.transform.transforms]
    cropped = [type(t).__name__ for t in dm.splits["b"].train.transform.transforms]
    assert "RandomResizedCrop" not in resized and "RandomResizedCrop" in cropped


def test_folders_relative_path_under_a_root_that_is_a_file(tmp_path):
    (tmp_path / "root").write_text("not a folder")
    with pytest.raises(DataConfigError) as err:
        _ = FoldersDataModule(root=str(tmp_path / "root"), folders=[
            {"name": "t", "train": "t/train", "test": "t/test"}], **SMALL).task_names
    assert "'t/train' is relative to data.root=" in str(err.value)
    assert "which is not a directory" in str(err.value)


def test_folders_absolute_paths_do_not_need_the_root(tmp_path):
    make_folder_task(tmp_path / "a", classes=("x", "y"))
    make_folder_task(tmp_path / "b", classes=("x", "y", "z"))
    nowhere = tmp_path / "data" / "folders"  # the default root, never created
    folders = [{"name": t, "train": str(tmp_path / t / "train"),
                "test": str(tmp_path / t / "test")} for t in ("a", "b")]
    dm = FoldersDataModule(root=str(nowhere), folders=folders, **SMALL)
    assert dm.task_names == ["a", "b"] and dm.num_classes("b") == 3
    assert dm.check_root() is None  # the root is not read
    # a relative path does need it, and the message says which path
    folders[1] = {"name": "b", "train": "b/train", "test": str(tmp_path / "b" / "test")}
    with pytest.raises(DataConfigError) as err:
        _ = FoldersDataModule(root=str(nowhere), folders=folders, **SMALL).task_names
    assert "'b/train' is relative to data.root=" in str(err.value)
    assert "does not exist" in str(err.value)


def test_folders_check_with_absolute_paths(tmp_path):
    import io

    from cwps_lightning.data.check import run_check

    make_folder_task(tmp_path / "a")
    folders = f"[{{name: a, train: '{tmp_path}/a/train', test: '{tmp_path}/a/test'}}]"
    out = io.StringIO()
    code = run_check(["data=folders", f"data.root={tmp_path / 'nowhere'}",
                      f"data.folders={folders}"], stream=out)
    assert code == 0, out.getvalue()
    assert "a: 3 classes, train 12 images, test 6 images" in out.getvalue()
    # the first line does not claim a root that was not read (it said "at .")
    first = out.getvalue().splitlines()[0]
    assert first.startswith("checking folders listed in data.folders: tasks ['a']"), first


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [FoldersDataModule, ImageNetSketchDataModule, DigitsDataModule])
def test_tasks_given_as_folder_entries(tmp_path, cls):
    make_folder_task(tmp_path / "a")
    tasks = [{"name": "a", "train": "a/train", "test": "a/test"}]
    kwargs = {} if cls is DigitsDataModule else dict(root=str(tmp_path), **SMALL)
    with pytest.raises(DataConfigError) as err:
        _ = cls(tasks=tasks, **kwargs).splits
    msg = str(err.value)
    assert msg.startswith("data.tasks takes task names") and "data.tasks[0]" in msg
    assert "data.folders=[{name: a, train: <dir>, test: <dir>}" in msg and "\n" not in msg


def test_tasks_given_as_folder_entries_on_the_command_line(tmp_path):
    from cwps_lightning.data.check import compose_config, instantiate_data

    entry = "data.tasks=[{name: a, train: a/train, test: a/test}]"
    for overrides in (["data=digits", entry], ["data=folders", f"data.root={tmp_path}", entry]):
        dm = instantiate_data(compose_config(overrides))  # OmegaConf containers for digits
        with pytest.raises(DataConfigError, match=r"data.tasks takes task names .* data.folders"):
            _ = dm.splits


@pytest.mark.parametrize(("tasks", "needle"), [
    ("optdigits", "e.g. data.tasks=[optdigits], got 'optdigits'"),
    (["optdigits", 3], "data.tasks[1] must be a task name, got 3"),
    (7, "a list of task names or null, got 7"),
])
def test_tasks_that_are_not_a_list_of_names(tasks, needle):
    with pytest.raises(DataConfigError) as err:
        _ = DigitsDataModule(tasks=tasks).num_classes("optdigits")
    assert needle in str(err.value)


@pytest.mark.parametrize("name", ["", " ", "a/b", "a\\b", "..", None])
def test_task_names_that_cannot_be_a_folder_or_a_store_key(tmp_path, name):
    """A task name becomes a folder and a store key (<task>/index/<layer>): an empty one, or
    one with a path separator, is refused whether it comes from data.tasks or data.folders."""
    make_folder_task(tmp_path / "t", classes=("a", "b"))
    entry = {"train": "t/train", "test": "t/test"}
    made = {"data.tasks[0]": dict(tasks=[name, "t"]),
            "data.folders[0].name": dict(folders=[{"name": name, **entry}])}
    for key, kwargs in made.items():
        dm = FoldersDataModule(root=str(tmp_path), **SMALL, **kwargs)
        with pytest.raises(DataConfigError) as err:
            dm.check_settings()  # the train command's check, before its job
        msg = str(err.value)
        assert msg.startswith(f"{key} must be a task name, got {name!r}"), msg
        assert "non-empty string without '/'" in msg and "\n" not in msg


def test_a_task_of_one_class_is_refused(tmp_path):
    """One class makes a head of one output, which the accuracy metrics refuse at the first
    fit (a traceback after the data was loaded): the task is refused when its classes are
    read, naming the task and the class."""
    make_folder_task(tmp_path / "wikiart", classes=("apple",))
    make_folder_task(tmp_path / "flowers", classes=("apple", "bee"))
    for cls in (FoldersDataModule, ImageNetSketchDataModule):
        with pytest.raises(DataConfigError) as err:
            _ = cls(root=str(tmp_path), tasks=["flowers", "wikiart"], **SMALL).task_names
        assert str(err.value) == (f"task 'wikiart': {tmp_path / 'wikiart' / 'train'} has a "
                                  f"single class folder, 'apple'; a task needs 2 or more classes")
    assert FoldersDataModule(root=str(tmp_path), tasks=["flowers"],
                             **SMALL).num_classes("flowers") == 2


def test_domainnet_head_of_one_class_is_refused(tmp_path):
    root = make_domainnet(tmp_path / "dn", domains=("clipart",), classes=("apple",))
    with pytest.raises(DataConfigError, match=r"data.num_classes must be an integer >= 2 .* "
                                              r"got 1"):
        _ = DomainNetDataModule(root=str(root), tasks=["clipart"], num_classes=1,
                                **SMALL).task_names
    with pytest.raises(DataConfigError, match=r"the single label 0 \('apple'\); a task needs 2"):
        _ = DomainNetDataModule(root=str(root), tasks=["clipart"], num_classes=None,
                                **SMALL).task_names


def bad_folder_entries(tmp_path) -> list[tuple[dict, str]]:
    """data.folders entries with one bad value each, and what the message must say."""
    train, test = str(tmp_path / "t" / "train"), str(tmp_path / "t" / "test")
    return [
        ({"train": None}, "data.folders[0].train must be a path to a folder "
                          "<dir>/<class>/<image>, got None"),
        ({"test": ""}, "data.folders[0].test must be a path"),
        ({"test": "   "}, "data.folders[0].test must be a path"),
        ({"val": 3}, "data.folders[0].val must be a path to a folder <dir>/<class>/<image> "
                     "or null"),
        ({"test": train}, f"data.folders[0]: train and test are the same folder {train}"),
        ({"test": train + "/"}, "train and test are the same folder"),
        ({"val": test}, f"data.folders[0]: val and test are the same folder {test}"),
        ({"transform": "zoom"}, "data.folders[0].transform must be one of ['resize', 'crop', "
                                "'rrc'] or null (data.transform), got 'zoom'"),
        ({"val_fraction": 2}, "data.folders[0].val_fraction must be a number in (0, 1)"),
        ({"num_classes": "3"}, "data.folders[0].num_classes must be an integer >= 2"),
        ({"num_classes": 1}, "data.folders[0].num_classes must be an integer >= 2 (a task "
                             "needs 2 or more classes) or null, got 1"),
    ]


def test_folders_entry_values_are_checked_before_any_folder_is_read(tmp_path):
    """Each bad value of a data.folders entry is one line from the checks the train command
    runs before its job (check_settings), not a TypeError, or a run that tests on its
    training images, or an error only once the folders are scanned."""
    make_folder_task(tmp_path / "t", classes=("a", "b"))
    for change, needle in bad_folder_entries(tmp_path):
        entry = {"name": "t", "train": str(tmp_path / "t" / "train"),
                 "test": str(tmp_path / "t" / "test"), **change}
        dm = FoldersDataModule(root=str(tmp_path), folders=[entry], **SMALL)
        with pytest.raises(DataConfigError) as err:
            dm.check_settings()
        assert needle in str(err.value) and "\n" not in str(err.value), (change, err.value)


def test_folders_splits_that_are_one_folder_through_a_link(tmp_path):
    make_folder_task(tmp_path / "t", classes=("a", "b"))
    os.symlink(tmp_path / "t" / "train", tmp_path / "same")
    dm = FoldersDataModule(root=str(tmp_path), folders=[
        {"name": "t", "train": "t/train", "test": "same"}], **SMALL)
    with pytest.raises(DataConfigError, match="train and test are the same folder"):
        _ = dm.task_names


@pytest.mark.parametrize("cls", [ImageNetSketchDataModule, DomainNetDataModule, FoldersDataModule])
def test_missing_root(tmp_path, cls):
    with pytest.raises(DataConfigError) as err:
        _ = cls(root=str(tmp_path / "nowhere"), **SMALL).task_names
    assert "nowhere" in str(err.value) and "does not exist" in str(err.value)
    assert cls.layout.split(" ")[0] in str(err.value)  # says which layout was expected


def test_wrong_layout_names_the_expected_one(tmp_path, dn_root):
    with pytest.raises(DataConfigError) as err:
        _ = ImageNetSketchDataModule(root=str(dn_root), **SMALL).task_names
    msg = str(err.value)
    assert "ImageNet-to-Sketch layout" in msg and "{train,test}/<class>/<image>" in msg
    assert "no folder flowers/" in msg and "clipart/" in msg  # what is there instead
    i2s = make_imagenet_sketch(tmp_path / "i2s", tasks=("flowers",))
    with pytest.raises(DataConfigError) as err:
        _ = DomainNetDataModule(root=str(i2s), **SMALL).task_names
    assert "DomainNet layout" in str(err.value) and "real_train.txt" in str(err.value)


def test_images_without_class_folders(tmp_path):
    for i in range(3):
        write_image(tmp_path / "flowers" / "train" / f"{i}.jpg")
        write_image(tmp_path / "flowers" / "test" / f"{i}.jpg")
    with pytest.raises(DataConfigError, match="holds images directly .* but no class folders"):
        _ = ImageNetSketchDataModule(root=str(tmp_path), tasks=["flowers"], **SMALL).task_names


def test_corrupt_images_are_listed(i2s_root):
    bad = [write_corrupt(i2s_root / "flowers" / "train" / "bee" / "broken.jpg"),
           write_corrupt(i2s_root / "wikiart" / "test" / "cat" / "empty.png")]
    bad[1].write_bytes(b"")
    with pytest.raises(DataConfigError) as err:
        _ = ImageNetSketchDataModule(root=str(i2s_root), **SMALL).task_names
    msg = str(err.value)
    assert msg.startswith("2 unreadable image(s)")
    assert all(str(p) in msg for p in bad) and "data.skip_corrupt=true" in msg


def test_skip_corrupt_leaves_them_out_and_says_how_many(i2s_root, caplog):
    write_corrupt(i2s_root / "flowers" / "train" / "bee" / "broken.jpg")
    write_corrupt(i2s_root / "flowers" / "test" / "bee" / "broken.jpg")
    write_corrupt(i2s_root / "sketches" / "test" / "bee" / "broken.jpg")
    with caplog.at_level(logging.WARNING):
        dm = ImageNetSketchDataModule(root=str(i2s_root), skip_corrupt=True, **SMALL)
        s = dm.splits["flowers"]
    assert dm.skipped == {"flowers": 2, "sketches": 1}
    assert "skipped 3 unreadable image(s)" in caplog.text
    assert len(s.train) + len(s.val) == 12 and len(s.test) == 6
    assert not any("broken" in p for ds in (s.train, s.val, s.test) for p in paths(ds))


def test_truncated_images(i2s_root):
    trunc = write_truncated(i2s_root / "flowers" / "test" / "bee" / "trunc.jpg")
    # the header reads: the default (header) check passes it, a full check does not
    with pytest.raises(DataConfigError, match="trunc.jpg"):
        _ = ImageNetSketchDataModule(root=str(i2s_root), verify_images="full", **SMALL).task_names
    dm = ImageNetSketchDataModule(root=str(i2s_root), tasks=["flowers"], **SMALL)
    test = dm.splits["flowers"].test
    i = paths(test).index(str(trunc))
    with pytest.raises(DataConfigError, match="cannot read image .*trunc.jpg.*skip_corrupt"):
        test[i]
    skipping = ImageListDataset(test.paths, test.labels, test.transform, skip_corrupt=True)
    x, y = skipping[i]  # the next readable image instead
    assert x.shape == (3, 32, 32) and y == int(test.labels[(i + 1) % len(test)])


def test_bad_settings_are_reported_when_building(i2s_root):
    dm = ImageNetSketchDataModule(root=str(i2s_root), num_workers=-1, image_size=32)
    with pytest.raises(DataConfigError, match="data.num_workers"):
        _ = dm.task_names
    for kwargs, key in ((dict(verify_images="some"), "data.verify_images"),
                        (dict(transform="zoom"), "data.transform"),
                        (dict(skip_corrupt="yes"), "data.skip_corrupt")):
        with pytest.raises(DataConfigError, match=key):
            _ = ImageNetSketchDataModule(root=str(i2s_root), **SMALL, **kwargs).task_names


# -- loaders -----------------------------------------------------------------------------------
def test_loader_settings(i2s_root, monkeypatch):
    monkeypatch.setattr("cwps_lightning.data.image_tasks.available_cpus", lambda: 16)
    dm = ImageNetSketchDataModule(root=str(i2s_root), image_size=32, batch_size=5,
                                  eval_batch_size=7)
    assert dm.num_workers == 8 and dm.persistent_workers  # auto: one per CPU, at most 8
    assert dm.pin_memory == torch.cuda.is_available()
    dm = ImageNetSketchDataModule(root=str(i2s_root), image_size=32, batch_size=5,
                                  eval_batch_size=7, num_workers=2, pin_memory=False,
                                  tasks=["flowers"])
    dm.use("flowers")
    train, test = dm.train_dataloader(), dm.test_dataloader()
    assert train.num_workers == 2 and train.persistent_workers and train.batch_size == 5
    assert test.batch_size == 7
    batches = list(test)  # worker processes really load the images
    assert sum(len(y) for _, y in batches) == 6 and batches[0][0].shape[1:] == (3, 32, 32)
    dm0 = ImageNetSketchDataModule(root=str(i2s_root), num_workers=0, persistent_workers=True)
    assert not dm0.persistent_workers


def test_hydra_config_builds_each_datamodule(i2s_root, dn_root, tmp_path):
    from cwps_lightning.data.check import compose_config, instantiate_data

    make_folder_task(tmp_path / "mine" / "t")
    for preset, root, cls in (("imagenet_sketch", i2s_root, ImageNetSketchDataModule),
                              ("domainnet", dn_root, DomainNetDataModule)):
        dm = instantiate_data(compose_config([f"+experiment={preset}", f"data.root={root}"]))
        assert type(dm) is cls and dm.image_size == 224 and dm.batch_size == 96
    dm = instantiate_data(compose_config(["data=folders", f"data.root={tmp_path / 'mine'}",
                                          "data.image_size=32"]))
    assert type(dm) is FoldersDataModule and dm.task_names == ["t"]


# -- validation split, scanning and split files in detail --------------------------------------
def test_carving_leaves_an_image_on_each_side():
    from cwps_lightning.data.image_tasks import carve_validation

    samples = [(f"{i}.jpg", i % 2) for i in range(10)]
    train, val = carve_validation(samples, 0.01, 0, "t")  # round(0.1) = 0 images
    assert (len(train), len(val)) == (9, 1)
    train, val = carve_validation(samples[:2], 0.9, 0, "t")  # round(1.8) = 2 images
    assert (len(train), len(val)) == (1, 1) and sorted(train + val) == samples[:2]
    with pytest.raises(DataConfigError, match="data.val_fraction"):
        _ = ImageNetSketchDataModule(root="x", val_fraction=1, **SMALL).task_names


def test_each_task_carves_validation_images_of_its_own(i2s_root):
    """The five trees hold the same file names: a seed per task (not per tree size) picks
    different ones."""
    dm = ImageNetSketchDataModule(root=str(i2s_root), **SMALL)
    picked = {tuple(os.path.relpath(p, i2s_root / t) for p in paths(dm.splits[t].val))
              for t in I2S_TASKS}
    assert len(picked) > 1


def test_validation_images_get_the_test_transform(i2s_root):
    dm = ImageNetSketchDataModule(root=str(i2s_root), tasks=["flowers", "cubs_cropped"], **SMALL)
    for task in ("flowers", "cubs_cropped"):
        s = dm.splits[task]
        val = [type(t).__name__ for t in s.val.transform.transforms]
        assert val == [type(t).__name__ for t in s.test.transform.transforms]
        assert not any(name.startswith("Random") for name in val), task


def test_a_corrupt_image_in_a_val_folder_is_listed_or_left_out(tmp_path):
    make_folder_task(tmp_path / "t", classes=("a", "b"))
    for cls in ("a", "b"):
        write_image(tmp_path / "t" / "val" / cls / "v.jpg")
    write_corrupt(tmp_path / "t" / "val" / "a" / "broken.jpg")
    entry = [{"name": "t", "train": "t/train", "test": "t/test", "val": "t/val"}]
    with pytest.raises(DataConfigError, match=r"1 unreadable image\(s\): .*broken.jpg"):
        _ = FoldersDataModule(root=str(tmp_path), folders=entry, **SMALL).task_names
    dm = FoldersDataModule(root=str(tmp_path), folders=entry, skip_corrupt=True, **SMALL)
    assert [os.path.basename(p) for p in paths(dm.splits["t"].val)] == ["v.jpg", "v.jpg"]
    assert dm.skipped == {"t": 1}


def test_scan_skips_hidden_entries_and_non_images_and_follows_nested_links(tmp_path):
    from cwps_lightning.data.scan import scan_class_folders

    d = tmp_path / "train"
    for i in reversed(range(8)):  # written in reverse: the scan sorts
        write_image(d / "a" / f"{i}.jpg")
    for rel in ("a/sub/x.jpg", "b/y.jpg", ".ipynb_checkpoints/z.jpg", "a/.cache/h.jpg",
                "a/._0.jpg"):
        write_image(d / rel)
    (d / "a" / "notes.txt").write_text("not an image")
    write_image(tmp_path / "elsewhere" / "w.jpg")
    os.symlink(tmp_path / "elsewhere", d / "b" / "linked")
    scan = scan_class_folders(d)
    assert {c: [os.path.relpath(p, d) for p in ps] for c, ps in scan.classes.items()} == {
        "a": [f"a/{i}.jpg" for i in range(8)] + ["a/sub/x.jpg"],
        "b": ["b/y.jpg", "b/linked/w.jpg"]}
    assert scan.ignored == [str(d / "a" / "notes.txt")] and scan.loose_images == []


def test_a_split_of_empty_class_folders_is_a_layout_error(tmp_path):
    from cwps_lightning.data.scan import folder_task_source

    t = make_folder_task(tmp_path / "t", classes=("a", "b"))
    for cls in ("a", "b"):
        (t / "val" / cls).mkdir(parents=True)
    with pytest.raises(DataConfigError, match=r"task 't': .*val has no class folders with "
                                              r"images"):
        folder_task_source("t", t / "train", t / "test", "crop", "<dir>/<class>/<image>",
                           val_dir=t / "val")


def test_domainnet_split_file_lines(tmp_path):
    from cwps_lightning.data.domainnet import parse_split_file

    f = tmp_path / "clipart_train.txt"
    f.write_text("clipart/ice cream/clipart_1.jpg 3\n\nclipart/loose.jpg 0\n"
                 "clipart/apple/x.jpg -1\n")
    entries, bad = parse_split_file(f)
    assert [(e.rel, e.label, e.line, e.class_name) for e in entries] == [
        ("clipart/ice cream/clipart_1.jpg", 3, 1, "ice cream"),
        ("clipart/loose.jpg", 0, 3, None)]
    assert len(bad) == 1 and bad[0].startswith("clipart_train.txt:4: expected")


def test_domainnet_head_reaches_the_largest_label_though_one_is_in_no_file(tmp_path):
    drop = {("clipart", "train"): {"bee"}, ("clipart", "test"): {"bee"}}
    root = make_domainnet(tmp_path / "dn", domains=("clipart",), drop=drop)
    dm = DomainNetDataModule(root=str(root), tasks=["clipart"], num_classes=None, **SMALL)
    assert dm.num_classes("clipart") == 3


def test_domainnet_class_with_two_labels(dn_root):
    with open(dn_root / "real_train.txt", "a") as f:
        f.write("real/apple/real_apple_train0.jpg 5\n")
    with pytest.raises(DataConfigError, match=r"real_train.txt:13: class 'apple' has label 0 "
                                              r"on \d+ line\(s\) \(\w+_train.txt:1, .*\) but 5 "
                                              r"here$"):
        _ = DomainNetDataModule(root=str(dn_root), tasks=["real"], **SMALL).task_names


def test_domainnet_one_wrong_line_is_the_line_named_wherever_it_is(dn_root):
    """A label's class was the one its first line gave: a wrong first line made every right
    line the conflict (and the class table wrong). The class most lines give is taken now."""
    path = dn_root / "clipart_train.txt"
    lines = path.read_text().splitlines()
    first_rel, first_label = lines[0].rsplit(maxsplit=1)
    other = next(rel.split("/")[1] for rel, label in (ln.rsplit(maxsplit=1) for ln in lines)
                 if label != first_label)
    wrong = first_rel.replace(f"/{first_rel.split('/')[1]}/", f"/{other}/")
    path.write_text("\n".join([f"{wrong} {first_label}", *lines[1:]]) + "\n")
    dm = DomainNetDataModule(root=str(dn_root), tasks=["clipart"], **SMALL)
    table, conflicts = dm.class_table()
    assert len(conflicts) == 1 and conflicts[0].startswith(
        f"clipart_train.txt:1: label {first_label} is class {first_rel.split('/')[1]!r} on "), \
        conflicts
    assert conflicts[0].endswith(f"but {other!r} here")
    assert table[int(first_label)] == first_rel.split("/")[1]
    with pytest.raises(DataConfigError, match=r"disagree on labels: clipart_train.txt:1: "):
        _ = dm.task_names


def test_a_class_without_test_images_is_said_once_where_training_takes_it(i2s_root, caplog,
                                                                          monkeypatch):
    """`data check` calls it an error in a reference dataset; the job trained on it without a
    word, and its test top-1 left the class out. Now rank 0 says which classes."""
    import shutil

    import cwps_lightning.distributed as distributed

    task = sorted(p.name for p in i2s_root.iterdir() if p.is_dir())[0]
    gone = sorted(p.name for p in (i2s_root / task / "test").iterdir())[-1]
    shutil.rmtree(i2s_root / task / "test" / gone)
    with caplog.at_level("WARNING", logger="cwps_lightning.data.image_tasks"):
        _ = ImageNetSketchDataModule(root=str(i2s_root), tasks=[task], **SMALL).task_names
    said = [r.getMessage() for r in caplog.records if "no test image" in r.getMessage()]
    assert said == [f"task {task!r}: 1 class(es) with training images have no test image, so "
                    f"the test top-1 leaves them out: {gone}"], caplog.text
    caplog.clear()
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    with caplog.at_level("WARNING", logger="cwps_lightning.data.image_tasks"):
        _ = ImageNetSketchDataModule(root=str(i2s_root), tasks=[task], **SMALL).task_names
    assert "no test image" not in caplog.text  # (rank 0 alone)
