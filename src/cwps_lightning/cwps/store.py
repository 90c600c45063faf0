"""The multi-task store: one artifact that serves T0 and every task.

Layout of a store directory::

    manifest.json                 structure, metrics, progress; the commit point
    kernels-<version>.safetensors for every shared layer, each distinct kernel once:
                                    "<layer>.weight" [n_kernels, ...], "<layer>.bias" [n_kernels]
    tasks-<version>.safetensors   per task: "<task>/index/<layer>" (int32 [C], a row of the
                                    layer's kernel table per output channel) and
                                    "<task>/rest/<state key>" (normalisation layers, head, ...)

A shared channel costs an index, not a copy. Writes are crash-safe: tensor files get a new
version name, then the manifest is replaced atomically (write aside, fsync, rename), then files no
manifest names are deleted. A kill at any moment leaves the previous or the new store, whole.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from .bank import KernelBank, LayerWeights, TaskEntry, param_counts

FORMAT = "cwps-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class StoreError(RuntimeError):
    """A store that is missing, corrupt or does not fit; the message names the file."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# mkstemp creates files readable by their owner only; give written files the usual mode
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write aside, fsync, rename: a reader sees the old file or the new one, never a part.

    The aside file has a name of its own per call, so concurrent writers of the same path
    (parallel runs sharing the T0 cache) never write into one another's file: the last rename
    wins and each rename installs a complete file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def library_versions() -> dict[str, str]:
    """Versions of the libraries a store's reader may care about, read from the installed
    packages' metadata (importing them to ask would cost seconds for lightning)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("timm", "safetensors", "lightning"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:  # optional packages
            pass
    return versions


def _bank_tensors(bank: KernelBank) -> tuple[dict[str, Tensor], dict[str, Tensor], dict]:
    """Deduplicated kernel tables, per-task indices + rest, and per-layer kernel counts."""
    kernels, tasks, counts = {}, {}, {}
    for layer in bank.layer_names:
        ids = bank.distinct_ids(layer)  # sorted; only ids some kept task references
        sample = next(iter(bank.entries.values())).layers[layer]
        weight = torch.empty((len(ids), *sample.weight.shape[1:]), dtype=sample.weight.dtype)
        bias = None if sample.bias is None else torch.empty(len(ids), dtype=sample.bias.dtype)
        for task, entry in bank.entries.items():
            lw = entry.layers[layer]
            rows = torch.searchsorted(ids, lw.ids)
            weight[rows] = lw.weight
            if bias is not None:
                bias[rows] = lw.bias
            tasks[f"{task}/index/{layer}"] = rows.to(torch.int32)
        kernels[f"{layer}.weight"] = weight
        if bias is not None:
            kernels[f"{layer}.bias"] = bias
        counts[layer] = len(ids)
    for task, entry in bank.entries.items():
        for key, value in entry.rest.items():
            tasks[f"{task}/rest/{key}"] = value.contiguous()
    return kernels, tasks, counts


def _write_tensors(path: Path, name: str, tensors: dict[str, Tensor]) -> dict:
    from safetensors.torch import save_file

    save_file(tensors, str(path / name))
    # (safetensors writes through a temporary file of mode 0600: the store's files get the
    # mode the manifest gets, under the umask)
    os.chmod(path / name, 0o666 & ~_UMASK)
    with open(path / name, "rb") as f:
        os.fsync(f.fileno())
    return {"file": name, "sha256": _sha256(path / name), "bytes": (path / name).stat().st_size}


#: the files a store writes (its versions' tensors, atomic_write's aside files of them and of
#: the manifest, and safetensors' own aside file, ".tmp" and six letters or digits, that a
#: killed save leaves): what a save tidies away, and nothing else in the folder
STORE_FILE = re.compile(r"(kernels|tasks)-\d{6}\.safetensors|\.(manifest\.json|(kernels|tasks)"
                        r"-\d{6}\.safetensors)\..*\.tmp|\.tmp[A-Za-z0-9]{6}")
#: manifest keys save_store writes itself (``meta`` may not set them)
MANIFEST_KEYS = ("format", "format_version", "version", "bank_uid", "bank_revision", "files",
                 "layers", "kernel_counts", "tasks", "task_order", "libraries")


def unfinished_first_save(path: str | Path) -> list[str]:
    """The files a store's first save left in ``path`` where it stopped before writing its
    manifest (killed, power lost): the names, where the folder holds nothing else and no
    manifest; else []. The next save_store there writes version 0 again and tidies them."""
    path = Path(path)
    if not path.is_dir() or (path / MANIFEST).exists():
        return []
    names = sorted(p.name for p in path.iterdir())
    own = names and all(STORE_FILE.fullmatch(n) and _file_version(n) <= 0 for n in names)
    return names if own else []


def save_store(path: str | Path, bank: KernelBank, meta: dict) -> Path:
    """Write ``bank`` (plus ``meta``: backbone, metrics, progress ...) as a store at ``path``.
    Only the store's own files are written and tidied there. ``meta['backbone']``, where
    given, is ``{'name': <timm model name>, 'kwargs': {...}}`` (both optional):
    MultiTaskStore.model builds the tasks' models from it when no factory is given."""
    path = Path(path)
    if not isinstance(meta, dict):
        raise TypeError(f"save_store: meta must be a dict, got {type(meta).__name__}")
    backbone = meta.get("backbone")
    if backbone is not None and not (isinstance(backbone, dict)
                                     and isinstance(backbone.get("name") or "", str)
                                     and isinstance(backbone.get("kwargs") or {}, dict)):
        # (what MultiTaskStore.model builds a task from; a bare name failed only there. An
        # empty one is a store whose models a factory builds)
        raise ValueError(f"save_store: meta['backbone'] must be {{'name': <timm model name>, "
                         f"'kwargs': {{...}}}} (both optional), got {backbone!r}")
    reserved = sorted(set(meta) & set(MANIFEST_KEYS))
    if reserved:
        raise ValueError(f"save_store: meta sets {reserved}, which the store writes itself "
                         f"(reserved: {list(MANIFEST_KEYS)})")
    if not bank.entries:
        raise ValueError("save_store: the bank holds no task (add T0 first)")
    if path.exists() and not path.is_dir():
        raise StoreError(f"{path}: a file, not a folder to write a store in")
    path.mkdir(parents=True, exist_ok=True)
    old = _read_manifest(path) if (path / MANIFEST).exists() else None
    version = (old["version"] + 1) if old else 0
    dropped = [t for t in (old or {}).get("task_order", [])
               if t not in bank.entries and t not in bank.removed]  # (its removals: quietly)
    if dropped:
        warnings.warn(f"save_store: the store at {path} holds task(s) {dropped}, which this "
                      f"bank neither holds nor removed (a copy taken before they were added, "
                      f"or another run's bank); the new version drops them", stacklevel=2)
    try:
        return _save_version(path, bank, meta, old, version)
    except Exception as err:  # disk full, quota, permissions: the old manifest still rules
        if not _is_io_error(err):
            raise
        written = (path / MANIFEST).exists() and _read_manifest(path)["version"] == version
        if written:
            raise StoreError(f"{path}: store version {version} is written, but tidying up "
                             f"after it failed ({err})") from err
        for name in (f"kernels-{version:06d}.safetensors", f"tasks-{version:06d}.safetensors"):
            if old is None or name not in {f["file"] for f in old["files"].values()}:
                (path / name).unlink(missing_ok=True)
        before = (f"still version {old['version']} with tasks {old.get('task_order')}, intact"
                  if old else "still without a manifest (nothing was stored)")
        raise StoreError(f"{path}: cannot write store version {version} "
                         f"({getattr(err, 'strerror', None) or err}); the store there is "
                         f"{before}") from err


def _is_io_error(err: Exception) -> bool:
    """An OSError, or safetensors' error for one (it wraps the OS error in its own type; its
    text read "IoError" and now reads "I/O error: ... (os error 13)")."""
    return isinstance(err, OSError) or (
        type(err).__name__ == "SafetensorError"
        and re.search(r"\bio ?error|i/o error|os error \d+", str(err), re.IGNORECASE) is not None)


def _save_version(path: Path, bank: KernelBank, meta: dict, old: dict | None,
                  version: int) -> Path:
    unchanged = (
        old is not None
        and old.get("bank_uid") == bank.uid
        and old.get("bank_revision") == bank.revision
        and all((path / f["file"]).exists() for f in old["files"].values())
    )
    if unchanged:  # only the manifest (metrics, progress) changes
        files, counts = old["files"], old["kernel_counts"]
    else:
        kernels, tasks, counts = _bank_tensors(bank)
        files = {
            "kernels": _write_tensors(path, f"kernels-{version:06d}.safetensors", kernels),
            "tasks": _write_tensors(path, f"tasks-{version:06d}.safetensors", tasks),
        }
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "version": version,
        "bank_uid": bank.uid,
        "bank_revision": bank.revision,
        "files": files,
        "layers": bank.layer_names,
        "kernel_counts": counts,
        "tasks": {
            t: {"num_classes": e.num_classes, "rest_params": e.rest_param_names,
                "head_params": e.head_param_names, **e.meta}
            for t, e in bank.entries.items()
        },
        "task_order": bank.tasks,
        "libraries": library_versions(),
        **meta,
    }
    atomic_write(path / MANIFEST, (json.dumps(manifest, indent=2, default=str) + "\n").encode())
    keep = {f["file"] for f in files.values()} | {MANIFEST}
    for stale in path.iterdir():  # (only files a store writes: the folder may hold others)
        if stale.name not in keep and STORE_FILE.fullmatch(stale.name) \
                and _file_version(stale.name) <= version:
            # (a version above this one's is no file this store wrote: its versions count up,
            # and a failed save's files are at the version the next save writes again)
            stale.unlink(missing_ok=True)
    return path


def _file_version(name: str) -> int:
    """The store version in a store file's name (-1 for the manifest's aside files)."""
    number = re.search(r"-(\d{6})\.safetensors", name)
    return int(number.group(1)) if number else -1


def _read_manifest(path: Path) -> dict:
    file = path / MANIFEST
    if not file.exists():
        hint = ""
        if (path / "store" / MANIFEST).exists():  # a run directory: its store is a subfolder
            hint = f"; the run's store is {path / 'store'}"
        raise StoreError(f"{file}: no store manifest here{hint}")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StoreError(f"{file}: corrupt manifest ({err})") from err
    if not isinstance(manifest, dict):
        raise StoreError(f"{file}: corrupt manifest (a JSON {type(manifest).__name__}, not an "
                         "object)")
    if manifest.get("format") != FORMAT:
        raise StoreError(f"{file}: not a CWPS store manifest (format {manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StoreError(
            f"{file}: store format version {manifest.get('format_version')}, "
            f"this code reads {FORMAT_VERSION}"
        )
    # (what every reader takes from it: a manifest cut short or edited fails here, by name)
    shapes = {"version": int, "files": dict, "layers": list, "tasks": dict, "task_order": list,
              "kernel_counts": dict}
    wrong = [k for k, kind in shapes.items() if not isinstance(manifest.get(k), kind)]
    files = manifest.get("files")
    if not wrong and not all(
            isinstance(files.get(k), dict) and isinstance(files[k].get("file"), str)
            and isinstance(files[k].get("bytes"), int) and isinstance(files[k].get("sha256"), str)
            for k in ("kernels", "tasks")):
        wrong = ["files"]
    if not wrong:
        wrong = [f"tasks.{t}" for t, info in manifest["tasks"].items()
                 if not (isinstance(info, dict) and _is_int(info.get("num_classes"))
                         and isinstance(info.get("rest_params"), list))][:1]
    if wrong:
        raise StoreError(f"{file}: corrupt manifest ({wrong[0]!r} missing or of another type)")
    order, tasks = manifest["task_order"], list(manifest["tasks"])
    if sorted(map(str, order)) != sorted(tasks) or len(set(map(str, order))) != len(order):
        # (a task left out of one of them was dropped without a word: a resume stored the run
        # again without it, and evaluate tested the others)
        raise StoreError(f"{file}: corrupt manifest (task_order {order} and the tasks it "
                         f"describes {tasks} differ)")
    return manifest


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Missing(StoreError):
    """A file the manifest names is not there (or went while it was read)."""


def _load_tensors(path: Path, info: dict, verify: bool) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    file = path / info["file"]
    missing = f"{file}: missing (named by {path / MANIFEST})"
    try:
        size = file.stat().st_size
        if size != info["bytes"]:
            raise StoreError(
                f"{file}: {size} bytes, the manifest says {info['bytes']} (truncated?)")
        if verify and _sha256(file) != info["sha256"]:
            raise StoreError(f"{file}: checksum mismatch, the file is corrupt")
    except FileNotFoundError as err:
        raise _Missing(missing) from err
    try:
        return load_file(str(file))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        if not file.exists():
            raise _Missing(missing) from err
        raise StoreError(f"{file}: cannot read ({err})") from err


class MultiTaskStore:
    """A loaded store: ``tasks``, ``model(task)``, ``relation_matrix()``, ``param_count()``."""

    def __init__(self, path: Path, manifest: dict, kernels: dict, task_tensors: dict):
        self.path, self.manifest = path, manifest
        self._kernels, self._tasks = kernels, task_tensors
        self.layers: list[str] = manifest["layers"]

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> MultiTaskStore:
        path = Path(path)
        if path.is_file():
            hint = (f"the store is its folder, {path.parent}"
                    if (path.parent / MANIFEST).is_file() else
                    f"give the store's folder (the one with {MANIFEST})")
            raise StoreError(f"{path}: a file, not a store directory; {hint}")
        if not path.is_dir():
            raise StoreError(f"{path}: no such store directory")
        for attempt in range(3):
            manifest = _read_manifest(path)
            try:
                kernels = _load_tensors(path, manifest["files"]["kernels"], verify)
                task_tensors = _load_tensors(path, manifest["files"]["tasks"], verify)
                return cls(path, manifest, kernels, task_tensors)
            except _Missing:
                # a run writing its next version has replaced the files in between: read that
                if attempt == 2 or _read_manifest(path)["version"] == manifest["version"]:
                    raise
        raise AssertionError("unreachable")

    @property
    def tasks(self) -> list[str]:
        return list(self.manifest["task_order"])

    def _check_task(self, task: str) -> None:
        if task not in self.manifest["tasks"]:
            raise KeyError(f"task {task!r} is not in the store; tasks: {self.tasks}")

    def index(self, task: str, layer: str) -> Tensor:
        """Which stored kernel rows ``task``'s ``layer`` takes, one per output channel."""
        self._check_task(task)
        if layer not in self.layers:
            raise KeyError(f"layer {layer!r} is not one of the store's layers: "
                           f"{self.layers[:5]}{' ...' if len(self.layers) > 5 else ''}")
        return self._tasks[f"{task}/index/{layer}"].to(torch.int64)

    def state_dict(self, task: str) -> dict[str, Tensor]:
        """The full state dict of ``task``'s plain (merged) model."""
        self._check_task(task)
        prefix = f"{task}/rest/"
        state = {k[len(prefix):]: v for k, v in self._tasks.items() if k.startswith(prefix)}
        for layer in self.layers:
            rows = self.index(task, layer)
            state[f"{layer}.weight"] = self._kernels[f"{layer}.weight"][rows]
            if f"{layer}.bias" in self._kernels:
                state[f"{layer}.bias"] = self._kernels[f"{layer}.bias"][rows]
        return state

    def model(self, task: str, factory: Callable[[int], nn.Module] | None = None) -> nn.Module:
        """``task``'s model as a plain nn.Module (eval mode). ``factory(num_classes)`` builds
        the architecture; by default the timm model the manifest names."""
        self._check_task(task)
        num_classes = self.manifest["tasks"][task]["num_classes"]
        if factory is None:
            backbone = self.manifest.get("backbone") or {}
            if not backbone.get("name"):
                raise StoreError(f"{self.path / MANIFEST}: no backbone name; pass a factory")
            import timm

            model = timm.create_model(
                backbone["name"], pretrained=False, num_classes=num_classes,
                **backbone.get("kwargs", {}),
            )
        else:
            model = factory(num_classes)
        state = self.state_dict(task)
        if set(state) != set(model.state_dict()) and hasattr(model, "reset_classifier"):
            # a task's model is T0's with reset_classifier(n), which may build another head
            # than the constructor does (timm RepViT drops its distillation head)
            reset = copy.deepcopy(model)
            try:
                reset.reset_classifier(num_classes)
            except Exception:  # noqa: BLE001 - another signature: the keys' error below says it
                reset = model
            if set(state) == set(reset.state_dict()):
                model = reset
        expected = model.state_dict()
        found = [(what, keys) for what, keys in (
            ("missing", sorted(set(expected) - set(state))),
            ("unexpected", sorted(set(state) - set(expected))),
            ("of another shape", sorted(f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
                                        for k, v in expected.items()
                                        if k in state and state[k].shape != v.shape)),
        ) if keys]
        if found:
            said = "; ".join(f"{len(keys)} {what} ({', '.join(keys[:4])}"
                             f"{', ...' if len(keys) > 4 else ''})" for what, keys in found)
            built = "the factory's model" if factory is not None else (
                f"timm's {self.manifest['backbone']['name']!r} "
                f"(kwargs {self.manifest['backbone'].get('kwargs', {})})")
            raise StoreError(f"{self.path}: task {task!r}'s tensors do not fit {built}: "
                             f"{said}; in Python, MultiTaskStore.model(task, factory) takes a "
                             f"factory(num_classes) that builds the task's architecture")
        model.load_state_dict(state)
        return model.eval()

    def relation_matrix(self) -> tuple[list[str], Tensor]:
        """Shared output channels between every pair of tasks (T0 included): [n, n] int64."""
        names = self.tasks
        n = len(names)
        mat = torch.zeros(n, n, dtype=torch.int64)
        for layer in self.layers:
            idx = torch.stack([self.index(t, layer) for t in names])  # [n, C]
            mat += (idx.unsqueeze(1) == idx.unsqueeze(0)).sum(-1)
        return names, mat

    def param_count(self) -> dict[str, int]:
        """Parameters stored: each kernel once, plus every task's own parameters (keys as
        bank.param_counts; ``backbone`` leaves the heads out, as the paper counts)."""
        kernels = sum(
            self._kernels[f"{layer}.weight"].numel()
            + (self._kernels[f"{layer}.bias"].numel() if f"{layer}.bias" in self._kernels else 0)
            for layer in self.layers
        )
        own = sum(
            self._tasks[f"{t}/rest/{name}"].numel()
            for t, info in self.manifest["tasks"].items()
            for name in info["rest_params"]
        )
        heads = sum(
            self._tasks[f"{t}/rest/{name}"].numel()
            for t, info in self.manifest["tasks"].items()
            for name in info.get("head_params", [])
        )
        return param_counts(kernels, own, heads)

    def to_bank(self) -> KernelBank:
        """The bank of kept models this store holds (kernel ids = kernel-table rows)."""
        bank = KernelBank(self.layers)
        for task in self.tasks:
            info = self.manifest["tasks"][task]
            prefix = f"{task}/rest/"
            rest = {k[len(prefix):]: v for k, v in self._tasks.items() if k.startswith(prefix)}
            layers = {}
            for layer in self.layers:
                rows = self.index(task, layer)
                w = self._kernels[f"{layer}.weight"][rows]
                b = self._kernels[f"{layer}.bias"][rows] if f"{layer}.bias" in self._kernels else None
                layers[layer] = LayerWeights(w, b, rows.clone())
            meta = {k: v for k, v in info.items()
                    if k not in ("num_classes", "rest_params", "head_params")}
            bank.entries[task] = TaskEntry(layers, rest, list(info["rest_params"]),
                                           info["num_classes"], meta,
                                           list(info.get("head_params", [])))
        for layer in self.layers:
            bank.next_id[layer] = int(self.manifest["kernel_counts"][layer])
        bank.revision = int(self.manifest.get("bank_revision", 0))
        # (a uid of its own: two banks taken from one store and grown apart would otherwise
        # both name their content (uid, revision + 1), and a save of the second into the
        # first's store would keep the first's tensors; the first save after a load writes them)
        return bank
