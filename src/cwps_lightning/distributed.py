"""What the run does between Lightning fits when it runs on several processes (DDP).

Lightning owns the process group: its launcher (``trainer.devices=N trainer.strategy=ddp``),
``torchrun`` or SLURM starts the ranks, and the first fit creates the group; every later fit
reuses it. Between fits every rank runs the same code (CPMS, evaluation, the bank), so each
rank must end every step in the same state. The helpers here make that hold by construction
and check it:

* ``local_device`` is the rank's own device for everything outside the fits;
* evaluation counts are summed over ranks (``all_reduce_sum``), each rank a shard
  (``shard_indices``), so every rank reads one number;
* a decision is taken on rank 0 and broadcast (``broadcast_object``);
* after a fit, buffers (BatchNorm running statistics: DDP syncs them only at the start of a
  forward, so each rank's last batch leaves its own) are copied from rank 0, and a hash of every
  parameter and buffer is compared across ranks (``check_same_weights``).

With one process (no group) every helper is the identity, so single-device runs pay nothing.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import multiprocessing
import os
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

#: environment variables that give a process's rank on its node, by launcher
_LOCAL_RANK_VARS = ("LOCAL_RANK", "SLURM_LOCALID", "JSM_NAMESPACE_LOCAL_RANK")


#: fits whose weights were compared across ranks in this process (for results.json)
_FITS_CHECKED = [0]
#: this rank's process group once announce_error closed it: its rank, size and store (kept
#: open: under Lightning's launcher rank 0's process serves it, and the ranks stop through it)
_CLOSED: dict[str, Any] = {}
#: whether launcher_store once failed to reach the store (it is not tried again)
_STORE_GONE = [False]
#: how long the error look-ups wait to reach the store (it answers at once while it is up)
LOOKUP_WAIT_S = 5.0


class RanksDisagree(RuntimeError):
    """Ranks hold different weights after a fit (they must not: DDP keeps them equal)."""


def active() -> bool:
    """True when a process group of more than one rank exists."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 without a group). Before the first fit creates the group,
    the launcher's environment says: ``RANK`` (torchrun), ``SLURM_PROCID``; Lightning's own
    launcher gives its children ``LOCAL_RANK`` and ``NODE_RANK`` only, so there the number is
    exact on node 0 and, on other nodes, non-zero but not the global rank (it only has to tell
    rank 0 from the others until the group exists)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    if _CLOSED:
        return _CLOSED["rank"]
    for var in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    node = int(os.environ.get("NODE_RANK", 0))
    return local_rank() + (10_000 * node if node else 0)


def local_rank() -> int:
    for var in _LOCAL_RANK_VARS:
        if var in os.environ:
            return int(os.environ[var])
    return 0


def world_size_from_env() -> int:
    """The number of ranks a launcher started (1 when none did), known before any group."""
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if var in os.environ:
            return int(os.environ[var])
    return 1


def world_size() -> int:
    """The number of ranks: the process group's once it exists (Lightning's launcher gives
    its ranks no WORLD_SIZE; after announce_error, the closed group's), else the launcher's
    environment's."""
    if active():
        return dist.get_world_size()
    return _CLOSED["world"] if _CLOSED else world_size_from_env()


def torchrun_world_size() -> int | None:
    """The number of ranks torchrun started (None where torchrun did not start this process)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    return int(os.environ.get("WORLD_SIZE", 1))


def local_device(accelerator: str = "auto", devices: Any = 1) -> torch.device:
    """The device this rank evaluates on: its own GPU (``trainer.devices`` may list ids: rank
    i takes the i-th), never ``cuda`` = GPU 0 for every rank; the CPU without CUDA."""
    if accelerator not in ("auto", "gpu", "cuda") or not torch.cuda.is_available():
        return torch.device("cpu")
    ids = device_ids(devices)
    index = local_rank()
    if ids is not None:
        if index >= len(ids):
            raise ValueError(f"trainer.devices={devices!r} lists {len(ids)} device(s), "
                             f"but this process has local rank {index}")
        return torch.device("cuda", ids[index])
    return torch.device("cuda", index % torch.cuda.device_count())


def device_ids(devices: Any) -> list[int] | None:
    """Explicit GPU ids of a Lightning ``devices`` value ([2, 3] or "2,3"), else None."""
    if isinstance(devices, str) and "," in devices:
        return [int(d) for d in devices.split(",") if d.strip()]
    if isinstance(devices, Sequence) and not isinstance(devices, str):
        return [int(d) for d in devices]
    return None


def shard_indices(n: int) -> range:
    """The items of a dataset of ``n`` this rank evaluates (every rank-th, none twice)."""
    if not active():
        return range(n)
    return range(dist.get_rank(), n, dist.get_world_size())


def all_reduce_sum(values: Sequence[int], device: torch.device) -> list[int]:
    """``values`` summed over ranks (int64 on ``device``: NCCL reduces GPU tensors only)."""
    if not active():
        return list(values)
    t = torch.tensor(list(values), dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [int(v) for v in t.tolist()]


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (picklable objects)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if active():
        dist.barrier()


def state_hash(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer (names, shapes, dtypes, bytes)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def sync_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers to every rank (float buffers: BatchNorm statistics and CWPS
    parents alike; the parents are equal already, the statistics are not)."""
    sync_tensors(model.buffers())


@torch.no_grad()
def sync_tensors(tensors) -> None:
    """Copy rank 0's values of ``tensors`` (buffers or parameters, the same list on every
    rank) to every rank, in place."""
    if not active():
        return
    backend = dist.get_backend()
    for t in tensors:
        t = t.detach()  # (a parameter's storage, written in place)
        if backend == "nccl" and not t.is_cuda:
            moved = t.cuda()
            dist.broadcast(moved, src=0)
            t.copy_(moved)
        else:
            dist.broadcast(t, src=0)
            # written in place by the backend, which autograd does not see: bump the version,
            # so what is kept for a tensor's version (a CWPS parent's window, a composed
            # weight) is redone
            torch.autograd.graph.increment_version(t)


def check_same_weights(model: nn.Module, what: str) -> None:
    """Raise RanksDisagree naming the ranks whose weights differ from rank 0's after ``what``."""
    if not active():
        return
    hashes: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(hashes, state_hash(model))
    odd = [r for r, h in enumerate(hashes) if h != hashes[0]]
    if odd:
        raise RanksDisagree(f"after {what}: rank(s) {odd} hold other weights than rank 0 "
                            f"(state hashes {[h[:12] for h in hashes]})")
    _FITS_CHECKED[0] += 1


def ranks_report() -> dict:
    """How many ranks ran the job, and after how many fits they were found to hold equal
    weights (every fit of a DDP run; 0 on one process)."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return {"world_size": world, "fits_checked_equal": _FITS_CHECKED[0]}


# -- stopping together on an error --------------------------------------------------------------
# torchrun stops every rank as soon as one exits with an error. Every rank meets a bad input (or
# a diverged loss) at about the same moment, and a rank above 0 that exits first cut rank 0 off
# before it had printed the error line or removed the run's stub directory (measured: 3 runs of
# 3 left a stub, one lost the line). So a rank above 0 waits for rank 0 to say it has stopped
# (through the key-value store torchrun's agent serves for the whole job, before any process
# group exists, or the group's own), and rank 0 waits, briefly, for the others to have tidied
# up. An error only one rank meets (a bad image in its shard) is said by that rank, after the
# wait: rank 0 never stops on it.

#: how long a rank above 0 waits for rank 0 to stop on the same error; past it the error is
#: taken as this rank's own (rank 0 went on: a bad image in this rank's shard), said, and the
#: rank exits (torchrun stops the job; elsewhere rank 0's next collective fails)
STOP_WAIT_S = 20.0
#: how long rank 0, having stopped, waits for the other ranks to have tidied up
TIDY_WAIT_S = 10.0


@dataclass(frozen=True)
class RankZeroStop:
    """What rank 0 stopped on: its error line, and whether it removed the run's stub
    directory (then a rank above 0 removes what it wrote there after, its log)."""

    line: str
    removed: bool


#: Lightning's launcher of the last fit, where it started the other ranks from this process
_CHILD_LAUNCHER: list = []


def remember_launcher(launcher) -> None:
    """Keep the launcher of a fit that started the other ranks from this process (rank 0
    under Lightning's own launcher), for forward_signal between fits."""
    if launcher is not None and getattr(launcher, "procs", None):
        _CHILD_LAUNCHER[:] = [launcher]


def forward_signal(signum: int) -> None:
    """Send ``signum`` to the ranks Lightning's launcher started from this process, as a fit's
    handler does (a rank 0 that a supervisor signalled alone left them running, to fail in
    their next collective); nothing where no launcher started any (torchrun, SLURM)."""
    for launcher in _CHILD_LAUNCHER:
        launcher.kill(signum)


def launcher_store(timeout_s: float):
    """A key-value store every rank reaches, as a client: the one torchrun's agent serves at
    MASTER_ADDR:MASTER_PORT for the life of the job (``TORCHELASTIC_USE_AGENT_STORE``), or,
    once the process group exists, the one its rendezvous made there (rank 0 serves it:
    Lightning's launcher, SLURM). None before the group without torchrun (one process, or
    ranks that cannot reach each other yet) or where it cannot be reached: then, for the rest
    of the process, at once (rank 0's process, which served it, is gone: each try would retry
    its connection for ``timeout_s`` and more, and print c10d's timeouts)."""
    if _STORE_GONE[0] or not dist.is_available() or not (
            os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            or dist.is_initialized() or _CLOSED):
        return None
    try:
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                             is_master=False, timeout=timedelta(seconds=timeout_s))
    except (KeyError, ValueError):
        return None
    except (RuntimeError, OSError):
        _STORE_GONE[0] = True
        return None


def _key(name: str) -> str:
    # (a group torchrun restarts, --max-restarts, starts with fresh keys)
    return f"cwps_lightning/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{name}"


def every_rank(flag: bool, what: str, timeout_s: float = 600.0) -> bool:
    """Whether ``flag`` holds on every rank, decided before any process group exists (through
    torchrun's store; ``what`` names the decision, one per run). Without torchrun's store, or
    once the group exists, this rank's ``flag`` (Lightning's launcher starts the other ranks
    only at the first fit, from the same disk)."""
    ranks = world_size()
    store = launcher_store(timeout_s) if ranks > 1 and not active() else None
    if store is None:
        return flag
    store.set(_key(f"{what}/{rank()}"), "1" if flag else "0")
    keys = [_key(f"{what}/{r}") for r in range(ranks)]
    store.wait(keys, timedelta(seconds=timeout_s))
    return all(store.get(key) == b"1" for key in keys)


def rank_zero_stopped(stop: RankZeroStop) -> None:
    """Rank 0, stopping on an error with its line printed: tells the other ranks, then waits
    (TIDY_WAIT_S at most) until each has said it tidied up. Nothing without a store
    (launcher_store: no torchrun, and no process group yet)."""
    ranks = world_size()
    store = launcher_store(TIDY_WAIT_S) if ranks > 1 else None
    if store is None:
        return
    stand_down_child_observer()
    try:
        store.set(_key("stop/rank0"), json.dumps(asdict(stop)))
        store.wait([_key(f"stop/tidied/{r}") for r in range(1, ranks)],
                   timedelta(seconds=TIDY_WAIT_S))
    except (RuntimeError, OSError):  # (DistStoreError on timeout: a rank that went on)
        pass


def stand_down_child_observer() -> None:
    """Rank 0 under Lightning's own launcher, stopping with the others: Lightning's observer
    thread (every 5 s) SIGKILLs every process, rank 0 too, once a rank above 0 has exited
    with a non-zero status; the others exit with the run's status once rank 0 has said it,
    and could so kill rank 0 before it exits with that status (measured: 3 ranks, exit 137
    where 2 was due). The observer stands down (nothing where there is none: torchrun,
    SLURM, one process)."""
    for thread in threading.enumerate():
        if thread.name == "child-process-observer" and hasattr(thread, "_run"):
            thread._run = lambda: True  # (its loop ends at its next look)


def await_rank_zero_stop(timeout_s: float = STOP_WAIT_S) -> RankZeroStop | None | bool:
    """A rank above 0, stopping on an error: rank 0's RankZeroStop once it has stopped too;
    False where rank 0 did not stop within ``timeout_s`` (the error is this rank's own); None
    without a store (launcher_store: nothing to wait for)."""
    store = launcher_store(timeout_s)
    if store is None:
        return None
    try:
        store.wait([_key("stop/rank0")], timedelta(seconds=timeout_s))
        return RankZeroStop(**json.loads(store.get(_key("stop/rank0"))))
    except (RuntimeError, OSError, ValueError, TypeError):
        return False


def tidied_up() -> None:
    """A rank above 0, after its cleanup: tells rank 0 it may exit."""
    store = launcher_store(TIDY_WAIT_S)
    if store is not None:
        with contextlib.suppress(RuntimeError, OSError):
            store.set(_key(f"stop/tidied/{rank()}"), "1")


# -- an error one rank meets alone ---------------------------------------------------------------
# A bad image in one rank's shard (or a loss that turns non-finite on one rank's batch) stops
# that rank in the middle of a fit while the others wait in DDP's gradient all-reduce for it.
# They used to wait until it exited (20 s, STOP_WAIT_S), and then failed with the backend's
# "Connection closed by peer", which rank 0 recorded as the run's error. Now the rank says its
# error through the store first, then closes its side of the process group: the others' pending
# collective fails at once, they find the error there (peer_error), and rank 0 says it.


class PeerStopped(RuntimeError):
    """This rank's collective failed because rank ``peer`` stopped on its own error
    (announce_error): that error's ``line`` (its str), exit ``status``, which the whole run
    takes, and ``kind``, its class's name where ``line`` does not start with it ("": it does,
    or none was said)."""

    def __init__(self, peer: int, line: str, status: int, kind: str = ""):
        super().__init__(peer, line, status, kind)  # (the args a pickled copy is rebuilt from)
        self.peer, self.line, self.status, self.kind = peer, line, status, kind

    def __str__(self) -> str:
        return self.line


def announce_error(line: str, status: int, kind: str = "") -> None:
    """This rank stops on an error of its own (``line``, exit ``status``; ``kind``: the
    error's class where ``line`` lacks it) while the process group is up: it says so through
    the store, then aborts its side of the group, so that a rank waiting in a collective for it
    fails now, not at the backend's timeout (gloo: "Connection closed by peer", at once), and
    finds this error with peer_error. Nothing without a group."""
    if not active():
        return
    store = launcher_store(LOOKUP_WAIT_S)
    if store is not None:
        key = _key(f"error/{rank()}")
        with contextlib.suppress(RuntimeError, OSError):
            store.set(key, json.dumps({"line": line, "status": status, "kind": kind}))
            store.get(key)  # (a round trip: the word is in before any peer can look)
    close_group()


def close_group() -> None:
    """Abort this rank's side of the process group, keeping its rank, size and store for the
    stop (announce_error; a rank that found a peer's error does it too: a third rank may be
    waiting for it). gloo closes its connections only once nothing else holds the group (a
    second Python reference, or a forked process's copy of its sockets: stop_data_workers)."""
    if not active():
        return
    c10d = dist.distributed_c10d
    _CLOSED.update(rank=dist.get_rank(), world=dist.get_world_size(),
                   store=c10d._get_default_store())
    # first: a DataLoader worker forked after the group connected holds a copy of each of its
    # sockets, and a socket closes (the peers see it) only once every copy is closed
    stop_data_workers()
    # abort, not destroy: it waits for no pending work (NCCL's destroy may). The abort is
    # torch's private call: tests/test_distributed.py checks that it frees the others
    getattr(c10d, "_abort_process_group", dist.destroy_process_group)()


def stop_data_workers() -> None:
    """Shut down this process's DataLoader worker processes. Persistent ones live as long as
    their loader: an error in a fit's validation leaves the training loader's (Lightning
    tears down only the loop it was in), and they kept the group's connections open past the
    abort (measured: 3 ranks, the third freed only when rank 0 exited, 10 s later)."""
    if not multiprocessing.active_children():
        return
    # (type(), not isinstance: isinstance asks every object for its __class__, and some warn)
    for it in [o for o in gc.get_objects() if issubclass(type(o), _MultiProcessingDataLoaderIter)]:
        with contextlib.suppress(Exception):
            it._shutdown_workers()  # (torch's own, as Lightning's teardown calls it)


def peer_error() -> PeerStopped | None:
    """The error another rank announced (announce_error), if one did: why this rank's
    collective failed. Looked up once: the word is in before that rank closed its side."""
    if not active():
        return None
    store = launcher_store(LOOKUP_WAIT_S)
    if store is None:
        return None
    for peer in range(world_size()):
        key = _key(f"error/{peer}")
        with contextlib.suppress(RuntimeError, OSError, ValueError, KeyError):
            if peer != rank() and store.check([key]):
                said = json.loads(store.get(key))
                return PeerStopped(peer, said["line"], int(said["status"]),
                                   said.get("kind", ""))
    return None
