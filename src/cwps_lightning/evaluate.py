"""Re-test every task of a store: ``python -m cwps_lightning.evaluate store=<dir> [overrides]``.

Rebuilds each task's model from the store alone, tests it on the task's test split (the data
config is the one saved in the store; ``data.root=...`` and other overrides, in the train
command's syntax, change it) and prints the table next to the accuracies recorded at training
time. Exit status: 0 every task matches, 1 a task differs, 2 bad input (one ``error:`` line).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from omegaconf import OmegaConf

from .config import apply_overrides, instantiate_data
from .cwps import MultiTaskStore, StoreError
from .cwps.store import MANIFEST
from .errors import ConfigError
from .fitting import eval_device, evaluate_top1
from .models import head_classes
from .report import is_number
from .runner import T0

USAGE = "usage: python -m cwps_lightning.evaluate store=<store dir> [data.root=... device=cpu]"
#: arguments of this command (not config overrides)
OWN_KEYS = ("store", "device")
#: what the overrides may change: the data (the models are the store's; the store keeps its
#: config resolved, so ``paths.*`` would change nothing)
OVERRIDE_PREFIXES = ("data.",)
DEVICES = ("auto", "cpu", "gpu", "cuda", "cuda:<index>")
HELP = f"""{USAGE}

Rebuild every task's model from the store alone, test it, and print the table next to the
top-1 the run recorded. data.<key>=... points at data that moved (the store's data.* keys;
+data.<key>= adds one); data.tasks=[a,b] tests those tasks alone (null: the store's
tasks, as without it); device= is one of
{', '.join(DEVICES)} (default auto).
Exit 0: every task matches; 1: a task differs, or has no recorded top-1 to compare with; 2: bad
input (one error: line)."""


def override_key(override: str) -> str:
    """The config key of a ``[+~]key=value`` override."""
    return override.lstrip("+~").split("=")[0]


def parse_args(argv: Sequence[str]) -> tuple[dict, list[str]]:
    """``store=`` and ``device=``, and the config overrides (everything else)."""
    own, overrides = {}, []
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"bad argument {item!r}: expected key=value. {USAGE}")
        if key in OWN_KEYS:
            own[key] = value
        elif key.lstrip("+~").startswith(OVERRIDE_PREFIXES):
            overrides.append(item)
        else:
            raise ConfigError(f"{item}: evaluate takes store=, device= and overrides of "
                              f"{', '.join(p + '*' for p in OVERRIDE_PREFIXES)} (the models are "
                              f"the store's). {USAGE}")
    if not own.get("store"):
        raise ConfigError(f"missing store=<dir>. {USAGE}")
    return own, overrides


def device_of(name: str) -> torch.device:
    """``device=``: auto (this process's GPU, else the CPU), cpu, gpu / cuda (a GPU must be
    visible) or cuda:<index>."""
    if name not in ("auto", "cpu", "gpu", "cuda") and not (
            name.startswith("cuda:") and name[5:].isdigit()):
        raise ConfigError(f"device={name!r}: accepted: {', '.join(DEVICES)}")
    if name in ("gpu", "cuda") or name.startswith("cuda:"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name[5:]) if name.startswith("cuda:") else 0
        if index >= count:
            raise ConfigError(f"device={name}: {count} CUDA GPU(s) visible on this machine")
        if name.startswith("cuda:"):
            return torch.device("cuda", index)
    return eval_device(name)


def evaluate_store(store: MultiTaskStore, overrides: Sequence[str] = (),
                   device: str = "auto") -> list[dict]:
    dev = device_of(device)
    config = store.manifest.get("config")
    if not isinstance(config, dict):  # (a store save_store wrote without one)
        raise StoreError(f"{store.path}: its manifest keeps no 'config', the data config "
                         "evaluate rebuilds the test splits from (a store the train command "
                         "writes has one)")
    cfg = apply_overrides(OmegaConf.create(config), overrides)
    kept = [t for t in store.tasks if t != T0]
    if OmegaConf.select(cfg, "data.tasks") is None and kept:
        # data.tasks=null tests the store's tasks, not the benchmark's default list (which
        # names tasks a store of some of them lacks)
        OmegaConf.update(cfg, "data.tasks", kept)
    datamodule = instantiate_data(cfg)
    recorded = store.manifest.get("metrics", {})
    if not isinstance(recorded, dict) or not all(
            isinstance(m, dict) and (m.get("top1") is None or is_number(m["top1"]))
            for m in recorded.values()):  # (a string top-1 failed in the comparison)
        raise StoreError(f"{store.path / MANIFEST}: corrupt manifest ('metrics' of another "
                         "type: each task's top1 a number)")
    # data.tasks=[...] narrows the test to those, and a task the store lacks is refused; else
    # the store's tasks are tested (a killed run's store holds the tasks it finished)
    given = list(datamodule.task_names)
    unknown = [t for t in given if t not in store.tasks]
    if unknown and any(override_key(o) == "data.tasks" for o in overrides):
        raise ConfigError(f"data.tasks: {unknown} not in the store; its tasks: {kept}")
    rows = []
    for task in store.tasks:
        if task == T0 or task not in given:
            continue
        model = store.model(task)
        datamodule.use(task)
        classes = head_classes(model)
        if classes is not None and classes != datamodule.num_classes(task):
            raise ConfigError(
                f"task {task!r}: the data has {datamodule.num_classes(task)} classes, the "
                f"store's model {classes} (do the data.* overrides point at other data?)")
        top1 = evaluate_top1(model, datamodule.test_dataloader(), dev)
        rows.append({"task": task, "top1": top1, "recorded": recorded.get(task, {}).get("top1")})
    return rows


def differs(row: dict) -> bool:
    """The re-tested top-1 is not the recorded one (to 1e-9; a row without one never)."""
    return row["recorded"] is not None and abs(row["recorded"] - row["top1"]) >= 1e-9


def format_rows(rows: list[dict]) -> str:
    lines = ["| Task | Top-1 (store) | Top-1 (recorded) | Match |", "|---|---|---|---|"]
    for r in rows:
        rec = r["recorded"]
        match = "-" if rec is None else ("NO" if differs(r) else "yes")
        rec_s = "-" if rec is None else f"{rec:.2f}"
        lines.append(f"| {r['task']} | {r['top1']:.2f} | {rec_s} | {match} |")
    mean = sum(r["top1"] for r in rows) / max(len(rows), 1)
    lines.append(f"| Mean | {mean:.2f} | | |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):
        print(HELP)
        return 0
    try:
        own, overrides = parse_args(argv)
        store = MultiTaskStore.load(own["store"])
        rows = evaluate_store(store, overrides, own.get("device", "auto"))
    except (ConfigError, StoreError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # (the store holds CWPS's models alone: the baselines' are not kept)
    print(f"CWPS, each task's model rebuilt from the store {own['store']}:\n")
    print(format_rows(rows))
    counts = store.param_count()
    print(f"\nparameters stored: {counts['total']:,} ({counts['kernels']:,} in the kernel table, "
          f"each distinct kernel once, shared or task-specific; {counts['heads']:,} in heads; "
          f"{counts['backbone']:,} without heads)")
    differ = [r["task"] for r in rows if differs(r)]
    if differ:
        print(f"\n{why_they_differ(differ, overrides)}")
    unrecorded = [r["task"] for r in rows if r["recorded"] is None]
    if unrecorded:  # (a manifest edited or cut: every Match '-' passed with nothing checked)
        print(f"\n{len(unrecorded)} task(s) have no recorded top-1 in the manifest to compare "
              f"with ({', '.join(unrecorded)}): not checked")
    if not rows:
        print("\nno task was tested (the store holds T0 alone, or data.tasks names none)")
    return 1 if differ or unrecorded or not rows else 0


#: overrides that leave the test images as the run had them (where they are, which tasks)
SAME_IMAGES = ("data.root", "data.tasks", "data.num_workers", "data.batch_size",
               "data.pin_memory", "data.persistent_workers")


#: overrides that carve every split from another pool of images
RECARVED = ("data.limit_per_task",)


def why_they_differ(tasks: list[str], overrides: Sequence[str]) -> str:
    """What a top-1 that differs from the recorded one may come from."""
    changed = [o for o in overrides if override_key(o) not in SAME_IMAGES]
    said = f"{len(tasks)} task(s) differ from the top-1 the run recorded ({', '.join(tasks)})"
    if changed:
        recarved = [o for o in changed if override_key(o) in RECARVED]
        overlap = (f" ({', '.join(recarved)} draws the splits anew from other images: its test "
                   f"split may hold images the run trained on, which inflates the top-1)"
                   if recarved else "")
        return (f"{said}: {', '.join(changed)} may test other images, or transform them "
                f"otherwise, than the run did{overlap}; without them the store's own data "
                f"config is used")
    return (f"{said}, with the store's own data config: the images under data.root differ "
            f"from the run's, or the machine or the library versions round otherwise")


if __name__ == "__main__":
    sys.exit(main())
