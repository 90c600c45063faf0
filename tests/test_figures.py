"""The run's figures plot the numbers they claim (figures.py), and the report command rebuilds
them from disk (report.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cwps_lightning import figures
from cwps_lightning.cwps import KernelBank, MultiTaskStore, save_store
from cwps_lightning.report import main as report_main
from cwps_lightning.report import write_results

from .helpers import Small

TASKS = ["a", "b"]


def small_store(tmp_path) -> MultiTaskStore:
    """T0, then task a sharing conv1's first 5 channels with T0, then task b sharing conv1's
    channels 0-1 with T0 and 5-6 with a; every other channel task-specific."""
    torch.manual_seed(0)
    t0 = Small()
    bank = KernelBank(["conv1", "conv2", "fc"])
    bank.add("T0", t0, 3)
    a = Small()
    ids_a = {n: torch.full((c,), -1) for n, c in (("conv1", 8), ("conv2", 6), ("fc", 10))}
    ids_a["conv1"][:5] = bank.entries["T0"].layers["conv1"].ids[:5]
    with torch.no_grad():
        a.conv1.weight[:5] = t0.conv1.weight[:5]
        a.conv1.bias[:5] = t0.conv1.bias[:5]
    bank.add("a", a, 3, kernel_ids=ids_a)
    b = Small()
    ids_b = {n: torch.full((c,), -1) for n, c in (("conv1", 8), ("conv2", 6), ("fc", 10))}
    ids_b["conv1"][:2] = bank.entries["T0"].layers["conv1"].ids[:2]
    ids_b["conv1"][5:7] = bank.entries["a"].layers["conv1"].ids[5:7]
    with torch.no_grad():  # (a shared channel holds its parent's kernel: the bank checks)
        for rows, src in ((slice(0, 2), t0), (slice(5, 7), a)):
            b.conv1.weight[rows] = src.conv1.weight[rows]
            b.conv1.bias[rows] = src.conv1.bias[rows]
    bank.add("b", b, 3, kernel_ids=ids_b)
    save_store(tmp_path / "store", bank, {})
    return MultiTaskStore.load(tmp_path / "store")


def results_of() -> dict:
    history = [
        {"iteration": 0, "task": "a", "accepted": True, "val_top1": 80.0, "top1": 70.0},
        {"iteration": 0, "task": "b", "accepted": True, "val_top1": 60.0, "top1": 50.0},
        {"iteration": 1, "task": "a", "accepted": False, "val_top1": 75.0, "top1": 90.0},
        {"iteration": 1, "task": "b", "accepted": True, "val_top1": 65.0, "top1": 58.0},
    ]
    by_layer = {"a": {"conv1": 3 / 8, "conv2": 1.0, "fc": 1.0},
                "b": {"conv1": 4 / 8, "conv2": 1.0, "fc": 0.5}}
    cwps = {"mode": "joint", "param_ratio": 1.5, "param_ratio_with_heads": 1.52, "mean_top1": 64.0, "history": history,
            "tasks": {t: {"top1": 1.0, "specific_by_layer": by_layer[t]} for t in TASKS}}
    return {
        "backbone": "small", "tasks": TASKS, "backbone_params": 100,
        "methods": {"cwps": cwps,
                    "finetune": {"label": "Fine-Tuning", "param_ratio": 3.0, "param_ratio_with_heads": 3.04, "mean_top1": 66.0,
                                 "tasks": {t: {"top1": 1.0} for t in TASKS}}},
    }


def test_relation_heatmap_and_graph_plot_the_stores_shared_channels(tmp_path):
    store = small_store(tmp_path)
    tasks, mat = store.relation_matrix()
    # by hand: T0-a share conv1 0-4 (5), T0-b 0-1 (2), a-b 0-1 and 5-6 (4)
    expected = np.array([[24, 5, 2], [5, 24, 4], [2, 4, 24]])
    assert tasks == ["T0", "a", "b"] and np.array_equal(mat.numpy(), expected)
    fig = figures.plot_relation_heatmap(tasks, mat.numpy(), 24)
    ax = fig.axes[0]
    shown = np.ma.filled(ax.images[0].get_array(), np.nan)
    off = ~np.eye(3, dtype=bool)
    assert np.array_equal(shown[off], expected[off]) and np.isnan(np.diag(shown)).all()
    assert sorted(t.get_text() for t in ax.texts) == sorted(["5", "2", "5", "4", "2", "4"])
    graph = figures.plot_relation_graph(tasks, mat.numpy())
    widths = sorted(line.get_linewidth() for line in graph.axes[0].lines)
    assert widths == [1.0, pytest.approx(1.0 + 9.0 * 2 / 3), 10.0]  # 2, 4, 5 shared


def test_accuracy_vs_params_plots_every_method(tmp_path):
    results = results_of()
    fig = figures.plot_accuracy_vs_params(figures.method_points(results), "t")
    ax = fig.axes[0]
    points = sorted(tuple(c.get_offsets()[0]) for c in ax.collections)
    assert points == [(1.5, 64.0), (3.0, 66.0)]
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == [
        "CWPS-Joint", "Fine-Tuning"]


def test_specific_by_layer_plots_percentages_per_task():
    by = results_of()["methods"]["cwps"]["tasks"]
    fig = figures.plot_specific_by_layer(["conv1", "conv2", "fc"],
                                         {t: list(by[t]["specific_by_layer"].values())
                                          for t in TASKS})
    lines = {line.get_label(): list(line.get_ydata()) for line in fig.axes[0].lines}
    assert lines == {"a": [37.5, 100.0, 100.0], "b": [50.0, 100.0, 50.0]}


def test_first_layer_kernels_frame_shared_and_specific_channels(tmp_path):
    store = small_store(tmp_path)
    flags = figures.shared_flags(store, "conv1")
    assert flags["T0"].tolist() == [True] * 5 + [False] * 3
    assert flags["a"].tolist() == [True] * 7 + [False]
    assert flags["b"].tolist() == [True, True, False, False, False, True, True, False]
    tiles = {t: figures.kernel_tiles(store.state_dict(t)["conv1.weight"]) for t in store.tasks}
    fig, order = figures.plot_first_layer_kernels("conv1", tiles, flags)
    # the legend is below the axis label, not over it (it was with resnet18's 64 kernels of
    # 7x7 in two rows, T0 and a task: a wide, low image)
    wide = {t: np.random.default_rng(0).random((64, 7, 7, 3)) for t in ("T0", "a")}
    wide_flags = {t: np.arange(64) % (2 + k) == 0 for k, t in enumerate(wide)}
    for shown in (fig, figures.plot_first_layer_kernels("conv1", wide, wide_flags)[0]):
        renderer = _drawn(shown)
        ax = shown.axes[0]
        label = ax.xaxis.label.get_window_extent(renderer)
        assert ax.get_legend().get_window_extent(renderer).y1 < label.y0
    # columns: shared by 3 tasks (0, 1), then by 2 (2, 3, 4, 5, 6), then by none (7)
    assert order.tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    grid = fig.axes[0].images[0].get_array()
    cell_h, cell_w = 3 + 3, 3 + 3  # 3x3 kernels, a 1-pixel frame each side, a 1-pixel gap
    for r, task in enumerate(store.tasks):
        for c, ch in enumerate(order):
            corner = grid[r * cell_h, c * cell_w]
            expected = figures.SHARED_RGB if flags[task][ch] else figures.SPECIFIC_RGB
            assert np.allclose(corner, expected), (task, ch)
            inner = grid[r * cell_h + 1:r * cell_h + 4, c * cell_w + 1:c * cell_w + 4]
            assert np.allclose(inner, tiles[task][ch])


def test_joint_iterations_plot_every_visit_and_the_kept_mean():
    results = results_of()
    fig = figures.plot_joint_iterations(results["methods"]["cwps"]["history"], TASKS)
    lines = {line.get_label(): list(line.get_ydata()) for line in fig.axes[0].lines}
    assert lines["a (test)"] == [70.0, 90.0] and lines["b (test)"] == [50.0, 58.0]
    # kept after iteration 0: a 70, b 50; after 1: a stays 70 (rejected), b 58
    assert lines["mean test top-1 of the kept models"] == [60.0, 64.0]
    hollow = [c for c in fig.axes[0].collections
              if np.allclose(c.get_facecolor()[0], (1, 1, 1, 1))]
    assert [tuple(c.get_offsets()[0]) for c in hollow] == [(1.0, 90.0)]
    # the legend says what the dashes and the hollow markers are, outside the curves
    renderer = _drawn(fig)
    legend = fig.axes[0].get_legend().get_window_extent(renderer)
    assert legend.x0 > fig.axes[0].get_window_extent(renderer).x1
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [
        "a (test)", "b (test)", "mean test top-1 of the kept models",
        "val top-1 of the same visits", "accepted visit", "rejected: the earlier model kept"]


def test_report_rebuilds_the_figures_and_results_md(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    small_store(run_dir)
    results = results_of()
    write_results(run_dir, results)
    assert report_main([str(run_dir)]) == 0
    names = sorted(p.name for p in (run_dir / "figures").iterdir())
    assert names == ["accuracy_vs_params.png", "first_layer_kernels.png", "joint_iterations.png",
                     "relation_graph.png", "relation_heatmap.png", "specific_by_layer.png"]
    listed = json.loads((run_dir / "results.json").read_text())["figures"]
    assert sorted(listed) == [f"figures/{n}" for n in names]
    table = (run_dir / "results.md").read_text()
    assert all(f"({f})" in table for f in listed)
    # a multirun directory: every run below it
    assert report_main([str(tmp_path)]) == 0
    assert "6 figure(s)" in capsys.readouterr().out


@pytest.mark.parametrize("setup, needle", [
    (lambda d: None, "no results.json in it or below it"),
    (lambda d: (d / "results.json").write_text("{not json"), "cannot read"),
    (lambda d: (d / "results.json").write_text("[]"), "not a results.json of this project"),
    (lambda d: (d / "results.json").write_text('{"methods": {}}'),
     "'tasks' missing or of another type (cut short, edited, or written by an older"),
    (lambda d: (d / "results.json").write_text("{}") and d / "results.json",
     "results.json: a file, not a run or multirun directory; the run directory is "),
    (lambda d: d / "nope", "nope: no such directory"),
    # a run's own folder (its store): the run directory is the one above
    (lambda d: (d / "results.json").write_text("{}") and (d / "store").mkdir() or d / "store",
     "store: no results.json in it or below it (a run or multirun directory of python -m "
     "cwps_lightning.train); the run directory is "),
])
def test_report_refuses_what_is_not_a_run_with_one_line(tmp_path, capsys, setup, needle):
    given = setup(tmp_path)  # (the path to give, where the setup names one)
    given = given if isinstance(given, Path) else tmp_path
    assert report_main([str(given)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0]


def test_a_machine_without_matplotlib_gets_its_results_without_figures(tmp_path, monkeypatch,
                                                                       caplog):
    """The figures are the only part of a run that needs matplotlib: without it the run's
    results.json and results.md are written all the same, and the log says how to draw the
    figures later."""
    import sys

    from cwps_lightning.report import add_figures

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    store = small_store(run_dir)
    results = results_of()
    # what an import of figures meets on a machine without matplotlib
    monkeypatch.delitem(sys.modules, "cwps_lightning.figures", raising=False)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    add_figures(run_dir, results, store)
    assert "figures" not in results
    assert "ModuleNotFoundError" in caplog.text and "cwps_lightning.report" in caplog.text
    write_results(run_dir, results)
    assert json.loads((run_dir / "results.json").read_text())["methods"]["cwps"]["mode"] == "joint"
    assert not (run_dir / "figures").exists()


def test_heatmap_colours_span_the_off_diagonal_counts_and_a_pair_sharing_nothing_has_no_edge():
    shared = np.array([[24, 5, 2, 0], [5, 24, 4, 3], [2, 4, 24, 6], [0, 3, 6, 24]])
    tasks = ["T0", "a", "b", "c"]
    norm = figures.plot_relation_heatmap(tasks, shared, 24).axes[0].images[0].norm
    assert (norm.vmin, norm.vmax) == (pytest.approx(0 - 0.15 * 6), 6)  # counts 0 to 6
    near = np.array([[24, 3], [3, 24]])  # one pair: a span of at least 2 around its count
    norm = figures.plot_relation_heatmap(["T0", "a"], near, 24).axes[0].images[0].norm
    assert (norm.vmin, norm.vmax) == (2, 4)
    ax = figures.plot_relation_graph(tasks, shared).axes[0]
    assert len(ax.lines) == 5  # six pairs, T0-c shares nothing
    assert sorted(t.get_text() for t in ax.texts if t.get_text() not in tasks) == [
        "2", "3", "4", "5", "6"]


def test_accuracy_vs_params_writes_each_points_top1():
    fig = figures.plot_accuracy_vs_params(figures.method_points(results_of()), "t")
    assert sorted(t.get_text() for t in fig.axes[0].texts) == ["64.00", "66.00"]


def test_accuracy_vs_params_keeps_every_value_inside_the_axes():
    """The value of the point at the right end ran over the frame (and a top one over the
    top): each is drawn inside the axes now, the right end's to the left of its point."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    points = [("CWPS", 1.34, 93.27), ("Fine-Tuning", 4.0, 93.29), ("Frozen", 1.0, 76.36),
              ("TAPS", 3.0, 40.0)]
    fig = figures.plot_accuracy_vs_params(points, "t")
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    ax = fig.axes[0]
    frame = ax.get_window_extent(renderer)
    values = {t.get_text(): t for t in ax.texts}
    assert sorted(values) == ["40.00", "76.36", "93.27", "93.29"]
    for text, t in values.items():
        box = t.get_window_extent(renderer)
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1, (text, box, frame)
        assert frame.y0 <= box.y0 and box.y1 <= frame.y1, (text, box, frame)
    assert values["93.29"].get_ha() == "right" and values["93.27"].get_ha() == "left"


def test_accuracy_vs_params_legend_hides_no_point_and_no_value():
    """Inside the axes (lower right) the legend hid Fine-Tuning's point (4.00x, low accuracy)
    and its value: it stands right of the axes now."""
    points = [("CWPS-Incremental", 1.34, 27.11), ("Fine-Tuning", 4.0, 27.56),
              ("TAPS", 4.0, 43.56)]
    fig = figures.plot_accuracy_vs_params(points, "t")
    renderer = _drawn(fig)
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent(renderer)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [p[0] for p in points]
    for collection in ax.collections:
        for x, y in ax.transData.transform(collection.get_offsets()):
            assert not legend.contains(x, y), (x, y, legend)
    for text in ax.texts:
        assert not legend.overlaps(text.get_window_extent(renderer)), text.get_text()


def test_kernel_tiles_keep_rgb_and_scale_each_kernel_on_its_own():
    w = torch.zeros(2, 3, 2, 2)
    w[0, 0] = 1.0  # a red kernel
    w[1, 2, 0, 0] = 0.01  # a faint blue dot
    tiles = figures.kernel_tiles(w)
    assert tiles.shape == (2, 2, 2, 3)
    assert np.allclose(tiles[0], [1.0, 0.0, 0.0])
    assert np.allclose(tiles[1, 0, 0], [0.0, 0.0, 1.0]) and np.allclose(tiles[1, 1, 1], 0.0)
    grey = figures.kernel_tiles(torch.arange(8.0).view(1, 2, 2, 2))  # 2 inputs: their mean
    assert np.allclose(grey[0, ..., 0], grey[0, ..., 2])
    assert np.allclose(grey[0, ..., 0], [[0.0, 1 / 3], [2 / 3, 1.0]])


def test_joint_iterations_dashed_lines_are_the_val_top1():
    history = results_of()["methods"]["cwps"]["history"]
    ax = figures.plot_joint_iterations(history, TASKS).axes[0]
    dashed = [list(line.get_ydata()) for line in ax.lines if line.get_linestyle() == "--"]
    assert dashed == [[80.0, 75.0], [60.0, 65.0]]


def _drawn(fig):
    """Draw ``fig`` (on Agg) and return its renderer, for the extents of what it shows."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    return renderer


def test_accuracy_vs_params_writes_plain_ratios_on_its_axis():
    """Ratios 4e-4 apart were ticked 0.0002 ... with a '+1.279' offset over the axis label."""
    fig = figures.plot_accuracy_vs_params([("a", 1.2792, 73.1), ("b", 1.2796, 74.0)], "t")
    _drawn(fig)
    axis = fig.axes[0].xaxis
    assert axis.get_major_formatter().get_offset() == ""
    ticks = [float(t.get_text().replace("\u2212", "-")) for t in axis.get_ticklabels()
             if t.get_text()]
    assert min(ticks) > 1.27 and max(ticks) < 1.29



def test_an_accuracy_axis_spans_at_least_a_point():
    """Two means 0.02 apart were drawn as a steep line over the whole axis (their noise):
    the y-axis spans at least figures.MIN_TOP1_SPAN points, around them; a wider spread keeps
    its own range."""
    from cwps_lightning.sweep import plot_lambda

    close = [("a", 1.30, 92.38), ("b", 1.25, 92.40)]
    for fig in (figures.plot_accuracy_vs_params(close, "t"),
                plot_lambda([(0.5, 92.38, 1.30), (0.7, 92.40, 1.25)])):
        lo, hi = fig.axes[0].get_ylim()
        assert hi - lo == pytest.approx(figures.MIN_TOP1_SPAN)
        assert lo < 92.38 and 92.40 < hi and (lo + hi) / 2 == pytest.approx(92.39, abs=0.01)
    lo, hi = figures.plot_accuracy_vs_params([("a", 1.3, 80.0), ("b", 4.0, 90.0)],
                                             "t").axes[0].get_ylim()
    assert lo < 80.0 and hi > 90.0 and hi - lo < 13


def test_a_figure_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """(a report killed while drawing left an empty PNG, which results.md linked)"""
    from matplotlib.figure import Figure

    from cwps_lightning.figures import save_figure

    fig = Figure()
    fig.add_subplot().plot([0, 1], [0, 1])
    path = tmp_path / "a.png"
    save_figure(fig, path)
    drawn = path.read_bytes()
    assert drawn.startswith(b"\x89PNG") and len(drawn) > 1000

    def stops_halfway(self, target, **kwargs):
        target.write(b"\x89PNG partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", stops_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_figure(fig, path)
    assert path.read_bytes() == drawn and [p.name for p in tmp_path.iterdir()] == ["a.png"]
