"""results.md's table and notes (report.markdown_table)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from cwps_lightning.report import markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"


def results(tasks=("a", "b")) -> dict:
    def method(top1, ratio, mode=None, label=None):
        out = {"tasks": {t: {"top1": v} for t, v in zip(tasks, top1, strict=True)},
               "mean_top1": sum(top1) / len(top1), "param_ratio": ratio,
               "param_ratio_with_heads": ratio + 0.01, "seconds_per_task": 3.4}
        if mode:
            out["mode"] = mode
        if label:
            out["label"] = label
        return out

    return {"tasks": list(tasks), "backbone": "resnet18", "backbone_params": 11_176_512,
            "methods": {"cwps": method([90.0, 80.5], 1.33, "incremental"),
                        "finetune": method([91.0, 81.0], 3.0, label="Fine-Tuning")}}


def test_table_rows_follow_the_row_order_with_each_methods_figures():
    text = markdown_table(json.loads(json.dumps(results())))
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0].split(" | ")[-3:] == ["b", "Mean", "Time per task |"]
    # fine-tuning first (ROW_ORDER), whatever the order in results.json
    assert rows[1] == "| Fine-Tuning | 3.00x | 3.01x | 91.00 | 81.00 | 86.00 | 3 s |"
    assert rows[2] == "| CWPS-Incremental | 1.33x | 1.34x | 90.00 | 80.50 | 85.25 | 3 s |"


def test_every_readme_section_the_notes_name_exists():
    """The notes send a reader to README sections by name: each is a heading there."""
    text = markdown_table(results())
    named = re.findall(r"README, '([^']+)'", text)
    assert named, "the notes name no README section"
    headings, fenced = set(), False
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced  # (a comment in a code block is no heading)
        elif line.startswith("#") and not fenced:
            headings.add(line.lstrip("#").strip())
    missing = [n for n in named if n not in headings]
    assert not missing, f"results.md names README sections that do not exist: {missing}"


def test_the_ddp_note_appears_for_several_ranks_only():
    one = {**results(), "ranks": {"world_size": 1, "fits_checked_equal": 0}}
    two = {**results(), "ranks": {"world_size": 2, "fits_checked_equal": 6}}
    assert "DDP" not in markdown_table(one)
    assert "DDP: 2 ranks; after each of 6 fits" in markdown_table(two)


def test_results_layout_gap_names_the_first_missing_key():
    from cwps_lightning.report import results_layout_gap

    whole = results()
    assert results_layout_gap(whole) is None
    assert results_layout_gap({**whole, "backbone_params": "11M"}) == "'backbone_params'"
    no_mean = json.loads(json.dumps(whole))
    del no_mean["methods"]["cwps"]["mean_top1"]
    assert results_layout_gap(no_mean) == "'methods.cwps.mean_top1'"

    def edited(edit):
        copy = json.loads(json.dumps(whole))
        edit(copy)
        return results_layout_gap(copy)

    # (each printed as a figure, or failed in the table after the figures were redrawn)
    cwps = lambda r: r["methods"]["cwps"]  # noqa: E731
    assert edited(lambda r: cwps(r).update(mean_top1=True)) == "'methods.cwps.mean_top1'"
    assert edited(lambda r: cwps(r).update(mean_top1=float("nan"))) == \
        "'methods.cwps.mean_top1'"
    assert edited(lambda r: cwps(r)["tasks"]["a"].update(top1=None)) == \
        "'methods.cwps.tasks.a.top1'"
    assert edited(lambda r: cwps(r)["tasks"].update(b=91.0)) == "'methods.cwps.tasks.b.top1'"
    assert edited(lambda r: cwps(r).update(seconds_per_task="3 s")) == \
        "'methods.cwps.seconds_per_task'"
    assert edited(lambda r: cwps(r).update(mode=1)) == "'methods.cwps.mode'"
    assert edited(lambda r: r.update(backbone_params=True)) == "'backbone_params'"
    assert edited(lambda r: cwps(r).update(seconds_per_task=None)) is None


def test_report_help_exits_0_and_bad_arguments_2(capsys):
    """(--help printed the usage as an error and exited 2)"""
    from cwps_lightning.report import main

    assert main(["--help"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("usage: python -m cwps_lightning.report <run dir") and err == ""
    assert main([]) == 2 and main(["a", "b"]) == 2
    assert capsys.readouterr().err.count("usage:") == 2


def test_a_run_that_cannot_be_rebuilt_is_named_and_the_others_and_the_sweep_still_are(
        tmp_path, capsys, monkeypatch):
    """(the first broken run of a multirun stopped the command: the runs after it and the
    sweep's table were not rebuilt)"""
    from cwps_lightning import report
    from cwps_lightning.cwps.store import StoreError
    from cwps_lightning.sweep import STATUS_FILE

    for job in range(3):
        d = tmp_path / str(job)
        d.mkdir()
        (d / STATUS_FILE).write_text(json.dumps({
            "job": job, "overrides": [f"seed={job}"], "status": "completed", "error": None}))
        (d / "results.json").write_text(json.dumps(results()))
    rebuilt = []

    def report_run(run_dir):
        if run_dir.name == "1":
            raise StoreError(f"{run_dir / 'results.json'}: cannot read (cut short)")
        rebuilt.append(run_dir.name)
        return {}

    monkeypatch.setattr(report, "report_run", report_run)
    assert report.main([str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert rebuilt == ["0", "2"] and (tmp_path / "sweep.md").is_file()
    assert f"{tmp_path / '1'}: not rebuilt: {tmp_path / '1' / 'results.json'}: cannot read" in out
    assert err.count("\n") == 1 and err.startswith("error: 1 of 3 run(s) not rebuilt")
    # one run given: its error alone, as before
    assert report.main([str(tmp_path / "1")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / '1' / 'results.json'}: ")
    # a completed job whose results.json is gone is not rebuilt either (it exited 0), and a
    # sweep with none left still gets its table
    (tmp_path / "2" / "results.json").unlink()
    assert report.main([str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert f"{tmp_path / '2'}: not rebuilt: results.json: cannot read" in out
    assert err.startswith("error: 2 of 3 run(s) not rebuilt")
    for job in ("0", "1"):
        (tmp_path / job / "results.json").unlink()
    (tmp_path / "sweep.md").unlink()
    assert report.main([str(tmp_path)]) == 2 and (tmp_path / "sweep.md").is_file()
    assert capsys.readouterr().err.startswith("error: 3 of 3 run(s) not rebuilt")



def test_a_store_another_run_left_in_the_folder_is_refused_before_its_figures(tmp_path):
    """(the figures were drawn from the other run's store next to this run's table)"""
    import pytest

    from cwps_lightning.cwps.store import StoreError
    from cwps_lightning.report import check_store_is_the_runs

    class Store:
        manifest = {"metrics": {"a": {"top1": 90.0, "val_top1": 91.0},
                                "b": {"top1": 80.5, "val_top1": 81.0}}}

    check_store_is_the_runs(Store(), results(), tmp_path)
    Store.manifest["metrics"]["b"]["top1"] = 70.0
    with pytest.raises(StoreError, match=r"not this run's store \(its top-1 of b is 70\.0, "
                                         r"results\.json's 80\.5\)"):
        check_store_is_the_runs(Store(), results(), tmp_path)


def test_a_run_dir_it_cannot_write_in_is_said_before_any_figure(tmp_path, monkeypatch):
    """(the figures were redrawn, then writing results.json failed with a traceback)"""
    import os

    import pytest

    from cwps_lightning import report
    from cwps_lightning.cwps.store import StoreError

    (tmp_path / "results.json").write_text(json.dumps(results()))
    drawn = []
    monkeypatch.setattr(report, "add_figures", lambda *a: drawn.append(a))
    monkeypatch.setattr(os, "access", lambda path, mode: mode != os.W_OK)  # (root ignores modes)
    with pytest.raises(StoreError, match=r"not writable, so its figures and results\.md cannot "):
        report.report_run(tmp_path)
    assert drawn == [] and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
