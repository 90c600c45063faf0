"""benchmarks/compose_ablation.py: its "full" variant is the real layer's arithmetic, and each
dropped piece changes exactly what it names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from .helpers import cwps_conv_twins, load_benchmark


@pytest.fixture(scope="module")
def ablation():
    return load_benchmark("compose_ablation")


def grads(layer, x):
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    y.square().sum().backward()
    return y.detach(), layer.weight.grad.clone(), layer.mask_logits.grad.clone()


def pair(ablation, dropped):
    real, twin = cwps_conv_twins("hard")
    return real, ablation.ablated_model(nn.Sequential(twin), dropped)[0]


@pytest.mark.parametrize("size", [5, 1])  # a 5x5 map (the ablated path) and a 1x1 map (real)
def test_full_is_the_real_layer(ablation, size):
    real, full = pair(ablation, ())
    x = torch.randn(2, 4, size, size)
    for a, b in zip(grads(real, x), grads(full, x), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_each_dropped_piece_changes_what_it_names(ablation):
    x = torch.randn(2, 4, 5, 5)
    real, _ = pair(ablation, ())
    y, gw, gm = grads(real, x)
    _, no_mask = pair(ablation, ("mask",))
    y2, gw2, gm2 = grads(no_mask, x)
    torch.testing.assert_close((y2, gw2), (y, gw))
    assert torch.equal(gm2, torch.zeros_like(gm)) and gm.abs().sum() > 0
    _, no_fwd = pair(ablation, ("fwd",))
    assert not torch.allclose(grads(no_fwd, x)[0], y)  # convolves the child, not w
    _, no_gmul = pair(ablation, ("gmul",))
    m = (torch.sigmoid(real.mask_logits.detach()) >= real.threshold).float()
    assert (m == 0).any()  # some shared channel: their child gradient is 0 only when scaled
    assert not torch.allclose(grads(no_gmul, x)[1], gw)


def test_the_script_runs_and_reports_every_variant(ablation, capsys):
    torch.set_num_threads(1)
    ratios = ablation.main(["--size", "16", "--batch", "2", "--rounds", "1", "--warmup", "0"])
    assert set(ratios) == {"finetune", *ablation.VARIANTS}
    assert ratios["finetune"] == 1.0
    assert "paired x fine-tuning" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "message"), [
    (["--rounds", "0"], "--rounds must be an integer >= 1, got 0"),
    (["--model", "nosuch"], "--model: unknown model 'nosuch'"),
])
def test_bad_arguments_stop_before_any_work(ablation, capsys, args, message):
    with pytest.raises(SystemExit) as stop:
        ablation.main(args)
    assert stop.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [
    (["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
    (["--images", "79"], "--images must be an integer >= 80 (5 per class), got 79"),
    (["--images", "10", "--classes", "2", "data.nope=1"], "data.nope: no such key; data has: "
                                                          "root, tasks, "),
])
def test_loader_throughput_refuses_bad_arguments_with_one_line(monkeypatch, capsys, tmp_path,
                                                               args, message):
    loader = load_benchmark("loader_throughput")
    monkeypatch.setattr("sys.argv", ["loader_throughput.py", "--root", str(tmp_path), *args])
    with pytest.raises(SystemExit) as stop:
        loader.main()
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_loader_throughputs_tree_puts_every_class_in_train(tmp_path):
    """(a class whose images all fell in test stopped the loader: every fifth image of each
    class is a test image)"""
    load_benchmark("loader_throughput").write_tree(tmp_path, 25, 5, size=8)
    for task in ("flowers", "cubs_cropped"):
        train = {p.name for p in (tmp_path / task / "train").iterdir()}
        test = {p.name for p in (tmp_path / task / "test").iterdir()}
        assert train == {f"class_{c:03d}" for c in range(5)} and test == train
        assert len(list((tmp_path / task / "test").glob("*/*.jpg"))) == 5


def test_each_variant_drops_the_piece_its_name_says():
    ablation = load_benchmark("compose_ablation")
    assert ablation.VARIANTS["full"] == () and set(ablation.VARIANTS["none"]) == {
        "fwd", "bwd", "mask", "gmul"}
    for name, dropped in ablation.VARIANTS.items():
        if name.startswith("no-"):
            assert dropped == (name.removeprefix("no-"),), name


def test_full_is_the_real_layer_where_the_backward_recomposes(monkeypatch):
    """Every kernel counted large (KEEP_COMPOSED_NUMEL 0): the real layer and ``full`` recompose
    w in the backward, so the input gradient is taken through the composed weight; no-bwd takes
    it through the child instead (what it names)."""
    from cwps_lightning.cwps import layers as L

    ablation = load_benchmark("compose_ablation")
    monkeypatch.setattr(L, "KEEP_COMPOSED_NUMEL", 0)
    x = torch.randn(2, 4, 5, 5)

    def run(layer):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.square().sum().backward()
        return y.detach(), xi.grad, layer.weight.grad, layer.mask_logits.grad

    real, full = pair(ablation, ())
    for a, b in zip(run(real), run(full), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    _, no_bwd = pair(ablation, ("bwd",))
    y, gx, _, _ = run(no_bwd)
    xi = x.clone().requires_grad_()
    child = torch.nn.functional.conv2d(xi, no_bwd.weight.detach(), None, padding=1)
    (expected,) = torch.autograd.grad(child, xi, grad_outputs=2 * y)
    torch.testing.assert_close(gx, expected, rtol=1e-5, atol=1e-6)


def test_the_script_reports_paired_median_ratios_over_the_timed_rounds(ablation, monkeypatch,
                                                                       capsys):
    """On a fake clock (the step of variant i, i = 1..6, in timed round r takes fine-tuning's
    times (1 + i/10, 1 + i/5, 5)[r], fine-tuning's (10, 20, 40)[r]; a warm-up step 1000):
    ratio 1 + i/5, the median of the paired ratios; every variant in the hard stage, the order
    rotated every round, the warm-up untimed."""
    import types

    from .helpers import Small

    torch.set_num_threads(1)
    lo = ablation.lo
    variant_of, calls, clock = {}, [], [0.0]
    ablated = ablation.ablated_model

    def record(model, dropped):
        model = ablated(model, dropped)
        variant_of[id(model)] = next(n for n, d in ablation.VARIANTS.items() if d == dropped)
        assert all(layer.stage == "hard" for _, layer in lo.cwps_layers(model))
        return model

    def build_base(name, seed):
        torch.manual_seed(seed)
        base = Small()
        base.num_classes = 3
        return base

    order = list(ablation.VARIANTS)

    def train_step(model, opt, x, y, amp="none"):
        name = variant_of.get(id(model), "finetune")
        done = sum(1 for c in calls if c == name)
        calls.append(name)
        if done < 2:  # --warmup 2
            clock[0] += 1000.0
            return torch.tensor(1.0)
        r = done - 2
        ft = (10.0, 20.0, 40.0)[r]
        i = order.index(name) + 1 if name != "finetune" else 0
        clock[0] += ft if i == 0 else ft * (1 + i / 10, 1 + i / 5, 5.0)[r]
        return torch.tensor(1.0)

    monkeypatch.setattr(ablation, "ablated_model", record)
    monkeypatch.setattr(lo, "build_base", build_base)
    monkeypatch.setattr(lo, "train_step", train_step)
    monkeypatch.setattr(ablation, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    ratios = ablation.main(["--size", "8", "--batch", "2", "--rounds", "3", "--warmup", "2"])
    assert ratios["finetune"] == 1.0
    for i, name in enumerate(order, start=1):
        assert ratios[name] == pytest.approx(1 + i / 5), name
    names = ["finetune", *order]
    timed = calls[2 * len(names):]
    for r in range(3):
        assert timed[r * 7:(r + 1) * 7] == names[r:] + names[:r], r


def test_loader_throughput_times_whole_epochs_after_an_untimed_one(monkeypatch):
    """A loader of batches of 4, 4 and 2 images on a fake clock that moves one second a batch:
    two timed epochs are 20 images in 6 s; the first pass over it (the warm-up) is not timed."""
    import types

    loader_mod = load_benchmark("loader_throughput")
    clock, passes = [0.0], [0]

    class Loader:
        def __iter__(self):
            passes[0] += 1
            for n in (4, 4, 2):
                clock[0] += 1.0
                yield torch.zeros(n, 3, 2, 2), torch.zeros(n)

    monkeypatch.setattr(loader_mod, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    assert loader_mod.time_loader(Loader(), 2) == pytest.approx(20 / 6)
    assert passes[0] == 3
