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

import hashlib
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

#: environment variables that give a process's rank on its node, by launcher
_LOCAL_RANK_VARS = ("LOCAL_RANK", "SLURM_LOCALID", "JSM_NAMESPACE_LOCAL_RANK")


#: fits whose weights were compared across ranks in this process (for results.json)
_FITS_CHECKED = [0]


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
