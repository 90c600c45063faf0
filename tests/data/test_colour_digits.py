"""The colour_digits benchmark: tasks, splits, images, bad input, presets, and the claim it is
built on (its tasks are nearer to one another than to T0)."""

from __future__ import annotations

import itertools

import pytest
import torch

from cwps_lightning.data import BENCHMARKS, DataConfigError, colour_digits, digits
from cwps_lightning.data.colour_digits import ColourDigitsDataModule
from cwps_lightning.data.digits import DigitsDataModule
from cwps_lightning.pretrain import cache_key, t0_spec

TASKS = ["mnist_m_smooth", "mnist_m_texture", "mnist_m_duotone"]
T0 = "optdigits"


@pytest.fixture(scope="module")
def full() -> ColourDigitsDataModule:
    dm = ColourDigitsDataModule()
    _ = dm.splits
    return dm


def images(dm, task, split="train") -> torch.Tensor:
    return getattr(dm.splits[task], split).tensors[0]


def labels(dm, task, split="train") -> torch.Tensor:
    return getattr(dm.splits[task], split).tensors[1]


def test_tasks_t0_classes_and_split_sizes(full):
    assert BENCHMARKS["colour_digits"] is ColourDigitsDataModule
    assert full.task_names == TASKS and full.pretrain_task == T0
    assert set(full.splits) == {T0, *TASKS}
    sizes = {t: tuple(len(getattr(full.splits[t], s)) for s in ("train", "val", "test"))
             for t in full.splits}
    # MNIST's 5000 images in thirds; 15% validation and 25% test of each task's images
    assert sizes == {T0: (1078, 270, 449), "mnist_m_smooth": (1000, 250, 417),
                     "mnist_m_texture": (1000, 250, 417), "mnist_m_duotone": (1000, 250, 416)}
    for t in full.splits:
        assert full.num_classes(t) == 10
        assert labels(full, t).dtype == torch.int64
        assert torch.bincount(labels(full, t), minlength=10).min() >= 70  # every class, ~100


def test_images_are_normalised_rgb_grey_t0_coloured_tasks(full):
    for t in full.splits:
        for split in ("train", "val", "test"):
            x = images(full, t, split)
            assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32)
            assert x.min() >= -1.0 and x.max() <= 1.0 and x.is_contiguous()
    x0 = images(full, T0)
    assert torch.equal(x0[:, 0], x0[:, 1]) and torch.equal(x0[:, 0], x0[:, 2])  # grey
    assert x0.mean() < -0.3  # mostly black background
    for t in TASKS:
        x = images(full, t)
        assert (x[:, 0] - x[:, 1]).abs().mean() > 0.2  # coloured
        assert abs(float(x.mean())) < 0.15  # fields of mean colour about 0.5


def test_splits_partition_each_source(monkeypatch):
    """Every MNIST image lands in exactly one split of one task (and every optdigits image in
    one split of T0): images that carry their index as their value, fields switched off."""
    n_mnist, n_opt = 5000, 1797
    ids = lambda n: torch.arange(n, dtype=torch.float32).div(n - 1).view(-1, 1, 1, 1)  # noqa: E731
    monkeypatch.setattr(colour_digits, "load_mnist_sample",
                        lambda: (ids(n_mnist).expand(-1, 1, 28, 28), torch.arange(n_mnist) % 10))
    monkeypatch.setattr(colour_digits, "load_optdigits",
                        lambda: (ids(n_opt).expand(-1, 1, 8, 8), torch.arange(n_opt) % 10))
    monkeypatch.setattr(colour_digits, "to_colour_blend", lambda x, seed, grid=4: x)
    monkeypatch.setattr(colour_digits, "to_duotone_blend", lambda x, seed: x)
    dm = ColourDigitsDataModule(image_size=8)

    def index_of(task, split, n):
        x, y = getattr(dm.splits[task], split).tensors
        v = x.flatten(1)
        assert (v.amax(dim=1) - v.amin(dim=1)).max() < 1e-5  # constant images (resizing rounds)
        i = ((v.mean(dim=1) * 0.5 + 0.5) * (n - 1)).round().long()
        assert torch.equal(y, i % 10)  # the labels travelled with their images
        return i.tolist()

    seen = [i for t in TASKS for s in ("train", "val", "test") for i in index_of(t, s, n_mnist)]
    assert sorted(seen) == list(range(n_mnist))
    seen = [i for s in ("train", "val", "test") for i in index_of(T0, s, n_opt)]
    assert sorted(seen) == list(range(n_opt))


def test_splits_are_deterministic_and_follow_the_seed(full):
    again = ColourDigitsDataModule()
    other = ColourDigitsDataModule(seed=1)
    for t in full.splits:
        for split in ("train", "val", "test"):
            a, b = getattr(full.splits[t], split), getattr(again.splits[t], split)
            assert all(torch.equal(u, v) for u, v in zip(a.tensors, b.tensors, strict=True))
        assert not torch.equal(images(full, t), images(other, t))


def test_a_task_does_not_depend_on_the_other_tasks_requested(full):
    dm = ColourDigitsDataModule(tasks=["mnist_m_duotone"])
    assert dm.task_names == ["mnist_m_duotone"] and set(dm.splits) == {T0, "mnist_m_duotone"}
    for t in (T0, "mnist_m_duotone"):
        assert torch.equal(images(dm, t, "test"), images(full, t, "test"))


def test_image_size_and_limit_per_task():
    dm = ColourDigitsDataModule(image_size=16, limit_per_task=40, tasks=["mnist_m_texture"])
    for t in (T0, "mnist_m_texture"):
        s = dm.splits[t]
        assert (len(s.train), len(s.val), len(s.test)) == (24, 6, 10)
        assert s.train.tensors[0].shape[1:] == (3, 16, 16)


@pytest.mark.parametrize(("kwargs", "needle"), [
    (dict(tasks=["mnist_m"]), "unknown task(s) ['mnist_m'] for this benchmark; known: "
                              "['mnist_m_smooth', 'mnist_m_texture', 'mnist_m_duotone', "
                              "'optdigits']"),
    (dict(tasks="mnist_m_smooth"), "e.g. data.tasks=[mnist_m_smooth], got 'mnist_m_smooth'"),
    (dict(tasks=["mnist_m_smooth", "mnist_m_smooth"]), "data.tasks lists a task twice"),
    # (an empty list ran the default tasks: null is the default order, [] no task)
    (dict(tasks=[]), "data.tasks is empty: name at least one task"),
    (dict(image_size=4), "data.image_size must be an integer from 8 to 2048, got 4"),
    (dict(limit_per_task=3), ">= 4 (images per task; fewer leave a split empty), got 3"),
    (dict(seed=0.5), "data.seed must be an integer from 0 to 4294967295, got 0.5"),
    (dict(seed=-1), "data.seed must be an integer from 0 to 4294967295, got -1"),
])
def test_bad_settings_are_config_errors(kwargs, needle):
    dm = ColourDigitsDataModule(**kwargs)
    with pytest.raises(DataConfigError) as err:
        _ = dm.splits
    assert needle in str(err.value)


def test_t0_cache_key_differs_from_the_digits_benchmark():
    """Same model, settings and data settings: a different benchmark, so a different T0."""
    args = ("resnet18", {}, 3, 0.05, 0)
    ours = t0_spec(ColourDigitsDataModule(), *args)
    theirs = t0_spec(DigitsDataModule(), *args)
    assert ours["data"] == "ColourDigitsDataModule" and ours["task"] == "optdigits"
    assert theirs["data"] == "DigitsDataModule" and theirs["task"] == "mnist"
    assert ours["data_spec"] == theirs["data_spec"]  # the class and task tell them apart
    assert cache_key(ours) != cache_key(theirs)
    assert cache_key(ours) != cache_key(t0_spec(ColourDigitsDataModule(image_size=16), *args))


def colour_histogram(x: torch.Tensor, bins: int = 4) -> torch.Tensor:
    """Share of the pixels of normalised images [N, 3, H, W] in each of bins**3 RGB cells."""
    q = ((x * 0.5 + 0.5).clamp(0, 1 - 1e-6) * bins).long()
    cell = (q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]
    h = torch.bincount(cell.flatten(), minlength=bins ** 3).float()
    return h / h.sum()


def histogram_distances(dm) -> dict[tuple[str, str], float]:
    """Total variation distance between the colour histograms of every pair of tasks (T0 too)."""
    h = {t: colour_histogram(images(dm, t)) for t in dm.splits}
    return {(a, b): 0.5 * float((h[a] - h[b]).abs().sum())
            for a, b in itertools.combinations(h, 2)}


def nearest_is_t0(dm) -> dict[str, bool]:
    """For each task: is T0 its nearest neighbour among T0 and the other tasks?"""
    d = histogram_distances(dm)
    dist = lambda a, b: d.get((a, b), d.get((b, a)))  # noqa: E731
    t0 = dm.pretrain_task
    return {t: min((u for u in dm.task_names + [t0] if u != t), key=lambda u: dist(t, u)) == t0
            for t in dm.task_names}


def test_tasks_are_nearer_to_one_another_than_to_t0(full):
    """What the benchmark is for: any two tasks' colour statistics are closer than any task's
    are to T0's. The same statistic says the opposite of the digits benchmark."""
    d = histogram_distances(full)
    between_tasks = [v for (a, b), v in d.items() if T0 not in (a, b)]
    to_t0 = [v for (a, b), v in d.items() if T0 in (a, b)]
    assert max(between_tasks) < 0.15 and min(to_t0) > 0.8, d
    assert not any(nearest_is_t0(full).values())
    # digits: optdigits' grey strokes are nearer to T0's grey MNIST than to any other task
    # (and mnist_m is far from everything)
    assert nearest_is_t0(DigitsDataModule(limit_per_task=1000))["optdigits"]


@pytest.mark.parametrize(("preset", "mode", "iterations"), [
    ("colour_digits", "incremental", 1), ("colour_digits_joint", "joint", 2)])
def test_presets(preset, mode, iterations):
    from cwps_lightning.data.check import compose_config

    cfg = compose_config([f"+experiment={preset}"])
    assert cfg.data._target_ == "cwps_lightning.data.colour_digits.ColourDigitsDataModule"
    assert cfg.cwps.mode == mode and cfg.cwps.iterations == iterations
    assert cfg.model.name == "resnet18" and cfg.data.image_size == 32
    assert cfg.data.batch_size == 32 and cfg.data.limit_per_task is None
    assert list(cfg.cwps.baselines) == ["finetune", "frozen"]  # as the digits presets


def test_colour_blend_of_the_digits_benchmark_is_unchanged():
    """colour_field's defaults are the draws digits' mnist_m always made."""
    x = torch.rand(5, 1, 12, 12)
    g = torch.Generator().manual_seed(7)
    field = torch.rand(5, 3, 4, 4, generator=g)
    field = torch.nn.functional.interpolate(field, size=(12, 12), mode="bicubic",
                                            align_corners=False).clamp(0, 1)
    assert torch.equal(digits.to_colour_blend(x, 7), (field - x).abs())


def test_t0_cache_key_holds_the_ranks_device_and_arithmetic_of_the_run():
    """A T0 pretrained on 2 ranks, in 16-bit or on a GPU is another T0: another key. The key
    comes from the run's config, the same on every rank; Trainer arguments that do not change
    the fit (the progress bar) leave it alone."""
    args = ("resnet18", {}, 3, 0.05, 0)
    one = {"accelerator": "auto", "devices": 1, "strategy": "auto", "precision": "32-true",
           "enable_progress_bar": True}
    key = cache_key(t0_spec(DigitsDataModule(), *args, one, "cpu"))
    assert key == cache_key(t0_spec(DigitsDataModule(), *args, dict(one), "cpu"))
    assert key == cache_key(t0_spec(DigitsDataModule(), *args,
                                    {**one, "enable_progress_bar": False}, "cpu"))
    others = [({**one, "devices": 2, "strategy": "ddp"}, "cpu"),
              ({**one, "num_nodes": 2}, "cpu"),
              ({**one, "precision": "16-mixed"}, "cpu"),
              (one, "cuda")]
    keys = {cache_key(t0_spec(DigitsDataModule(), *args, t, d)) for t, d in others}
    assert key not in keys and len(keys) == len(others)

    # two names of one arithmetic are one T0: Lightning's aliases, and on the CPU 16-mixed,
    # which it runs as bf16-mixed (each pretrained a T0 of its own); on a GPU they differ
    def keyed(precision, device="cpu"):
        return cache_key(t0_spec(DigitsDataModule(), *args, {**one, "precision": precision},
                                 device))

    assert keyed("32") == keyed(32) == key
    assert keyed("16-mixed") == keyed("bf16-mixed") == keyed("bf16") == keyed(16)
    assert keyed("16-mixed", "cuda") != keyed("bf16-mixed", "cuda")
    assert keyed("16-mixed", "cuda") == keyed("16", "cuda")


def test_t0_cache_key_holds_the_cpu_thread_count_of_a_one_process_run():
    """One process on the CPU: torch's thread count orders the float sums (another T0), so it
    is in the key. On a GPU, or on several ranks (whose launchers set their counts after the
    key is taken), it is not: those keys stand as before."""
    args = ("resnet18", {}, 3, 0.05, 0)
    one = {"accelerator": "cpu", "devices": 1, "strategy": "auto", "precision": "32-true"}
    ddp = {**one, "devices": 2, "strategy": "ddp"}

    def spec(trainer, device_type, threads):
        torch.set_num_threads(threads)  # (conftest puts the worker's count back)
        return t0_spec(DigitsDataModule(), *args, trainer, device_type)

    assert spec(one, "cpu", 1)["cpu_threads"] == 1 and spec(one, "cpu", 2)["cpu_threads"] == 2
    assert cache_key(spec(one, "cpu", 1)) != cache_key(spec(one, "cpu", 2))
    assert spec({**one, "devices": "auto"}, "cpu", 2)["cpu_threads"] == 2  # (auto: one CPU)
    for trainer, device_type in [(ddp, "cpu"), ({**one, "num_nodes": 2}, "cpu"), (one, "cuda")]:
        assert "cpu_threads" not in spec(trainer, device_type, 1)
        assert cache_key(spec(trainer, device_type, 1)) == cache_key(spec(trainer, device_type, 2))


def test_the_texture_field_is_patchier_than_the_smooth_one(full):
    """(the 8 x 8 lattice against the 4 x 4: more change from one pixel to the next)"""
    def roughness(t):
        x = images(full, t)
        return float((x[..., 1:] - x[..., :-1]).abs().mean())

    assert roughness("mnist_m_texture") > 1.3 * roughness("mnist_m_smooth")
