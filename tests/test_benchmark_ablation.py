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
