#!/usr/bin/env python
"""Tabulate CWPS over the runs a seed sweep kept, and compare trade-off curves at matched ratio.

``benchmarks/seed_sweep.py --keep-dir DIR`` leaves one run directory per (setting, seed),
named ``<setting>_s<seed>``. This reads every ``results.json`` there and prints, per setting, over
its seeds (mean +- sd): CWPS mean top-1, the paper's param_ratio, the share of task-specific
channels (mean over tasks), and the mask flips per stage (channels whose hard decision changed
in the soft and in the hard stage, % of all channels, mean over tasks).

Settings named ``<curve>_l<lambda>`` form one curve per ``<curve>`` (accuracy against
param_ratio over lambda). ``--reference NAME`` compares every other curve with NAME's at
matched param_ratio: the other curve's accuracy, interpolated linearly at each of NAME's points
inside its ratio range, minus NAME's accuracy there.

    python benchmarks/tabulate_runs.py /work/sweeps/init --reference mean_ratio
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

RUN_DIR = re.compile(r"^(?P<setting>.+)_s(?P<seed>\d+)$")
CURVE = re.compile(r"^(?P<curve>.+)_l(?P<lam>[0-9.]+)$")


def run_row(results: dict) -> dict:
    """CWPS's figures of one run."""
    cwps = results["methods"]["cwps"]
    for key in ("mean_top1", "param_ratio"):  # (a string failed in the table, a boolean or
        # nan was averaged)
        value = cwps[key]
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value):
            raise ValueError(f"methods.cwps.{key} is {value!r}, not a finite number")
    tasks = list(cwps["tasks"].values())
    flips = [t["mask_flips"] for t in tasks]
    return {
        "mean_top1": cwps["mean_top1"],
        "param_ratio": cwps["param_ratio"],
        "specific": 100 * statistics.mean(t["specific_channels"] for t in tasks),
        "flips_soft": 100 * statistics.mean(f["soft"] / f["channels"] for f in flips),
        "flips_hard": 100 * statistics.mean(f["hard"] / f["channels"] for f in flips),
    }


def collect(root: Path, skipped: list[Path] | None = None) -> dict[str, list[dict]]:
    """Rows by setting, in the order the settings first appear (sorted by name); the
    results.json files that cannot be read are said and added to ``skipped``."""
    by_setting: dict[str, list[dict]] = {}
    for run in sorted(root.iterdir()):
        match = RUN_DIR.match(run.name)
        results = run / "results.json"
        if not match or not results.is_file():
            continue
        try:
            row = run_row(json.loads(results.read_text()))
        except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as err:
            # (one cut-short or foreign file must not hide the others, nor itself)
            print(f"{results}: skipped, cannot read its CWPS figures ({type(err).__name__}: "
                  f"{err})", file=sys.stderr)
            if skipped is not None:
                skipped.append(results)
            continue
        row["seed"] = int(match["seed"])
        by_setting.setdefault(match["setting"], []).append(row)
    return by_setting


def mean_sd(values: list[float], digits: int = 2) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} +- {sd:.{digits}f}"


def table(by_setting: dict[str, list[dict]]) -> str:
    lines = ["| setting | seeds | mean top-1 | param_ratio | task-specific % | "
             "flips soft % | flips hard % |", "|---|---|---|---|---|---|---|"]
    for name, rows in by_setting.items():
        col = {k: [r[k] for r in rows] for k in rows[0]}
        lines.append(
            f"| {name} | {len(rows)} | {mean_sd(col['mean_top1'])} | "
            f"{mean_sd(col['param_ratio'])}x | {mean_sd(col['specific'], 1)} | "
            f"{mean_sd(col['flips_soft'], 2)} | {mean_sd(col['flips_hard'], 2)} |")
    return "\n".join(lines)


def curves(by_setting: dict[str, list[dict]]) -> dict[str, list[tuple[float, float, float]]]:
    """(lambda, mean param_ratio, mean top-1) per curve, by lambda."""
    out: dict[str, list[tuple[float, float, float]]] = {}
    for name, rows in by_setting.items():
        match = CURVE.match(name)
        if match:
            out.setdefault(match["curve"], []).append((
                float(match["lam"]), statistics.mean(r["param_ratio"] for r in rows),
                statistics.mean(r["mean_top1"] for r in rows)))
    return {k: sorted(v) for k, v in out.items()}


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """Linear interpolation of y at x over (x, y) points; None outside their x range."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    if len(pts) == 1 and pts[0][0] == x:
        return pts[0][1]
    return None


def matched_ratio(curves_: dict, reference: str) -> str:
    ref = curves_[reference]
    lines = [f"Accuracy minus {reference}'s at {reference}'s param_ratio (linear interpolation "
             "along each curve; '-' = outside the curve's ratio range):", "",
             "| curve | " + " | ".join(f"{reference} lambda {lam:g} ({ratio:.2f}x)"
                                      for lam, ratio, _ in ref) + " |",
             "|---|" + "---|" * len(ref)]
    for name, pts in curves_.items():
        if name == reference:
            continue
        cells = []
        for _, ratio, top1 in ref:
            got = interpolate([(r, a) for _, r, a in pts], ratio)
            cells.append("-" if got is None else f"{got - top1:+.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="a seed_sweep --keep-dir directory")
    parser.add_argument("--reference", help="the curve the others are compared with")
    args = parser.parse_args()
    if not args.root.is_dir():
        parser.error(f"{args.root} is not a directory")
    skipped: list[Path] = []
    by_setting = collect(args.root, skipped)
    if not by_setting:
        skipped = (f" ({len(skipped)} found, none readable: each said above)"
                   if skipped else "")
        parser.error(f"no readable <setting>_s<seed>/results.json under {args.root}{skipped}")
    found = curves(by_setting) if args.reference else {}
    if args.reference and args.reference not in found:  # (before anything is printed)
        parser.error(f"--reference {args.reference!r}: no such curve; found {sorted(found)}")
    print(table(by_setting))
    if args.reference:
        print()
        print(matched_ratio(found, args.reference))


if __name__ == "__main__":
    main()
