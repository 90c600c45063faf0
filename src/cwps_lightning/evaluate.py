"""Re-test every task of a store: ``python -m cwps_lightning.evaluate store=<dir> [key=value ...]``.

Rebuilds each task's model from the store alone, tests it on the task's test split (the data
config is the one saved in the store; ``data.root=...`` and other dotted overrides change it) and
prints the table next to the accuracies recorded at training time.
"""

from __future__ import annotations

import sys

from omegaconf import OmegaConf

from .cwps import MultiTaskStore, StoreError
from .errors import ConfigError
from .fitting import eval_device, evaluate_top1
from .runner import T0

USAGE = "usage: python -m cwps_lightning.evaluate store=<store dir> [data.root=... device=cpu]"


def parse_args(argv: list[str]) -> dict:
    args = {}
    for item in argv:
        if "=" not in item:
            raise ConfigError(f"bad argument {item!r}: expected key=value. {USAGE}")
        key, value = item.split("=", 1)
        args[key] = value
    if "store" not in args:
        raise ConfigError(f"missing store=<dir>. {USAGE}")
    return args


def evaluate_store(store: MultiTaskStore, overrides: dict, device: str = "auto") -> list[dict]:
    from .train import instantiate_data

    cfg = OmegaConf.create(store.manifest["config"])
    dotlist = [f"{k}={v}" for k, v in overrides.items()]
    if dotlist:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotlist))
    datamodule = instantiate_data(cfg.data)
    dev = eval_device(device)
    recorded = store.manifest.get("metrics", {})
    rows = []
    for task in store.tasks:
        if task == T0:
            continue
        model = store.model(task)
        datamodule.use(task)
        top1 = evaluate_top1(model, datamodule.test_dataloader(), dev)
        rows.append({"task": task, "top1": top1, "recorded": recorded.get(task, {}).get("top1")})
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = ["| Task | Top-1 (store) | Top-1 (recorded) | Match |", "|---|---|---|---|"]
    for r in rows:
        rec = r["recorded"]
        match = "-" if rec is None else ("yes" if abs(rec - r["top1"]) < 1e-9 else "NO")
        rec_s = "-" if rec is None else f"{rec:.2f}"
        lines.append(f"| {r['task']} | {r['top1']:.2f} | {rec_s} | {match} |")
    mean = sum(r["top1"] for r in rows) / max(len(rows), 1)
    lines.append(f"| Mean | {mean:.2f} | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        store = MultiTaskStore.load(args.pop("store"))
        device = args.pop("device", "auto")
        rows = evaluate_store(store, args, device)
    except (ConfigError, StoreError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_rows(rows))
    counts = store.param_count()
    print(f"\nparameters stored: {counts['total']:,} ({counts['kernels']:,} in shared kernels)")
    return 0 if all(r["recorded"] is None or abs(r["recorded"] - r["top1"]) < 1e-9
                    for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
