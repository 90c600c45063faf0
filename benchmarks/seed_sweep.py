#!/usr/bin/env python
"""Run the training job over several seeds and settings; tabulate CWPS against fine-tuning.

One run of the built-in benchmark is noisy (mnist_m's test split has 375 images, and a short
training budget leaves every method on the steep part of its learning curve), so a single
seed cannot tell a real gap from a bad draw. This script runs ``python -m cwps_lightning.train``
for every (setting, seed) pair, reads each run's results.json and prints, per setting, the mean
and standard deviation over seeds of every method's mean top-1, of the per-task top-1, of
CWPS - fine-tune, and of the parameter ratio.

    python benchmarks/seed_sweep.py --seeds 0 1 2 \\
        --setting default= --setting lambda0.3="cwps.threshold=0.3" \\
        [--common "trainer=gpu"] [--parallel 2] [--out sweep.json] [--keep-dir runs/]

A setting is NAME=OVERRIDES (space-separated Hydra overrides, may be empty). ``--common`` is
added to every run, before the setting's overrides (a key in both: the setting's wins). Runs
go to a temporary directory unless ``--keep-dir`` is given; with ``--reuse`` a run already
finished there is read instead of run again, when its store's manifest shows the same settings
(a kept run without a readable one, or of other settings, is named FAILED). Every run starts in the
checkout this script is in, so it uses that checkout's T0 cache (``<checkout>/.cache``): a
worktree of another revision, with its copy of this script, compares against its own T0s.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_setting(text: str) -> tuple[str, list[str]]:
    name, sep, overrides = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--setting must be NAME=OVERRIDES, got {text!r}")
    return name, split_overrides(overrides)


def split_overrides(text: str, flag: str = "") -> list[str]:
    try:
        return shlex.split(text)
    except ValueError as err:  # (an unbalanced quote)
        raise argparse.ArgumentTypeError(f"{flag} {text!r}: {err}".lstrip()) from None


#: Hydra's compose is process-wide (GlobalHydra): the pool's threads take turns
_COMPOSE = threading.Lock()


def kept_run_differs(out: Path, overrides: list[str]) -> str | None:
    """Why the kept run in ``out`` was made with other settings than ``overrides`` give (the
    train command's own resume check, on its store's manifest), or None: --reuse read such a
    run's numbers under the new setting's name."""
    from cwps_lightning.config import compose_config
    from cwps_lightning.errors import ConfigError
    from cwps_lightning.persist import check_run_dir_reuse

    try:  # (required: train's own check passes a run dir without a record, to start afresh;
        # here its results.json would be read under this setting's name unchecked)
        with _COMPOSE:
            check_run_dir_reuse(out, compose_config(overrides), required=True)
    except ConfigError as err:
        return str(err)
    return None


def run_one(name, overrides, seed, common, root: Path, reuse: bool = False) -> dict:
    out = root / f"{name}_s{seed}"
    results = out / "results.json"
    job = [*common, *overrides, f"seed={seed}", "trainer.enable_progress_bar=false",
           f"hydra.run.dir={out}"]
    cmd = [sys.executable, "-m", "cwps_lightning.train", *job]
    t0 = time.perf_counter()
    if reuse and results.is_file():  # a finished run of an earlier, interrupted sweep
        differs = kept_run_differs(out, job)
        if differs is not None:
            print(f"  {name} seed {seed}: FAILED (not reused: {differs})", flush=True)
            return {"setting": name, "seed": seed, "ok": False, "wall_s": 0.0}
        proc = subprocess.CompletedProcess(cmd, 0, "", "")
        print(f"  {name} seed {seed}: reused {results}", flush=True)
    else:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not results.is_file():
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
        why = f"exit {proc.returncode}" if proc.returncode else f"no {results}"
        print(f"  {name} seed {seed}: FAILED ({why})\n    " + "\n    ".join(tail))
        return {"setting": name, "seed": seed, "ok": False, "wall_s": wall}
    from cwps_lightning.report import StoreError, read_results

    try:  # (the report's check: cut short, edited, a boolean or nan for a figure)
        data = read_results(out)
    except StoreError as err:
        print(f"  {name} seed {seed}: FAILED ({err})", flush=True)
        return {"setting": name, "seed": seed, "ok": False, "wall_s": wall}
    methods = {
        m: {
            "mean_top1": r["mean_top1"],
            "param_ratio": r["param_ratio"],
            "param_ratio_with_heads": r["param_ratio_with_heads"],
            "tasks": {t: v["top1"] for t, v in r["tasks"].items()},
        }
        for m, r in data["methods"].items()
    }
    line = "  ".join(f"{m} {r['mean_top1']:.2f}" for m, r in methods.items())
    print(f"  {name} seed {seed}: {line}  ({wall:.0f} s)", flush=True)
    return {"setting": name, "seed": seed, "ok": True, "wall_s": wall, "methods": methods}


def mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} +- {sd:.2f}"


def summarise(runs: list[dict], settings: list[str]) -> dict:
    summary = {}
    for name in settings:
        ok = [r for r in runs if r["setting"] == name and r["ok"]]
        if not ok:
            continue
        s = {"seeds": [r["seed"] for r in ok]}
        for m in ok[0]["methods"]:
            s[m] = {
                "mean_top1": [r["methods"][m]["mean_top1"] for r in ok],
                "param_ratio": [r["methods"][m]["param_ratio"] for r in ok],
                "tasks": {
                    t: [r["methods"][m]["tasks"][t] for r in ok]
                    for t in ok[0]["methods"][m]["tasks"]
                },
            }
        if "cwps" in s and "finetune" in s:
            s["cwps_minus_finetune"] = [
                a - b
                for a, b in zip(s["cwps"]["mean_top1"], s["finetune"]["mean_top1"], strict=True)
            ]
        summary[name] = s
    return summary


def print_summary(summary: dict) -> None:
    print()
    for name, s in summary.items():
        print(f"{name}  (seeds {s['seeds']})")
        for m, r in s.items():
            if not isinstance(r, dict):
                continue
            tasks = "  ".join(f"{t} {mean_sd(v)}" for t, v in r["tasks"].items())
            print(f"  {m:<9} mean {mean_sd(r['mean_top1'])}  ratio {mean_sd(r['param_ratio'])}"
                  f"  | {tasks}")
        if "cwps_minus_finetune" in s:
            d = s["cwps_minus_finetune"]
            print(f"  cwps - finetune: {mean_sd(d)}  per seed "
                  + " ".join(f"{v:+.2f}" for v in d))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--setting", type=parse_setting, action="append",
                   help="NAME=OVERRIDES; repeatable (default: one setting, 'default=')")
    p.add_argument("--common", default="", help="overrides added to every run")
    p.add_argument("--parallel", type=int, default=1, help="runs at once (1 on a 2-core CPU)")
    p.add_argument("--out", default=None, help="write every run and the summary as JSON")
    p.add_argument("--keep-dir", default=None, help="keep the run directories here")
    p.add_argument("--reuse", action="store_true",
                   help="with --keep-dir: read runs that already have a results.json there "
                        "instead of running them again (resumes an interrupted sweep)")
    args = p.parse_args(argv)
    if args.reuse and not args.keep_dir:
        p.error("--reuse needs --keep-dir (the directory of the earlier runs)")
    settings = args.setting or [("default", [])]
    names = [n for n, _ in settings]
    if len(set(names)) != len(names):
        p.error(f"--setting names must be unique, got {names}")
    if args.parallel < 1:
        p.error(f"--parallel must be >= 1, got {args.parallel}")
    try:
        common = split_overrides(args.common, "--common")
    except argparse.ArgumentTypeError as err:
        p.error(str(err))
    if args.keep_dir:
        try:  # (made here, before any run: a file in its path ended the sweep in a traceback)
            Path(args.keep_dir).resolve().mkdir(parents=True, exist_ok=True)
        except OSError as err:
            p.error(f"--keep-dir {args.keep_dir}: cannot be made a directory "
                    f"({err.strerror or err})")
    jobs = [(n, o, seed) for seed in args.seeds for n, o in settings]
    print(f"{len(jobs)} runs ({len(settings)} settings x {len(args.seeds)} seeds), "
          f"{args.parallel} at a time", flush=True)
    with tempfile.TemporaryDirectory(prefix="cwps-sweep-") as tmp:
        # (absolute: the runs start in the checkout, a relative path means the caller's cwd)
        root = Path(args.keep_dir).resolve() if args.keep_dir else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(args.parallel) as pool:
            runs = list(pool.map(lambda j: run_one(*j, common, root, args.reuse), jobs))
    summary = summarise(runs, names)
    print_summary(summary)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "settings": {n: o for n, o in settings}, "common": common,
            "runs": runs, "summary": summary,
        }, indent=2))
        print(f"wrote {args.out}")
    return 0 if all(r["ok"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
