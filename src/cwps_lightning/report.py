"""results.json and results.md (a table shaped like the paper's Table 1)."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .cwps.store import MultiTaskStore, atomic_write

#: row order of the table: the reference points first, then the peers, then CWPS
ROW_ORDER = ("finetune", "frozen", "piggyback", "taps", "cwps")


def markdown_table(results: dict) -> str:
    methods = results["methods"]
    tasks = results["tasks"]
    head = ["Method", "Param ratio", *tasks, "Mean", "Time per task"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = [m for m in ROW_ORDER if m in methods]
    order += [m for m in methods if m not in order]
    for m in order:
        r = methods[m]
        label = r.get("label") or m
        if m == "cwps" and r.get("mode"):
            label = f"CWPS-{r['mode'].capitalize()}"
        cells = [label, f"{r['param_ratio']:.2f}x"]
        cells += [f"{r['tasks'][t]['top1']:.2f}" if t in r["tasks"] else "-" for t in tasks]
        cells.append(f"{r['mean_top1']:.2f}")
        seconds = r.get("seconds_per_task")
        cells.append("-" if seconds is None else f"{seconds:.0f} s")
        rows.append("| " + " | ".join(cells) + " |")
    notes = [
        "",
        f"Top-1 accuracy (%) on each task's test split; backbone {results['backbone']} "
        f"({results['backbone_params']:,} parameters without head).",
        "Param ratio: parameters needed to serve T0 and every task (each distinct kernel once, "
        "plus every task's normalisation layers and head) / backbone parameters. TAPS: a layer "
        "whose gate is open stores its full residual; Piggyback: 1 bit per masked weight "
        "(numel / 32) and the head (README, 'Parameter accounting').",
        "Time per task: training and testing, wall-clock seconds per task (every pass in joint "
        "mode).",
    ]
    return "\n".join(rows + notes) + "\n"


def write_results(run_dir: str | Path, results: dict) -> None:
    run_dir = Path(run_dir)
    atomic_write(run_dir / "results.json",
                 (json.dumps(results, indent=2, default=str) + "\n").encode())
    atomic_write(run_dir / "results.md", markdown_table(results).encode())


def assemble_results(cfg: DictConfig, benchmark: str, tasks: list[str], methods: dict,
                     method_objects: list, cwps,
                     backbone_params: int, t0_info: dict, store_dir: Path, seconds: float,
                     device, read_store: bool = True) -> dict:
    """results.json's content: the run, and per method its per-task metrics, mean top-1 and
    parameter count. With ``read_store`` (rank 0 only: the rank that wrote it, so no rank reads
    a store being written), CWPS's count is read back from the saved store."""
    results = {
        "benchmark": benchmark,
        "tasks": list(tasks),
        "backbone": cfg.model.name,
        "backbone_params": backbone_params,
        "t0": t0_info,
        "store": str(store_dir),
        "methods": {name: result.summary(backbone_params) for name, result in methods.items()},
        "seconds": round(seconds, 1),
        "device": str(device),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    for method in method_objects:
        results["methods"][method.name]["label"] = method.label or method.name
    cwps_result = results["methods"]["cwps"]
    cwps_result.update({"mode": cwps.mode, "iterations": cwps.iterations})
    if read_store:
        stored = MultiTaskStore.load(store_dir).param_count()
        cwps_result["params"] = stored
        cwps_result["param_ratio"] = stored["total"] / backbone_params
    return results
