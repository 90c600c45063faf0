"""results.json and results.md (a table shaped like the paper's Table 1), and the report
command that rebuilds them and the figures from what a run left on disk:

    python -m cwps_lightning.report <run dir | multirun dir>
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from . import distributed
from .cwps.store import MANIFEST, MultiTaskStore, StoreError, atomic_write
from .methods.base import param_ratios

log = logging.getLogger(__name__)

#: row order of the table: the reference points first, then the peers, then CWPS
ROW_ORDER = ("finetune", "frozen", "piggyback", "taps", "cwps")


def method_label(name: str, result: dict) -> str:
    """A method's row label in the table and the figures (CWPS with its mode)."""
    if name == "cwps" and result.get("mode"):
        return f"CWPS-{result['mode'].capitalize()}"
    return result.get("label") or name


def _ranks_note(ranks: dict | None) -> list[str]:
    if not ranks or ranks.get("world_size", 1) <= 1:
        return []
    return [f"DDP: {ranks['world_size']} ranks; after each of {ranks['fits_checked_equal']} "
            f"fits every rank held the same weights (state hashes compared)."]


def markdown_table(results: dict) -> str:
    methods = results["methods"]
    tasks = results["tasks"]
    head = ["Method", "Param ratio", "With heads", *tasks, "Mean", "Time per task"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = [m for m in ROW_ORDER if m in methods]
    order += [m for m in methods if m not in order]
    for m in order:
        r = methods[m]
        cells = [method_label(m, r), f"{r['param_ratio']:.2f}x",
                 f"{r['param_ratio_with_heads']:.2f}x"]
        cells += [f"{r['tasks'][t]['top1']:.2f}" if t in r["tasks"] else "-" for t in tasks]
        cells.append(f"{r['mean_top1']:.2f}")
        seconds = r.get("seconds_per_task")
        cells.append("-" if seconds is None else f"{seconds:.0f} s")
        rows.append("| " + " | ".join(cells) + " |")
    notes = [
        "",
        f"Top-1 accuracy (%) on each task's test split; backbone {results['backbone']} "
        f"({results['backbone_params']:,} parameters without head).",
        "Param ratio (the paper's): backbone parameters needed to serve T0 and every task (each "
        "distinct kernel once, plus every task's normalisation layers; heads left out) / "
        "backbone parameters, so fine-tuning reads 1 + K for K tasks. With heads: the same "
        "with T0's and every task's head in the numerator. TAPS: a layer whose gate is open "
        "stores its full residual; Piggyback: 1 bit per masked weight (numel / 32) (README, "
        "'`param_ratio`, precisely').",
        "Time per task: training and testing, wall-clock seconds per task (every pass in joint "
        "mode).",
        *_ranks_note(results.get("ranks")),
    ]
    if results.get("figures"):
        notes += ["", "Figures:", ""] + [f"- [{f}]({f})" for f in results["figures"]]
    return "\n".join(rows + notes) + "\n"


def write_results(run_dir: str | Path, results: dict) -> None:
    run_dir = Path(run_dir)
    atomic_write(run_dir / "results.json",
                 (json.dumps(results, indent=2, default=str) + "\n").encode())
    atomic_write(run_dir / "results.md", markdown_table(results).encode())


def assemble_results(cfg: DictConfig, benchmark: str, tasks: list[str], methods: dict,
                     method_objects: list, cwps,
                     backbone_params: int, t0_info: dict, store_dir: Path, seconds: float,
                     device, saved: MultiTaskStore | None = None,
                     ranks: dict | None = None) -> dict:
    """results.json's content: the run, and per method its per-task metrics, mean top-1 and
    parameter count. ``saved``: the store as read back after the run (rank 0 only: the rank
    that wrote it, so no rank reads a store being written); CWPS's count is then its count.
    ``ranks``: the ranks record over every attempt at the run (None: this process's)."""
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
        # torch's intra-op threads (rank 0's): on the CPU they order the float sums, so two
        # counts give two sets of results (README, *Which machine and which version*)
        "cpu_threads": torch.get_num_threads(),
        "ranks": ranks if ranks is not None else distributed.ranks_report(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    for method in method_objects:
        results["methods"][method.name]["label"] = method.label or method.name
    cwps_result = results["methods"]["cwps"]
    cwps_result.update({"mode": cwps.mode, "iterations": cwps.iterations})
    if saved is not None:
        stored = saved.param_count()
        cwps_result["params"] = stored
        cwps_result.update(param_ratios(stored, backbone_params))
    return results


# -- figures, and the report command ------------------------------------------------------------
def add_figures(run_dir: Path, results: dict, store: MultiTaskStore | None) -> None:
    """Draw the run's figures and list them in ``results["figures"]``. A figure that fails
    is logged, not raised: the results it would show are already computed (a machine without
    matplotlib, the figures' only extra package, included)."""
    try:
        from .figures import write_run_figures

        results["figures"] = write_run_figures(run_dir, results, store)
    except Exception as err:  # noqa: BLE001 - the run's results stand without its figures
        log.error("figures failed (%s: %s); rebuild them with python -m cwps_lightning.report "
                  "%s", type(err).__name__, err, run_dir)


#: what the table reads of results.json, and of each method in it ("number": an int or a
#: float, not a boolean, finite)
RESULTS_KEYS = {"methods": dict, "tasks": list, "backbone": str, "backbone_params": int}
METHOD_KEYS = {"tasks": dict, "mean_top1": "number", "param_ratio": "number",
               "param_ratio_with_heads": "number"}


def is_number(value) -> bool:
    """An int or float (not a boolean) that is finite: what a table may print as a figure."""
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and abs(value) < float("inf"))


def _of_kind(value, kind) -> bool:
    if kind == "number":
        return is_number(value)
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def results_layout_gap(results: dict) -> str | None:
    """The first key the report needs that ``results`` lacks (or holds of another type: a
    boolean or nan is no accuracy), as a path ("methods.cwps.mean_top1"); None when the
    layout is whole."""
    for key, kind in RESULTS_KEYS.items():
        if not _of_kind(results.get(key), kind):
            return repr(key)
    if not all(isinstance(t, str) for t in results["tasks"]):
        return repr("tasks")
    for name, method in results["methods"].items():
        if not isinstance(method, dict):
            return repr(f"methods.{name}")
        for key, kind in METHOD_KEYS.items():
            if not _of_kind(method.get(key), kind):
                return repr(f"methods.{name}.{key}")
        for task, metrics in method["tasks"].items():
            if not (isinstance(metrics, dict) and is_number(metrics.get("top1"))):
                return repr(f"methods.{name}.tasks.{task}.top1")
        for key in ("seconds_per_task", "mode", "label"):  # (optional: None or their kind)
            kind = "number" if key == "seconds_per_task" else str
            if method.get(key) is not None and not _of_kind(method[key], kind):
                return repr(f"methods.{name}.{key}")
    return None


def read_results(run_dir: Path) -> dict:
    """A run's results.json, with the layout the report needs; else a StoreError saying why
    (unreadable, cut short, edited, or written by an older revision)."""
    path = run_dir / "results.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise StoreError(f"{path}: cannot read ({err})") from None
    if not isinstance(results, dict) or "methods" not in results:
        raise StoreError(f"{path}: not a results.json of this project (no 'methods')")
    missing = results_layout_gap(results)
    if missing:
        raise StoreError(f"{path}: {missing} missing or of another type (cut short, edited, or "
                         "written by an older revision)")
    return results


def report_run(run_dir: Path) -> dict:
    """Rebuild a finished run's figures and results.md from its results.json and store."""
    results = read_results(run_dir)
    if not os.access(run_dir, os.W_OK):  # (figures redrawn, then a PermissionError traceback)
        raise StoreError(f"{run_dir}: not writable, so its figures and results.md cannot be "
                         "rebuilt there; copy the run somewhere writable and report the copy")
    store = MultiTaskStore.load(run_dir / "store") if (run_dir / "store" / MANIFEST).exists() \
        else None
    if store is not None:
        check_store_is_the_runs(store, results, run_dir)
    add_figures(run_dir, results, store)
    write_results(run_dir, results)
    return results


def check_store_is_the_runs(store: MultiTaskStore, results: dict, run_dir: Path) -> None:
    """The store's recorded CWPS top-1s are results.json's: the figures drawn from a store
    another run left in the folder (copied over, or restored from elsewhere) sat next to this
    run's table without a word."""
    recorded = store.manifest.get("metrics")
    ours = results["methods"].get("cwps", {}).get("tasks", {})
    if not isinstance(recorded, dict):
        return  # (evaluate names a manifest without its metrics)
    for task, metrics in ours.items():
        theirs = recorded.get(task, {}).get("top1") if isinstance(recorded.get(task), dict) \
            else None
        if theirs != metrics["top1"]:
            raise StoreError(f"{run_dir / 'store'}: not this run's store (its top-1 of {task} "
                             f"is {theirs}, results.json's {metrics['top1']}); put the run's "
                             f"own store back, or report the run it belongs to")


def run_dirs(path: Path) -> list[Path]:
    """``path`` if it is a run directory, else the run directories below it (a multirun)."""
    if path.is_file():  # (results.json, results.md: the run directory is their folder)
        hint = f"; the run directory is {path.parent}" if (
            path.parent / "results.json").is_file() else ""
        raise StoreError(f"{path}: a file, not a run or multirun directory{hint}")
    if not path.exists():
        raise StoreError(f"{path}: no such directory")
    if (path / "results.json").is_file():
        return [path]
    found = sorted({p.parent for p in path.glob("**/results.json")})
    if not found and not any(path.glob("*/job_status.json")):  # (a sweep's table stands alone)
        # (a folder of a run, its store or figures: the run directory is the one above)
        hint = f"; the run directory is {path.parent}" if (
            path.parent / "results.json").is_file() else ""
        raise StoreError(f"{path}: no results.json in it or below it (a run or multirun "
                         f"directory of python -m cwps_lightning.train){hint}")
    return found


USAGE = "usage: python -m cwps_lightning.report <run dir | multirun dir>"
HELP = f"""{USAGE}

Rebuild a run's results.md and figures from its results.json and store (a multirun
directory: every run below it, then the sweep's table and figure; a run that cannot be
rebuilt is named and skipped, and the sweep's table marks it).
Exit 0: done; 2: bad input, or a run not rebuilt (one error: line)."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):
        print(HELP)
        return 0
    if len(argv) != 1 or argv[0].startswith("-"):
        print(USAGE, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        runs = run_dirs(Path(argv[0]))
    except StoreError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    root = Path(argv[0])
    if runs == [root]:  # one run: its error alone
        try:
            results = report_run(root)
        except StoreError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"{root}: results.md and {len(results.get('figures', []))} figure(s)")
        return 0
    failed = {}
    for run_dir in runs:
        started = time.perf_counter()
        try:
            results = report_run(run_dir)
        except StoreError as err:
            failed[run_dir] = str(err)  # (the others are still rebuilt, and the sweep's table)
            print(f"{run_dir}: not rebuilt: {err}")
            continue
        print(f"{run_dir}: results.md and {len(results.get('figures', []))} figure(s) "
              f"in {time.perf_counter() - started:.1f} s")
    from .sweep import STATUS_FILE, sweep_rows, write_sweep_report

    if any(root.glob(f"*/{STATUS_FILE}")):
        rows = sweep_rows(root)
        written = write_sweep_report(root, rows)
        print(f"{root}: {', '.join(written)}")
        for row in rows:  # (a completed job whose results.json is gone)
            job_dir = root / row["dir"]
            if row["status"] == "unreadable" and job_dir not in failed:
                failed[job_dir] = row["error"]
                print(f"{job_dir}: not rebuilt: {row['error']}")
    if failed:
        total = len(set(runs) | set(failed))
        print(f"error: {len(failed)} of {total} run(s) not rebuilt (each said above): "
              f"{[str(p) for p in failed]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
