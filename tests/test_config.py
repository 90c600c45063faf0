"""The typed config (config.py, settings.py): one source of defaults, Hydra's own rejection of
unknown keys and wrong types, the overrides grammar of ``evaluate``, and the README's
plain-PyTorch example running the CLI's method."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from cwps_lightning.config import (
    apply_overrides,
    compose_config,
    schema_keys,
    settings_of,
    unknown_keys,
)
from cwps_lightning.errors import ConfigError
from cwps_lightning.settings import (
    CWPSSettings,
    LoggerSettings,
    ModelSettings,
    OptimSettings,
    StageSettings,
    T0Settings,
)

README = Path(__file__).resolve().parents[1] / "README.md"
SECTIONS = {"cwps": CWPSSettings, "optim": OptimSettings, "model": ModelSettings,
            "t0": T0Settings, "logger": LoggerSettings}


@pytest.mark.parametrize("key", sorted(SECTIONS))
def test_cli_defaults_are_the_library_defaults(key):
    """The default run's sections equal the dataclasses' defaults: no YAML restates or
    changes them (so plain Python and the CLI run the same method)."""
    cfg = compose_config([])
    assert settings_of(cfg[key], SECTIONS[key], key) == SECTIONS[key]()


def test_library_defaults_of_the_lower_layers_match():
    """CWPSLitModule, FitSettings and search_parents default to the CLI's values."""
    import inspect

    from cwps_lightning.cwps import search_parents
    from cwps_lightning.fitting import FitSettings
    from cwps_lightning.models import CWPSLitModule

    cli = settings_of(compose_config([]).optim, OptimSettings, "optim")
    for fn in (CWPSLitModule.__init__, FitSettings.__init__):
        params = inspect.signature(fn).parameters
        assert {k: params[k].default for k in ("lr", "mask_lr", "momentum", "weight_decay")} == {
            "lr": cli.lr, "mask_lr": cli.mask_lr, "momentum": cli.momentum,
            "weight_decay": cli.weight_decay}
    cwps = settings_of(compose_config([]).cwps, CWPSSettings, "cwps")
    params = inspect.signature(search_parents).parameters
    assert (params["distance"].default, params["init_scope"].default) == (
        cwps.distance, cwps.init_scope)


@pytest.mark.parametrize(("override", "expected"), [
    ("cwps.no_such_key=1", r"^cwps\.no_such_key: no such key; accepted: mode, iterations"),
    # a near name, the paper's name, a top-level key
    ("cwps.treshold=0.3", r"^cwps\.treshold: no such key; did you mean cwps\.threshold\? "
                          r"accepted: mode, iterations"),
    ("cwps.lambda=0.3", r"^cwps\.lambda: no such key; did you mean cwps\.threshold \(the "
                        r"paper's lambda\)\? accepted: mode"),
    ("cwp.threshold=0.3", r"^cwp: no such key; did you mean cwps\? accepted: data, model, cwps, "
                          r"methods, optim, t0, trainer, logger, paths, seed$"),
    ("+cwps.no_such_key=1", r"^cwps\.no_such_key: no such key"),
    # a value its type cannot take: what the key accepts (a bounded one: its range)
    ("cwps.threshold=abc", r"^cwps\.threshold must be a number in \[0, 1\] \(the paper's "
                           r"lambda\), got 'abc'$"),
    ("cwps.stages.soft_epochs=two", r"^cwps\.stages\.soft_epochs must be a number, got 'two'$"),
    ("cwps.iterations=1.5", r"^cwps\.iterations must be a whole number, got 1\.5$"),
    ("model.pretrained=maybe", r"^model\.pretrained must be true or false, got 'maybe'$"),
    ("data=nosuchdata", r"^data=nosuchdata: no such config; available: colour_digits, digits, "),
    ("hydra/sweeper=optunaa", r"^hydra/sweeper=optunaa: no such config; available: .*basic.*"
                              r"optuna$"),
    ("cwps.baselines=[finetune,cwps]", r"^cwps\.baselines lists cwps: CWPS runs in every job; "
                                       r"list the methods to compare it with \(\['finetune', "),
    ("cwps.threshold=1.5", r"^cwps\.threshold \(lambda\) must be in \[0, 1\], got 1\.5$"),
    ("cwps.mode=sideways", r"^cwps\.mode must be one of \['incremental', 'joint'\]"),
    ("cwps.compose=backward", r"^cwps\.compose must be one of \['forward', 'step'\]"),
    ("cwps.baselines=[finetune,nope]", r"cwps\.baselines has unknown entries \['nope'\]"),
    ("optim.lr=-1", r"^optim\.lr must be a finite number > 0, got -1"),
    ("optim.lr=0", r"^optim\.lr must be a finite number > 0, got 0"),
    ("optim.lr=inf", r"^optim\.lr must be a finite number > 0, got inf"),
    ("optim.mask_lr=inf", r"^optim\.mask_lr must be a finite number >= 0, got inf"),
    ("optim.weight_decay=nan", r"^optim\.weight_decay must be a finite number >= 0, got nan"),
    ("cwps.stages.hard_epochs=inf", r"^cwps\.stages\.hard_epochs must be a finite number >= 0"),
    ("t0.lr=inf", r"^t0\.lr must be a finite number > 0, got inf"),
    ("logger.kind=tensorboard", r"^logger\.kind must be one of"),
    # nodes the YAML files fill (the schema leaves them open): their keys, the nearest one
    ("data.image_sise=64", r"^data\.image_sise: no such key; did you mean data\.image_size\? "
                           r"\(data has: tasks, image_size, "),
    ("paths.nope=1", r"^paths\.nope: no such key; paths has: root_dir, .*; add a key it lacks "
                     r"with \+paths\.nope=\.\.\.$"),
    ("trainer.gradient_clip=1", r"did you mean trainer\.gradient_clip_val\?"),
    ("trainer.fast_dev_run=1", r"^trainer\.fast_dev_run: not set in the trainer config "
                               r"\(trainer has: .*\); add it with \+trainer\.fast_dev_run="),
    ("trainer.max_epochs=1", r"^trainer\.max_epochs: set per fit from cwps\.stages"),
    ("trainer.logger=false", r"^trainer\.logger: set per fit from the logger config"),
    ("trainer.max_steps=5", r"^trainer\.max_steps: left to the epochs cwps\.stages and "
                            r"t0\.epochs plan .*; remove it$"),
    ("trainer.max_epoch=1", r"^trainer\.max_epoch: no such key; the nearest, "
                            r"trainer\.max_epochs, is set per fit from cwps\.stages"),
    # one value where a list goes, a list where a group goes
    ("cwps.baselines=finetune", r"^cwps\.baselines: a list is accepted, e\.g\. "
                                r"cwps\.baselines=\[finetune\]; got 'finetune'$"),
    ("cwps.baselines={a:1}", r"^cwps\.baselines: a list is accepted.*; got a dict$"),
    ("cwps.stages=[1]", r"^cwps\.stages: a group of keys is accepted \(warmup_epochs, "),
    # (a Hydra traceback)
    ("trainer=null", r"^trainer=null: Config group override must be a string or a list\. .*; "
                     r"a config group takes one of its options"),
])
def test_bad_values_give_one_line_naming_the_key(override, expected):
    with pytest.raises(ConfigError) as err:
        cfg = compose_config([override])
        for key, cls in SECTIONS.items():
            settings_of(cfg[key], cls, key)
    message = str(err.value)
    assert "\n" not in message
    assert re.search(expected, message), message


def test_stage_settings_nested_from_a_dict_and_checked():
    s = CWPSSettings(stages={"warmup_epochs": 2, "soft_epochs": 0, "hard_epochs": 3})
    assert s.stages == StageSettings(2, 0, 3) and s.total_epochs == 5
    with pytest.raises(ValueError, match="soft_epochs \\+ hard_epochs"):
        CWPSSettings(stages=StageSettings(1, 0, 0))
    # the switch may fall inside an epoch, the mask fit is whole epochs
    assert StageSettings(1, 0.5, 1.5).mask_epochs == 2
    with pytest.raises(ValueError, match=r"must be a whole number >= 1, got 0.5 \+ 1.25 = 1.75"):
        StageSettings(1, 0.5, 1.25)
    with pytest.raises(ValueError, match="warmup_epochs must be a whole number, got 1.5"):
        StageSettings(1.5, 1, 2)


@pytest.mark.parametrize("preset", [None, "imagenet_sketch", "domainnet", "digits_joint"])
def test_default_and_presets_split_epochs_as_the_paper(preset):
    """Warm-up = 1/4 of a visit's epochs; of the mask training 1/4 soft, 3/4 hard; the baselines
    train as many epochs as one visit (the runner's ``epochs`` is total_epochs)."""
    if preset is None:
        stages = CWPSSettings().stages
    else:
        stages = StageSettings(**dict(compose_config([f"+experiment={preset}"]).cwps.stages))
    total = stages.total_epochs
    assert stages.warmup_epochs == total / 4
    assert stages.soft_epochs == stages.mask_epochs / 4
    assert stages.hard_epochs == 3 * stages.mask_epochs / 4
    with pytest.raises(ValueError, match="cwps.iterations=2 needs cwps.mode=joint"):
        CWPSSettings(iterations=2)


def test_schema_keys_and_unknown_keys():
    assert schema_keys("cwps.stages") == ["warmup_epochs", "soft_epochs", "hard_epochs",
                                          "lr_schedule"]
    assert schema_keys("trainer") is None  # an open dict of Trainer arguments
    node = OmegaConf.create({"mode": "joint", "stages": {"soft_epochs": 1, "nope": 2}, "x": 1})
    assert unknown_keys(node, CWPSSettings, "cwps") == ["cwps.stages.nope", "cwps.x"]


def test_presets_state_only_what_differs_and_compose_typed():
    """Every paper preset takes the shared base: the paper's stages and lr unless it says
    otherwise."""
    for preset, lr in [("imagenet_sketch", 0.01), ("imagenet_sketch_densenet", 0.08),
                       ("imagenet_sketch_vit", 0.001), ("domainnet", 0.01)]:
        cfg = compose_config([f"+experiment={preset}", "data.root=/nowhere"])
        cwps = settings_of(cfg.cwps, CWPSSettings, "cwps")
        assert cwps.stages == StageSettings(10, 7.5, 22.5) and cwps.baselines == []
        assert cfg.optim.lr == lr and cfg.model.pretrained is True


def test_apply_overrides_uses_the_train_grammar():
    saved = OmegaConf.create({"data": {"root": "/old", "tasks": ["a", "b"]}, "seed": 0})
    cfg = apply_overrides(saved, ["data.root=/new", "data.tasks=[b]", "+data.extra=1", "seed=3"])
    assert OmegaConf.to_container(cfg) == {"data": {"root": "/new", "tasks": ["b"], "extra": 1},
                                           "seed": 3}
    assert saved.data.root == "/old"  # the store's config is not changed in place
    with pytest.raises(ConfigError, match="one value"):
        apply_overrides(saved, ["seed=1,2"])
    with pytest.raises(ConfigError):
        apply_overrides(saved, ["data.root=[unclosed"])


def _readme_example() -> str:
    text = README.read_text()
    section = text.split("## Using the core from plain PyTorch", 1)[1]
    return section.split("```python", 1)[1].split("```", 1)[0]


def test_readme_plain_pytorch_example_runs_the_clis_cpms(monkeypatch):
    """The README's example, run as written, chooses the same parents and initialises the same
    mask logits as the CLI's default settings would (same distance, same init scope)."""
    from cwps_lightning.cwps import search

    code = _readme_example()
    assert "search_parents(model, bank, \"task1\")" in code
    # the example's warm-up placeholder, made a stand-in: the weights move off T0's
    warmup = "# ... warm-up fine-tune `model` ..."
    assert warmup in code
    code = code.replace(warmup, "[p.data.add_(0.01 * torch.randn_like(p)) for p in "
                                "model.parameters()]")
    seen = []
    real = search.search_parents

    def spy(model, bank, task, *args, **kwargs):
        result = real(model, bank, task, *args, **kwargs)
        logits = {n: m.mask_logits.detach().clone()
                  for n, m in model.named_modules() if hasattr(m, "mask_logits")}
        seen.append((result, logits))
        return result

    import cwps_lightning

    monkeypatch.setattr(cwps_lightning, "search_parents", spy)
    torch.manual_seed(0)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    # the freeze the CLI attaches hooks the example's optimiser (a shared channel's child
    # would drift under momentum in the hard stage without it)
    assert "SharedChannelFreeze(model).attach(opt)" in code
    assert len(scope["opt"]._optimizer_step_pre_hooks) == 1
    cli = settings_of(compose_config([]).cwps, CWPSSettings, "cwps")
    assert re.search(r"inject_cwps\(model, threshold=([0-9.]+)", code).group(1) == str(cli.threshold)
    explicit = code.replace('search_parents(model, bank, "task1")',
                            f'search_parents(model, bank, "task1", distance="{cli.distance}", '
                            f'init_scope="{cli.init_scope}")')
    torch.manual_seed(0)
    exec(compile(explicit, "README.md", "exec"), {})
    (readme, readme_logits), (cli_run, cli_logits) = seen
    assert readme.parent_task == cli_run.parent_task
    for name in readme.parent_ids:
        assert torch.equal(readme.parent_ids[name], cli_run.parent_ids[name])
        assert torch.equal(readme_logits[name], cli_logits[name])
    # and a different setting would have been told apart
    other = "l2" if cli.distance == "cosine" else "cosine"
    torch.manual_seed(0)
    exec(compile(code.replace('search_parents(model, bank, "task1")',
                              f'search_parents(model, bank, "task1", distance="{other}")'),
                 "README.md", "exec"), {})
    assert any(not torch.equal(readme_logits[n], seen[-1][1][n]) for n in readme_logits)


def test_readme_step_compose_example_trains_the_layers():
    """The README's second example (compose at the step), run as written on an injected
    model: the children and scores move, and every composed weight is the next forward's."""
    from torch import nn

    import cwps_lightning
    from cwps_lightning.cwps import cwps_layers, inject_cwps

    text = README.read_text().split("## Using the core from plain PyTorch", 1)[1]
    code = text.split("```python", 2)[2].split("```", 1)[0]
    assert "use_step_compose(model)" in code and "StepComposeSGD(" in code
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 6),
                          nn.Linear(6, 3))
    inject_cwps(model)
    for _, layer in cwps_layers(model):
        with torch.no_grad():
            layer.set_parent(torch.randn_like(layer.weight), torch.randn_like(layer.bias))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [(torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4,))) for _ in range(3)]
    scope = {"model": model, "batches": batches, "torch": torch,
             "set_stage": cwps_lightning.set_stage}
    exec(compile(code, "README.md", "exec"), scope)
    assert isinstance(scope["opt"], cwps_lightning.cwps.StepComposeSGD)
    for _, layer in cwps_layers(model):
        assert layer.compose == "step" and layer.stage == "soft"
        for kind in ("weight", "mask_logits"):
            name = next(n for n, m in model.named_modules() if m is layer) + "." + kind
            assert not torch.equal(getattr(layer, kind), before[name]), name
        m = torch.sigmoid(layer.mask_logits.detach())[:, None]
        parent = layer.parent_weight.flatten(1)
        expected = parent + m * (layer.weight.detach().flatten(1) - parent)
        torch.testing.assert_close(layer.composed_weight.flatten(1), expected)


def test_a_key_added_at_its_old_value_leaves_the_run_hash_as_it_was():
    """cwps.compose came after runs were made: at "forward" (what they computed) it is left
    out of the resume hash, so such a run's store and fit checkpoints are still found; at
    "step" it counts."""
    from omegaconf import OmegaConf

    from cwps_lightning.persist import config_hash, result_config

    cfg = compose_config([])
    plain = result_config(cfg)
    assert "compose" not in plain["cwps"] and "threshold" in plain["cwps"]
    before = OmegaConf.to_container(cfg, resolve=False)
    del before["cwps"]["compose"]  # the config as a run before the key wrote it
    for key in ("paths", "hydra", "logger"):
        before.pop(key, None)
    for key in ("enable_progress_bar", "enable_model_summary", "log_every_n_steps",
                "num_nodes", "gradient_clip_val", "accumulate_grad_batches"):  # (the same)
        before["trainer"].pop(key, None)
    assert config_hash(plain) == config_hash(before)
    step = result_config(compose_config(["cwps.compose=step"]))
    assert step["cwps"]["compose"] == "step"
    assert config_hash(step) != config_hash(plain)


@pytest.mark.parametrize("preset", [[], ["trainer=ddp"], ["trainer=gpu"], ["trainer=cpu"]])
def test_the_trainer_keys_listed_with_lightnings_defaults_leave_the_run_hash_as_it_was(preset):
    """trainer.num_nodes, gradient_clip_val and accumulate_grad_batches joined the trainer
    config after runs were made (at Lightning's defaults): a run made before, whose config
    lacks them, keeps its hash under every trainer preset; another value counts. And the T0
    cache key reads one node as it did when the key was absent."""
    from omegaconf import OmegaConf

    from cwps_lightning.persist import config_hash, result_config
    from cwps_lightning.pretrain import cache_key, t0_spec

    cfg = compose_config(preset)
    added = ("num_nodes", "gradient_clip_val", "accumulate_grad_batches")
    assert all(key in cfg.trainer for key in added)
    before = OmegaConf.to_container(cfg, resolve=False)
    for key in added:
        del before["trainer"][key]  # the config as a run before the keys wrote it
    assert config_hash(result_config(cfg)) == config_hash(result_config(OmegaConf.create(before)))
    for override in ("trainer.num_nodes=2", "trainer.gradient_clip_val=1.0",
                     "trainer.accumulate_grad_batches=2"):
        other = result_config(compose_config([*preset, override]))
        assert config_hash(other) != config_hash(result_config(cfg)), override
    from cwps_lightning.data.digits import DigitsDataModule

    args = (DigitsDataModule(), "resnet18", {}, 1, 0.1, 0)
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    old = {k: v for k, v in trainer.items() if k != "num_nodes"}
    assert cache_key(t0_spec(*args, trainer)) == cache_key(t0_spec(*args, old))
    assert cache_key(t0_spec(*args, {**trainer, "num_nodes": 2})) != cache_key(
        t0_spec(*args, old))


def test_apply_overrides_names_a_key_the_config_lacks_and_refuses_hydra_keys():
    saved = OmegaConf.create({"data": {"root": "/old"}, "seed": 0})
    with pytest.raises(ConfigError, match=r"^data\.rot: no such key in this config "
                                          r"\('data\.rot=/new'; \+data\.rot=/new adds one\)$"):
        apply_overrides(saved, ["data.rot=/new"])
    with pytest.raises(ConfigError, match=r"^override 'hydra\.run\.dir=x': give one value"):
        apply_overrides(saved, ["hydra.run.dir=x"])
    assert apply_overrides(saved, ["~data.root"]).data.root is None


def test_settings_of_names_the_first_unknown_key():
    node = OmegaConf.create({"lr": 0.1, "nope": 1, "other": 2})
    with pytest.raises(ConfigError, match=r"^optim\.nope: no such key; accepted under optim: "
                                          r"lr, mask_lr, momentum, weight_decay$"):
        settings_of(node, OptimSettings, "optim")


def _takes_nothing():
    pass


class _InnerTypeError:
    """A DataModule whose __init__ passes a wrong argument to something else."""

    def __init__(self, size: int = 1):
        _takes_nothing(colour=size)


def test_a_type_error_from_inside_a_datamodule_is_not_taken_for_its_argument():
    from cwps_lightning.config import instantiate_data

    target = f"{__name__}._InnerTypeError"
    cfg = OmegaConf.create({"data": {"_target_": target, "size": 2}})
    with pytest.raises(ConfigError) as err:
        instantiate_data(cfg)
    assert str(err.value).startswith(f"cannot build data={target}: "), str(err.value)
    cfg = OmegaConf.create({"data": {"_target_": target, "colour": 2}})
    with pytest.raises(ConfigError, match=r"^data\.colour: _InnerTypeError takes no such "
                                          r"argument; accepted: size$"):
        instantiate_data(cfg)


def test_init_arguments_follow_kwargs_to_the_bases_only_where_passed_on():
    from cwps_lightning.config import init_arguments

    class Base:
        def __init__(self, root: str = ".", batch_size: int = 1):
            pass

    class PassesOn(Base):
        def __init__(self, tasks=(), **kwargs):
            super().__init__(**kwargs)

    class Closed(Base):
        def __init__(self, tasks=()):
            super().__init__()

    assert init_arguments(PassesOn) == ["tasks", "root", "batch_size"]
    assert init_arguments(Closed) == ["tasks"]


def test_the_lr_key_a_diverged_fit_names_is_the_key_its_lr_came_from(monkeypatch):
    """A nan loss says which learning rate to lower: T0's pretraining, TAPS and Piggyback fits
    train at their own (the hint said optim.lr for every fit)."""
    from cwps_lightning import pretrain
    from cwps_lightning.fitting import FitSettings
    from cwps_lightning.methods.base import OptimizerPlan
    from cwps_lightning.methods.piggyback import PiggybackMethod
    from cwps_lightning.methods.taps import TAPSMethod
    from cwps_lightning.settings import MethodsSettings

    from .helpers import synthetic_tasks
    from .methods.helpers import PlanRecorder

    cfg = compose_config(["t0.lr=0.011", "methods.taps.lr=0.012", "methods.piggyback.lr=0.013"])
    methods = settings_of(cfg.methods, MethodsSettings, "methods")
    t0_lr = settings_of(cfg.t0, T0Settings, "t0").lr
    harness = PlanRecorder()
    TAPSMethod(methods.taps).train("t", 0, None, harness)
    PiggybackMethod(methods.piggyback).train("t", 0, None, harness)
    plans = harness.plans

    class Stop(Exception):
        pass

    def stop(model, datamodule, task, plan, *args, **kwargs):
        plans.append(plan)
        raise Stop

    monkeypatch.setattr(pretrain, "fit", stop)
    data = synthetic_tasks(n_train=8, batch_size=4)
    monkeypatch.setattr(type(data), "pretrain_task", "t", raising=False)
    with pytest.raises(Stop):
        pretrain.pretrain_t0(data, "resnet18", {}, 1, t0_lr, FitSettings(trainer={}), None)
    assert len(plans) == 3
    for plan in plans:
        assert OmegaConf.select(cfg, plan.optimizer.lr_key) == plan.optimizer.lr
        for group, key in plan.optimizer.group_keys.items():  # (masks, gates: their own rate)
            assert OmegaConf.select(cfg, key) == plan.optimizer.groups[group]
    assert [list(p.optimizer.group_keys.values()) for p in plans] == [
        ["methods.taps.gate_lr"], ["methods.piggyback.mask_lr"], []]
    assert [p.optimizer.lr for p in plans] == [0.012, 0.013, 0.011]
    # the other fits train at optim.lr, which their plans leave to the run's settings
    assert OptimizerPlan().lr is None and OptimizerPlan().lr_key == "optim.lr"


def test_a_missing_sweeper_plugin_is_named():
    """Without hydra-optuna-sweeper, hydra/sweeper=optuna offered "basic" alone, without a word
    why; a name no plugin gives gets no such hint."""
    from hydra.errors import MissingConfigException

    from cwps_lightning.config import one_line

    def missing(name):
        return MissingConfigException("x", missing_cfg_file=f"hydra/sweeper/{name}",
                                      options=["basic"])

    assert one_line(missing("optuna")) == (
        "hydra/sweeper=optuna: no such config; available: basic (is hydra-optuna-sweeper "
        "installed? pip install -e . installs it)")
    assert one_line(missing("ax")) == "hydra/sweeper=ax: no such config; available: basic"
