"""The figures of a run, from what it leaves on disk (results.json and the store).

Each ``plot_*`` function takes plain data, draws one matplotlib Figure (no pyplot: no global
state, no display needed) and returns it; ``write_run_figures`` draws every figure that fits a
run into ``<run dir>/figures/`` and returns their file names. The paper's figures they follow:

  relation_heatmap.png / relation_graph.png   Figure 4 (right): shared channels between tasks
  accuracy_vs_params.png                      Figure 4 (left): mean top-1 against param_ratio
  specific_by_layer.png                       Figure 8's information: per layer, the share of
                                              each task's channels that are task-specific
  first_layer_kernels.png                     Figure 6: the first layer's kernels of every task,
                                              shared ones framed apart from task-specific ones
  joint_iterations.png                        Figure 7: val / test top-1 per joint iteration
"""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.transforms import offset_copy

from .cwps.store import atomic_write

log = logging.getLogger(__name__)

SHARED_RGB = (0.10, 0.55, 0.25)  # frame of a kernel shared with another task
SPECIFIC_RGB = (0.90, 0.45, 0.05)  # frame of a task-specific kernel
DPI = 120


def save_figure(fig: Figure, path: Path) -> None:
    """Draw ``fig`` to ``path`` whole or not at all: drawn in memory, then written aside and
    renamed (a report killed while drawing left an empty PNG that results.md linked)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png", dpi=DPI,
                bbox_inches="tight")
    atomic_write(path, buffer.getvalue())



#: the least span of an accuracy axis, in points of top-1 (%)
MIN_TOP1_SPAN = 1.0


def at_least_span(ax, span: float = MIN_TOP1_SPAN) -> None:
    """Widen the y-axis to ``span`` around its middle where the points lie closer: fitted to
    two means 0.02 apart, it drew their noise as a steep line."""
    lo, hi = ax.get_ylim()
    if hi - lo < span:
        mid = (lo + hi) / 2
        ax.set_ylim(mid - span / 2, mid + span / 2)


# -- Figure 4 (right): the relation of tasks -------------------------------------------------------
def plot_relation_heatmap(tasks: list[str], shared: np.ndarray, channels: int) -> Figure:
    """``shared[i, j]``: output channels where tasks i and j hold the same kernel."""
    n = len(tasks)
    values = shared.astype(float).copy()
    np.fill_diagonal(values, np.nan)  # a task shares every channel with itself
    fig = Figure(figsize=(1.4 + 1.1 * n, 1.0 + 1.0 * n))
    ax = fig.add_subplot()
    # the colour spans the off-diagonal range (the counts are written in the cells), so that
    # the differences between pairs show
    lo = np.nanmin(values) if n > 1 else 0.0
    hi = np.nanmax(values) if n > 1 else 1.0
    lo, hi = (lo - 1, hi + 1) if hi - lo < 2 else (lo - 0.15 * (hi - lo), hi)
    im = ax.imshow(values, cmap="Greens", vmin=lo, vmax=hi)
    for i in range(n):
        for j in range(n):
            if i != j:
                dark = values[i, j] > lo + 0.6 * (hi - lo)
                ax.text(j, i, f"{int(shared[i, j]):,}", ha="center", va="center", fontsize=9,
                        color="white" if dark else "black")
    ax.set_xticks(range(n), tasks, rotation=30, ha="right")
    ax.set_yticks(range(n), tasks)
    ax.set_title(f"Shared output channels between tasks\n(of {channels:,} per task)")
    fig.colorbar(im, ax=ax, label="shared channels")
    return fig


def plot_relation_graph(tasks: list[str], shared: np.ndarray) -> Figure:
    """Tasks on a circle; an edge's width grows with the channels the two share (from the
    least-sharing pair, thinnest, to the most-sharing one), and carries the count."""
    n = len(tasks)
    angles = [math.pi / 2 - 2 * math.pi * k / n for k in range(n)]
    pos = [(math.cos(a), math.sin(a)) for a in angles]
    fig = Figure(figsize=(5.5, 5.5))
    ax = fig.add_subplot()
    off = shared[~np.eye(n, dtype=bool)]
    lo, hi = (int(off.min()), int(off.max())) if off.size else (0, 1)
    for i in range(n):
        for j in range(i + 1, n):
            s = int(shared[i, j])
            if s == 0:
                continue
            (x1, y1), (x2, y2) = pos[i], pos[j]
            width = 1.0 + 9.0 * (s - lo) / max(hi - lo, 1)
            ax.plot([x1, x2], [y1, y2], color=SHARED_RGB, alpha=0.7, lw=width,
                    solid_capstyle="round", zorder=1)
            # the count a third of the way along, so that crossing edges keep apart
            ax.text(x1 + 0.36 * (x2 - x1), y1 + 0.36 * (y2 - y1), f"{s:,}", fontsize=8,
                    ha="center", va="center", bbox=dict(fc="white", ec="none", alpha=0.85),
                    zorder=3)
    for (x, y), name in zip(pos, tasks, strict=True):
        ax.scatter([x], [y], s=120, color="black", zorder=2)
        ha = "left" if x > 0.3 else "right" if x < -0.3 else "center"
        ax.text(1.1 * x + 0.06 * np.sign(round(x, 3)), 1.1 * y + 0.1 * np.sign(round(y, 3)),
                name, ha=ha, va="center",
                fontsize=9, zorder=4)
    ax.set_xlim(-1.9, 1.9)
    ax.set_ylim(-1.4, 1.4)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(f"Relation of tasks: shared output channels per pair\n"
                 f"(edge width from {lo:,}, thinnest, to {hi:,})")
    return fig


# -- Figure 4 (left): accuracy against parameters ----------------------------------------------------
def plot_accuracy_vs_params(points: list[tuple[str, float, float]], title: str) -> Figure:
    """``points``: (label, param_ratio, mean top-1 %) per method (or per job). The legend
    stands right of the axes: inside them (lower right) it hid a method of many parameters and
    low accuracy, and its value."""
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot()
    ratios = [ratio for _, ratio, _ in points]
    right = max(ratios, default=0.0) - 0.2 * (max(ratios, default=0.0) - min(ratios, default=0.0))
    for label, ratio, top1 in points:
        ax.scatter([ratio], [top1], s=60, label=label, zorder=2)
        # a value at the right end of the axis is written to the left of its point (to the
        # right it ran over the frame)
        left = len(points) > 1 and ratio > right
        ax.annotate(f"{top1:.2f}", (ratio, top1), textcoords="offset points",
                    xytext=(-6, 4) if left else (6, 4), ha="right" if left else "left",
                    fontsize=8)
    ax.margins(x=0.08, y=0.1)  # (room for the values above the highest points)
    # plain tick values: ratios a few 1e-4 apart got ticks 0.0002... and a "+1.279" offset
    # written over the axis label
    ax.ticklabel_format(useOffset=False)
    at_least_span(ax)
    ax.set_xlabel("Backbone parameters to serve T0 and every task, heads excluded (x backbone)")
    ax.set_ylabel("Mean top-1 over tasks (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3, zorder=0)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


# -- Figure 8's information: where the task-specific channels are ------------------------------------
def plot_specific_by_layer(layers: list[str], by_task: dict[str, list[float]]) -> Figure:
    """``by_task[task][k]``: share of layer k's output channels that are task-specific."""
    fig = Figure(figsize=(max(6.5, 0.3 * len(layers)), 4.5))
    ax = fig.add_subplot()
    x = np.arange(len(layers))
    for task, shares in by_task.items():
        ax.plot(x, [100 * s for s in shares], marker="o", ms=3, label=task)
    ax.set_xticks(x, layers, rotation=90, fontsize=7)
    ax.set_ylim(-3, 103)
    ax.set_xlabel("Layer (input to output)")
    ax.set_ylabel("Task-specific output channels (%)")
    ax.set_title("CWPS: share of each task's channels that are task-specific, per layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


# -- Figure 6: the first layer's kernels -------------------------------------------------------------
def kernel_tiles(weight: torch.Tensor) -> np.ndarray:
    """[C, in, kh, kw] kernels as [C, kh, kw, 3] images in [0, 1], each scaled on its own
    (3 input channels as RGB, otherwise their mean in grey)."""
    w = weight.detach().float()
    w = w if w.shape[1] == 3 else w.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
    lo = w.amin(dim=(1, 2, 3), keepdim=True)
    hi = w.amax(dim=(1, 2, 3), keepdim=True)
    return ((w - lo) / (hi - lo).clamp_min(1e-12)).permute(0, 2, 3, 1).numpy()


def kernel_grid(tiles: dict[str, np.ndarray], shared: dict[str, np.ndarray],
                order: np.ndarray, border: int = 1) -> np.ndarray:
    """One RGB image: a row per task, its kernels in ``order``, each framed by whether it is
    shared (SHARED_RGB) or task-specific (SPECIFIC_RGB); a white gap between tiles."""
    first = next(iter(tiles.values()))
    _, kh, kw, _ = first.shape
    cell_h, cell_w = kh + 2 * border + 1, kw + 2 * border + 1
    grid = np.ones((len(tiles) * cell_h, len(order) * cell_w, 3))
    for r, task in enumerate(tiles):
        for c, ch in enumerate(order):
            y, x = r * cell_h, c * cell_w
            frame = SHARED_RGB if shared[task][ch] else SPECIFIC_RGB
            grid[y:y + kh + 2 * border, x:x + kw + 2 * border] = frame
            grid[y + border:y + border + kh, x + border:x + border + kw] = tiles[task][ch]
    return grid


def plot_first_layer_kernels(layer: str, tiles: dict[str, np.ndarray],
                             shared: dict[str, np.ndarray]) -> tuple[Figure, np.ndarray]:
    """Columns: output channels, those shared by the most tasks first. Returns the figure and
    the column order (channel indices)."""
    counts = np.sum([shared[t] for t in tiles], axis=0)
    order = np.argsort(-counts, kind="stable")
    grid = kernel_grid(tiles, shared, order)
    n, c = len(tiles), len(order)
    fig = Figure(figsize=(min(18, 1.5 + 0.22 * c), 1.2 + 0.45 * n))
    ax = fig.add_subplot()
    ax.imshow(grid, interpolation="nearest")
    cell_h = grid.shape[0] / n
    ax.set_yticks([(r + 0.5) * cell_h for r in range(n)], list(tiles))
    ax.set_xticks([])
    ax.set_xlabel(f"output channels of {layer} (shared by the most tasks first)")
    ax.set_title(f"First layer's kernels per task ({layer})")
    # below the axis label by a fixed distance in points (a fraction of the axes' height put
    # it over the label where there are few rows)
    below = offset_copy(ax.transAxes, fig=fig, y=-26, units="points")
    ax.legend(handles=[Patch(color=SHARED_RGB, label="shared with another task"),
                       Patch(color=SPECIFIC_RGB, label="task-specific")],
              loc="upper center", bbox_to_anchor=(0.5, 0.0), bbox_transform=below, ncol=2,
              fontsize=8)
    return fig, order


# -- Figure 7: joint-mode iterations ----------------------------------------------------------------
def plot_joint_iterations(history: list[dict], tasks: list[str]) -> Figure:
    """Val (dashed) and test (solid) top-1 of every visit, per task, and the mean over tasks of
    the kept models after each iteration; accepted visits filled, rejected ones hollow."""
    iterations = sorted({h["iteration"] for h in history})
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    kept_mean = []
    kept: dict[str, float] = {}
    for it in iterations:
        for h in history:
            if h["iteration"] == it and h["accepted"]:
                kept[h["task"]] = h["top1"]
        kept_mean.append(sum(kept.values()) / len(kept))
    for k, task in enumerate(tasks):
        visits = [h for h in history if h["task"] == task]
        color = f"C{k}"
        xs = [h["iteration"] for h in visits]
        ax.plot(xs, [h["val_top1"] for h in visits], ls="--", color=color, alpha=0.6)
        ax.plot(xs, [h["top1"] for h in visits], color=color, label=f"{task} (test)")
        for h in visits:
            ax.scatter([h["iteration"]], [h["top1"]], edgecolors=color, zorder=3,
                       facecolors=color if h["accepted"] else "white")
    ax.plot(iterations, kept_mean, color="black", lw=2, marker="s", label="mean test top-1 of the kept models")
    ax.set_xticks(iterations)
    ax.set_xlabel("Joint iteration")
    ax.set_ylabel("Top-1 (%): test solid, val dashed")
    ax.set_title("CWPS joint mode: every visit (filled = accepted, hollow = kept the old model)")
    ax.grid(alpha=0.3)
    # the line styles and markers in the legend too, not only in the title and axis label
    handles, _ = ax.get_legend_handles_labels()
    handles += [Line2D([], [], ls="--", color="0.45", label="val top-1 of the same visits"),
                Line2D([], [], ls="", marker="o", color="0.45", label="accepted visit"),
                Line2D([], [], ls="", marker="o", markerfacecolor="white",
                       markeredgecolor="0.45", label="rejected: the earlier model kept")]
    # outside the axes: ten entries and more (six tasks) covered the curves inside
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


# -- all of a run ---------------------------------------------------------------------------------
def method_points(results: dict) -> list[tuple[str, float, float]]:
    """(label, param_ratio, mean top-1) per method, labelled as in results.md."""
    from .report import method_label

    return [(method_label(name, r), float(r["param_ratio"]), float(r["mean_top1"]))
            for name, r in results["methods"].items()]


def shared_flags(store, layer: str) -> dict[str, np.ndarray]:
    """Per task, per output channel of ``layer``: does another task hold the same kernel?"""
    idx = {t: store.index(t, layer).numpy() for t in store.tasks}
    return {t: np.any([idx[t] == idx[u] for u in store.tasks if u != t], axis=0)
            for t in store.tasks}


def write_run_figures(run_dir: str | Path, results: dict, store=None) -> list[str]:
    """Every figure that fits the run into ``<run dir>/figures``; returns the paths written,
    relative to the run directory. ``store``: the run's MultiTaskStore (None: no store)."""
    run_dir = Path(run_dir)
    out = run_dir / "figures"
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig: Figure, name: str) -> None:
        save_figure(fig, out / name)
        written.append(f"figures/{name}")

    save(plot_accuracy_vs_params(method_points(results),
                                 f"Accuracy vs parameters ({results['backbone']}, "
                                 f"{len(results['tasks'])} tasks)"), "accuracy_vs_params.png")
    cwps = results["methods"].get("cwps", {})
    by_layer = {t: m["specific_by_layer"] for t, m in cwps.get("tasks", {}).items()
                if "specific_by_layer" in m}
    if by_layer:
        layers = list(next(iter(by_layer.values())))
        save(plot_specific_by_layer(layers, {t: [v[n] for n in layers]
                                             for t, v in by_layer.items()}),
             "specific_by_layer.png")
    if store is not None and len(store.tasks) > 1:
        tasks, mat = store.relation_matrix()
        channels = int(mat[0, 0])
        save(plot_relation_heatmap(tasks, mat.numpy(), channels), "relation_heatmap.png")
        save(plot_relation_graph(tasks, mat.numpy()), "relation_graph.png")
        layer = store.layers[0]
        weights = {t: store.state_dict(t)[f"{layer}.weight"] for t in store.tasks}
        if next(iter(weights.values())).dim() == 4:  # a conv layer (a ViT starts with one too)
            tiles = {t: kernel_tiles(w) for t, w in weights.items()}
            fig, _ = plot_first_layer_kernels(layer, tiles, shared_flags(store, layer))
            save(fig, "first_layer_kernels.png")
    history = cwps.get("history") or []
    if len({h["iteration"] for h in history}) > 1:
        save(plot_joint_iterations(history, results["tasks"]), "joint_iterations.png")
    log.info("figures: %s", ", ".join(written))
    return written
