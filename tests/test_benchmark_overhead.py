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


# ---------------------------------------------------------------------------------------------
# The reported figures (mutation audit): ratios, CI, verdict, JSON, timing loop, memory worker
# ---------------------------------------------------------------------------------------------
def test_paired_ratio_is_the_median_of_per_round_ratios_with_the_bootstrap_95_percent_ci():
    """Seven rounds whose ratios are 1..7 (in shuffled rounds, each against another base time):
    the median ratio is 4; the bootstrap medians of 7 draws fall at or below the j-th value
    with probability P(Binomial(7, j/7) >= 4): 0.3% for j=1, 9.1% for j=2, 90.9% for j=5 and
    99.7% for j=6, so with 2000 resamples the 2.5% and 97.5% quantiles are the 2nd and 6th
    values (each more than 6 standard deviations of the resampling noise from its neighbour)."""
    bench = load_benchmark("layer_overhead")
    ratios = [3.0, 7.0, 1.0, 5.0, 2.0, 6.0, 4.0]
    base = [10.0, 20.0, 5.0, 40.0, 8.0, 16.0, 32.0]
    times = [r * b for r, b in zip(ratios, base, strict=True)]
    median, (lo, hi) = bench.paired_ratio(times, base)
    assert median == 4.0
    assert (lo, hi) == (2.0, 6.0)
    assert bench.paired_ratio(base, base) == (1.0, (1.0, 1.0))  # identical steps: exactly 1
    with pytest.raises(ValueError):  # rounds must pair up
        bench.paired_ratio(times[:-1], base)


def _fake_main(monkeypatch, tmp_path, times, mem, stopped=False, skip_memory=False):
    """layer_overhead.main with the measuring stood in for: ``times`` (variant -> step seconds
    per round) and ``mem`` (variant -> a memory worker's result); returns (exit status, JSON,
    printed text via capsys by the caller)."""
    bench = load_benchmark("layer_overhead")
    threads = torch.get_num_threads()
    monkeypatch.setattr(bench, "build_all",
                        lambda names, *a, **k: {n: torch.nn.Linear(1, 1) for n in names})
    monkeypatch.setattr(bench, "check_equivalence", lambda models, args, device: {})
    monkeypatch.setattr(bench, "run_timing", lambda models, args, device: {
        "times_s": {n: list(t) for n, t in times.items()},
        "final_loss": {n: (float("nan") if n == "cwps-hard" else 1.0) for n in times},
        "stopped": stopped})

    def run_memory(args, names, decisions_task=None, results=None):
        results.update({n: dict(r) for n, r in mem.items()})
        return results

    monkeypatch.setattr(bench, "run_memory", run_memory)
    out = tmp_path / "run.json"
    argv = ["--variants", ",".join(times), "--out", str(out), "--threads", "1",
            "--steps", str(len(times["finetune"]))] + (["--skip-memory"] if skip_memory else [])
    try:
        rc = bench.main(argv)
    finally:
        torch.set_num_threads(threads)
    return rc, json.loads(out.read_text())


MiB = 2**20


def _mem(peak_mib, saved_act_mib, saved_total_mib, hwm_mib, reached=True):
    return {"peak_growth_bytes": peak_mib * MiB, "saved_activation_bytes": saved_act_mib * MiB,
            "saved_total_bytes": saved_total_mib * MiB, "hwm_growth_bytes": hwm_mib * MiB,
            "peak_reached_in_steps": reached}


def test_the_report_pairs_rounds_and_decides_on_the_paired_ratio(monkeypatch, tmp_path, capsys):
    """Hand-made timings and memory: cwps-soft's per-round ratios 1.05, 1.4, 1.025 (paired
    median 1.05, exactly the target: PASS) while its unpaired median ratio is 41/30; cwps-hard's
    1.1, 1.1, 0.5 (paired 1.1: FAIL) while its unpaired one is 20/30. Memory: soft grows by
    110 MiB against fine-tuning's 100 (1.10, the target: PASS), hard by 120 (FAIL)."""
    times = {"finetune": [10.0, 30.0, 40.0], "cwps-soft": [10.5, 42.0, 41.0],
             "cwps-hard": [11.0, 33.0, 20.0],
             "finetune+compile": [5.0, 5.0, 5.0], "cwps-soft+compile": [6.0, 6.0, 6.0]}
    mem = {"finetune": _mem(100, 50, 80, 100), "cwps-soft": _mem(110, 60, 200, 300),
           "cwps-hard": _mem(120, 45, 100, 100, reached=False)}
    rc, result = _fake_main(monkeypatch, tmp_path, times, mem)
    text = capsys.readouterr().out
    assert rc == 0 and "stopped" not in result
    rows = result["variants"]
    soft, hard, ft = rows["cwps-soft"], rows["cwps-hard"], rows["finetune"]
    assert soft["paired_time_ratio"] == pytest.approx(1.05)
    assert soft["time_ratio"] == pytest.approx(41.0 / 30.0)
    assert hard["paired_time_ratio"] == pytest.approx(1.1)
    assert hard["time_ratio"] == pytest.approx(20.0 / 30.0)
    assert ft["paired_time_ratio"] == 1.0 and ft["time_ratio"] == 1.0
    for row, per_round in ((soft, [1.05, 1.4, 1.025]), (hard, [1.1, 1.1, 0.5])):
        lo, hi = row["paired_time_ratio_ci95"]
        assert min(per_round) - 1e-9 <= lo <= row["paired_time_ratio"] <= hi \
            <= max(per_round) + 1e-9
    assert soft["median_ms"] == pytest.approx(41e3)
    assert (soft["min_ms"], soft["max_ms"]) == pytest.approx((10.5e3, 42e3))
    assert soft["times_ms"] == pytest.approx([10.5e3, 42e3, 41e3])
    assert soft["mem_ratio"] == pytest.approx(1.1) and hard["mem_ratio"] == pytest.approx(1.2)
    assert soft["saved_activation_ratio"] == pytest.approx(1.2)
    assert hard["saved_activation_ratio"] == pytest.approx(0.9)
    assert result["verdict"] == {"cwps-soft": {"time_ok": True, "mem_ok": True},
                                 "cwps-hard": {"time_ok": False, "mem_ok": False}}
    compiled = rows["cwps-soft+compile"]  # like for like: against fine-tuning compiled
    assert compiled["same_mode_base"] == "finetune+compile"
    assert compiled["paired_time_ratio_same_mode"] == pytest.approx(1.2)
    assert compiled["paired_time_ratio"] == pytest.approx(0.2)  # (and against eager: 6/30)
    assert "_worker" not in result["config"]
    # the targets the verdict applied (soft passed at exactly 1.05 and 1.10, hard failed above)
    assert result["targets"] == {"time_ratio_max": 1.05, "mem_ratio_max": 1.10}
    assert "cwps-soft: time 1.050" in text and "(<= 1.05: PASS)" in text
    assert "WARNING: ru_maxrss not raised by the training steps for ['cwps-hard']" in text
    assert "WARNING: non-finite loss after training for ['cwps-hard']" in text


def test_a_run_stopped_part_way_exits_3_and_names_what_it_kept(monkeypatch, tmp_path, capsys):
    times = {"finetune": [10.0, 10.0], "cwps-soft": [11.0, 12.0]}
    mem = {"finetune": _mem(100, 50, 80, 100)}
    rc, result = _fake_main(monkeypatch, tmp_path, times, mem, stopped=True)
    assert rc == 3
    assert result["stopped"] == {"in": "timing", "rounds": 2, "memory_workers": 1}
    assert result["variants"]["cwps-soft"]["paired_time_ratio"] == pytest.approx(1.15)
    assert "mem_ratio" not in result["variants"]["cwps-soft"]  # its worker did not finish
    assert "STOPPED (SIGTERM) in the timing phase, after 2 of 2 timed rounds and 1 of 2" \
        in capsys.readouterr().out


def test_variants_without_finetune_are_refused_before_any_work(monkeypatch):
    bench = load_benchmark("layer_overhead")

    def build_all(*a, **k):
        raise AssertionError("built models")

    monkeypatch.setattr(bench, "build_all", build_all)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit, match="must include finetune"):
            bench.main(["--variants", "cwps-soft,cwps-hard", "--skip-memory", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)


def test_mem_steps_below_one_is_refused(capsys):
    with pytest.raises(SystemExit) as stop:
        load_benchmark("layer_overhead").parse_args(["--mem-steps", "0"])
    assert stop.value.code == 2
    assert "--mem-steps must be an integer >= 1, got 0" in capsys.readouterr().err


def _timing_harness(monkeypatch, stop_at=None):
    """run_timing over three stand-in models on a fake clock: step k of variant n in round r
    takes (r + 1) * {finetune: 1, a: 10, b: 100}[n] seconds; events record the order of syncs,
    clock reads and steps."""
    import types

    bench = load_benchmark("layer_overhead")
    names = ["finetune", "a", "b"]
    models = {n: torch.nn.Linear(2, 2) for n in names}
    which = {id(m): n for n, m in models.items()}
    scale = {"finetune": 1.0, "a": 10.0, "b": 100.0}
    clock, events, rounds = [0.0], [], {n: 0 for n in names}

    def train_step(model, opt, x, y, amp="none"):
        n = which[id(model)]
        assert amp == "bf16"  # every step under the run's --amp
        events.append(("step", n))
        if stop_at is not None and len([e for e in events if e[0] == "step"]) == stop_at:
            raise bench.Stopped()
        clock[0] += (rounds[n] + 1) * scale[n]
        rounds[n] += 1
        return torch.tensor(1.0)

    def perf_counter():
        events.append(("clock",))
        return clock[0]

    monkeypatch.setattr(bench, "train_step", train_step)
    monkeypatch.setattr(bench, "sync", lambda device: events.append(("sync",)))
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=perf_counter))
    # (a full collection per step costs ~0.3 s in a test process; it does not decide a figure)
    monkeypatch.setattr(bench, "gc", types.SimpleNamespace(collect=lambda: None,
                                                           enable=lambda: None,
                                                           disable=lambda: None))
    args = argparse.Namespace(warmup=2, steps=3, amp="bf16", batch=2, size=8, seed=0,
                              channels_last=False)
    out = bench.run_timing(models, args, torch.device("cpu"))
    return out, events, names, scale


def test_timing_rotates_the_order_and_times_only_the_rounds_after_the_warm_up(monkeypatch,
                                                                              capsys):
    out, events, names, scale = _timing_harness(monkeypatch)
    assert not out["stopped"]
    for n in names:  # rounds 3..5 (after two warm-up rounds), each alone on the clock
        assert out["times_s"][n] == [r * scale[n] for r in (3.0, 4.0, 5.0)], n
    steps = [e[1] for e in events if e[0] == "step"]
    assert len(steps) == 5 * 3
    for r in range(5):  # every round starts one variant later
        assert steps[3 * r: 3 * r + 3] == names[r % 3:] + names[: r % 3], r
    # each timed interval waits for the device before the first clock read and after the step
    for i, e in enumerate(events):
        if e[0] == "step":
            assert events[i - 2: i] == [("sync",), ("clock",)]
            assert events[i + 1: i + 3] == [("sync",), ("clock",)]


def test_timing_stopped_keeps_only_the_rounds_every_variant_finished(monkeypatch, capsys):
    # the 8th step: the second of the first timed round (round 3, order a, b, finetune)
    out, _, names, scale = _timing_harness(monkeypatch, stop_at=8)
    assert out["stopped"]
    assert out["times_s"] == {n: [] for n in names}
    out, _, names, scale = _timing_harness(monkeypatch, stop_at=11)  # in the 2nd timed round
    assert out["stopped"]
    assert out["times_s"] == {n: [3.0 * scale[n]] for n in names}


def _memory_harness(monkeypatch, mem_steps, peaks):
    """memory_worker on a tiny model with the process's memory figures stood in for: VmRSS
    1000 KiB before the steps, ru_maxrss 5000 KiB from the build, step k peaking at peaks[k]
    KiB (ru_maxrss the highest so far), VmHWM reading 100 KiB under it."""
    import types

    bench = load_benchmark("layer_overhead")
    state = {"rss": 1000, "maxrss": 5000, "hwm": 1000, "steps": 0}
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    model.num_classes = 4
    monkeypatch.setattr(bench, "build_all", lambda names, *a, **k: {names[0]: model})
    original = bench.train_step

    def train_step(model, opt, x, y, amp="none"):
        peak = peaks[state["steps"]]
        state["steps"] += 1
        state["maxrss"] = max(state["maxrss"], peak)
        state["hwm"] = max(state["hwm"], peak - 100)
        return original(model, opt, x, y, amp)

    monkeypatch.setattr(bench, "train_step", train_step)
    monkeypatch.setattr(bench, "rss_kib", lambda: state["rss"])
    monkeypatch.setattr(bench, "hwm_kib", lambda: state["hwm"])
    monkeypatch.setattr(bench, "reset_hwm", lambda: True)
    monkeypatch.setattr(bench, "resource", types.SimpleNamespace(
        RUSAGE_SELF=0, getrusage=lambda who: types.SimpleNamespace(ru_maxrss=state["maxrss"])))
    args = bench.parse_args(["--batch", "2", "--size", "8", "--threads", "1",
                             "--mem-steps", str(mem_steps)])
    args._worker = "finetune"
    out = bench.memory_worker(args)
    return out, state


def test_memory_worker_reports_growth_over_the_rss_before_the_steps_in_bytes(monkeypatch):
    torch.set_num_threads(1)
    out, state = _memory_harness(monkeypatch, 2, [4000, 7000])
    assert state["steps"] == 2  # --mem-steps steps (saved_tensor_bytes steps on its own)
    assert out["peak_growth_bytes"] == (7000 - 1000) * 1024
    assert out["hwm_growth_bytes"] == (6900 - 1000) * 1024
    assert out["rss_before_kib"] == 1000 and out["ru_maxrss_before_kib"] == 5000
    assert out["peak_reached_in_steps"] is True
    # steps that stay under the build's high-water mark: ru_maxrss says nothing about them
    out, _ = _memory_harness(monkeypatch, 1, [4000])
    assert out["peak_reached_in_steps"] is False
    assert out["peak_growth_bytes"] == (5000 - 1000) * 1024  # (an upper bound, flagged)


def test_saved_tensor_bytes_counts_activations_apart_from_parameters_and_buffers():
    """Linear(16, 16) -> Linear(16, 10) -> times a buffer, on an input that needs no gradient:
    the first layer saves its input (an activation), the second its weight (for the input
    gradient) and the first layer's output, the product its buffer; parameters and buffers
    are not activations."""
    torch.set_num_threads(1)
    bench = load_benchmark("layer_overhead")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(16, 16), torch.nn.Linear(16, 10)
            self.register_buffer("scale", torch.full((10,), 2.0))

        def forward(self, x):
            return self.b(self.a(x)) * self.scale

    net = Net()
    x, y = torch.randn(4, 16), torch.randint(0, 10, (4,))
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    out = bench.saved_tensor_bytes(net, opt, x, y)
    owned = net.b.weight.nbytes + net.scale.nbytes
    assert out["saved_param_buffer_bytes"] == owned
    assert out["saved_activation_bytes"] >= x.nbytes + 4 * 16 * 4  # the input, a's output
    assert out["saved_total_bytes"] == owned + out["saved_activation_bytes"]


def test_memory_workers_get_the_runs_settings_and_a_fixed_mmap_threshold(monkeypatch,
                                                                       tmp_path):
    """Each worker is this script with --_worker, parsing to the parent's settings; on the CPU
    with glibc's mmap threshold fixed at 1 MiB unless --malloc-default; its result is the last
    line of its output."""
    import subprocess
    import sys

    bench = load_benchmark("layer_overhead")
    path, _ = _job_results(tmp_path, bench.build_base("resnet18", 0))
    calls = []

    def run(cmd, env=None, **kw):
        calls.append((cmd, env))
        line = json.dumps({"peak_growth_bytes": 3 * MiB, "saved_activation_bytes": MiB})
        return subprocess.CompletedProcess(cmd, 0, "a warning\n" + line + "\n", "")

    monkeypatch.setattr(bench.subprocess, "run", run)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    argv = ["--batch", "3", "--size", "24", "--seed", "7", "--threads", "1", "--mem-steps", "4",
            "--amp", "bf16", "--channels-last", "--decisions", str(path)]
    args = bench.parse_args(argv)
    results = bench.run_memory(args, ["finetune", "cwps-hard"], "a")
    assert list(results) == ["finetune", "cwps-hard"]
    assert results["cwps-hard"]["peak_growth_bytes"] == 3 * MiB
    for (cmd, env), name in zip(calls, ["finetune", "cwps-hard"], strict=True):
        assert cmd[0] == sys.executable and cmd[1].endswith("layer_overhead.py")
        worker = bench.parse_args(cmd[2:])
        assert worker._worker == name
        for key in ("device", "batch", "size", "seed", "threads", "mem_steps", "amp",
                    "channels_last", "model", "decisions"):
            assert getattr(worker, key) == getattr(args, key), key
        assert worker.decisions_task == "a"
        assert env["MALLOC_MMAP_THRESHOLD_"] == str(1 << 20)
        assert env["PYTHONPATH"].split(":")[0] == str(bench.REPO / "src")
    calls.clear()
    bench.run_memory(bench.parse_args(["--malloc-default"]), ["finetune"])
    assert "MALLOC_MMAP_THRESHOLD_" not in calls[0][1]


def test_train_step_is_the_documented_sgd_step_from_fresh_gradients():
    """Two steps of train_step with make_optimizer on a plain model equal two steps of torch's
    SGD at the documented settings (lr 1e-3, momentum 0.9, weight decay 5e-4), each from the
    step's own gradient, in fp32 unless --amp says otherwise."""
    torch.set_num_threads(1)
    bench = load_benchmark("layer_overhead")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    ref = __import__("copy").deepcopy(model)
    x, y = torch.randn(6, 8), torch.randint(0, 4, (6,))
    opt = bench.make_optimizer(model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    for _ in range(3):
        loss = bench.train_step(model, opt, x, y)
        ref_opt.zero_grad()
        ref_loss = torch.nn.functional.cross_entropy(ref(x), y)
        ref_loss.backward()
        ref_opt.step()
        torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-6, atol=1e-7)
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_mask_scores_step_without_weight_decay():
    """The CWPS variants' mask scores take no weight decay (as in the job): with a zero
    gradient (lr 1e-3, weight decay 5e-4) a score would shrink by 5e-7 of itself."""
    torch.set_num_threads(1)
    from .helpers import Small

    bench = load_benchmark("layer_overhead")
    torch.manual_seed(0)
    model = bench.make_variant("cwps-soft", Small(), None, 0)
    opt = bench.make_optimizer(model)
    layers = [layer for _, layer in bench.cwps_layers(model)]
    scores = [layer.mask_logits.detach().clone() for layer in layers]
    weights = [layer.weight.detach().clone() for layer in layers]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for layer, s, w in zip(layers, scores, weights, strict=True):
        assert torch.equal(layer.mask_logits.detach(), s)
        specific = torch.sigmoid(s) >= layer.threshold  # (shared rows are restored)
        assert not torch.equal(layer.weight.detach()[specific], w[specific])  # (decayed)


def _small_variants(names, batchnorm=False):
    bench = load_benchmark("layer_overhead")
    base, cwps = _base_and_cwps(bench, batchnorm)
    return bench, {n: bench.make_variant(n, base, cwps, 0) for n in names}


def test_two_pass_and_naive_variants_compute_cwps_soft_their_own_way(monkeypatch):
    """two-pass: two convolutions per CWPS convolution (child and parent); naive-autograd: one,
    on a weight composed by autograd; both the soft stage's function and gradients, which the
    equivalence check confirms (Small: two CWPS convolutions and a CWPS linear layer)."""
    torch.set_num_threads(1)
    bench, models = _small_variants(["cwps-soft", "two-pass", "naive-autograd"])
    assert {type(layer).__name__ for _, layer in bench.cwps_layers(models["two-pass"])} == {
        "TwoPassConv2d", "TwoPassLinear"}
    assert {type(layer).__name__ for _, layer in bench.cwps_layers(models["naive-autograd"])} \
        == {"NaiveConv2d", "NaiveLinear"}
    conv2d = torch.nn.functional.conv2d
    count = [0]

    def counted(*a, **k):
        count[0] += 1
        return conv2d(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "conv2d", counted)
    x = torch.randn(2, 3, 6, 6)
    for name, convs in (("two-pass", 4), ("naive-autograd", 2)):
        count[0] = 0
        models[name](x)
        assert count[0] == convs, name
    monkeypatch.undo()
    args = argparse.Namespace(batch=4, size=6, seed=0, channels_last=False)
    report = bench.check_equivalence(models, args, torch.device("cpu"))
    assert set(report) == {"two-pass", "naive-autograd"}
    for name, r in report.items():
        assert r["loss_abs_diff"] < 1e-5 and r["max_rel_grad_diff"] < 1e-4, (name, r)


def test_the_equivalence_check_reports_the_largest_gradient_and_the_loss_difference():
    """A 'two-pass' whose head holds twice the weight and halves its input (the same function,
    its head's weight gradient half the reference's: relative difference 0.5, the others 0) and
    a 'naive-autograd' whose head adds 1 to the logits of class 0 (another loss)."""
    torch.set_num_threads(1)
    bench, models = _small_variants(["cwps-soft", "two-pass", "naive-autograd"])
    for name in ("two-pass", "naive-autograd"):
        models[name] = bench.make_variant("cwps-soft", *_base_and_cwps(bench), 0)
    with torch.no_grad():
        models["two-pass"].head.weight.mul_(2)
        models["naive-autograd"].head.bias[0] += 1.0
    models["two-pass"].head.register_forward_pre_hook(lambda m, a: (a[0] / 2,))
    args = argparse.Namespace(batch=4, size=6, seed=0, channels_last=False)
    report = bench.check_equivalence(models, args, torch.device("cpu"))
    assert report["two-pass"]["loss_abs_diff"] < 1e-6
    assert report["two-pass"]["max_rel_grad_diff"] == pytest.approx(0.5, abs=1e-3)
    assert report["naive-autograd"]["loss_abs_diff"] > 1e-3


def _base_and_cwps(bench, batchnorm=False):
    from .helpers import Small

    torch.manual_seed(0)
    base = Small()
    base.num_classes = 3
    if not batchnorm:  # (the tests that need every gradient to carry signal)
        base.bn = torch.nn.Identity()
    return base, bench.make_cwps(base, 0)


def test_the_equivalence_check_takes_a_gradient_of_rounding_noise_for_no_scale():
    """conv1's bias before a BatchNorm: its exact gradient is 0, each implementation's is
    rounding noise; the check still reads the two exact compositions as equal."""
    torch.set_num_threads(1)
    bench, models = _small_variants(["cwps-soft", "two-pass", "naive-autograd"], batchnorm=True)
    args = argparse.Namespace(batch=4, size=6, seed=0, channels_last=False)
    report = bench.check_equivalence(models, args, torch.device("cpu"))
    for name, r in report.items():
        assert r["max_rel_grad_diff"] < 1e-4, (name, r)


def test_the_batch_is_drawn_from_the_seed():
    bench = load_benchmark("layer_overhead")
    args = argparse.Namespace(batch=2, size=8, seed=3, channels_last=False)
    torch.manual_seed(1)
    a = bench.make_batch(args, torch.device("cpu"), 10)
    torch.manual_seed(2)  # the global RNG does not matter, the seed does
    b = bench.make_batch(args, torch.device("cpu"), 10)
    assert all(torch.equal(s, t) for s, t in zip(a, b, strict=True))
    c = bench.make_batch(argparse.Namespace(**{**vars(args), "seed": 4}), torch.device("cpu"), 10)
    assert not torch.equal(a[0], c[0])


def test_job_decisions_put_each_channel_clearly_either_side_of_the_threshold():
    """(sigmoid 0.95 / 0.05: the soft variants mix 95% / 5% of the child, not a tie at 0.5)"""
    from .helpers import Small

    bench = load_benchmark("layer_overhead")
    base = Small()
    names = [n for n, _ in bench.cwps_layers(bench.make_cwps(base, 0))]
    model = bench.make_cwps(base, 0, {n: 0.5 for n in names})
    for _, layer in bench.cwps_layers(model):
        s = torch.sigmoid(layer.mask_logits.detach())
        assert ((s - 0.95).abs() < 5e-3).sum() == round(0.5 * s.numel())
        assert (((s - 0.95).abs() < 5e-3) | ((s - 0.05).abs() < 5e-3)).all()


@pytest.mark.parametrize("variants", ["finetune,cwps-soft,traffic-floor", "cwps-soft,finetune"])
def test_the_json_counts_the_cwps_layers_whatever_variant_comes_last(monkeypatch, tmp_path,
                                                                    variants):
    """Small has three CWPS layers (conv1, conv2, fc): the JSON's cwps_layers says so for any
    order of --variants."""
    from .helpers import Small

    bench = load_benchmark("layer_overhead")

    def build_base(name, seed):
        torch.manual_seed(seed)
        base = Small()
        base.num_classes = 3
        return base

    monkeypatch.setattr(bench, "build_base", build_base)
    monkeypatch.setattr(bench, "check_equivalence", lambda models, args, device: {})
    monkeypatch.setattr(bench, "run_timing", lambda models, args, device: {
        "times_s": {n: [1.0] for n in models}, "final_loss": {}, "stopped": False})
    out = tmp_path / "run.json"
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--variants", variants, "--skip-memory", "--steps", "1",
                           "--threads", "1", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert json.loads(out.read_text())["cwps_layers"] == 3
