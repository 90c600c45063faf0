"""benchmarks/tabulate_runs.py: the per-setting table and the matched-ratio comparison, on a
seed_sweep --keep-dir tree written by hand (every figure below worked out by hand)."""

from __future__ import annotations

import json

import pytest

from .helpers import load_benchmark

tab = load_benchmark("tabulate_runs")

TASKS = {"t1": {"specific_channels": 0.25, "mask_flips": {"soft": 10, "hard": 2, "channels": 100}},
         "t2": {"specific_channels": 0.75, "mask_flips": {"soft": 30, "hard": 4, "channels": 200}}}


def write_run(root, name, top1, ratio, tasks=TASKS):
    run = root / name
    run.mkdir(parents=True)
    cwps = {"mean_top1": top1, "param_ratio": ratio, "tasks": tasks}
    (run / "results.json").write_text(json.dumps({"methods": {"cwps": cwps}}))


@pytest.fixture
def sweep_dir(tmp_path):
    write_run(tmp_path, "base_l0.3_s0", 80.0, 1.2)
    write_run(tmp_path, "base_l0.3_s1", 82.0, 1.4)
    write_run(tmp_path, "base_l0.7_s0", 90.0, 2.0)
    write_run(tmp_path, "other_l0.5_s0", 84.0, 1.6)
    write_run(tmp_path, "other_l0.9_s0", 92.0, 2.4)
    write_run(tmp_path, "notes_s3x", 0.0, 9.0)  # not <setting>_s<seed>: not a run
    (tmp_path / "base_l0.3_s2").mkdir()  # a run that left no results.json
    (tmp_path / "junk").mkdir()
    return tmp_path


def test_a_runs_row_averages_its_tasks_in_percent():
    row = tab.run_row({"methods": {"cwps": {"mean_top1": 80.0, "param_ratio": 1.2,
                                            "tasks": TASKS}}})
    # specific (25% + 75%) / 2; soft flips (10/100 + 30/200) / 2; hard (2/100 + 4/200) / 2
    assert row == pytest.approx({"mean_top1": 80.0, "param_ratio": 1.2, "specific": 50.0,
                                 "flips_soft": 12.5, "flips_hard": 2.0})


def test_the_table_has_one_row_per_setting_over_its_seeds(sweep_dir):
    by_setting = tab.collect(sweep_dir)
    assert list(by_setting) == ["base_l0.3", "base_l0.7", "other_l0.5", "other_l0.9"]
    assert [r["seed"] for r in by_setting["base_l0.3"]] == [0, 1]
    lines = tab.table(by_setting).splitlines()
    # 80 and 82: mean 81, sample sd sqrt(2) = 1.41; ratios 1.2 and 1.4: 1.30 +- 0.14
    assert lines[2] == ("| base_l0.3 | 2 | 81.00 +- 1.41 | 1.30 +- 0.14x | 50.0 +- 0.0 | "
                        "12.50 +- 0.00 | 2.00 +- 0.00 |")
    assert lines[3].startswith("| base_l0.7 | 1 | 90.00 +- 0.00 | 2.00 +- 0.00x |")


def test_interpolation_is_linear_inside_the_range_and_none_outside():
    pts = [(2.0, 20.0), (1.0, 10.0)]
    assert tab.interpolate(pts, 1.5) == 15.0
    assert tab.interpolate(pts, 1.25) == 12.5
    assert tab.interpolate(pts, 1.0) == 10.0 and tab.interpolate(pts, 2.0) == 20.0  # the ends
    assert tab.interpolate(pts, 0.5) is None and tab.interpolate(pts, 2.5) is None
    assert tab.interpolate([(1.0, 5.0)], 1.0) == 5.0
    assert tab.interpolate([(1.0, 5.0)], 2.0) is None


def test_curves_go_by_lambda_and_compare_at_the_references_ratio(sweep_dir):
    rows = [{"param_ratio": 1.0, "mean_top1": 1.0}]
    assert [p[0] for p in tab.curves({"c_l0.7": rows, "c_l0.3": rows})["c"]] == [0.3, 0.7]
    found = tab.curves(tab.collect(sweep_dir))
    assert found == {"base": [(0.3, pytest.approx(1.3), 81.0), (0.7, 2.0, 90.0)],
                     "other": [(0.5, 1.6, 84.0), (0.9, 2.4, 92.0)]}
    text = tab.matched_ratio(found, "base")
    # base at 1.3x: outside other's 1.6-2.4x; at 2.0x other reaches 84 + 8 * 0.4 / 0.8 = 88,
    # two points under base's 90
    assert text.splitlines()[-1] == "| other | - | -2.00 |"


def test_main_prints_the_table_and_refuses_an_unknown_reference(sweep_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["tabulate_runs.py", str(sweep_dir), "--reference", "base"])
    tab.main()
    out = capsys.readouterr().out
    assert "| other_l0.9 | 1 |" in out and out.strip().endswith("| other | - | -2.00 |")
    monkeypatch.setattr("sys.argv", ["tabulate_runs.py", str(sweep_dir), "--reference", "nope"])
    with pytest.raises(SystemExit) as stop:
        tab.main()
    said = capsys.readouterr()
    assert stop.value.code == 2 and "no such curve" in said.err
    assert said.out == ""  # refused before the table: no half-written output


def test_a_run_whose_results_cannot_be_read_is_named_and_skipped(sweep_dir, capsys):
    """(a cut-short results.json ended the script in a JSONDecodeError naming no file)"""
    broken = sweep_dir / "base_l0.7_s1" / "results.json"
    broken.parent.mkdir()
    broken.write_text('{"methods": {"cw')
    by_setting = tab.collect(sweep_dir)
    assert [r["seed"] for r in by_setting["base_l0.7"]] == [0]
    assert capsys.readouterr().err.startswith(f"{broken}: skipped, cannot read its CWPS "
                                              f"figures (JSONDecodeError: ")


def test_a_figure_that_is_no_finite_number_is_named_and_when_none_is_read_the_error_says_so(
        tmp_path, monkeypatch, capsys):
    """(a string mean ended the script in a TypeError at the table; a boolean or nan was
    averaged; with every file unreadable the error said there was none)"""
    for i, bad in enumerate(["92", True, float("nan")]):
        write_run(tmp_path, f"base_s{i}", 90.0, 1.2)
        path = tmp_path / f"base_s{i}" / "results.json"
        results = json.loads(path.read_text())
        results["methods"]["cwps"]["mean_top1"] = bad
        path.write_text(json.dumps(results))
    skipped = []
    assert tab.collect(tmp_path, skipped) == {} and len(skipped) == 3
    err = capsys.readouterr().err
    assert "methods.cwps.mean_top1 is '92', not a finite number" in err
    assert "is True," in err and "is nan," in err
    monkeypatch.setattr("sys.argv", ["tabulate_runs.py", str(tmp_path)])
    with pytest.raises(SystemExit) as stop:
        tab.main()
    assert stop.value.code == 2
    assert f"no readable <setting>_s<seed>/results.json under {tmp_path} (3 found, none " \
           "readable: each said above)" in capsys.readouterr().err
