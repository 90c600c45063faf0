"""The main job end to end through the real CLI (tiny settings), and its bad-input errors."""

from __future__ import annotations

import re
import statistics

import pytest
import timm
from hydra.utils import instantiate

from cwps_lightning.cwps import MultiTaskStore

from .helpers import (
    compose_run_config,
    count_store_params,
    count_test_top1,
    model_param_counts,
    read_results,
    run_train,
)

FIVE = "cwps.baselines=[finetune,frozen,taps,piggyback]"


def test_run_with_every_method_writes_results_for_each(run_dir, t0_cache):
    """The default run with TAPS and Piggyback added: five rows, each method's accounting
    counted again by hand from fresh models."""
    proc = run_train(run_dir, FIVE, cache=t0_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = read_results(run_dir)
    tasks = res["tasks"]
    assert tasks == ["optdigits", "mnist_sketch", "mnist_m"]
    k = len(tasks)
    methods = res["methods"]
    assert set(methods) == {"cwps", "finetune", "frozen", "taps", "piggyback"}
    for m in methods.values():
        assert set(m["tasks"]) == set(tasks)
        for t in tasks:
            assert 0.0 <= m["tasks"][t]["top1"] <= 100.0
        assert m["mean_top1"] == pytest.approx(statistics.fmean(
            m["tasks"][t]["top1"] for t in tasks))

    # the time split: exclusive parts and the rest add up to the run's time; CPMS per visit
    split = res["time_split"]
    assert sum(split["seconds"].values()) == pytest.approx(split["total"], abs=0.1)
    assert split["seconds"]["training"] > split["seconds"]["cpms"] > 0
    cpms = [h["cpms_seconds"] for h in methods["cwps"]["history"]]
    assert len(cpms) == k and all(c > 0 for c in cpms)
    assert split["seconds"]["cpms"] == pytest.approx(sum(cpms), abs=0.01)
    assert res["ranks"] == {"world_size": 1, "fits_checked_equal": 0}
    assert res["cpu_threads"] == 1  # (cli_env: OMP_NUM_THREADS=1)

    # CWPS's top-1 counted again, image by image, with the models rebuilt from the store
    store_dir = run_dir / "store"
    store = MultiTaskStore.load(store_dir)
    datamodule = instantiate(res["config"]["data"])
    counted = {t: count_test_top1(store.model(t), datamodule, t) for t in tasks}
    for t in tasks:
        assert methods["cwps"]["tasks"][t]["top1"] == pytest.approx(counted[t], abs=1e-9)
    assert methods["cwps"]["mean_top1"] == pytest.approx(sum(counted.values()) / k)

    # parameters counted on fresh models of each task's class count (README "param_ratio"):
    # fine-tuning = T0 + a full copy per task; frozen = T0 + each task's norms and head; CWPS =
    # the store's kernel tables + every task's own parameters, T0's included
    name, kwargs = res["backbone"], res["config"]["model"]["kwargs"]
    classes = {t: info["num_classes"] for t, info in store.manifest["tasks"].items()}
    assert set(classes) == {"T0", *tasks}
    counts = {t: model_param_counts(name, n, kwargs) for t, n in classes.items()}
    backbone = counts["T0"]["backbone"]
    assert res["backbone_params"] == backbone
    # TAPS: each open layer's full weight (resnet convs have no bias) + norms and head;
    # Piggyback: a bit per masked weight (the backbone's conv weights) + the head
    fresh = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    taps_open = {t: sum(fresh.get_submodule(n).weight.numel()
                        for n in methods["taps"]["tasks"][t]["open"]) for t in tasks}
    expected = {
        "finetune": counts["T0"]["full"] + sum(counts[t]["full"] for t in tasks),
        "frozen": counts["T0"]["full"] + sum(counts[t]["own"] for t in tasks),
        "taps": counts["T0"]["full"] + sum(counts[t]["own"] + taps_open[t] for t in tasks),
        "piggyback": counts["T0"]["full"] + sum(
            (counts[t]["full"] - counts[t]["own"]) / 32 + counts[t]["full"] - counts[t]["backbone"]
            for t in tasks),
        "cwps": count_store_params(store_dir, name, kwargs),
    }
    # the paper's ratio leaves every head (T0's and each task's) out of the numerator
    heads = sum(counts[t]["full"] - counts[t]["backbone"] for t in ["T0", *tasks])
    for method, total in expected.items():
        assert methods[method]["params"]["total"] == total, method
        assert methods[method]["params"]["heads"] == heads, method
        assert methods[method]["param_ratio_with_heads"] == pytest.approx(total / backbone), method
        assert methods[method]["param_ratio"] == pytest.approx((total - heads) / backbone), method
    # fine-tuning is exactly 1 + K backbones; frozen is T0 plus every task's norms
    assert methods["finetune"]["param_ratio"] == pytest.approx(1 + k, rel=1e-12)
    norms = sum(counts[t]["own"] - (counts[t]["full"] - counts[t]["backbone"]) for t in tasks)
    assert methods["frozen"]["param_ratio"] == pytest.approx(1 + norms / backbone, rel=1e-12)
    assert expected["frozen"] < expected["cwps"] < expected["finetune"]
    assert expected["frozen"] < expected["taps"] <= expected["finetune"]
    assert expected["frozen"] < expected["piggyback"] < expected["finetune"]
    table = (run_dir / "results.md").read_text()
    assert ("| Method | Param ratio | With heads | optdigits | mnist_sketch | mnist_m | Mean | Time per task |"
            in table)
    for label in ("CWPS-Incremental", "Fine-Tuning", "TAPS", "Piggyback"):
        assert f"| {label} |" in table
    for m in methods.values():
        assert all(m["tasks"][t]["seconds"] > 0 for t in tasks)
    # the figures, drawn from this run's numbers (their data is tested in tests/test_figures.py)
    assert sorted(res["figures"]) == [f"figures/{n}.png" for n in (
        "accuracy_vs_params", "first_layer_kernels", "relation_graph", "relation_heatmap",
        "specific_by_layer")]
    assert all((run_dir / f).stat().st_size > 0 for f in res["figures"])
    assert all(set(methods["cwps"]["tasks"][t]["specific_by_layer"]) == set(store.layers)
               for t in tasks)
    assert (run_dir / "store" / "manifest.json").exists()
    assert list((run_dir / "logs" / "cwps").glob("*/metrics.csv"))


def test_experiment_preset_composes(run_dir, t0_cache):
    proc = run_train(run_dir, "+experiment=digits_joint", "cwps.iterations=1",
                     "cwps.baselines=[]", "data.tasks=[optdigits]", cache=t0_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = read_results(run_dir)
    assert res["config"]["cwps"]["mode"] == "joint"
    assert set(res["methods"]) == {"cwps"}
    assert res["tasks"] == ["optdigits"]


def test_joint_run_iterates_cwps_and_visits_the_other_methods_once(run_dir, t0_cache):
    proc = run_train(run_dir, "+experiment=digits_joint", "cwps.iterations=2", FIVE,
                     "data.tasks=[optdigits]", cache=t0_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = read_results(run_dir)
    methods = res["methods"]
    assert [h["iteration"] for h in methods["cwps"]["history"]] == [0, 1]
    assert "figures/joint_iterations.png" in res["figures"]
    for name in ("finetune", "frozen", "taps", "piggyback"):
        assert [h["iteration"] for h in methods[name]["history"]] == [0]
        assert set(methods[name]["tasks"]) == {"optdigits"}


def test_bad_input_on_the_cli_is_one_clear_line(run_dir, t0_cache):
    proc = run_train(run_dir, "model.name=resnet_nosuch", cache=t0_cache, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "resnet_nosuch" in lines[0], proc.stderr[-2000:]
    assert "resnet18" in lines[0]  # says what is accepted
    assert "Traceback" not in proc.stderr
    assert not (run_dir / "results.json").exists()


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("cwps.threshold=1.5", "1.5"),
        ("cwps.threshold=-0.1", "-0.1"),
        ("cwps.distance=manhattan", "manhattan"),
        ("cwps.mode=sideways", "sideways"),
        ("cwps.iterations=3", "cwps.mode=joint"),
        ("data.tasks=[optdigits,nosuchtask]", "nosuchtask"),
        ("cwps.baselines=[finetune,magic]", "magic"),
        ("cwps.baselines=[finetune,no_such_module:Method]", "cannot import no_such_module"),
        ("cwps.baselines=[taps,taps]", "lists a method twice"),
        ("methods.taps.lam=-1", "methods.taps.lam must be a finite number >= 0, got -1"),
        ("methods.piggyback.optimizer=lion", "methods.piggyback.optimizer must be one of"),
        ("model.weights=/nonexistent/weights.pt", "/nonexistent/weights.pt"),
    ],
)
def test_bad_input_raises_config_error_before_any_output(run_dir, override, needle):
    from cwps_lightning.errors import ConfigError
    from cwps_lightning.train import run

    cfg = compose_run_config(run_dir, override)
    with pytest.raises(ConfigError, match=re.escape(needle)):
        run(cfg)
    assert not (run_dir / "results.json").exists()
    assert not (run_dir / "store").exists()


def test_unknown_config_group_option_names_it(run_dir):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as info:
        compose_run_config(run_dir, "data=nosuchdata")
    assert "nosuchdata" in str(info.value) and "digits" in str(info.value)
