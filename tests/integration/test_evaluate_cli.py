"""`python -m cwps_lightning.evaluate store=<dir>`: exit 0 when every task's re-tested top-1
matches the recorded one, 1 when one differs, 2 on bad input (one `error:` line)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from cwps_lightning.evaluate import main

from .helpers import REPO, cli_env, compose_run_config


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory, t0_cache):
    """The store of a tiny in-process run (one task, no baselines)."""
    from cwps_lightning.train import run

    run_dir = tmp_path_factory.mktemp("evaluate") / "run"
    run(compose_run_config(run_dir, "data.tasks=[optdigits]", "cwps.baselines=[]",
                           f"paths.cache_dir={t0_cache}"))
    return run_dir / "store"


@pytest.fixture
def mismatching_store(store_dir, tmp_path):
    """A copy of the store whose manifest records a top-1 one point off the true one."""
    copy = shutil.copytree(store_dir, tmp_path / "store")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["metrics"]["optdigits"]["top1"] += 1.0
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_matching_store_exits_0(store_dir, capsys):
    assert main([f"store={store_dir}", "device=cpu"]) == 0
    out, err = capsys.readouterr()
    assert "optdigits" in out and err == ""
    # the table says whose models it re-tests (the store keeps CWPS's alone)
    assert out.startswith(f"CWPS, each task's model rebuilt from the store {store_dir}:\n\n| Task |")
    # the kernel count is the whole table (it read 'in shared kernels': task-specific ones too)
    from cwps_lightning.cwps.store import MultiTaskStore
    kernels = MultiTaskStore.load(store_dir).param_count()["kernels"]
    assert (f"({kernels:,} in the kernel table, each distinct kernel once, shared or "
            "task-specific;") in out


def test_mismatch_exits_1(mismatching_store, capsys):
    assert main([f"store={mismatching_store}", "device=cpu"]) == 1
    out, err = capsys.readouterr()
    assert "optdigits" in out and "error:" not in err


def test_bad_input_exits_2_with_one_error_line(store_dir, tmp_path, capsys):
    broken = shutil.copytree(store_dir, tmp_path / "broken")
    kernels = next(broken.glob("kernels-*.safetensors"))
    kernels.write_bytes(kernels.read_bytes()[:1000])
    garbled = shutil.copytree(store_dir, tmp_path / "garbled")
    (garbled / "manifest.json").write_text("{not json")
    cases = {
        "no store argument": [],
        "an argument without =": [f"store={store_dir}", "cpu"],
        "no such directory": [f"store={tmp_path / 'nowhere'}"],
        "a directory without a store": [f"store={tmp_path}"],
        "a truncated tensor file": [f"store={broken}"],
        "a corrupt manifest": [f"store={garbled}"],
        "an empty store=": ["store="],
        "a device it does not know": [f"store={store_dir}", "device=gpux"],
        "a key outside data and paths": [f"store={store_dir}", "cwps.threshold=0.5"],
        "a misspelt data key": [f"store={store_dir}", "data.image_sise=32"],
    }
    for case, argv in cases.items():
        assert main(argv) == 2, case
        out, err = capsys.readouterr()
        one_error_line(err)
        assert out == "", case


def test_a_manifest_whose_recorded_top1_is_missing_or_no_number_is_not_a_pass(
        store_dir, tmp_path, capsys):
    """(without metrics every Match read '-' and evaluate exited 0 with nothing checked; a
    string top-1 failed in the comparison with a traceback)"""
    def copy_with(name, edit):
        copy = shutil.copytree(store_dir, tmp_path / name)
        manifest = json.loads((copy / "manifest.json").read_text())
        edit(manifest)
        (copy / "manifest.json").write_text(json.dumps(manifest))
        return copy

    unrecorded = copy_with("no_metrics", lambda m: m.pop("metrics"))
    assert main([f"store={unrecorded}", "device=cpu"]) == 1
    out = capsys.readouterr().out
    assert "1 task(s) have no recorded top-1 in the manifest to compare with (optdigits): not " \
           "checked" in out
    text = copy_with("str_top1", lambda m: m["metrics"]["optdigits"].update(top1="92"))
    assert main([f"store={text}", "device=cpu"]) == 2
    assert "corrupt manifest ('metrics' of another type" in one_error_line(
        capsys.readouterr().err)


def test_cli_subprocess_exit_status(mismatching_store):
    """The module run as a program: the table on stdout, the exit status main returns."""
    proc = subprocess.run(
        [sys.executable, "-m", "cwps_lightning.evaluate", f"store={mismatching_store}",
         "device=cpu"],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "optdigits" in proc.stdout and "Traceback" not in proc.stderr


def test_bad_device_and_overrides_name_what_is_accepted(store_dir, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv, needle in (
            (["device=gpux"], "device='gpux': accepted: auto, cpu, gpu, cuda, cuda:<index>"),
            (["device=cuda:1"], "device=cuda:1: 0 CUDA GPU(s) visible"),
            (["cwps.treshold=0.5"], "cwps.treshold=0.5: evaluate takes store=, device= and "
                                    "overrides of data.*"),
            (["data.image_sise=32"], "data.image_sise: no such key in this config "
                                     "('data.image_sise=32'; +data.image_sise=32 adds one)")):
        assert main([f"store={store_dir}", *argv]) == 2
        assert needle in one_error_line(capsys.readouterr()[1]), argv


def test_data_that_does_not_fit_the_store_is_refused(store_dir, tmp_path, capsys, monkeypatch):
    """A manifest without the data config, a task the store lacks, and data whose class count
    is not the store's head's (data.* pointing at other data): one line each, exit 2."""
    from cwps_lightning.data.digits import DigitsDataModule

    bare = shutil.copytree(store_dir, tmp_path / "bare")
    manifest = json.loads((bare / "manifest.json").read_text())
    del manifest["config"]
    (bare / "manifest.json").write_text(json.dumps(manifest))
    assert main([f"store={bare}", "device=cpu"]) == 2
    assert "its manifest keeps no 'config'" in one_error_line(capsys.readouterr().err)
    assert main([f"store={store_dir}", "device=cpu", "data.tasks=[optdigits,mnist_m]"]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        "error: data.tasks: ['mnist_m'] not in the store; its tasks: ['optdigits']")
    # a killed run's store: its config lists a task it never finished; the others are tested
    partial = shutil.copytree(store_dir, tmp_path / "partial")
    manifest = json.loads((partial / "manifest.json").read_text())
    manifest["config"]["data"]["tasks"] = ["optdigits", "mnist_m"]
    (partial / "manifest.json").write_text(json.dumps(manifest))
    assert main([f"store={partial}", "device=cpu"]) == 0
    assert "| optdigits |" in capsys.readouterr().out
    # data.tasks=null: the store's tasks too (it was the benchmark's default list, and the
    # tasks the store lacks were refused)
    assert main([f"store={partial}", "device=cpu", "data.tasks=null"]) == 0
    out = capsys.readouterr().out
    assert "| optdigits |" in out and "mnist" not in out
    monkeypatch.setattr(DigitsDataModule, "num_classes", lambda self, task: 3)
    assert main([f"store={store_dir}", "device=cpu"]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        "error: task 'optdigits': the data has 3 classes, the store's model 10 (do the data.* "
        "overrides point at other data?)")


def test_the_table_marks_any_difference_and_means_the_stores_column():
    """(No store needed.) A match is exact to 1e-9, a hundredth of a point is a mismatch."""
    from cwps_lightning.evaluate import format_rows

    lines = format_rows([{"task": "a", "top1": 50.0, "recorded": 50.0},
                         {"task": "b", "top1": 70.0, "recorded": 70.01},
                         {"task": "c", "top1": 90.0, "recorded": None}]).splitlines()
    assert lines[2:] == ["| a | 50.00 | 50.00 | yes |", "| b | 70.00 | 70.01 | NO |",
                         "| c | 90.00 | - | - |", "| Mean | 70.00 | | |"]


def test_a_hundredth_of_a_point_off_exits_1(store_dir, tmp_path, capsys):
    copy = shutil.copytree(store_dir, tmp_path / "store")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["metrics"]["optdigits"]["top1"] += 0.01
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert main([f"store={copy}", "device=cpu"]) == 1
    out = capsys.readouterr().out
    assert "| NO |" in out
    assert out.rstrip().endswith("1 task(s) differ from the top-1 the run recorded (optdigits), "
                                 "with the store's own data config: the images under data.root "
                                 "differ from the run's, or the machine or the library versions "
                                 "round otherwise"), out
    # an override that changes the test split is named as the likely cause (it said only NO)
    assert main([f"store={copy}", "device=cpu", "data.limit_per_task=100"]) == 1
    assert "(optdigits): data.limit_per_task=100 may test other images, or transform them " \
           "otherwise, than the run did (data.limit_per_task=100 draws the splits anew from " \
           "other images: its test split may hold images the run trained on, which inflates " \
           "the top-1); without" in capsys.readouterr().out
    assert main([f"store={store_dir}", "device=cpu"]) == 0
    assert "differ" not in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_the_usage_and_exits_0(flag, capsys):
    """(it said "error: bad argument '--help'" and exited 2)"""
    assert main([flag]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("usage: python -m cwps_lightning.evaluate store=") and err == ""
    assert "device=" in out and "Exit 0" in out
