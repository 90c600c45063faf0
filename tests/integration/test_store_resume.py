"""Joint mode, the store a run leaves, and resuming after SIGKILL (real CLI, tiny settings)."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import time

import pytest

from cwps_lightning.cwps import MultiTaskStore
from cwps_lightning.evaluate import evaluate_store

from .helpers import (
    REPO,
    TINY,
    cli_env,
    compose_run_config,
    count_store_params,
    model_param_counts,
    read_results,
    run_train,
    train_cmd,
)

TWO_TASKS = "data.tasks=[optdigits,mnist_sketch]"


def test_joint_mode_records_iterations_and_store_reproduces_top1(run_dir, t0_cache):
    proc = run_train(run_dir, TWO_TASKS, "cwps.mode=joint", "cwps.iterations=2",
                     "cwps.baselines=[]", cache=t0_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = read_results(run_dir)
    hist = res["methods"]["cwps"]["history"]
    assert [(h["iteration"], h["task"]) for h in hist] == [
        (0, "optdigits"), (0, "mnist_sketch"), (1, "optdigits"), (1, "mnist_sketch")]
    for h in hist:
        assert {"val_top1", "top1", "accepted"} <= set(h)
    assert all(h["accepted"] for h in hist[:2])  # a first visit is always kept
    for task, kept in res["methods"]["cwps"]["tasks"].items():
        visits = [h for h in hist if h["task"] == task]
        assert kept["val_top1"] == max(h["val_top1"] for h in visits)
    store = MultiTaskStore.load(run_dir / "store")
    assert store.tasks[0] == "T0" and set(store.tasks[1:]) == {"optdigits", "mnist_sketch"}
    # every task's model rebuilt from the store gets exactly the recorded test top-1
    rows = evaluate_store(store, device="cpu")
    assert {row["task"] for row in rows} == {"optdigits", "mnist_sketch"}
    for row in rows:
        assert row["top1"] == res["methods"]["cwps"]["tasks"][row["task"]]["top1"]
    # param_ratio is the store's parameters, counted from its tensors, over the backbone's,
    # counted on a fresh model; and the files hold no hidden copies
    name, kwargs = res["backbone"], res["config"]["model"]["kwargs"]
    total = count_store_params(run_dir / "store", name, kwargs)
    backbone = model_param_counts(name, 10, kwargs)["backbone"]
    assert res["methods"]["cwps"]["params"]["total"] == total
    assert res["methods"]["cwps"]["param_ratio_with_heads"] == pytest.approx(total / backbone)
    heads = sum(model_param_counts(name, info["num_classes"], kwargs)["full"]
                - model_param_counts(name, info["num_classes"], kwargs)["backbone"]
                for info in store.manifest["tasks"].values())
    assert res["methods"]["cwps"]["param_ratio"] == pytest.approx((total - heads) / backbone)
    tensor_bytes = sum(f.stat().st_size for f in (run_dir / "store").glob("*.safetensors"))
    assert tensor_bytes <= 1.05 * 4 * total


def _done_visits(run_dir) -> int:
    manifest = run_dir / "store" / "manifest.json"
    try:
        return len(json.loads(manifest.read_text())["run"]["methods"]["cwps"]["done"])
    except (OSError, ValueError, KeyError):
        return 0


def _kill_when(run_dir, overrides, cache, ready, what: str, poll: float) -> None:
    """Start the run, SIGKILL it as soon as ``ready()`` holds (within 240 s)."""
    proc = subprocess.Popen(train_cmd(run_dir, *overrides, cache=cache), cwd=REPO,
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while not ready():
            assert proc.poll() is None, f"the run ended before {what}"
            assert time.time() < deadline, f"not {what} within 240 s"
            time.sleep(poll)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_sigkill_mid_run_then_resume_finishes_every_task(run_dir, t0_cache):
    overrides = ("cwps.baselines=[frozen]",)
    _kill_when(run_dir, overrides, t0_cache, lambda: _done_visits(run_dir) >= 1,
               "a task was finished", poll=0.2)
    done_at_kill = _done_visits(run_dir)
    assert 1 <= done_at_kill < 3
    store = MultiTaskStore.load(run_dir / "store")  # loads, and holds exactly the finished work
    assert len(store.tasks) == 1 + done_at_kill
    assert not (run_dir / "results.json").exists()

    t0_first = json.loads((run_dir / "store" / "manifest.json").read_text())["run"]["t0"]
    assert "val_top1" in t0_first
    resumed = run_train(run_dir, *overrides, cache=t0_cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed" in resumed.stderr + resumed.stdout
    res = read_results(run_dir)
    # T0 as the first attempt had it (its val top-1), restored from the store
    assert res["t0"] == {**t0_first, "restored_from": str(run_dir / "store")}
    for method in ("cwps", "frozen"):
        assert set(res["methods"][method]["tasks"]) == {"optdigits", "mnist_sketch", "mnist_m"}
    assert len(MultiTaskStore.load(run_dir / "store").tasks) == 4


def test_resume_refuses_store_of_other_config_and_corrupt_store(run_dir, t0_cache):
    from cwps_lightning.cwps import StoreError
    from cwps_lightning.errors import ConfigError
    from cwps_lightning.train import preflight, run

    args = ("data.tasks=[optdigits]", "cwps.baselines=[]", f"paths.cache_dir={t0_cache}")
    run(compose_run_config(run_dir, *args))
    assert (run_dir / "results.json").exists()
    with pytest.raises(ConfigError, match=r"different config.*cwps\.threshold"):
        run(compose_run_config(run_dir, *args, "cwps.threshold=0.4"))
    # the command refuses it before Hydra writes its .hydra/ files over the finished run's
    # (and takes the same config, hashed as the run hashes it, as the same)
    preflight([*TINY, f"hydra.run.dir={run_dir}", *args])
    with pytest.raises(ConfigError, match=r"different config.*cwps\.threshold"):
        preflight([*TINY, f"hydra.run.dir={run_dir}", *args, "cwps.threshold=0.4"])
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text("the finished run's\n")
    proc = run_train(run_dir, *args, "cwps.threshold=0.4", cache=t0_cache, timeout=120)
    assert proc.returncode == 2 and "different config" in proc.stderr, proc.stderr[-2000:]
    assert (run_dir / ".hydra" / "config.yaml").read_text() == "the finished run's\n"
    kernels = next((run_dir / "store").glob("kernels-*.safetensors"))
    kernels.write_bytes(kernels.read_bytes()[:1000])
    with pytest.raises(StoreError, match=kernels.name):
        run(compose_run_config(run_dir, *args))


def test_killed_inside_a_fit_continues_from_its_epoch_checkpoint(run_dir, t0_cache):
    """trainer.enable_checkpointing=true: SIGKILL after the mask fit's first epoch; the rerun
    takes the finished warm-up from its checkpoint, continues the mask fit from its last epoch,
    and deletes every checkpoint once the tasks are stored."""
    overrides = ("trainer.enable_checkpointing=true", "data.tasks=[optdigits]",
                 "cwps.baselines=[]", "cwps.stages.hard_epochs=4")
    mask_ckpt = "checkpoints/*/cwps/optdigits-it0-mask/last.ckpt"
    mask_csv = run_dir / "logs" / "cwps" / "optdigits-it0-mask" / "metrics.csv"

    def first_epoch_done() -> bool:
        # its checkpoint, and its epoch row: Lightning logs that row just after the checkpoint,
        # so a kill between the two would resume after an epoch whose row was never written
        if not any(run_dir.glob(mask_ckpt)) or not mask_csv.is_file():
            return False
        try:
            with mask_csv.open(newline="") as file:
                rows = list(csv.DictReader(file))
        except (csv.Error, OSError):  # caught while Lightning rewrites it
            return False
        return any(row.get("epoch") == "0" and row.get("train/loss_epoch") for row in rows)

    _kill_when(run_dir, overrides, t0_cache, first_epoch_done,
               "the mask fit wrote a checkpoint and its first epoch's row", poll=0.1)
    assert not (run_dir / "store" / "manifest.json").exists()  # the task was not finished

    resumed = run_train(run_dir, *overrides, cache=t0_cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert "cwps/optdigits-it0-warmup: continuing from" in log
    assert "cwps/optdigits-it0-mask: continuing from" in log
    assert set(read_results(run_dir)["methods"]["cwps"]["tasks"]) == {"optdigits"}
    assert not (run_dir / "checkpoints").exists()
    # the metrics of the epochs before the kill stay: the finished warm-up's and the mask
    # fit's first epoch's (Lightning's logger deleted both files on the rerun)
    epochs = {fit: {row["epoch"] for row in csv.DictReader(
        (run_dir / "logs" / "cwps" / f"optdigits-it0-{fit}" / "metrics.csv").open())}
        for fit in ("warmup", "mask")}
    assert epochs["warmup"] == {"0"} and "0" in epochs["mask"], epochs
