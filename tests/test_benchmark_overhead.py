"""benchmarks/layer_overhead.py: --channels-last builds what the training job trains."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from .helpers import load_benchmark


def test_channels_last_puts_every_variant_and_the_batch_in_nhwc():
    bench = load_benchmark("layer_overhead")
    names = ["finetune", "cwps-hard"]
    models = bench.build_all(names, "resnet18", 0, torch.device("cpu"), channels_last=True)
    for name in names:
        # (a 1x1 kernel is contiguous in both formats: the 3x3 ones tell)
        kernels = [t for t in models[name].state_dict().values()
                   if t.dim() == 4 and t.shape[-1] > 1]
        assert kernels and all(t.is_contiguous(memory_format=torch.channels_last)
                               and not t.is_contiguous() for t in kernels), name
    args = argparse.Namespace(batch=2, size=32, seed=0, channels_last=True)
    x, _ = bench.make_batch(args, torch.device("cpu"), 10)
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    plain = bench.build_all(["finetune"], "resnet18", 0, torch.device("cpu"))["finetune"]
    assert plain.conv1.weight.is_contiguous()
    assert bench.parse_args(["--channels-last"]).channels_last
    assert not bench.parse_args([]).channels_last


def test_per_layer_variants_are_the_stage_without_its_groups():
    """cwps-hard-per-layer: the same layers, stage and step as cwps-hard (the same loss and
    gradients bit for bit on resnet18, whose layers each run once), only without ComposeGroups."""
    bench = load_benchmark("layer_overhead")
    names = ["finetune", "cwps-hard", "cwps-hard-per-layer"]
    torch.manual_seed(0)
    models = bench.build_all(names, "resnet18", 0, torch.device("cpu"))
    grouped, per_layer = models["cwps-hard"], models["cwps-hard-per-layer"]
    layers = dict(bench.cwps_layers(per_layer))
    assert all(layer.stage == "hard" and "_compose_group" not in layer.__dict__
               for layer in layers.values())
    assert any("_compose_group" in layer.__dict__ for _, layer in bench.cwps_layers(grouped))
    args = argparse.Namespace(batch=2, size=32, seed=0, channels_last=False)
    x, y = bench.make_batch(args, torch.device("cpu"), 1000)
    losses = [bench.train_step(m, bench.make_optimizer(m), x, y) for m in (grouped, per_layer)]
    assert torch.equal(*losses)
    for (name, a), b in zip(grouped.named_parameters(), per_layer.parameters(), strict=True):
        assert torch.equal(a, b), name  # after one SGD step: the same gradients
    assert "cwps-soft-per-layer" in bench.EXTRA_VARIANTS


@pytest.mark.parametrize("channels_last", [False, True])
def test_traffic_floor_steps_as_fine_tuning_with_a_compose_and_a_fused_pass_per_layer(
        channels_last):
    """traffic-floor is a lower bound, not a CWPS step: two steps give fine-tuning's weights bit
    for bit; every CWPS layer composes once per forward and takes one fused pass per backward,
    on a 1x1 output over the taps its input meets only (resnet18 at 32 px: layer4's 3x3
    convolutions, one tap of nine, the stride-2 one four of nine)."""
    torch.set_num_threads(2)
    bench = load_benchmark("layer_overhead")
    names = ["finetune", "traffic-floor"]
    models = bench.build_all(names, "resnet18", 0, torch.device("cpu"), channels_last)
    floor = models["traffic-floor"].traffic_floor
    n_layers = len(list(bench.cwps_layers(bench.make_cwps(bench.build_base("resnet18", 0), 0))))
    args = argparse.Namespace(batch=2, size=32, seed=0, channels_last=channels_last)
    x, y = bench.make_batch(args, torch.device("cpu"), 1000)
    opts = {n: bench.make_optimizer(m) for n, m in models.items()}
    for _ in range(2):
        losses = [bench.train_step(models[n], opts[n], x, y) for n in names]
        assert torch.equal(*losses)
    assert floor.passes == [2 * n_layers, 2 * n_layers]
    for (name, a), b in zip(models["finetune"].named_parameters(),
                            models["traffic-floor"].parameters(), strict=True):
        assert torch.equal(a, b), name
    assert floor.window_numel["layer4.1.conv2"] == 512 * 512  # one tap of 3x3
    assert floor.window_numel["layer4.0.conv1"] == 512 * 256 * 4  # 2x2 of 3x3
    assert floor.window_numel["layer3.1.conv2"] == 256 * 256 * 9  # a 2x2 output: all taps
    assert "fc" not in floor.window_numel  # the head is not a CWPS layer


def test_cwps_variants_step_with_the_jobs_shared_channel_freeze():
    """The hard step restores the shared channels after the SGD step, as the training job's
    optimiser does; fine-tuning's optimiser has no such hook."""
    bench = load_benchmark("layer_overhead")
    models = bench.build_all(["finetune", "cwps-hard"], "resnet18", 0, torch.device("cpu"))
    ft_opt = bench.make_optimizer(models["finetune"])
    assert not ft_opt._optimizer_step_post_hooks
    model = models["cwps-hard"]
    opt = bench.make_optimizer(model)
    hooks = opt._optimizer_step_post_hooks.values()
    assert any(isinstance(getattr(h, "__self__", None), bench.SharedChannelFreeze) for h in hooks)
    opt.param_groups[0]["weight_decay"] = 0.1  # moves every row, shared ones too, unless restored
    layer = model.layer1[0].conv1
    shared = torch.sigmoid(layer.mask_logits.detach()) < layer.threshold
    assert shared.any() and (~shared).any()
    before = layer.weight.detach().clone()
    args = argparse.Namespace(batch=2, size=32, seed=0, channels_last=False)
    x, y = bench.make_batch(args, torch.device("cpu"), 1000)
    bench.train_step(model, opt, x, y)
    moved = (layer.weight.detach() != before).flatten(1).any(1)
    assert not moved[shared].any() and moved[~shared].all()


def _job_results(tmp_path, model):
    """A results.json as the training job writes it, with per-layer fractions for model."""
    bench = load_benchmark("layer_overhead")
    names = [name for name, _ in bench.cwps_layers(bench.make_cwps(model, 0))]
    fractions = {name: (0.0 if i % 3 == 0 else 1.0 if i % 3 == 1 else 0.25)
                 for i, name in enumerate(names)}
    tasks = {"a": {"specific_by_layer": {n: 1.0 for n in names}},
             "b": {"specific_by_layer": fractions}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"methods": {"cwps": {"tasks": tasks}}}))
    return path, fractions


def test_decisions_from_a_job_share_each_layers_fraction_of_channels(tmp_path):
    bench = load_benchmark("layer_overhead")
    base = bench.build_base("resnet18", 0)
    path, fractions = _job_results(tmp_path, base)
    task, loaded = bench.load_decisions(str(path))
    assert task == "b" and loaded == fractions  # the last task by default
    model = bench.make_cwps(base, 0, loaded)
    for name, layer in bench.cwps_layers(model):
        specific = torch.sigmoid(layer.mask_logits) >= layer.threshold
        assert int(specific.sum()) == round(fractions[name] * specific.numel()), name
    # the parents are those of the random decisions (only the mask scores differ)
    random = dict(bench.cwps_layers(bench.make_cwps(base, 0)))
    for name, layer in bench.cwps_layers(model):
        assert torch.equal(layer.parent_weight, random[name].parent_weight), name
    args = bench.parse_args(["--decisions", str(path), "--decisions-task", "a"])
    task, fractions = bench.decisions_of(args)
    assert task == "a" and set(fractions.values()) == {1.0}
    assert bench.decisions_of(bench.parse_args([])) == (None, None)


def test_bad_decisions_name_what_is_wrong(tmp_path):
    bench = load_benchmark("layer_overhead")
    base = bench.build_base("resnet18", 0)
    path, _ = _job_results(tmp_path, base)
    with pytest.raises(SystemExit, match=r"--decisions-task 'c' is not in .*\['a', 'b'\]"):
        bench.load_decisions(str(path), "c")
    with pytest.raises(SystemExit, match="not a readable results.json"):
        bench.load_decisions(str(tmp_path / "missing.json"))
    (tmp_path / "other.json").write_text(json.dumps({"methods": {"finetune": {}}}))
    with pytest.raises(SystemExit, match="no CWPS task with specific_by_layer"):
        bench.load_decisions(str(tmp_path / "other.json"))
    _, fractions = bench.load_decisions(str(path))
    fractions["not.a.layer"] = 1.0
    with pytest.raises(SystemExit, match=r"unknown \['not.a.layer'\]"):
        bench.make_cwps(base, 0, fractions)


def test_memory_counts_the_scratch_buffer_the_training_steps_use(monkeypatch):
    """The warm-up forward before the memory baseline may compose into the CWPS layers' scratch
    buffer (a large kernel in the soft stage does): the worker drops it, so the steps allocate
    it again and the peak growth counts it."""
    torch.set_num_threads(2)
    bench = load_benchmark("layer_overhead")
    seen = []
    original = bench.train_step

    def step(model, opt, x, y, amp="none"):
        seen.append(sum(b.numel() for b in bench._layers._SCRATCH.buffers.values()))
        return original(model, opt, x, y, amp)

    monkeypatch.setattr(bench, "train_step", step)
    args = bench.parse_args(["--size", "112", "--batch", "1", "--mem-steps", "2"])
    args._worker = "cwps-soft"
    out = bench.memory_worker(args)
    assert seen[0] == 0 and seen[1] >= 512 * 512 * 9  # resnet18's largest kernel, after one
    assert {"peak_growth_bytes", "hwm_growth_bytes", "saved_activation_bytes"} <= set(out)
    # The growth itself means something only in a fresh process, as the benchmark measures it
    # (run_memory): in this one, memory freed by earlier tests is resident already and the
    # high-water mark may stand above anything these steps reach.
    args.threads = 2
    fresh = bench.run_memory(args, ["cwps-soft"])["cwps-soft"]
    # at least the weight gradients and the momentum buffers (resnet18: 11.7M each); the
    # resettable high-water mark (at batch 1 the steps need not raise ru_maxrss past the build)
    growth = fresh["hwm_growth_bytes"] if fresh["hwm_reset"] else fresh["peak_growth_bytes"]
    assert growth >= 2 * 11e6 * 4, fresh


def test_compile_suffixes_pick_the_mode_and_bad_names_are_refused(monkeypatch):
    """+compile is torch.compile's default mode, +compile-ro reduce-overhead (CUDA graphs);
    the eager variant underneath is the named one; an unknown suffix is refused by name."""
    bench = load_benchmark("layer_overhead")
    assert bench.split_compile("cwps-hard+compile-ro") == ("cwps-hard", "reduce-overhead", True)
    assert bench.split_compile("cwps-soft+compile") == ("cwps-soft", None, True)
    assert bench.split_compile("traffic-floor") == ("traffic-floor", None, False)
    seen = []
    monkeypatch.setattr(bench.torch, "compile",
                        lambda model, mode=None: seen.append((type(model).__name__, mode)) or model)
    base = bench.build_all(["finetune"], "resnet18", 0, torch.device("cpu"))["finetune"]
    bench.make_variant("finetune+compile-ro", base, None, 0)
    bench.make_variant("finetune+compile", base, None, 0)
    assert seen == [("ResNet", "reduce-overhead"), ("ResNet", None)]
    with pytest.raises(SystemExit, match=r"finetune\+compile-xx"):
        bench.main(["--variants", "finetune,finetune+compile-xx", "--skip-memory"])


def test_compiled_variants_are_also_paired_with_fine_tuning_compiled_the_same_way():
    bench = load_benchmark("layer_overhead")
    times = {"finetune": [10.0, 10.0, 10.0], "cwps-soft": [11.0, 11.0, 11.0],
             "finetune+compile": [8.0, 8.0, 8.0], "cwps-soft+compile": [10.0, 10.0, 10.0],
             "cwps-hard+compile-ro": [9.0, 9.0, 9.0], "finetune+compile-ro": [6.0, 6.0, 6.0],
             "cwps-hard+compile": [9.0, 9.0, 9.0]}
    got = bench.same_mode_ratios(times)
    assert set(got) == {"cwps-soft+compile", "cwps-hard+compile", "cwps-hard+compile-ro"}
    assert got["cwps-soft+compile"][:2] == ("finetune+compile", 1.25)
    assert got["cwps-hard+compile"][:2] == ("finetune+compile", 9.0 / 8.0)
    assert got["cwps-hard+compile-ro"][:2] == ("finetune+compile-ro", 1.5)
    del times["finetune+compile-ro"]  # nothing to pair with
    assert "cwps-hard+compile-ro" not in bench.same_mode_ratios(times)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["soft", "hard"])
def test_step_variants_are_the_core_step_compose_training_as_the_cwps_variant(stage):
    """cwps-step-<stage>: the CWPS model's own layers in compose="step", stepped by the core's
    StepComposeSGD (compiled before the steps, its composed weights released so that the
    steps allocate them), training as cwps-<stage> does to rounding, the job's fused SGD for
    the other parameters."""
    torch.set_num_threads(2)
    bench = load_benchmark("layer_overhead")
    names = [f"cwps-{stage}", f"cwps-step-{stage}"]
    models = bench.build_all(names, "resnet18", 0, torch.device("cpu"), channels_last=True)
    ref, step = (models[n] for n in names)
    assert all(layer.compose == "step" and layer.stage == stage
               for _, layer in bench.cwps_layers(step))
    opts = {n: bench.make_optimizer(m) for n, m in models.items()}
    opt = opts[names[1]]
    assert isinstance(opt, bench.step_compose.StepComposeSGD)
    assert type(opt._rest).__name__ == "FusedSGD"
    assert all(layer.composed_weight is None for _, layer in bench.cwps_layers(step))
    args = argparse.Namespace(batch=2, size=32, seed=0, channels_last=True)
    x, y = bench.make_batch(args, torch.device("cpu"), 1000)
    for _ in range(2):
        losses = [bench.train_step(models[n], opts[n], x, y) for n in names]
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(ref.named_parameters(), step.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)
    assert "cwps-step-soft" in bench.EXTRA_VARIANTS and "cwps-step-hard" in bench.EXTRA_VARIANTS


def _run_until(tmp_path, extra: list[str], line: str):
    """The benchmark in a subprocess, sent SIGTERM (as ``timeout`` sends it) once it printed
    ``line``; its exit status, output and JSON."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "run.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "layer_overhead.py"
    proc = subprocess.Popen(
        [sys.executable, str(script), "--size", "16", "--batch", "2", "--threads", "1",
         "--warmup", "1", "--steps", "100000", "--variants", "finetune,cwps-soft",
         "--out", str(out), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for text in proc.stdout:
        seen.append(text)
        if line in text:
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=60)
    return proc.returncode, "".join(seen) + rest, json.loads(out.read_text())


def test_a_run_stopped_in_the_timing_reports_the_rounds_it_finished(tmp_path):
    rc, text, result = _run_until(tmp_path, ["--skip-memory"], "round  3/")
    assert rc == 3
    stopped = result["stopped"]
    assert stopped["in"] == "timing" and stopped["rounds"] >= 3
    assert f"STOPPED (SIGTERM) in the timing phase, after {stopped['rounds']} of 100000" in text
    for name in ("finetune", "cwps-soft"):  # every variant over the same finished rounds
        row = result["variants"][name]
        assert len(row["times_ms"]) == stopped["rounds"]
        assert row["paired_time_ratio"] > 0
    assert "cwps-soft" in result["verdict"]


def test_a_run_stopped_in_the_memory_phase_writes_what_it_has(tmp_path):
    # stopped while the first memory worker runs: no worker finished, no timing
    rc, text, result = _run_until(tmp_path, [], "memory: 2 fresh subprocesses")
    assert rc == 3
    assert result["stopped"] == {"in": "memory", "rounds": 0, "memory_workers": 0}
    assert result["variants"] == {} and result["verdict"] == {}
    assert "STOPPED (SIGTERM) in the memory phase" in text


@pytest.mark.parametrize(("args", "message"), [
    (["--batch", "0"], "--batch must be an integer >= 1, got 0"),
    (["--size", "4"], "--size must be an integer >= 8, got 4"),
    (["--steps", "0"], "--steps must be an integer >= 1, got 0"),
    (["--warmup", "-1"], "--warmup must be an integer >= 0, got -1"),
    (["--threads", "0"], "--threads must be an integer >= 1, got 0"),
    (["--model", "resnet_nosuch"], "--model: unknown model 'resnet_nosuch': model.name takes any "
                                   "timm model name"),
])
def test_bad_arguments_stop_before_any_work_with_one_line(capsys, args, message):
    """(each of these ran for a minute, or failed with a worker's traceback)"""
    with pytest.raises(SystemExit) as stop:
        load_benchmark("layer_overhead").parse_args(args)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
