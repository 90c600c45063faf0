"""The paper's experiment presets: their settings, and each one run end to end (tiny, CPU)
through the real CLI in a subprocess."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cwps_lightning.data.check import CONF_DIR, compose_config

from .helpers import (
    make_domainnet,
    make_folder_task,
    make_imagenet_sketch,
    run_cli,
    write_checkpoint,
    write_corrupt,
)

PRESETS = {
    # preset: (model, mode, iterations, lr, benchmark)
    "imagenet_sketch": ("resnet50", "incremental", 1, 0.01, "imagenet_sketch"),
    "imagenet_sketch_joint": ("resnet50", "joint", 2, 0.01, "imagenet_sketch"),
    "imagenet_sketch_densenet": ("densenet121", "joint", 2, 0.08, "imagenet_sketch"),
    "imagenet_sketch_vit": ("vit_base_patch16_224", "incremental", 1, 0.001, "imagenet_sketch"),
    "domainnet": ("resnet50", "joint", 2, 0.01, "domainnet"),
    "lambda_sweep": ("resnet18", "joint", 3, 0.01, "imagenet_sketch"),
}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_settings(preset):
    model, mode, iterations, lr, data = PRESETS[preset]
    cfg = compose_config([f"+experiment={preset}"])
    assert cfg.model.name == model and cfg.model.pretrained is True and cfg.model.weights is None
    assert cfg.cwps.mode == mode and cfg.cwps.iterations == iterations
    assert cfg.cwps.threshold == 0.5 and list(cfg.cwps.baselines) == []
    assert dict(cfg.cwps.stages) == {
        "warmup_epochs": 10, "soft_epochs": 7.5, "hard_epochs": 22.5, "lr_schedule": "task"}
    assert cfg.optim.lr == lr and cfg.optim.mask_lr == 0.02
    assert cfg.data.batch_size == 96 and cfg.data.image_size == 224
    assert cfg.data.root.endswith(f"/data/{data}")
    assert cfg.data._target_.endswith({"imagenet_sketch": "ImageNetSketchDataModule",
                                       "domainnet": "DomainNetDataModule"}[data])
    if preset == "imagenet_sketch_vit":
        assert list(cfg.data.mean) == list(cfg.data.std) == [0.5, 0.5, 0.5]
    if preset == "lambda_sweep":
        assert cfg.hydra.sweeper.params["cwps.threshold"] == "0,0.3,0.4,0.5,0.6,0.7,1"
    text = (CONF_DIR / "experiment" / f"{preset}.yaml").read_text()
    assert "Table" in text.split("defaults:")[0]  # names the paper's table / figure


def tiny_run(tmp_path: Path, preset: str, root: Path, *extra: str, model="resnet18",
             ckpt_kwargs=None, workers="0", env_extra=None):
    ckpt = tmp_path / "t0.pt"
    write_checkpoint(ckpt, model, num_classes=5, **(ckpt_kwargs or {}))
    run_dir = tmp_path / "run"
    args = [f"+experiment={preset}", f"data.root={root}", f"model.name={model}",
            f"model.weights={ckpt}", "data.image_size=32", "cwps.stages.warmup_epochs=1",
            "cwps.stages.soft_epochs=1", "cwps.stages.hard_epochs=1",
            "+trainer.limit_train_batches=1", "+trainer.limit_val_batches=1",
            "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
            f"hydra.run.dir={run_dir}", f"data.num_workers={workers}", "data.batch_size=4",
            *extra]
    proc = run_cli("cwps_lightning.train", args, cwd=tmp_path, env_extra=env_extra)
    return proc, run_dir


def read_results(proc, run_dir: Path) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    return results


def test_imagenet_sketch_preset_end_to_end(tmp_path):
    """The fast one: the incremental preset on two tasks, one per transform policy."""
    root = make_imagenet_sketch(tmp_path / "i2s", tasks=("flowers", "cubs_cropped"))
    proc, run_dir = tiny_run(tmp_path, "imagenet_sketch", root,
                             "data.tasks=[cubs_cropped,flowers]")
    results = read_results(proc, run_dir)
    assert results["tasks"] == ["cubs_cropped", "flowers"]
    assert results["benchmark"] == "ImageNetSketchDataModule"
    assert set(results["methods"]) == {"cwps"}  # the presets run no baselines
    cwps = results["methods"]["cwps"]
    assert set(cwps["tasks"]) == {"cubs_cropped", "flowers"} and cwps["mode"] == "incremental"
    assert results["t0"] == {"weights": str(tmp_path / "t0.pt")}


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["imagenet_sketch", "imagenet_sketch_joint",
                                    "imagenet_sketch_densenet", "lambda_sweep"])
def test_imagenet_sketch_presets_end_to_end(tmp_path, preset):
    """Each preset's mode, iterations and backbone through the CLI, on two of its tasks (one
    per transform policy; the other tasks run in the tests around). The default order of all
    five is the datamodule's (tests/data/test_datamodules.py)."""
    tasks = ["sketches", "stanford_cars_cropped"]
    root = make_imagenet_sketch(tmp_path / "i2s", tasks=tasks)
    proc, run_dir = tiny_run(tmp_path, preset, root, f"data.tasks=[{','.join(tasks)}]")
    results = read_results(proc, run_dir)
    assert results["tasks"] == tasks
    cwps = results["methods"]["cwps"]
    assert set(cwps["tasks"]) == set(tasks)
    assert cwps["mode"] == PRESETS[preset][1] and cwps["iterations"] == PRESETS[preset][2]


@pytest.mark.slow
def test_imagenet_sketch_vit_preset(tmp_path):
    tasks = ["wikiart", "cubs_cropped"]
    root = make_imagenet_sketch(tmp_path / "i2s", tasks=tasks)
    proc, run_dir = tiny_run(tmp_path, "imagenet_sketch_vit", root, "+model.kwargs.img_size=32",
                             f"data.tasks=[{','.join(tasks)}]",
                             model="vit_tiny_patch16_224", ckpt_kwargs={"img_size": 32})
    results = read_results(proc, run_dir)
    assert results["tasks"] == tasks and results["backbone"] == "vit_tiny_patch16_224"
    assert set(results["methods"]["cwps"]["tasks"]) == set(tasks)


@pytest.mark.slow
def test_domainnet_preset(tmp_path):
    """The preset on two domains, one with a class missing from its train split, and data
    loader workers on; the default order of all six is the datamodule's."""
    tasks = ["quickdraw", "clipart"]
    root = make_domainnet(tmp_path / "dn", domains=tuple(tasks),
                          drop={("clipart", "train"): {"bee"}})
    proc, run_dir = tiny_run(tmp_path, "domainnet", root, f"data.tasks=[{','.join(tasks)}]",
                             workers="auto")
    results = read_results(proc, run_dir)
    assert results["tasks"] == tasks
    cwps = results["methods"]["cwps"]
    assert set(cwps["tasks"]) == set(tasks) and cwps["mode"] == "joint"
    assert cwps["iterations"] == 2


@pytest.mark.slow
def test_folders_end_to_end(tmp_path):
    make_folder_task(tmp_path / "mine" / "leaves", classes=("oak", "ash"))
    make_folder_task(tmp_path / "mine" / "stones", classes=("a", "b", "c", "d"))
    proc, run_dir = tiny_run(
        tmp_path, "imagenet_sketch", tmp_path / "mine", "data=folders",
        "data.folders=[{name:stones,train:stones/train,test:stones/test},"
        "{name:leaves,train:leaves/train,test:leaves/test,val_fraction:0.25}]")
    results = read_results(proc, run_dir)
    assert results["tasks"] == ["stones", "leaves"]
    assert results["benchmark"] == "FoldersDataModule"


# -- bad input through the CLI: one line, exit 2, no results --------------------------------
def assert_clean_failure(proc, run_dir: Path, *fragments: str):
    assert proc.returncode == 2, proc.stderr[-2000:]
    err_lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(err_lines) == 1, proc.stderr[-2000:]
    for fragment in fragments:
        assert fragment in err_lines[0]
    assert "Traceback" not in proc.stderr
    assert not (run_dir / "results.json").exists() and not (run_dir / "store").exists()


def test_cli_missing_root(tmp_path):
    proc, run_dir = tiny_run(tmp_path, "domainnet", tmp_path / "nowhere")
    assert_clean_failure(proc, run_dir, "data.root=", "nowhere", "does not exist",
                         "DomainNet layout",
                         "data download +experiment=domainnet data.root=<dir>")  # (how to get it)


@pytest.mark.parametrize("root", [None, "nowhere"])
def test_a_missing_imagenet_sketch_root_says_where_the_data_comes_from(tmp_path, root):
    from cwps_lightning.data.base import DataConfigError
    from cwps_lightning.data.imagenet_sketch import ImageNetSketchDataModule

    dm = ImageNetSketchDataModule(root=None if root is None else tmp_path / root)
    with pytest.raises(DataConfigError, match="Piggyback, PackNet and TAPS distribute") as err:
        dm.check_root()
    assert "docs/datasets.md" in str(err.value) and "data check" in str(err.value)


@pytest.mark.slow
def test_cli_wrong_layout_and_corrupt_images(tmp_path):
    dn = make_domainnet(tmp_path / "dn", domains=("clipart",))
    proc, run_dir = tiny_run(tmp_path, "imagenet_sketch", dn)
    assert_clean_failure(proc, run_dir, "ImageNet-to-Sketch layout", "no folder flowers/")
    i2s = make_imagenet_sketch(tmp_path / "i2s", tasks=("flowers", "wikiart"))
    bad = write_corrupt(i2s / "wikiart" / "train" / "cat" / "broken.jpg")
    proc, run_dir = tiny_run(tmp_path, "imagenet_sketch", i2s, "data.tasks=[flowers,wikiart]")
    assert_clean_failure(proc, run_dir, "1 unreadable image(s)", str(bad), "skip_corrupt")
    proc, run_dir = tiny_run(tmp_path, "imagenet_sketch", i2s, "data.tasks=[flowers,wikiart]",
                             "data.skip_corrupt=true")
    results = read_results(proc, run_dir)
    assert results["tasks"] == ["flowers", "wikiart"]
    assert "skipped 1 unreadable image(s) (wikiart: 1)" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_cli_split_file_naming_a_missing_image_and_offline_hub(tmp_path):
    dn = make_domainnet(tmp_path / "dn", domains=("clipart", "real"))
    (dn / "real" / "cat" / "real_cat_test1.jpg").unlink()
    proc, run_dir = tiny_run(tmp_path, "domainnet", dn, "data.tasks=[clipart,real]")
    assert_clean_failure(proc, run_dir, "real_test.txt", "names 1 missing image(s)",
                         "real/cat/real_cat_test1.jpg")
    dn2 = make_domainnet(tmp_path / "dn2", domains=("clipart",))
    proc, run_dir = tiny_run(tmp_path, "domainnet", dn2, "data.tasks=[clipart]",
                             "model.weights=null",  # the preset's model.pretrained=true, offline
                             env_extra={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert_clean_failure(proc, run_dir, "model.pretrained=true", "model.weights=<file>")
