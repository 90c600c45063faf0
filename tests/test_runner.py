"""The task sequence (runner.py): methods are compared on common random numbers."""

from __future__ import annotations

import random

import numpy as np
import pytest
import timm
import torch

from cwps_lightning.cwps.method import CWPSMethod
from cwps_lightning.data.digits import DigitsDataModule
from cwps_lightning.fitting import FitSettings
from cwps_lightning.methods.baselines import FineTune
from cwps_lightning.runner import MethodResult, Runner
from cwps_lightning.settings import CWPSSettings

from .helpers import cwps_settings

# one pytest-xdist worker runs this module: its tests share the module-scoped baseline runs
pytestmark = pytest.mark.xdist_group("runner")

TRAINER = dict(
    accelerator="cpu", devices=1, enable_checkpointing=False, enable_model_summary=False,
    enable_progress_bar=False, num_sanity_val_steps=0,
)


def _runner(cwps: CWPSSettings, seed: int = 3, limit: int = 96, **loader) -> Runner:
    dm = DigitsDataModule(image_size=16, limit_per_task=limit, tasks=["optdigits"], batch_size=16,
                          seed=0, **loader)
    torch.manual_seed(0)  # the same T0 for every runner
    t0 = timm.create_model("resnet18", pretrained=False, num_classes=10)
    # momentum 0: SGD keeps no state across fits, so a warm-up fit followed by a mask fit can
    # reproduce one fine-tuning fit of the same epochs step for step
    settings = FitSettings(trainer=TRAINER, lr=0.05, mask_lr=0.02, momentum=0.0)
    return Runner(dm, t0, settings, epochs=cwps.total_epochs, seed=seed)


def run_one(runner: Runner, method) -> MethodResult:
    return runner.run_method(method, runner.new_result(method))


def perturb_global_rngs() -> None:
    """Draw from torch's, Python's and NumPy's global generators (as other code would)."""
    torch.rand(7)
    random.random()
    np.random.rand(3)


def _max_weight_diff(a: MethodResult, b, task: str) -> float:
    """Largest weight difference between ``a``'s kept model of ``task`` and ``b``'s
    (a KeepingFineTune: fine-tuning keeps no models in its bank)."""
    layers = a.bank.entries[task].layers
    model = b.models[task]
    return max(float((lw.weight - model.get_submodule(n).weight.detach()).abs().max())
               for n, lw in layers.items())


class KeepingFineTune(FineTune):
    """Fine-tuning that keeps each task's trained model for the comparison."""

    def __init__(self):
        self.models = {}

    def train(self, task, iteration, bank, harness):
        trained = super().train(task, iteration, bank, harness)
        self.models[task] = trained.model
        return trained


# the data loader settings the pairing must hold under: in-process, and persistent workers
# (which start one pass per loader, so a split into two fits must not shift the order)
LOADERS = {"in_process": {}, "persistent_workers": dict(num_workers=1, persistent_workers=True)}


@pytest.fixture(scope="module", params=list(LOADERS))
def loader(request):
    return request.param


@pytest.fixture(scope="module")
def finetuned(loader):
    cwps = cwps_settings(threshold=0.0, warmup_epochs=1, soft_epochs=0, hard_epochs=2)
    method = KeepingFineTune()
    method.result = run_one(_runner(cwps, **LOADERS[loader]), method)
    return method


@pytest.mark.parametrize("warmup_epochs", [1, 0])
def test_cwps_without_sharing_reproduces_the_finetuning_run(finetuned, loader, warmup_epochs):
    """lambda = 0 keeps every channel task-specific; with no soft stage, CWPS is then the
    fine-tuning run cut in two fits (or, without a warm-up, in one): same head, same data
    order, same schedule."""
    cwps = cwps_settings(threshold=0.0, warmup_epochs=warmup_epochs, soft_epochs=0,
                         hard_epochs=3 - warmup_epochs)
    runner = _runner(cwps, **LOADERS[loader])
    # what ran before must not matter: every fit seeds itself. The fixture's baseline ran with
    # the global RNGs as _runner left them; move them on before this run starts.
    perturb_global_rngs()
    result = run_one(runner, CWPSMethod(cwps))
    assert result.tasks["optdigits"]["specific_channels"] == 1.0
    assert _max_weight_diff(result, finetuned, "optdigits") < 1e-4
    assert result.tasks["optdigits"]["top1"] == finetuned.result.tasks["optdigits"]["top1"]


def test_another_seed_gives_another_run(finetuned, loader):
    """The control for the test above: the weights do depend on the draw."""
    if loader != "in_process":
        pytest.skip("one control is enough")
    cwps = cwps_settings(threshold=0.0, warmup_epochs=1, soft_epochs=0, hard_epochs=2)
    other = run_one(_runner(cwps, seed=4), CWPSMethod(cwps))
    assert _max_weight_diff(other, finetuned, "optdigits") > 1e-2


# -- joint mode: a candidate that does not beat the kept model's val top-1 is not kept ----------
def _entry_tensors(bank, task: str, ids: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of ``task``'s bank entry (kernels, biases, norms, head, and the kernel ids
    unless ``ids`` is false: a bank read back from a store numbers kernels by table row)."""
    entry = bank.entries[task]
    out = {f"rest/{k}": v.clone() for k, v in entry.rest.items()}
    for name, lw in entry.layers.items():
        out[f"{name}.weight"] = lw.weight.clone()
        if ids:
            out[f"{name}.ids"] = lw.ids.clone()
        if lw.bias is not None:
            out[f"{name}.bias"] = lw.bias.clone()
    return out


def _same_tensors(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("second_val", [60.0, 80.0, 95.0], ids=["loses", "ties", "wins"])
def test_joint_mode_keeps_the_model_with_the_higher_val_top1(monkeypatch, tmp_path, second_val,
                                                            caplog):
    """Iteration 0's candidate scores val 80 / test 70, iteration 1's ``second_val`` / test 90
    (the runner's evaluation is scripted). A loser leaves the kept model, the bank and the
    store as they were, though its test top-1 is higher; a winner replaces all three. A tie
    is not better (Algorithm 1: c > c_i): the earlier model stays."""
    import cwps_lightning.runner as runner_module
    from cwps_lightning.cwps import MultiTaskStore, save_store

    scores = iter([80.0, 70.0, second_val, 90.0])  # (val, test) of iteration 0, then 1
    monkeypatch.setattr(runner_module, "evaluate_top1", lambda model, loader, device: next(scores))
    cwps = cwps_settings(mode="joint", iterations=2, warmup_epochs=1, soft_epochs=0,
                         hard_epochs=1)
    runner = _runner(cwps, limit=48)
    after_visit = []  # the bank entry after each visit, and the store written then

    def on_task_done(result):
        after_visit.append(_entry_tensors(result.bank, "optdigits"))
        save_store(tmp_path / "store", result.bank, {})

    runner.on_task_done = on_task_done
    with caplog.at_level("INFO", logger="cwps_lightning.runner"):
        result = run_one(runner, CWPSMethod(cwps))

    wins = second_val > 80.0
    said = [r.getMessage() for r in caplog.records if "optdigits it1: val" in r.getMessage()]
    assert len(said) == 1, said
    why = {60.0: "(kept the earlier model, of it0: its val top-1 80.00 is higher; ",
           80.0: "(kept the earlier model, of it0: its val top-1 80.00 is equal; ",
           # (a winner's line said nothing: a falling test top-1 read as if it were kept)
           95.0: "(replaces the model of it0: its val top-1 was 80.00)"}
    assert why[second_val] in said[0], said[0]
    first_line = [r.getMessage() for r in caplog.records if "optdigits it0: val" in
                  r.getMessage()]
    assert len(first_line) == 1 and "(" not in first_line[0].split("test")[1], first_line
    assert [h["accepted"] for h in result.history] == [True, wins]
    assert [(h["val_top1"], h["top1"]) for h in result.history] == [(80.0, 70.0),
                                                                   (second_val, 90.0)]
    kept = result.tasks["optdigits"]
    assert (kept["iteration"], kept["val_top1"], kept["top1"]) == (
        (1, second_val, 90.0) if wins else (0, 80.0, 70.0))
    first, second = after_visit  # the bank entry after iteration 0, after iteration 1
    assert _same_tensors(first, second) is not wins
    assert _same_tensors(_entry_tensors(result.bank, "optdigits"), second)
    # the store written after iteration 1 holds the model the bank keeps, tensor for tensor
    stored = MultiTaskStore.load(tmp_path / "store").to_bank()
    assert stored.tasks == ["T0", "optdigits"]
    kept_now = {k: v for k, v in second.items() if not k.endswith(".ids")}
    assert _same_tensors(_entry_tensors(stored, "optdigits", ids=False), kept_now)


def test_summary_arithmetic_mean_top1_time_per_task_and_ratios():
    """mean_top1 over the kept tasks; seconds_per_task: every visit's seconds (joint mode: all
    passes) per task, not per visit; the ratios are the bank's counts over the backbone's."""

    class Bank:
        def param_count(self, tasks=None):
            return {"backbone": 30, "total": 36}

    result = MethodResult("m", Bank(), tasks={"a": {"top1": 80.0}, "b": {"top1": 70.0}},
                          history=[{"seconds": s} for s in (1.0, 2.0, 3.0, 4.0)])
    summary = result.summary(backbone_params=10)
    assert summary["mean_top1"] == 75.0
    assert summary["seconds_per_task"] == 5.0  # 10 s over two passes of two tasks
    three = MethodResult("m", Bank(), tasks={t: {"top1": 1.0} for t in "abc"},
                         history=[{"seconds": s} for s in (7.4, 6.8, 8.0)])
    assert three.summary(10)["seconds_per_task"] == 7.4  # (the plain mean: 7.400000000000001)
    assert (summary["param_ratio"], summary["param_ratio_with_heads"]) == (3.0, 3.6)


def test_seeds_differ_by_visit_phase_task_and_run_seed_and_are_stable():
    """Joint mode's second pass must not replay the first pass's head and data order."""
    from types import SimpleNamespace

    def seed(base, task, phase, iteration):
        return Runner.seed(SimpleNamespace(seed_base=base), task, phase, iteration)

    first = seed(3, "optdigits", "fit", 0)
    assert first == seed(3, "optdigits", "fit", 0)  # stable: no state, no global RNG
    others = [seed(3, "optdigits", "fit", 1), seed(3, "optdigits", "head", 0),
              seed(3, "mnist_m", "fit", 0), seed(4, "optdigits", "fit", 0)]
    assert len({first, *others}) == 5
    # the key's characters count by position: visits 12 and 21 are two draws
    assert seed(3, "optdigits", "fit", 12) != seed(3, "optdigits", "fit", 21)
    assert all(0 <= s < 2**31 for s in (first, *others))


def test_a_stored_visit_drops_its_own_fit_checkpoints_only(monkeypatch, tmp_path):
    """A baseline names its fit by the task, CWPS by <task>-it<i>-<phase>: once the visit is
    stored, both kinds of checkpoint of that task and visit go, the others stay."""
    import cwps_lightning.runner as runner_module
    from cwps_lightning.methods.base import Method, Trained

    class Stub(Method):
        name = "stub"

        def train(self, task, iteration, bank, harness):
            return Trained(harness.new_model(task, iteration),
                           params={"kernels": 0, "task_own": 0})

    monkeypatch.setattr(runner_module, "evaluate_top1", lambda model, loader, device: 50.0)
    runner = _runner(cwps_settings(warmup_epochs=1, soft_epochs=0, hard_epochs=1), limit=48)
    runner.settings.checkpoint_dir = tmp_path
    names = ["optdigits", "optdigits-it0-mask", "optdigits-it1-mask", "mnist_m"]
    for name in names:
        (tmp_path / "stub" / name).mkdir(parents=True)
    run_one(runner, Stub())
    assert sorted(p.name for p in (tmp_path / "stub").iterdir()) == [
        "mnist_m", "optdigits-it1-mask"]


def test_progress_counts_each_step_and_names_resumed_ones_by_their_range(caplog):
    from cwps_lightning.runner import Progress

    caplog.set_level("INFO", logger="cwps_lightning.runner")
    progress = Progress(6)
    progress.skip(2, "cwps optdigits-it0")  # (a CWPS visit: two fits)
    progress.step("finetune optdigits")
    progress.skip(1, "frozen optdigits")
    progress.step("cwps mnist_m-it0")
    assert caplog.messages == ["[1-2/6] cwps optdigits-it0 (done before, resumed)",
                               "[3/6] finetune optdigits",
                               "[4/6] frozen optdigits (done before, resumed)",
                               "[5/6] cwps mnist_m-it0"]
