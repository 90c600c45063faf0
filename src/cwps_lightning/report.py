"""results.json and results.md (a table shaped like the paper's Table 1)."""

from __future__ import annotations

import json
from pathlib import Path

from .cwps.store import atomic_write

METHOD_LABELS = {
    "finetune": "Fine-Tuning",
    "frozen": "Feature extractor (frozen T0)",
    "cwps": "CWPS",
}


def markdown_table(results: dict) -> str:
    methods = results["methods"]
    tasks = results["tasks"]
    head = ["Method", "Param ratio", *tasks, "Mean"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = [m for m in ("finetune", "frozen", "cwps") if m in methods]
    order += [m for m in methods if m not in order]
    for m in order:
        r = methods[m]
        label = METHOD_LABELS.get(m, m)
        if m == "cwps" and r.get("mode"):
            label = f"CWPS-{r['mode'].capitalize()}"
        cells = [label, f"{r['param_ratio']:.2f}x"]
        cells += [f"{r['tasks'][t]['top1']:.2f}" if t in r["tasks"] else "-" for t in tasks]
        cells.append(f"{r['mean_top1']:.2f}")
        rows.append("| " + " | ".join(cells) + " |")
    notes = [
        "",
        f"Top-1 accuracy (%) on each task's test split; backbone {results['backbone']} "
        f"({results['backbone_params']:,} parameters without head).",
        "Param ratio: parameters needed to serve T0 and every task (each distinct kernel once, "
        "plus every task's normalisation layers and head) / backbone parameters.",
    ]
    return "\n".join(rows + notes) + "\n"


def write_results(run_dir: str | Path, results: dict) -> None:
    run_dir = Path(run_dir)
    atomic_write(run_dir / "results.json",
                 (json.dumps(results, indent=2, default=str) + "\n").encode())
    atomic_write(run_dir / "results.md", markdown_table(results).encode())
