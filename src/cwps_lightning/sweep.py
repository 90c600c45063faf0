"""The sweep report: one table (Markdown and CSV) and the figures that fit a multirun.

``SweepReport`` is a Hydra callback (conf/hydra/default.yaml). After every job it records the
job's status (``job_status.json``: completed or failed, with the error line) in the job's
directory and rewrites the report in the sweep directory, so the report is there whatever
happens to a later job; ``on_multirun_end`` writes it once more. ``python -m
cwps_lightning.report <multirun dir>`` rebuilds it from disk.

    sweep.md / sweep.csv      every job: number, overrides, status (or error line), per method
                              mean top-1 and param_ratio, wall time
    figures/lambda.png        a sweep over cwps.threshold alone: the paper's Figure 5 (CWPS mean
                              top-1 against lambda, marker area = param_ratio), and sweep.md's
                              table is then its Table 3
    figures/accuracy_vs_params.png   any other sweep: CWPS mean top-1 against param_ratio,
                              one point per job, labelled by what the job changed
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf

from .cwps.store import atomic_write
from .distributed import PeerStopped
from .report import is_number

log = logging.getLogger(__name__)

STATUS_FILE = "job_status.json"
#: failed jobs of this process's multirun, as (sweep dir, job number): train.main names them
#: and exits non-zero at the sweep's end
FAILED_JOBS: list[tuple[str, int]] = []
LAMBDA_KEY = "cwps.threshold"


def _rank_zero() -> bool:
    """Rank as Lightning reads it (RANK, LOCAL_RANK, SLURM_PROCID, ...): only rank 0 writes."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


class SweepJobFailed(CompactHydraException):
    """One of the project's own errors (config, data, store, a diverged fit) ended a job of a
    multirun. Hydra records the job as failed and runs the others; a compact exception, so that
    at the end of a sweep Hydra prints its line and not a traceback through the project's code.
    ``line``: the error's line (``error_line``), as the report shows it."""

    def __init__(self, line: str, job: int):
        super().__init__(line, job)  # (the args a pickled copy is rebuilt from)
        self.line, self.job = line, job

    def __str__(self) -> str:
        return f"job {self.job} failed: {self.line}"


def error_line(err: BaseException) -> str:
    if isinstance(err, SweepJobFailed):
        return err.line
    if isinstance(err, PeerStopped):  # (another rank's error: the line rank 0 would have
        # written for it, and which rank met it)
        return f"{err.kind + ': ' if err.kind else ''}{err.line} (rank {err.peer})"
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


class SweepReport(Callback):
    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if not _rank_zero():
            return
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra = HydraConfig.get()
        job_dir = Path(hydra.runtime.output_dir)
        failed = job_return.status == JobStatus.FAILED
        status = {
            "job": hydra.job.get("num", 0),
            "overrides": list(hydra.overrides.task),
            "status": "failed" if failed else "completed",
            "error": error_line(job_return._return_value) if failed else None,
        }
        job_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(job_dir / STATUS_FILE, (json.dumps(status, indent=2) + "\n").encode())
        if hydra.mode != RunMode.MULTIRUN:  # (one run: its error follows, as Hydra prints it)
            return
        if failed:
            log.error("job %s failed: %s (the sweep goes on)", status["job"], status["error"])
            FAILED_JOBS.append((str(config.hydra.sweep.dir), status["job"]))
        write_sweep_report(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if _rank_zero():
            sweep_dir = Path(config.hydra.sweep.dir)
            written = write_sweep_report(sweep_dir)
            if written:  # (the jobs' lines name their own dirs; this one the sweep's)
                log.info("the sweep's report: %s", ", ".join(str(sweep_dir / f)
                                                             for f in written))


# -- the report ---------------------------------------------------------------------------------
def _read_json(path: Path):
    """A job file's JSON, or a ValueError saying why it cannot be read."""
    try:
        return json.loads(path.read_text())
    except OSError as err:
        raise ValueError(f"cannot read ({err.strerror or err})") from None
    except ValueError as err:
        raise ValueError(f"not JSON ({err})") from None


def job_results(path: Path) -> tuple[float | None, dict]:
    """A job's seconds and each method's mean top-1 and param_ratio from its results.json;
    a ValueError saying what is wrong with the file (one job's must not stop the report)."""
    results = _read_json(path)
    methods = results.get("methods") if isinstance(results, dict) else None
    if not isinstance(methods, dict):
        raise ValueError("no 'methods'")
    out = {}
    for name, r in methods.items():
        got = {k: r.get(k) if isinstance(r, dict) else None
               for k in ("mean_top1", "param_ratio")}
        bad = [k for k, v in got.items() if not is_number(v)]
        if bad:
            raise ValueError(f"'methods.{name}.{bad[0]}' missing or not a finite number")
        out[name] = got
    seconds = results.get("seconds")
    return (seconds if isinstance(seconds, int | float) else None), out


def sweep_rows(sweep_dir: Path) -> list[dict]:
    """One row per job directory below ``sweep_dir`` that recorded a status, by job number
    (then folder name: a folder of single runs holds many a job 0)."""
    rows = []
    for status_file in sweep_dir.glob(f"*/{STATUS_FILE}"):
        try:
            status = _read_status(status_file)
        except ValueError as err:  # (cut short, edited: said in its row, the others stand)
            overrides, _ = _job_overrides(status_file.parent)
            rows.append({"job": _job_number(status_file.parent), "overrides": overrides,
                         "status": "unreadable", "error": f"{STATUS_FILE}: {err}",
                         "dir": status_file.parent.name, "methods": {}, "seconds": None,
                         "values": parse_overrides(overrides)})
            continue
        results_file = status_file.parent / "results.json"
        row = {**status, "dir": status_file.parent.name, "methods": {}, "seconds": None,
               "values": parse_overrides(status["overrides"])}
        if status["status"] == "completed":
            try:
                row["seconds"], row["methods"] = job_results(results_file)
            except ValueError as err:  # (missing, cut short, edited: said in its row)
                row.update(status="unreadable", error=f"results.json: {err}")
        rows.append(row)
    # a job Hydra started that recorded no status (killed, or still running): listed as such
    for overrides_file in sweep_dir.glob("*/.hydra/overrides.yaml"):
        job_dir = overrides_file.parent.parent
        if job_dir.name.isdigit() and not (job_dir / STATUS_FILE).exists():
            overrides, error = _job_overrides(job_dir)
            rows.append({"job": int(job_dir.name), "overrides": overrides,
                         "status": "incomplete", "error": error, "dir": job_dir.name,
                         "methods": {}, "seconds": None, "values": parse_overrides(overrides)})
    return sorted(rows, key=lambda r: (r["job"], r["dir"]))


def _read_status(status_file: Path) -> dict:
    """A job's job_status.json, or a ValueError saying what is wrong with it."""
    status = _read_json(status_file)
    kinds = {"job": int, "status": str, "overrides": list}
    bad = [k for k, kind in kinds.items() if not isinstance(status, dict)
           or not isinstance(status.get(k), kind) or isinstance(status.get(k), bool)]
    if not bad and not all(isinstance(o, str) for o in status["overrides"]):
        bad = ["overrides"]
    if bad:
        raise ValueError(f"'{bad[0]}' missing or of another type")
    return status


def _job_number(job_dir: Path) -> int:
    return int(job_dir.name) if job_dir.name.isdigit() else -1


def _job_overrides(job_dir: Path) -> tuple[list[str], str | None]:
    """The overrides Hydra recorded for a job (its .hydra/overrides.yaml), and what is wrong
    with that file (None: nothing, or no such file)."""
    file = job_dir / ".hydra" / "overrides.yaml"
    if not file.exists():
        return [], None
    try:
        overrides = OmegaConf.load(file)
        if not isinstance(overrides, ListConfig):
            raise ValueError("not a list")
        return [str(o) for o in overrides], None
    except Exception as err:  # noqa: BLE001 - YAML's and OmegaConf's errors: said in its row
        return [], f".hydra/overrides.yaml: cannot read ({type(err).__name__})"


#: a character Hydra's sweeper escapes in a job's overrides (``[a,m.x\\:Cls]``), and its escape
_HYDRA_ESCAPE = re.compile(r"\\([\\()\[\]{}:=, \t])")


def parse_overrides(overrides: list[str]) -> dict[str, str]:
    """``key=value`` overrides as {key: value} (the ``+`` / ``~`` prefix dropped), the values
    as they were typed: without the escapes Hydra's sweeper writes into a job's overrides
    (``m.x\\:Cls`` for ``m.x:Cls``), which the table, the CSV and the figure showed."""
    return {k.lstrip("+~"): _HYDRA_ESCAPE.sub(r"\1", v)
            for k, _, v in (o.partition("=") for o in overrides)}


def varying_keys(rows: list[dict]) -> list[str]:
    """The override keys that some job lacks or sets to another value (what the sweep sweeps),
    in the order they first appear."""
    keys = list(dict.fromkeys(k for r in rows for k in r["values"]))
    return [k for k in keys if len({r["values"].get(k) for r in rows}) > 1]


def override_value(row: dict, key: str) -> str | None:
    return row["values"].get(key)


def pareto_rows(rows: list[dict]) -> list[int]:
    """Indices of the rows no other row beats on both CWPS mean top-1 (higher) and
    param_ratio (lower).

    Compared at 9 decimals: two means of the same per-task accuracies summed in another order
    differ in the last bit (70.22222222222223 and ...21), and that must not decide."""
    pts = {i: (r["methods"]["cwps"]["mean_top1"], r["methods"]["cwps"]["param_ratio"])
           for i, r in enumerate(rows) if "cwps" in r["methods"]}
    pts = {i: (round(t, 9), round(p, 9)) for i, (t, p) in pts.items()
           if math.isfinite(t) and math.isfinite(p)}
    return sorted(i for i, (top1, ratio) in pts.items()
                  if not any(t >= top1 and p <= ratio and (t, p) != (top1, ratio)
                             for k, (t, p) in pts.items() if k != i))


def pareto_jobs(rows: list[dict]) -> list[int]:
    """The job numbers of pareto_rows (one sweep's jobs: each number once)."""
    return [rows[i]["job"] for i in pareto_rows(rows)]


def row_labels(rows: list[dict]) -> tuple[str, list[str]]:
    """What names each row, and the noun for it: ``job`` and its job number, or, where
    numbers repeat (a folder of single runs, each job 0 of its own), ``run`` and its run
    folder."""
    jobs = [r["job"] for r in rows]
    if len(set(jobs)) == len(jobs):
        return "job", [str(j) for j in jobs]
    return "run", [str(r.get("dir", r["job"])) for r in rows]


def sweep_table(rows: list[dict]) -> tuple[str, str]:
    """The sweep table as Markdown and as CSV."""
    methods = sorted({m for r in rows for m in r["methods"]},
                     key=lambda m: (m != "cwps", m))
    keys = varying_keys(rows)
    noun, labels = row_labels(rows)
    head = [noun, *keys, "status"]
    for m in methods:
        head += [f"{m} mean top-1", f"{m} param_ratio"]
    head += ["seconds", "pareto"]
    pareto = pareto_rows(rows)
    body = []
    for i, r in enumerate(rows):
        cells = [labels[i], *[override_value(r, k) or "-" for k in keys],
                 f"{r['status']}: {r['error']}" if r.get("error") else r["status"]]
        for m in methods:
            got = r["methods"].get(m)
            cells += ([f"{got['mean_top1']:.2f}", f"{got['param_ratio']:.3f}"] if got
                      else ["-", "-"])
        cells.append("-" if r["seconds"] is None else f"{r['seconds']:.0f}")
        cells.append("yes" if i in pareto else "")
        body.append(cells)
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(c.replace("|", "/") for c in cells) + " |" for cells in body]
    failed = sum(r["status"] == "failed" for r in rows)
    incomplete = sum(r["status"] == "incomplete" for r in rows)
    unreadable = sum(r["status"] == "unreadable" for r in rows)
    unfinished = (f", {incomplete} incomplete (no {STATUS_FILE}: killed, or still running)"
                  if incomplete else "")
    unfinished += (f", {unreadable} completed with a results.json the report cannot read"
                   if unreadable else "")
    md += ["", f"{len(rows)} {noun}(s), {failed} failed{unfinished}. Mean top-1 (%) over each "
           f"{noun}'s tasks; "
           f"param_ratio as in the {noun}'s results.md. Pareto-optimal (CWPS mean top-1 up, "
           f"param_ratio down): {noun}(s) "
           f"{[int(labels[i]) if noun == 'job' else labels[i] for i in pareto]}."]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(head)
    writer.writerows(body)
    return "\n".join(md) + "\n", buf.getvalue()


def lambda_points(rows: list[dict]) -> list[tuple[float, float, float]]:
    """(lambda, CWPS mean top-1, CWPS param_ratio) of every completed job, by lambda."""
    pts = []
    for r in rows:
        value, cwps = override_value(r, LAMBDA_KEY), r["methods"].get("cwps")
        if value is not None and cwps:
            pts.append((float(value), cwps["mean_top1"], cwps["param_ratio"]))
    return sorted(pts)


def plot_lambda(points: list[tuple[float, float, float]]):
    """The paper's Figure 5: accuracy against lambda, marker area proportional to parameters."""
    from matplotlib.figure import Figure

    from .figures import at_least_span

    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot()
    lam, top1, ratio = zip(*points, strict=True)
    ax.plot(lam, top1, color="0.6", zorder=1)
    ax.scatter(lam, top1, s=[120 * r for r in ratio], alpha=0.7, zorder=2,
               label="CWPS (marker area = param_ratio)")
    for x, y, r in points:
        ax.annotate(f"{r:.2f}x", (x, y), textcoords="offset points", xytext=(8, -12), fontsize=8)
    ax.set_xlabel("lambda (cwps.threshold)")
    ax.set_ylabel("Mean top-1 over tasks (%)")
    ax.margins(x=0.12, y=0.12)  # (the end points and their labels inside the frame)
    at_least_span(ax)
    ax.ticklabel_format(useOffset=False)
    ax.set_title("Accuracy vs lambda (labels: param_ratio)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig


#: the figures a sweep report draws (one of them, or none under two points)
SWEEP_FIGURES = ("lambda.png", "accuracy_vs_params.png")


def write_sweep_report(sweep_dir: Path, rows: list[dict] | None = None) -> list[str]:
    """sweep.md, sweep.csv and the sweep's figures; returns the files written (relative).
    ``rows``: sweep_rows(sweep_dir), where the caller has them already."""
    rows = sweep_rows(sweep_dir) if rows is None else rows
    if not rows:
        return []
    md, csv_text = sweep_table(rows)
    before = sweep_dir / "sweep.md"
    linked = before.read_text(errors="replace") if before.is_file() else ""
    atomic_write(sweep_dir / "sweep.csv", csv_text.encode())
    written = ["sweep.md", "sweep.csv"]
    try:
        figure = sweep_figure(rows, sweep_dir / "figures",
                              drawn_before=[f for f in SWEEP_FIGURES if f"(figures/{f})" in linked])
    except Exception as err:  # noqa: BLE001 - the table stands without its figure
        figure = None
        log.error("the sweep's figure failed (%s: %s); sweep.md and sweep.csv are written "
                  "without it", type(err).__name__, err)
    if figure is not None:
        written.append(f"figures/{figure}")
        md += f"\n![{figure}](figures/{figure})\n"
    atomic_write(sweep_dir / "sweep.md", md.encode())
    return written


def sweep_figure(rows: list[dict], figures_dir: Path,
                 drawn_before: Sequence[str] = ()) -> str | None:
    """Draw the sweep's figure into ``figures_dir`` (Figure 5 for a lambda sweep, accuracy
    against parameters per job otherwise); its file name, or None with under two points
    (jobs at the same point count once).
    ``drawn_before``: the figures the previous report linked, removed where this one draws
    another (or none): a file of that name the report did not draw stays."""
    figure = None
    keys, lambdas = varying_keys(rows), lambda_points(rows)
    if keys == [LAMBDA_KEY] and len(lambdas) >= 2:
        figure = ("lambda.png", plot_lambda(lambdas))
    else:
        from .figures import plot_accuracy_vs_params

        noun, labels = row_labels(rows)
        # (named as the table names the row: its job number or run folder, then its values)
        points = [(f"{noun} {label}" + "".join(
                       f"{', ' if i else ': '}{k}={override_value(r, k)}"
                       for i, k in enumerate(keys)),
                   r["methods"]["cwps"]["param_ratio"], r["methods"]["cwps"]["mean_top1"])
                  for r, label in zip(rows, labels, strict=True) if "cwps" in r["methods"]]
        # (jobs whose CWPS is the same, a sweep over cwps.baselines: one dot hid the others)
        if len({(ratio, top1) for _, ratio, top1 in points}) >= 2:
            figure = ("accuracy_vs_params.png",
                      plot_accuracy_vs_params(
                          points, f"CWPS per {noun}: accuracy vs parameters"))
    # the other figure (or both) a report of fewer jobs drew stays no longer: it would show
    # those jobs alone next to the table of all of them
    for stale in drawn_before:
        if figure is None or stale != figure[0]:
            (figures_dir / stale).unlink(missing_ok=True)
    if figure is None:
        return None
    figures_dir.mkdir(exist_ok=True)
    from .figures import save_figure

    save_figure(figure[1], figures_dir / figure[0])
    return figure[0]
