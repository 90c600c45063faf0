"""DDP through the real CLI on the CPU (gloo, 2 processes): Lightning's own launcher and
torchrun each produce one run (one results.json, one store, one T0 cache file, rank 0's logs),
the ranks agree on the weights after every fit, and the results match a 1-process run with the
same global batch within the noise of these tiny settings."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cwps_lightning.cwps import MultiTaskStore

from .helpers import REPO, cli_env, read_results, train_cmd

pytestmark = pytest.mark.xdist_group("ddp")  # 2 processes each: one such run at a time

TASKS = ["optdigits", "mnist_m"]
SMALL = ["data.tasks=[optdigits,mnist_m]", "cwps.baselines=[]", "data.limit_per_task=96"]
DDP = ["trainer.devices=2", "trainer.strategy=ddp", "data.batch_size=8"]  # 2 x 8 = 16
#: fits of one run: T0, then a warm-up and a mask fit per task
FITS = 1 + 2 * len(TASKS)
#: measured (seeds 0-4, CPU, every training batch full): mean top-1 of 2-rank vs 1-process
#: runs at these settings differed by -2.1, +6.3, -12.5, +8.3 and +14.6 points; the 1-process
#: runs alone spread over 20.8 points (sd 7.9: T0 near chance after 1 epoch on 96 images, 24
#: test images per task). The bound (twice the largest difference) catches a broken run, not
#: a bias: that the DDP fit computes the right update is test_ddp_fit.py's exact check, and
#: the README compares the full default job (CWPS means within 0.3 points).
TOP1_TOLERANCE = 30.0


def _run(cmd, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp-ref")
    proc = _run(train_cmd(root / "run", *SMALL, "data.batch_size=16", cache=root / "cache"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_results(root / "run")


def _check_one_run(root, proc, rank1_log: str, reference: dict) -> None:
    run = root / "run"
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    # every epoch-level metric is reduced over the ranks (Lightning warned of 5 that were not)
    assert "sync_dist" not in proc.stderr
    res = read_results(run)
    assert res["ranks"] == {"world_size": 2, "fits_checked_equal": FITS}
    assert "DDP: 2 ranks" in (run / "results.md").read_text()
    store = MultiTaskStore.load(run / "store")
    assert store.tasks == ["T0", *TASKS]
    # one run: nothing beside the run dir and the cache, one .hydra, one T0 cache file
    assert sorted(p.name for p in root.iterdir()) == ["cache", "run"]
    assert (run / ".hydra" / "config.yaml").is_file()
    assert [p.suffix for p in (root / "cache" / "t0").iterdir()] == [".pt"]
    # rank 1 logs warnings only; rank 0 logs the run once
    other = (run / rank1_log).read_text() if (run / rank1_log).exists() else ""
    assert "[INFO]" not in other
    assert (run / "train.log").read_text().count("results: ") == 1
    # the same job as one process with the same global batch, up to the noise of 12-image tests
    cwps, ref = res["methods"]["cwps"], reference["methods"]["cwps"]
    assert abs(cwps["mean_top1"] - ref["mean_top1"]) <= TOP1_TOLERANCE
    assert abs(res["t0"]["val_top1"] - reference["t0"]["val_top1"]) <= TOP1_TOLERANCE
    assert cwps["param_ratio"] == pytest.approx(ref["param_ratio"], abs=0.1)


def test_lightning_launcher_runs_one_job_on_two_ranks(tmp_path, one_process):
    cmd = train_cmd(tmp_path / "run", *SMALL, *DDP, cache=tmp_path / "cache")
    _check_one_run(tmp_path, _run(cmd), "train_ddp_process_1.log", one_process)


def test_torchrun_runs_one_job_on_two_ranks(tmp_path, one_process):
    job = train_cmd(tmp_path / "run", *SMALL, *DDP, cache=tmp_path / "cache")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *job[1:]]  # job[1:] is "-m cwps_lightning.train <overrides>"
    _check_one_run(tmp_path, _run(cmd), "train_rank_1.log", one_process)


def _folder_task_with_one_training_image(root):
    """A data=folders tree whose task has one training image: found wrong only when the data
    is read (too few to carve a validation split), after Hydra made the run dir."""
    from PIL import Image

    for split, classes in (("train", ["c0"]), ("test", ["c0", "c1"])):
        for c in classes:
            (root / "a" / split / c).mkdir(parents=True)
            Image.new("RGB", (16, 16)).save(root / "a" / split / c / "0.png")
    (root / "a" / "train" / "c1").mkdir()  # (a class folder without images)


def test_torchrun_stops_on_bad_data_with_one_line_and_no_run_dir(tmp_path):
    """Every rank meets the bad data; rank 1 used to exit first, and torchrun then stopped
    rank 0 before it said the error or removed the stub dir (3 runs of 3 left one)."""
    import timm
    import torch

    _folder_task_with_one_training_image(tmp_path / "data")
    torch.save(timm.create_model("resnet18", num_classes=2).state_dict(), tmp_path / "w.pt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "cwps_lightning.train", "data=folders", f"data.root={tmp_path / 'data'}",
           f"model.weights={tmp_path / 'w.pt'}", f"hydra.run.dir={tmp_path / 'run'}",
           f"paths.cache_dir={tmp_path / 'cache'}", "trainer.accelerator=cpu",
           "trainer.enable_progress_bar=false", *DDP]
    proc = _run(cmd)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert errors == ["error: task 'a' has 1 training image(s): too few to carve a validation "
                      "split from"], proc.stderr[-3000:]
    assert not (tmp_path / "run").exists(), list((tmp_path / "run").iterdir())


def _folder_task_with_a_truncated_training_image(root) -> str:
    """A data=folders task whose training split holds one JPEG cut to a third: its header
    passes the check before the run, and decoding it fails in the fit, on the one rank whose
    shard holds it. Returns the file's name."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 3)):
        for c in ("c0", "c1"):
            (root / "a" / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / "a" / split / c / f"{i:03d}.jpg")
    bad = root / "a" / "train" / "c0" / "005.jpg"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 3])
    return bad.name


#: seeds whose shuffle gives the truncated image to rank 1, then to rank 0 (measured)
READER_SEEDS = {1: 0, 0: 2}


@pytest.mark.parametrize("reader", [1, 0])
def test_an_image_only_one_rank_reads_stops_both_with_its_line(tmp_path, reader):
    """Rank 1 meeting it: rank 0, in the gradient all-reduce, failed with gloo's "Connection
    closed by peer" once rank 1 exited, and exited 1 with that traceback, as its run's error
    (the image named nowhere under Lightning's launcher). Rank 0 meeting it: rank 1 printed
    that traceback. Now the one that met it says it and closes its side of the group: exit 2,
    one line naming the image (and the rank), no backend error, the line in train.log."""
    import timm
    import torch

    bad = _folder_task_with_a_truncated_training_image(tmp_path / "data")
    torch.save(timm.create_model("resnet18", num_classes=2).state_dict(), tmp_path / "w.pt")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "cwps_lightning.train", "data=folders",
           f"data.root={tmp_path / 'data'}", f"model.weights={tmp_path / 'w.pt'}",
           "data.image_size=24", "data.verify_images=none",  # (the fit finds it)
           "cwps.baselines=[]", "cwps.stages.warmup_epochs=1",
           f"seed={READER_SEEDS[reader]}", f"hydra.run.dir={run}",
           f"paths.cache_dir={tmp_path / 'cache'}", "trainer.accelerator=cpu",
           "trainer.enable_progress_bar=false", *DDP]
    proc = _run(cmd)
    said = proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert proc.returncode == 2 and len(errors) == 1, said[-3000:]
    where = f" (rank {reader})" if reader else ""
    assert errors[0].startswith(f"error{where}: cannot read image "), errors
    assert bad in errors[0] and "truncated" in errors[0].lower()
    assert "Connection closed" not in said and "Traceback" not in said, said[-3000:]
    assert (run / "train.log").read_text().splitlines()[-1].endswith(errors[0])


def test_torchrun_a_crash_on_one_rank_is_said_by_rank_0_not_as_a_backend_error(tmp_path):
    """A bug only rank 1 meets while rank 0 waits in a collective: rank 1 prints its
    traceback, rank 0 names rank 1's error (it said gloo's "Connection closed by peer")."""
    job = train_cmd(tmp_path / "run", "data.tasks=[optdigits]", "data.limit_per_task=48",
                    "cwps.baselines=[tests.integration.diverging_method:CrashingOnRank1]",
                    *DDP, cache=tmp_path / "cache")
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node=2", *job[1:]])
    said = proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert proc.returncode == 1 and errors == ["error (rank 1): KeyError: 'a bug on rank 1'"], \
        said[-3000:]
    assert "\nKeyError: 'a bug on rank 1'" in proc.stderr  # (rank 1's traceback)
    assert "Connection closed" not in said
    assert (tmp_path / "run" / "train.log").read_text().rstrip().endswith(errors[0])


def test_sigterm_to_rank_0_stops_both_ranks_at_the_next_batch(tmp_path):
    """Lightning's own SIGTERM handler calls a collective inside the handler; mid-backward it
    paired with rank 1's gradient all-reduce and both waited for gloo's timeout (measured: no
    progress in 120 s). The project's handler records the signal; the ranks stop together at
    the next batch, exit 143 with one `error:` line."""
    import signal
    import time

    run = tmp_path / "run"
    cmd = train_cmd(run, "data.tasks=[optdigits,mnist_m]", "cwps.baselines=[]",
                    "data.limit_per_task=600", "cwps.stages.warmup_epochs=1",
                    "cwps.stages.hard_epochs=3", *DDP, cache=tmp_path / "cache")
    proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while "[2/4]" not in _text(run / "train.log") and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        time.sleep(1.5)  # (inside the mask fit, whose 4 epochs take several seconds)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert time.monotonic() - sent < 60
    # rank 0 passed the signal on in this, the job's second fit, whose launcher started no
    # ranks (the first fit's did): rank 1 had it too, and said so
    assert "rank 1: SIGTERM" in out + err, (out + err)[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "cwps/optdigits-it0-mask: stopped by SIGTERM" in errors[0], \
        err[-3000:]
    # rank 1 stopped where rank 0 did, not in a collective rank 0 left (a gloo error)
    assert "Traceback" not in err and "Connection closed" not in err, err[-3000:]


def _text(path) -> str:
    return path.read_text() if path.exists() else ""
