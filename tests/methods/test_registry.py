"""Method names in the config and the classes they stand for (methods/registry.py)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from cwps_lightning.cwps.method import CWPSMethod
from cwps_lightning.methods.base import Method
from cwps_lightning.methods.baselines import FineTune
from cwps_lightning.methods.registry import BASELINE_NAMES, BUILTIN, method_class


def test_every_builtin_name_resolves_to_a_method_of_that_name():
    for name in BUILTIN:
        cls = method_class(name)
        assert issubclass(cls, Method) and cls.name == name
    assert method_class("cwps") is CWPSMethod
    assert "cwps" not in BASELINE_NAMES


def test_a_method_from_any_module_by_its_path():
    cls = method_class("examples.lora:LoRA")
    assert issubclass(cls, Method) and cls.name == "lora"


@pytest.mark.parametrize("name, needle", [
    ("magic", r"unknown method 'magic'; accepted: \['finetune', 'frozen', 'taps', 'piggyback'\]"),
    ("examples.nope:LoRA", r"cannot import examples.nope:LoRA \(No module named "
                           r"'examples.nope'; a module of your own must be importable: under "
                           r"the working directory, or on PYTHONPATH\)"),
    ("examples.lora:Nope", r"cannot import examples.lora:Nope"),
    ("examples.lora:RANK", r"is not a subclass of cwps_lightning.methods.base.Method"),
    # (importlib's "Empty module name" said nothing of the form)
    (":", r"^method ':': accepted: 'package\.module:Class' \(a Method subclass: a module and a "
          r"class, both named\)"),
    ("examples.lora:", r"^method 'examples\.lora:': accepted: 'package\.module:Class'"),
])
def test_bad_names_say_what_is_accepted(name, needle):
    with pytest.raises(ValueError, match=needle):
        method_class(name)


def test_the_core_and_the_methods_import_without_lightning_or_hydra():
    """The method code (CWPS's included) stays usable from plain PyTorch."""
    import subprocess
    import sys

    code = ("import sys; import cwps_lightning.cwps.method, cwps_lightning.methods.taps, "
            "cwps_lightning.methods.piggyback, cwps_lightning.methods.baselines, "
            "cwps_lightning.methods.registry, cwps_lightning.settings; "
            "print([m for m in ('lightning', 'hydra', 'omegaconf') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("baselines, needle", [
    (["tests.methods.plugins:Nameless"], "sets no `name`"),
    (["finetune", "tests.methods.plugins:AlsoFineTune"],
     "tests.methods.plugins:AlsoFineTune and finetune are both named 'finetune'"),
    (["tests.methods.plugins:Sharing"], "only CWPS may share between tasks"),
    (["cwps"], "cwps: CWPS runs in every job; list the methods to compare it with "
               "(['finetune', 'frozen', 'taps', 'piggyback'] or 'package.module:Class')"),
])
def test_config_check_refuses_methods_that_would_mix_up_results(baselines, needle):
    from cwps_lightning.checks import check_methods
    from cwps_lightning.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(needle)):
        check_methods(baselines)
    check_methods(["finetune", "frozen", "taps", "piggyback", "examples.lora:LoRA"])


@pytest.mark.parametrize("returned, needle", [
    ("no cost", r"must return a Trained with params 'kernels' and 'task_own' \(the parameters "
                r"the task adds to the store; got \[\]\)"),
    (None, r"must return a Trained, got NoneType \(README: \*A method of your own\*\)"),
    ("a tensor", r"must return a Trained whose model is an nn.Module, got Tensor"),
    ("params None", r"must return a Trained with params 'kernels' and 'task_own' \(the "
                    r"parameters the task adds to the store; got None\)")])
def test_a_method_that_breaks_its_contract_stops_with_one_line_before_its_test_pass(
        returned, needle):
    """(a method's ValueError stopped the run with a traceback; the test pass ran first)"""
    from types import SimpleNamespace

    from cwps_lightning.errors import ConfigError
    from cwps_lightning.methods.base import Trained
    from cwps_lightning.runner import Runner

    class Broken(FineTune):
        name = "broken"

        def train(self, task, iteration, bank, harness):
            if returned is None:
                return None
            if returned == "params None":
                return Trained(nn.Linear(1, 1), params=None)
            return Trained(nn.Linear(1, 1) if returned == "no cost" else torch.zeros(1))

    tested = []
    runner = Runner.__new__(Runner)  # only the visit's bookkeeping is exercised
    runner._test = lambda model, task: tested.append(task) or (1.0, 1.0)
    result = SimpleNamespace(bank=None)
    with pytest.raises(ConfigError, match=r"^method 'broken' \(tests\.methods\.test_registry:.*Broken\): "
                                          r"train\(\) " + needle):
        runner.visit(Broken(), result, "t", 0)
    assert tested == []
