"""distributed.py in a real 2-process gloo group (CPU): every helper, and what it guards."""

from __future__ import annotations

import os
import socket
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cwps_lightning import distributed
from cwps_lightning.fitting import evaluate_top1

pytestmark = pytest.mark.xdist_group("ddp")  # two processes of their own: not beside others


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))


def _ranked(rank: int, world: int, port: int, errors, body) -> None:
    """One rank of a gloo group running ``body(rank, world)``; a failure goes to ``errors``."""
    try:
        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        # (a collective that never completes fails the test in a minute, not in gloo's 30)
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        body(rank, world)
        if dist.is_initialized():  # (a body may have closed it: announce_error)
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent process
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise


def _on_two_ranks(body) -> None:
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    mp.start_processes(_ranked, args=(2, _free_port(), errors, body), nprocs=2, join=True,
                       start_method="spawn")
    assert errors.empty(), errors.get()


def _helpers(rank: int, world: int) -> None:
    assert distributed.active() and distributed.rank() == rank

    # shards: disjoint, together every item once (13 items: unequal shards)
    mine = list(distributed.shard_indices(13))
    every = [None] * world
    dist.all_gather_object(every, mine)
    assert sorted(i for part in every for i in part) == list(range(13))

    assert distributed.all_reduce_sum([rank + 1, 10], torch.device("cpu")) == [3, 20]
    assert distributed.broadcast_object({"accept": rank == 0}) == {"accept": True}

    # evaluation: each rank a shard, counts summed: the whole set's top-1 on every rank
    x = torch.randn(13, 4, generator=torch.Generator().manual_seed(0))
    model = _model(0).eval()
    y = model(x).argmax(1)
    y[:4] = (y[:4] + 1) % 3  # 4 of 13 wrong
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    assert evaluate_top1(model, loader, "cpu") == pytest.approx(100 * 9 / 13)

    # weights: a rank that differs is named; buffers synced from rank 0 make them agree
    checked = distributed.ranks_report()["fits_checked_equal"]
    same = _model(0)
    distributed.check_same_weights(same, "a fit")
    with torch.no_grad():
        same[1].running_mean.fill_(float(rank))  # each rank's last batch: its own stats
    with pytest.raises(distributed.RanksDisagree, match=r"rank\(s\) \[1\]"):
        distributed.check_same_weights(same, "a fit")
    distributed.sync_buffers(same)
    assert float(same[1].running_mean.sum()) == 0.0
    distributed.check_same_weights(same, "a fit")
    with pytest.raises(distributed.RanksDisagree):  # parameters are not synced: caught
        distributed.check_same_weights(_model(rank), "a fit")
    # results.json's count: the two checks that found the ranks equal
    assert distributed.ranks_report() == {"world_size": 2, "fits_checked_equal": checked + 2}
    # the group's size, where the launcher's environment has none (Lightning's launcher)
    os.environ.pop("WORLD_SIZE", None)
    assert distributed.world_size() == 2


def test_helpers_in_a_two_rank_gloo_group():
    _on_two_ranks(_helpers)


def test_without_a_group_every_helper_is_the_identity(monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "NODE_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert not distributed.active()
    assert distributed.rank() == 0 and distributed.world_size_from_env() == 1
    assert distributed.shard_indices(5) == range(5)
    assert distributed.all_reduce_sum([2, 3], torch.device("cpu")) == [2, 3]
    assert distributed.broadcast_object("x") == "x"
    distributed.check_same_weights(_model(0), "a fit")  # nothing to compare with


def test_rank_before_the_group_reads_each_launcher(monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "NODE_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LOCAL_RANK", "1")  # Lightning's launcher: local rank only
    assert distributed.rank() == 1
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("NODE_RANK", "1")  # another node's first process is not rank 0
    assert distributed.rank() != 0
    monkeypatch.setenv("RANK", "5")  # torchrun
    assert distributed.rank() == 5


def test_local_device_is_the_ranks_own(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.local_device("gpu", 2) == torch.device("cuda", 1)
    assert distributed.local_device("auto", [2, 3]) == torch.device("cuda", 3)
    assert distributed.local_device("gpu", "0,2") == torch.device("cuda", 2)
    assert distributed.local_device("cpu", 2) == torch.device("cpu")
    with pytest.raises(ValueError, match="local rank 1"):
        distributed.local_device("gpu", [0])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.local_device("auto", 1) == torch.device("cpu")


def test_state_hash_sees_buffers_and_parameters():
    a, b = _model(0), _model(0)
    assert distributed.state_hash(a) == distributed.state_hash(b)
    with torch.no_grad():
        b[1].running_var[0] += 1e-7
    assert distributed.state_hash(a) != distributed.state_hash(b)


def _parents(rank: int, world: int) -> None:
    from cwps_lightning.cwps import inject_cwps, set_stage
    from cwps_lightning.models.lit_module import CWPSLitModule

    from .helpers import Small

    torch.manual_seed(0)
    model = Small()
    inject_cwps(model)
    set_stage(model, "soft")
    with torch.no_grad():  # each rank's own parent search, as if it had found other ones
        model.conv1.parent_weight.fill_(float(rank))
    module = CWPSLitModule(model, num_classes=3)
    version = model.conv1.parent_weight._version
    module.setup("fit")  # every rank takes rank 0's buffers, parents included
    assert float(model.conv1.parent_weight.abs().max()) == 0.0
    # written in place by gloo: the version moves, so a kept parent window is redone
    assert model.conv1.parent_weight._version > version
    names = module.parent_buffer_names()
    assert names == ["model.conv1.parent_weight", "model.conv1.parent_bias",
                     "model.conv2.parent_weight", "model.fc.parent_weight",
                     "model.fc.parent_bias"]
    with torch.no_grad():  # ranks that disagree from here on: what DDP would send
        model.conv1.parent_weight.fill_(float(rank))
        model.bn.running_mean.fill_(float(rank))
    ddp = torch.nn.parallel.DistributedDataParallel(module)
    # DDP broadcasts the BatchNorm statistics (0.1-0.3% of a resnet's buffer bytes) at its
    # start and before every forward, not the parents
    assert "model.bn.running_mean" in ddp.named_module_buffers
    assert not set(names) & set(ddp.named_module_buffers)
    ddp(torch.randn(2, 3, 6, 6))
    assert float(model.bn.running_mean.abs().max()) < 1.0  # rank 0's, one batch on
    assert float(model.conv1.parent_weight.min()) == float(rank)  # its own: not sent


def test_ddp_leaves_the_frozen_parents_out_of_its_buffer_broadcasts():
    _on_two_ranks(_parents)


# -- an error one rank meets alone: the others' collective fails at once, naming it ---------------
def _one_rank_stops(rank: int, world: int, stopper: int, workers: bool = False) -> None:
    import time

    store = distributed.launcher_store(30.0)  # (the group's: rank 0 serves it)
    dist.all_reduce(torch.ones(1))  # (the connections are up)
    if rank == stopper:
        if workers:  # a loader's worker, forked now, holds copies of the group's sockets
            # (fork, as in a run: this test's ranks are spawned, and their loaders would not)
            data = DataLoader(TensorDataset(torch.zeros(4, 1)), num_workers=1,
                              persistent_workers=True, multiprocessing_context="fork")
            batches = iter(data)
            next(batches)
        time.sleep(0.5)  # (the other rank is in its all-reduce by now)
        distributed.announce_error("cannot read image x.jpg", 2, "DataConfigError")
        assert not dist.is_initialized()
        # the closed group's rank and size still hold, and its store still serves: the ranks
        # stop together through it
        assert (distributed.rank(), distributed.world_size()) == (rank, world)
        assert distributed.launcher_store(5.0) is not None
        assert distributed.peer_error() is None  # (no group: nothing to look for)
    else:
        _frees_the_collective(stopper)
    # (each process stays until both have looked: rank 0's serves the store)
    store.set(f"done/{rank}", "1")
    store.wait(["done/0", "done/1"], timedelta(seconds=30))


def _frees_the_collective(stopper: int) -> None:
    import time

    assert distributed.peer_error() is None  # (nobody stopped yet)
    start = time.monotonic()
    with pytest.raises(RuntimeError):
        dist.all_reduce(torch.ones(3))  # the stopper never joins it
    # the failure comes when the stopper closes its side, not when it exits (it waits)
    assert time.monotonic() - start < 20
    stopped = distributed.peer_error()
    assert isinstance(stopped, distributed.PeerStopped)
    assert (stopped.peer, str(stopped), stopped.status, stopped.kind) == (
        stopper, "cannot read image x.jpg", 2, "DataConfigError")


@pytest.mark.parametrize("stopper, workers", [(1, True), (0, False)])
def test_a_rank_that_stops_alone_frees_the_others_collective_with_its_error(stopper, workers):
    """Rank 1 (a bad image in its shard): rank 0, in DDP's gradient all-reduce, used to wait
    until rank 1 exited and then record gloo's "Connection closed by peer" as the run's error.
    Rank 0 stopping: its process serves the group's store, which must outlive the group. A
    persistent DataLoader worker of the stopper's (forked after the group connected) kept the
    connections open until the process exited."""
    import functools

    _on_two_ranks(functools.partial(_one_rank_stops, stopper=stopper, workers=workers))


@pytest.mark.parametrize("stand_down", [True, False])
def test_lightnings_child_observer_stands_down_when_rank_0_stops(stand_down):
    """Lightning's launcher watches its children every 5 s and SIGKILLs every process, its
    own included, once one exited non-zero: a rank that exits with the run's status after
    rank 0 said it would kill rank 0 before it exits with that status. Here the observer's
    "main process" is a stand-in, so the kill is seen, not suffered."""
    import subprocess
    import sys
    import time

    from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver

    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(2)"])
    try:
        observer = _ChildProcessObserver(stand_in.pid, [child], sleep_period=0.2)
        observer.start()
        if stand_down:
            distributed.stand_down_child_observer()
        observer.join(timeout=30)
        time.sleep(0.2)
        assert not observer.is_alive()
        assert (stand_in.poll() is None) == stand_down  # (killed unless it stood down)
    finally:
        stand_in.kill()
        stand_in.wait()
        child.wait()


# -- torchrun: the ranks stop together on an error (a store like the one torchrun's agent serves)
@pytest.fixture
def agent_store(monkeypatch):
    """A TCPStore served here, and the environment torchrun gives its ranks to reach it."""
    port = _free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=5))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    return server


def test_without_torchruns_store_nobody_waits(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.launcher_store(1.0) is None
    assert distributed.await_rank_zero_stop(30.0) is None  # (at once)
    distributed.rank_zero_stopped(distributed.RankZeroStop("x", True))  # (no-op, no wait)
    distributed.tidied_up()


def test_a_store_that_cannot_be_reached_is_not_tried_again(monkeypatch):
    """Rank 0's process served it and is gone: every stop step used to retry its connection
    (a rank lived 140 s on after rank 0 was killed, printing c10d's timeouts)."""
    import time

    monkeypatch.setattr(distributed, "_STORE_GONE", [False])
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))  # (nobody serves it)
    assert distributed.launcher_store(0.5) is None
    start = time.monotonic()
    assert distributed.launcher_store(30.0) is None
    assert distributed.await_rank_zero_stop(30.0) is None
    assert time.monotonic() - start < 0.5


def test_a_rank_above_0_reads_how_rank_0_stopped(agent_store, monkeypatch):
    import time

    monkeypatch.setenv("RANK", "1")
    distributed.tidied_up()  # (rank 1 said it tidied up: rank 0 does not wait)
    monkeypatch.setenv("RANK", "0")
    start = time.monotonic()
    distributed.rank_zero_stopped(distributed.RankZeroStop("bad data", removed=True))
    assert time.monotonic() - start < distributed.TIDY_WAIT_S / 2
    monkeypatch.setenv("RANK", "1")
    assert distributed.await_rank_zero_stop(5.0) == distributed.RankZeroStop("bad data", True)
    # a group torchrun restarted has its own keys: rank 0 of this attempt has not stopped
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    start = time.monotonic()
    assert distributed.await_rank_zero_stop(0.5) is False
    assert 0.4 < time.monotonic() - start < 5.0


def test_rank_0_waits_for_the_others_to_tidy_up_then_gives_up(agent_store, monkeypatch):
    import time

    monkeypatch.setattr(distributed, "TIDY_WAIT_S", 0.5)
    monkeypatch.setenv("RANK", "0")
    start = time.monotonic()
    distributed.rank_zero_stopped(distributed.RankZeroStop("bad data", removed=False))
    assert 0.4 < time.monotonic() - start < 5.0  # (rank 1 never said it tidied up)
    assert agent_store.get("cwps_lightning/0/stop/rank0")  # (but rank 0's word is there)


def test_every_rank_is_the_and_of_the_ranks_flags(agent_store, monkeypatch):
    """Before any group: each rank says its flag through torchrun's store and reads all
    (rank 1's word is set here by hand, as rank 1's process would)."""
    monkeypatch.setenv("RANK", "0")
    agent_store.set("cwps_lightning/0/t0-cached/1", "0")  # rank 1 has no cache
    assert distributed.every_rank(True, "t0-cached", timeout_s=5) is False
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # (a fresh attempt: fresh keys)
    agent_store.set("cwps_lightning/1/t0-cached/1", "1")
    assert distributed.every_rank(True, "t0-cached", timeout_s=5) is True
    assert agent_store.get("cwps_lightning/1/t0-cached/0") == b"1"  # (rank 0's word)
    # without torchrun's store: this rank's own flag, at once
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE")
    assert distributed.every_rank(False, "t0-cached") is False
    assert distributed.every_rank(True, "t0-cached") is True
