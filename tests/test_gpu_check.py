"""benchmarks/gpu_check.py, run on the CPU: every layer path is checked, and a path no case
took fails the check."""

from __future__ import annotations

import pytest
import torch

from cwps_lightning.cwps import compose_group, layers, step_compose

from .helpers import load_benchmark


@pytest.fixture
def check():
    """The benchmark module; the process-wide settings its main() changes (random state, TF32
    flags) and this test's thread count are put back afterwards."""
    threads = torch.get_num_threads()
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.set_num_threads(1)
    with torch.random.fork_rng():
        yield load_benchmark("gpu_check")
    torch.set_num_threads(threads)
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def test_every_path_is_checked_and_counted(check, capsys):
    assert check.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for path in check.PATHS:
        assert f"ok  path {path!r} taken" in out and f"{path!r} taken 0 " not in out
    assert out.strip().endswith("ALL OK")
    # the counters are gone afterwards
    assert "apply" not in layers._ComposedOp.__dict__
    assert "apply" not in compose_group._GroupCompose.__dict__


def test_a_path_no_case_took_fails(check, capsys, monkeypatch):
    # every kernel small: nothing reaches the large-kernel path
    monkeypatch.setattr(layers, "KEEP_COMPOSED_NUMEL", 1 << 30)
    assert check.main(["--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "FAIL path 'composed-op large kernel' taken 0 time(s)" in out
    assert out.strip().endswith("SOME CHECKS FAILED")


def test_a_wrong_mask_gradient_fails(check, capsys, monkeypatch):
    slope = layers.mask_slope
    monkeypatch.setattr(layers, "mask_slope", lambda *a, **k: 2.0 * slope(*a, **k))
    assert check.main(["--device", "cpu"]) == 1
    assert "FAIL large 3x3      soft fp32" in capsys.readouterr().out


def test_a_wrong_step_compose_fails(check, capsys, monkeypatch):
    """The step compose's own mask gradient doubled: only its checks fail."""
    slope = step_compose.mask_slope
    monkeypatch.setattr(step_compose, "mask_slope", lambda *a, **k: 2.0 * slope(*a, **k))
    assert check.main(["--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert out.count("FAIL step compose") == 3
    assert "FAIL " not in out.replace("FAIL step compose", "")


def test_without_cuda_it_says_so_and_exits_2(check, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert check.main([]) == 2  # (--device cuda is the default)
    assert capsys.readouterr().out.strip() == "no CUDA device"


def _large_case(check):
    torch.manual_seed(0)
    kw, shape = check.PATH_CASES["large 3x3"]
    layer = check.CWPSConv2d(**kw)
    check.randomise(layer)
    return layer, torch.randn(shape).requires_grad_()


@pytest.mark.parametrize(("dtype", "error", "label"), [
    (None, 1.005, "fp32"),  # 0.5% off: well over fp32 rounding (1e-4), fails
    (torch.bfloat16, 1.1, "bfloat16"),  # 10% off: over bf16 rounding (3e-2), fails
])
def test_a_small_error_in_a_gradient_fails_at_each_precision(check, capsys, monkeypatch,
                                                              dtype, error, label):
    """The tolerances tell a real error from rounding: the mask gradient off by a small factor
    fails the check (the fp32 one at 0.5%, the bf16 one at 10%), the exact one passes."""
    layer, x = _large_case(check)
    assert check.check("large", layer, x, "soft", dtype, check.reference)
    slope = layers.mask_slope
    monkeypatch.setattr(layers, "mask_slope", lambda *a, **k: error * slope(*a, **k))
    assert not check.check("large", layer, x, "soft", dtype, check.reference)
    assert f"FAIL large          soft {label}" in capsys.readouterr().out


def test_a_merged_layer_unlike_the_wrapped_one_fails_the_run(check, capsys, monkeypatch):
    """(the other checks stood in for: only the merge decides here)"""
    layer, _ = _large_case(check)
    shape = check.PATH_CASES["large 3x3"][1]
    assert check.check_merged("large", layer, shape, torch.device("cpu"))
    to_plain = check.CWPSConv2d.to_plain

    def off(self):
        plain = to_plain(self)
        with torch.no_grad():
            plain.weight[0].add_(1e-2)
        return plain

    monkeypatch.setattr(check.CWPSConv2d, "to_plain", off)
    assert not check.check_merged("large", layer, shape, torch.device("cpu"))
    monkeypatch.setattr(check, "check", lambda *a, **k: True)
    monkeypatch.setattr(check, "check_step_compose", lambda *a, **k: True)
    monkeypatch.setattr(check, "PATHS", ())
    assert check.main(["--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert any(line.startswith("FAIL 3x3 s1 ") and "merged == wrapped" in line
               for line in out.splitlines())
    assert out.strip().endswith("SOME CHECKS FAILED")


def test_every_case_runs_in_both_stages_at_every_cpu_precision(check, capsys, monkeypatch):
    """fp32 and bf16 autocast (the CPU's) for every layer case, soft and hard; a merge check for
    every single layer (the checks themselves recorded, not run)."""
    seen, merged = [], []
    monkeypatch.setattr(check, "check", lambda name, module, x, stage, dtype, ref:
                        seen.append((name, stage, dtype)) or True)
    monkeypatch.setattr(check, "check_merged", lambda name, *a: merged.append(name) or True)
    monkeypatch.setattr(check, "check_step_compose", lambda *a, **k: True)
    monkeypatch.setattr(check, "PATHS", ())
    assert check.main(["--device", "cpu"]) == 0
    singles = list(check.CONVS) + [f"{n}{s}" for n in check.PATH_CASES
                                   for s in ("", " cl", " shared", " specific")] + ["linear 3-D"]
    models = ["grouped model", "grouped model cl", "grouped model shared"]
    assert sorted(seen, key=str) == sorted(
        [(n, st, dt) for n in singles + models for st in ("soft", "hard")
         for dt in (None, torch.bfloat16)], key=str)
    assert merged == singles


def test_shared_and_specific_cases_have_every_mask_score_on_one_side(check, monkeypatch):
    """'shared': every channel shared in the hard stage (all scores -3), 'specific': every
    channel task-specific (+3); the others random."""
    scores = {}

    def record(name, module, x, stage, dtype, ref):
        scores[name] = torch.cat([layer.mask_logits.detach().flatten()
                                  for _, layer in check.cwps_layers(module)])
        return True

    monkeypatch.setattr(check, "check", record)
    monkeypatch.setattr(check, "check_merged", lambda *a: True)
    monkeypatch.setattr(check, "check_step_compose", lambda *a, **k: True)
    monkeypatch.setattr(check, "PATHS", ())
    assert check.main(["--device", "cpu"]) == 0
    for name, s in scores.items():
        if name.endswith("shared"):
            assert (s == -3.0).all(), name
        elif name.endswith("specific"):
            assert (s == 3.0).all(), name
        else:
            assert (s > 0).any() and (s < 0).any(), name


def _step_compose_spoilt_at_the_end(check, monkeypatch, spoil):
    """check_step_compose (CPU, fp32, NCHW, eager) with ``spoil(model)`` applied to the
    step-compose net right after its last (8th) step; returns (ok, stages set)."""
    stages = []
    set_stage = check.set_stage
    monkeypatch.setattr(check, "set_stage",
                        lambda net, stage: stages.append(stage) or set_stage(net, stage))
    sgd = check.StepComposeSGD

    def spoilt(groups, model, **kw):
        opt, calls = sgd(groups, model=model, **kw), [0]
        step = opt.step

        def last_step_spoilt(*a, **k):
            out = step(*a, **k)
            calls[0] += 1
            if calls[0] == 8:
                with torch.no_grad():
                    spoil(model)
            return out

        opt.step = last_step_spoilt
        return opt

    monkeypatch.setattr(check, "StepComposeSGD", spoilt)
    return check.check_step_compose(torch.device("cpu"), False, None, compiled=False), stages


def test_step_compose_trains_soft_then_hard_steps_and_a_small_weight_error_fails(
        check, capsys, monkeypatch):
    """Both nets take 3 soft then 5 hard steps. A step-compose optimiser whose last step leaves
    one BatchNorm weight 1e-3 off (every decision and every other parameter as the reference's)
    fails on the parameters alone; the exact one passes (test_every_path_is_checked_and_counted).
    """
    def bn_off(model):
        model[1].weight[0] += 1e-3

    ok, stages = _step_compose_spoilt_at_the_end(check, monkeypatch, bn_off)
    assert not ok
    assert stages == [s for s in ["soft"] * 3 + ["hard"] * 5 for _ in range(2)]
    out = capsys.readouterr().out
    assert out.startswith("FAIL step compose   fp32: largest difference ")
    # (1e-3 over the weight's scale, max(|w|, 1): BatchNorm weights stay near 1)
    assert 5e-4 < float(out.split("largest difference ")[1].split()[0]) <= 1e-3


def test_step_compose_decisions_unlike_the_references_fail_with_equal_parameters(
        check, capsys, monkeypatch):
    """The step-compose net deciding at another threshold after its last step (its parameters
    exactly the reference's): the decisions differ, and that alone fails the comparison."""
    def decide_otherwise(model):
        layer = next(layer for _, layer in check.cwps_layers(model))
        layer.threshold = 0.999

    ok, _ = _step_compose_spoilt_at_the_end(check, monkeypatch, decide_otherwise)
    assert not ok
    out = capsys.readouterr().out
    assert out.startswith("FAIL step compose   fp32: largest difference ")
    assert float(out.split("largest difference ")[1].split()[0]) < 1e-4  # parameters agree


def test_a_wrong_forward_fails_even_where_every_gradient_agrees(check, capsys):
    """A reference off by delta = s(pixel) * v(channel), v in the null space of the composed
    1x1 weight's transpose and s orthogonal to every input channel's map: the gradients of
    mean(out^2) (input, child, mask scores) do not see delta, so only the forward comparison
    can fail the case."""
    torch.manual_seed(0)
    layer = check.CWPSConv2d(**check.CONVS["1x1 nobias"])  # 16 -> 32 channels, 1x1, no bias
    check.randomise(layer)
    x = torch.randn(2, 16, 4, 4)
    with torch.no_grad():
        m = torch.sigmoid(layer.mask_logits)
        w = torch.lerp(layer.parent_weight, layer.weight, m.view(-1, 1, 1, 1)).flatten(1)
        v = torch.linalg.svd(w.double().T).Vh[-1]  # w^T v = 0 (w: 32 x 16)
        pixels = x.permute(0, 2, 3, 1).reshape(-1, 16).double()  # 32 pixels x 16 channels
        s = torch.linalg.svd(pixels.T).Vh[-1]  # pixels^T s = 0
        delta = (s.view(2, 4, 4, 1) * v).permute(0, 3, 1, 2).float()
    assert delta.abs().max() > 1e-2

    def off(module, xi, stage):
        return check.reference(module, xi, stage) + delta

    xg = x.clone().requires_grad_()
    g = check.grads(layer, xg, check.reference(layer, xg, "soft"))
    g_off = check.grads(layer, xg, off(layer, xg, "soft"))
    for a, b in zip(g, g_off, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert check.check("1x1 nobias", layer, x.clone().requires_grad_(), "soft", None,
                       check.reference)
    assert not check.check("1x1 nobias", layer, x.clone().requires_grad_(), "soft", None, off)
    assert "FAIL 1x1 nobias" in capsys.readouterr().out
