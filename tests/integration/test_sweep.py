"""A multirun through the real CLI: the sweep report, a failing job, a bad value (sweep.py)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np

from cwps_lightning.sweep import lambda_points, sweep_rows

from .helpers import REPO, TINY, cli_env

ONE_TASK = [*TINY, "data.tasks=[optdigits]", "cwps.baselines=[]"]


def multirun(sweep_dir, cache, *overrides, timeout=600):
    cmd = [sys.executable, "-m", "cwps_lightning.train", "-m", *ONE_TASK,
           f"hydra.sweep.dir={sweep_dir}", f"paths.cache_dir={cache}", *overrides]
    return subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_lambda_sweep_writes_table_and_figure5(tmp_path, t0_cache):
    """Three lambdas: the sweep table (Markdown, CSV) and Figure 5 show each job's numbers."""
    sweep = tmp_path / "sweep"
    proc = multirun(sweep, t0_cache, "cwps.threshold=0.2,0.5,0.8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = sweep_rows(sweep)
    assert [r["status"] for r in rows] == ["completed"] * 3
    results = [json.loads((sweep / r["dir"] / "results.json").read_text()) for r in rows]
    # the report's numbers are the jobs' own
    points = lambda_points(rows)
    assert [p[0] for p in points] == [0.2, 0.5, 0.8]
    for (lam, top1, ratio), res in zip(points, results, strict=True):
        assert res["config"]["cwps"]["threshold"] == lam
        assert (top1, ratio) == (res["methods"]["cwps"]["mean_top1"],
                                 res["methods"]["cwps"]["param_ratio"])
    with open(sweep / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert [row["cwps.threshold"] for row in table] == ["0.2", "0.5", "0.8"]
    assert np.allclose([float(row["cwps param_ratio"]) for row in table],
                       [p[2] for p in points], atol=5e-4)
    assert (sweep / "figures" / "lambda.png").stat().st_size > 0
    assert "![lambda.png](figures/lambda.png)" in (sweep / "sweep.md").read_text()
    # the end says where the sweep's report is (the jobs' lines name the jobs' dirs only)
    assert f"the sweep's report: {sweep / 'sweep.md'}, {sweep / 'sweep.csv'}, " \
           f"{sweep / 'figures' / 'lambda.png'}" in proc.stdout + proc.stderr


def test_a_job_that_fails_does_not_stop_the_sweep(tmp_path, t0_cache):
    """A T0 weights file that is not one fails its job while running (the checks before the
    sweep see only that it exists): the other job runs, the report lists the failure with its
    error line, and the multirun exits non-zero at the end."""
    sweep = tmp_path / "sweep"
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    proc = multirun(sweep, t0_cache, "data.tasks=[optdigits]", f"model.weights={junk},null")
    assert proc.returncode != 0  # at the end, after every job ran
    rows = sweep_rows(sweep)
    assert [r["status"] for r in rows] == ["failed", "completed"]
    # (12 test images at this size: 0% is a possible draw, so only the range is checked)
    assert "model.weights" in rows[0]["error"] and 0.0 <= rows[1]["methods"]["cwps"]["mean_top1"] <= 100
    md = (sweep / "sweep.md").read_text()
    assert f"| failed: ModelConfigError: model.weights: cannot read '{junk}'" in md
    assert "2 job(s), 1 failed" in md
    # the project's error as one line at the end (no traceback), then which jobs failed
    assert "Traceback" not in proc.stderr
    assert f"job 0 failed: ModelConfigError: model.weights: cannot read '{junk}'" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: 1 job(s) of the sweep failed ([0]); see {sweep}/sweep.md")


def test_a_bad_lambda_stops_the_sweep_before_any_job(tmp_path, t0_cache):
    sweep = tmp_path / "sweep"
    proc = multirun(sweep, t0_cache, "cwps.threshold=0.5,1.5", timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "1.5" in lines[0] and "job 1 of the sweep" in lines[0]
    assert not sweep.exists()


def test_figure5_plots_each_lambdas_accuracy_with_area_by_parameters():
    from cwps_lightning.sweep import plot_lambda

    fig = plot_lambda([(0.3, 90.0, 2.0), (0.7, 85.0, 1.25)])
    dots = fig.axes[0].collections[0]
    assert np.allclose(dots.get_offsets(), [[0.3, 90.0], [0.7, 85.0]])
    assert np.allclose(dots.get_sizes(), [240.0, 150.0])
    assert [t.get_text() for t in fig.axes[0].texts] == ["2.00x", "1.25x"]
    # every value label inside the frame (the right end's ran past it)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    ax = fig.axes[0]
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    frame = ax.get_window_extent(renderer)
    for text in ax.texts:
        box = text.get_window_extent(renderer)
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0, text


def test_a_completed_job_whose_results_cannot_be_read_is_marked_and_the_rest_reported(tmp_path):
    """(one cut-short or edited results.json stopped the whole sweep report; a missing one
    gave a 'completed' row of dashes without a word)"""
    from cwps_lightning.sweep import sweep_table, write_sweep_report

    job_dir(tmp_path, 0, ["cwps.threshold=0.3"], cwps=(90.0, 1.3))
    job_dir(tmp_path, 1, ["cwps.threshold=0.5"], cwps=(91.0, 1.2))
    path = tmp_path / "1" / "results.json"
    path.write_text(path.read_text()[:30])
    job_dir(tmp_path, 2, ["cwps.threshold=0.7"])  # (completed, its results.json gone)
    job_dir(tmp_path, 3, ["cwps.threshold=0.9"], cwps=(92.0, 1.1))
    path = tmp_path / "3" / "results.json"
    path.write_text(path.read_text().replace("92.0", '"92"'))
    rows = sweep_rows(tmp_path)
    assert [r["status"] for r in rows] == ["completed", "unreadable", "unreadable", "unreadable"]
    assert rows[1]["error"].startswith("results.json: not JSON (")
    assert rows[2]["error"] == "results.json: cannot read (No such file or directory)"
    assert rows[3]["error"] == ("results.json: 'methods.cwps.mean_top1' missing or not a finite "
                                "number")
    md, _ = sweep_table(rows)
    assert "| 0 | 0.3 | completed | 90.00 | 1.300 | 7 | yes |" in md
    assert "| 2 | 0.7 | unreadable: results.json: cannot read (No such file or directory) | - " \
           "| - | - |  |" in md
    assert "4 job(s), 0 failed, 3 completed with a results.json the report cannot read." in md
    assert write_sweep_report(tmp_path)[:2] == ["sweep.md", "sweep.csv"]


def test_the_table_shows_values_as_typed_not_with_hydras_escapes(tmp_path):
    """Hydra's sweeper writes ``m.x\\:Cls`` into a job's overrides for ``m.x:Cls``: the table,
    the CSV and the figure's legend showed the backslash."""
    from cwps_lightning.sweep import sweep_table, write_sweep_report

    job_dir(tmp_path, 0, ["cwps.baselines=[finetune]"], cwps=(90.0, 1.3))
    job_dir(tmp_path, 1, ["cwps.baselines=[taps,mine.last\\:Last]"], cwps=(90.0, 1.3))
    rows = sweep_rows(tmp_path)
    assert [r["values"]["cwps.baselines"] for r in rows] == ["[finetune]",
                                                            "[taps,mine.last:Last]"]
    md, csv_text = sweep_table(rows)
    assert "| 1 | [taps,mine.last:Last] |" in md and "\\" not in md + csv_text
    # CWPS is the same in both jobs (the baselines do not change it): no figure of one dot
    # hiding the other
    assert write_sweep_report(tmp_path) == ["sweep.md", "sweep.csv"]
    job_dir(tmp_path, 2, ["cwps.baselines=[]"], cwps=(91.5, 1.2))
    assert write_sweep_report(tmp_path)[-1] == "figures/accuracy_vs_params.png"


def test_a_figure_of_fewer_jobs_does_not_stay_next_to_the_table(tmp_path):
    """After two jobs only lambda varied (lambda.png); a third job with another key made the
    report draw accuracy_vs_params.png, and the lambda figure of two jobs stayed."""
    from cwps_lightning.sweep import write_sweep_report

    job_dir(tmp_path, 0, ["cwps.threshold=0.3", "data.limit_per_task=10"], cwps=(90.0, 1.3))
    job_dir(tmp_path, 1, ["cwps.threshold=0.7", "data.limit_per_task=10"], cwps=(91.0, 1.2))
    assert write_sweep_report(tmp_path)[-1] == "figures/lambda.png"
    job_dir(tmp_path, 2, ["cwps.threshold=0.3", "data.limit_per_task=200"], cwps=(92.0, 1.1))
    assert write_sweep_report(tmp_path)[-1] == "figures/accuracy_vs_params.png"
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == [
        "accuracy_vs_params.png"]
    # under two points: no figure at all, and none left over
    for job in ("1", "2"):
        (tmp_path / job / "results.json").unlink()
    assert write_sweep_report(tmp_path) == ["sweep.md", "sweep.csv"]
    assert list((tmp_path / "figures").iterdir()) == []
    # a file of that name the report did not draw (a folder of single runs) stays
    (tmp_path / "figures" / "lambda.png").write_bytes(b"mine")
    assert write_sweep_report(tmp_path) == ["sweep.md", "sweep.csv"]
    assert (tmp_path / "figures" / "lambda.png").read_bytes() == b"mine"


def test_pareto_jobs_are_those_no_other_job_beats_on_both_objectives():
    from cwps_lightning.sweep import pareto_jobs

    def row(job, top1, ratio):
        return {"job": job, "methods": {"cwps": {"mean_top1": top1, "param_ratio": ratio}}}

    rows = [row(0, 90.0, 1.5), row(1, 91.0, 1.4), row(2, 89.0, 1.1), row(3, 91.0, 1.4),
            row(4, 88.0, 1.2), {"job": 5, "methods": {}}]
    assert pareto_jobs(rows) == [1, 2, 3]  # 0 is beaten by 1, 4 by 2; ties both stay
    # equal means whose float sums rounded apart (a lambda sweep's jobs 0 and 1): the higher
    # ratio is beaten all the same
    assert pareto_jobs([row(0, 70.22222222222223, 4.0), row(1, 70.22222222222221, 2.3)]) == [1]


def test_optuna_search_of_three_trials_runs_and_reports_its_pareto_jobs(tmp_path, t0_cache):
    sweep = tmp_path / "sweep"
    proc = multirun(sweep, t0_cache, "hparams_search=cwps_optuna", "hydra.sweeper.n_trials=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = sweep_rows(sweep)
    assert [r["status"] for r in rows] == ["completed"] * 3
    for r in rows:
        res = json.loads((sweep / r["dir"] / "results.json").read_text())
        assert 0.1 <= res["config"]["cwps"]["threshold"] <= 0.9
        assert 0.002 <= res["config"]["optim"]["mask_lr"] <= 0.2
    with open(sweep / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert {"cwps.threshold", "optim.mask_lr", "pareto"} <= set(table[0])
    assert any(row["pareto"] == "yes" for row in table)
    # the sweeper saw both objectives: its Pareto solutions are the report's Pareto jobs
    from omegaconf import OmegaConf

    from cwps_lightning.sweep import pareto_jobs

    solutions = OmegaConf.load(sweep / "optimization_results.yaml").solutions
    got = sorted(tuple(s["values"]) for s in solutions)
    ours = sorted((r["methods"]["cwps"]["mean_top1"], r["methods"]["cwps"]["param_ratio"])
                  for r in rows if r["job"] in pareto_jobs(rows))
    assert got == ours and all(len(v) == 2 for v in got)


def test_a_backbone_sweep_plots_accuracy_vs_params_per_job(tmp_path):
    from cwps_lightning.sweep import STATUS_FILE, write_sweep_report

    for job, (name, top1, ratio) in enumerate([("resnet18", 90.0, 1.3), ("resnet34", 92.0, 1.2)]):
        d = tmp_path / str(job)
        d.mkdir()
        (d / STATUS_FILE).write_text(json.dumps({
            "job": job, "overrides": [f"model.name={name}", "seed=0"], "status": "completed",
            "error": None}))
        (d / "results.json").write_text(json.dumps({"seconds": 5.0, "methods": {
            "cwps": {"mean_top1": top1, "param_ratio": ratio}}}))
    written = write_sweep_report(tmp_path)
    assert written == ["sweep.md", "sweep.csv", "figures/accuracy_vs_params.png"]
    md = (tmp_path / "sweep.md").read_text()
    assert "| job | model.name | status |" in md and "seed" not in md.split("\n")[0]
    assert "| 1 | resnet34 | completed | 92.00 | 1.200 | 5 | yes |" in md
    assert "| 0 | resnet18 | completed | 90.00 | 1.300 | 5 |  |" in md


def test_a_job_that_recorded_no_status_is_listed_as_incomplete(tmp_path):
    """(a killed job, or one still running, has Hydra's overrides.yaml but no job status)"""
    from cwps_lightning.sweep import STATUS_FILE, write_sweep_report

    (tmp_path / "0").mkdir()
    (tmp_path / "0" / STATUS_FILE).write_text(json.dumps({
        "job": 0, "overrides": ["cwps.threshold=0.3"], "status": "completed", "error": None}))
    (tmp_path / "0" / "results.json").write_text(json.dumps({"seconds": 5.0, "methods": {
        "cwps": {"mean_top1": 90.0, "param_ratio": 1.3}}}))
    (tmp_path / "1" / ".hydra").mkdir(parents=True)
    (tmp_path / "1" / ".hydra" / "overrides.yaml").write_text("- cwps.threshold=0.5\n")
    write_sweep_report(tmp_path)
    md = (tmp_path / "sweep.md").read_text()
    assert "| 1 | 0.5 | incomplete | - | - | - |  |" in md
    assert "2 job(s), 0 failed, 1 incomplete (no job_status.json: killed, or still running)." in md


def test_a_job_status_or_overrides_file_that_cannot_be_read_is_marked_and_the_rest_reported(
        tmp_path):
    """(a cut-short job_status.json, or a garbage overrides.yaml of a job without one, stopped
    the whole report with a traceback; a boolean or nan accuracy was reported as a number)"""
    from cwps_lightning.sweep import STATUS_FILE, write_sweep_report

    job_dir(tmp_path, 0, ["cwps.threshold=0.3"], cwps=(90.0, 1.3))
    job_dir(tmp_path, 1, ["cwps.threshold=0.5"], cwps=(91.0, 1.2))
    status = tmp_path / "1" / STATUS_FILE
    status.write_text(status.read_text()[:20])
    job_dir(tmp_path, 2, ["cwps.threshold=0.7"], cwps=(92.0, 1.1))
    (tmp_path / "2" / STATUS_FILE).write_text(json.dumps({"job": 2, "status": "completed"}))
    (tmp_path / "3" / ".hydra").mkdir(parents=True)
    (tmp_path / "3" / ".hydra" / "overrides.yaml").write_text("{[: not yaml\x00")
    job_dir(tmp_path, 4, ["cwps.threshold=0.9"], cwps=(93.0, 1.0))
    path = tmp_path / "4" / "results.json"
    path.write_text(path.read_text().replace("93.0", "true"))
    job_dir(tmp_path, 5, ["cwps.threshold=1.0"], cwps=(94.0, 1.0))
    path = tmp_path / "5" / "results.json"
    path.write_text(path.read_text().replace("94.0", "NaN"))
    rows = sweep_rows(tmp_path)
    assert [(r["job"], r["status"]) for r in rows] == [
        (0, "completed"), (1, "unreadable"), (2, "unreadable"), (3, "incomplete"),
        (4, "unreadable"), (5, "unreadable")]
    assert rows[1]["error"].startswith("job_status.json: not JSON (")
    assert rows[1]["values"] == {"cwps.threshold": "0.5"}  # (from Hydra's record)
    assert rows[2]["error"] == "job_status.json: 'overrides' missing or of another type"
    assert rows[3]["error"].startswith(".hydra/overrides.yaml: cannot read (")
    assert rows[4]["error"] == ("results.json: 'methods.cwps.mean_top1' missing or not a finite "
                                "number")
    assert rows[5]["error"] == rows[4]["error"]
    assert write_sweep_report(tmp_path)[:2] == ["sweep.md", "sweep.csv"]
    assert "| 0 | 0.3 | completed | 90.00 |" in (tmp_path / "sweep.md").read_text()


def test_optuna_search_goes_on_after_a_failed_trial_and_exits_non_zero(tmp_path, t0_cache):
    """The preset tolerates failed trials (max_failure_rate: 1.0): every trial runs, each is in
    the report, and the command still ends with status 1 and one line saying so."""
    sweep = tmp_path / "sweep"
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    proc = multirun(sweep, t0_cache, "hparams_search=cwps_optuna", "hydra.sweeper.n_trials=2",
                    f"model.weights={junk}", timeout=300)
    assert proc.returncode == 1
    assert [r["status"] for r in sweep_rows(sweep)] == ["failed", "failed"]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: 2 job(s) of the sweep failed ([0, 1]); see {sweep}/sweep.md")


def test_a_machine_without_matplotlib_gets_the_sweep_table_without_its_figure(
        tmp_path, monkeypatch, caplog):
    import sys

    from cwps_lightning.sweep import STATUS_FILE, write_sweep_report

    for job, lam in enumerate((0.3, 0.7)):
        d = tmp_path / str(job)
        d.mkdir()
        (d / STATUS_FILE).write_text(json.dumps({
            "job": job, "overrides": [f"cwps.threshold={lam}"], "status": "completed",
            "error": None}))
        (d / "results.json").write_text(json.dumps({"seconds": 5.0, "methods": {
            "cwps": {"mean_top1": 90.0 + job, "param_ratio": 1.5 - job / 10}}}))
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # what an import then meets
    assert write_sweep_report(tmp_path) == ["sweep.md", "sweep.csv"]
    assert "| 1 | 0.7 | completed | 91.00 |" in (tmp_path / "sweep.md").read_text()
    assert "ModuleNotFoundError" in caplog.text and not (tmp_path / "figures").exists()


def job_dir(sweep, job, overrides, status="completed", error=None, cwps=None):
    """A job directory as a multirun leaves it (Hydra's overrides.yaml, the job's status and,
    where given, its results.json)."""
    d = sweep / str(job)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (d / "job_status.json").write_text(json.dumps({
        "job": job, "overrides": overrides, "status": status, "error": error}))
    if cwps is not None:
        (d / "results.json").write_text(json.dumps({"seconds": 7.0, "methods": {
            "cwps": {"mean_top1": cwps[0], "param_ratio": cwps[1]}}}))


def test_sweep_rows_one_per_job_and_a_failed_jobs_results_are_not_read(tmp_path):
    from cwps_lightning.sweep import sweep_table

    job_dir(tmp_path, 0, ["+cwps.threshold=0.7"], cwps=(90.0, 1.3))
    job_dir(tmp_path, 1, ["+cwps.threshold=0.3"], status="failed",
            error="RuntimeError: a|b", cwps=(99.0, 1.0))
    rows = sweep_rows(tmp_path)
    assert [(r["job"], r["status"], r["values"]) for r in rows] == [
        (0, "completed", {"cwps.threshold": "0.7"}), (1, "failed", {"cwps.threshold": "0.3"})]
    assert rows[1]["methods"] == {} and rows[1]["seconds"] is None
    md, _ = sweep_table(rows)
    assert "| 1 | 0.3 | failed: RuntimeError: a/b | - | - | - |  |" in md


def test_lambda_points_are_in_lambda_order():
    def row(job, lam):
        return {"job": job, "values": {"cwps.threshold": lam},
                "methods": {"cwps": {"mean_top1": 80.0 + job, "param_ratio": 1.0 + job}}}

    assert lambda_points([row(0, "0.7"), row(1, "0.3"), {"job": 2, "values": {},
                                                          "methods": {}}]) == [
        (0.3, 81.0, 2.0), (0.7, 80.0, 1.0)]


def test_pareto_counts_a_tie_on_one_objective_as_beaten_and_leaves_out_nan():
    from cwps_lightning.sweep import pareto_jobs

    def row(job, top1, ratio):
        return {"job": job, "methods": {"cwps": {"mean_top1": top1, "param_ratio": ratio}}}

    rows = [row(0, 90.0, 1.5), row(1, 90.0, 1.4), row(2, 89.0, 1.4), row(3, float("nan"), 1.0)]
    assert pareto_jobs(rows) == [1]


def test_sweep_table_puts_cwps_first():
    from cwps_lightning.sweep import sweep_table

    methods = {m: {"mean_top1": 80.0, "param_ratio": 2.0} for m in ("finetune", "bn", "cwps")}
    md, csv_text = sweep_table([{"job": 0, "values": {}, "status": "completed", "error": None,
                                 "methods": methods, "seconds": 3.0}])
    assert next(csv.reader(csv_text.splitlines())) == [
        "job", "status", "cwps mean top-1", "cwps param_ratio", "bn mean top-1",
        "bn param_ratio", "finetune mean top-1", "finetune param_ratio", "seconds", "pareto"]


def test_error_line_is_the_type_and_the_first_line():
    from cwps_lightning.sweep import error_line

    assert error_line(ValueError("first\nsecond")) == "ValueError: first"
    assert error_line(RuntimeError()) == "RuntimeError"


def test_a_failed_jobs_error_keeps_its_line_and_job_when_pickled():
    """(a launcher that runs jobs in other processes sends the exception back pickled)"""
    import pickle

    from cwps_lightning.sweep import SweepJobFailed, error_line

    err = pickle.loads(pickle.dumps(SweepJobFailed("DataConfigError: no split files", 3)))
    assert (err.line, err.job) == ("DataConfigError: no split files", 3)
    assert str(err) == "job 3 failed: DataConfigError: no split files"
    assert error_line(err) == "DataConfigError: no split files"  # the report's line, as it was


def test_another_ranks_error_keeps_its_line_rank_and_status_when_pickled():
    """The report's line for a bad image reads the same whichever rank read it (rank 0's
    own: "DataConfigError: ..."), with the rank that did after it."""
    import pickle

    from cwps_lightning.data.base import DataConfigError
    from cwps_lightning.distributed import PeerStopped
    from cwps_lightning.sweep import error_line

    err = pickle.loads(pickle.dumps(PeerStopped(1, "cannot read image x.jpg", 2,
                                                "DataConfigError")))
    assert (err.peer, str(err), err.status, err.kind) == (
        1, "cannot read image x.jpg", 2, "DataConfigError")
    own = error_line(DataConfigError("cannot read image x.jpg"))
    assert error_line(err) == f"{own} (rank 1)" == "DataConfigError: cannot read image x.jpg (rank 1)"
    # a crash's line names its class already
    assert error_line(PeerStopped(2, "KeyError: 'w'", 1)) == "KeyError: 'w' (rank 2)"


def test_a_sweep_over_lambda_and_another_key_is_no_figure5(tmp_path):
    from cwps_lightning.sweep import sweep_figure

    for job, (lam, seed) in enumerate([("0.3", "0"), ("0.7", "1")]):
        job_dir(tmp_path, job, [f"cwps.threshold={lam}", f"seed={seed}"],
                cwps=(90.0 - job, 1.5 - job / 10))
    assert sweep_figure(sweep_rows(tmp_path), tmp_path / "figures") == "accuracy_vs_params.png"


def test_a_key_that_some_job_lacks_varies():
    from cwps_lightning.sweep import varying_keys

    rows = [{"values": {"seed": "0", "model.name": "a"}}, {"values": {"model.name": "a"}}]
    assert varying_keys(rows) == ["seed"]


def test_sigterm_stops_the_whole_sweep_not_only_its_job(tmp_path, t0_cache):
    """A signal in a job's fit ends the process with the job's line and 143; the sweep's
    other jobs do not start (a job's own error would let them run)."""
    import signal
    import time

    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "cwps_lightning.train", "-m", *ONE_TASK,
           "data.limit_per_task=600", "cwps.stages.hard_epochs=3",
           f"hydra.sweep.dir={sweep_dir}", f"paths.cache_dir={t0_cache}",
           "cwps.threshold=0.5,0.7"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    log = sweep_dir / "0" / "train.log"
    try:
        deadline = time.monotonic() + 240
        while "[2/2]" not in (log.read_text() if log.exists() else ""):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.2)
        time.sleep(1.0)  # (inside the mask fit)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert [line for line in err.splitlines() if line.startswith("error")] == [
        line for line in err.splitlines() if "stopped by SIGTERM" in line][:1]
    assert not (sweep_dir / "1").exists()


def test_a_folder_of_single_runs_tells_the_runs_apart_and_finds_their_pareto_runs(
        tmp_path, monkeypatch):
    """Every single run is job 0 of its own: the report keyed its Pareto set by job number,
    marked every row 'yes' (59.52 at 1.815 next to 72.62 at 1.247) and said 'job(s) [0]'."""
    import numpy as np

    from cwps_lightning import figures
    from cwps_lightning.sweep import STATUS_FILE, sweep_rows, write_sweep_report

    drawn = []
    plot = figures.plot_accuracy_vs_params
    monkeypatch.setattr(figures, "plot_accuracy_vs_params",
                        lambda *a, **k: drawn.append(plot(*a, **k)) or drawn[-1])

    for name, top1, ratio in [("b_run", 59.52, 1.815), ("a_run", 72.62, 1.247),
                              ("c_run", 70.0, 1.1)]:
        d = tmp_path / name
        d.mkdir()
        (d / STATUS_FILE).write_text(json.dumps({
            "job": 0, "overrides": [], "status": "completed", "error": None}))
        (d / "results.json").write_text(json.dumps({"seconds": 5.0, "methods": {
            "cwps": {"mean_top1": top1, "param_ratio": ratio}}}))
    assert [r["dir"] for r in sweep_rows(tmp_path)] == ["a_run", "b_run", "c_run"]
    assert write_sweep_report(tmp_path)[-1] == "figures/accuracy_vs_params.png"
    md = (tmp_path / "sweep.md").read_text()
    assert "| run | status |" in md
    assert "| a_run | completed | 72.62 | 1.247 | 5 | yes |" in md
    assert "| b_run | completed | 59.52 | 1.815 | 5 |  |" in md
    assert "| c_run | completed | 70.00 | 1.100 | 5 | yes |" in md
    assert "param_ratio down): run(s) ['a_run', 'c_run']." in md
    (fig,) = drawn
    ax = fig.axes[0]
    assert ax.get_title() == "CWPS per run: accuracy vs parameters"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["run a_run", "run b_run",
                                                                   "run c_run"]
    # runs made with other overrides: each named by its folder, as the table names it, then
    # what differs
    for name, size in (("a_run", 32), ("b_run", 64), ("c_run", 64)):
        status = json.loads((tmp_path / name / STATUS_FILE).read_text())
        status["overrides"] = [f"data.image_size={size}"]
        (tmp_path / name / STATUS_FILE).write_text(json.dumps(status))
    write_sweep_report(tmp_path)
    assert [t.get_text() for t in drawn[-1].axes[0].get_legend().get_texts()] == [
        "run a_run: data.image_size=32", "run b_run: data.image_size=64",
        "run c_run: data.image_size=64"]
    assert np.allclose(np.concatenate([c.get_offsets() for c in ax.collections]),
                       [[1.247, 72.62], [1.815, 59.52], [1.1, 70.0]])
