"""Hydra glue: the typed schema of the run config, and one compose / instantiate helper for
every command (``train``, ``evaluate``, ``data check``, ``data download``).

The schema is the dataclasses of settings.py registered in Hydra's ConfigStore as
``cwps_lightning_schema``; conf/config.yaml lists it first in its defaults, so every YAML file
and every override merges into typed nodes: Hydra itself rejects an unknown key
(``cwps.no_such_key=1``) or a wrong type (``cwps.threshold=abc``), naming the key.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from .cwps.layers import THRESHOLD_RANGE
from .errors import ConfigError
from .settings import (
    CWPSSettings,
    LoggerSettings,
    MethodsSettings,
    ModelSettings,
    OptimSettings,
    T0Settings,
)

#: the repository's Hydra config directory (the one ``cwps_lightning.train`` uses)
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
SCHEMA = "cwps_lightning_schema"


@dataclass
class RunConfig:
    """The whole run config. ``data`` (a DataModule with its ``_target_``), ``trainer``
    (lightning.Trainer arguments) and ``paths`` are open dicts given by their YAML groups."""

    data: Any = MISSING
    model: ModelSettings = field(default_factory=ModelSettings)
    cwps: CWPSSettings = field(default_factory=CWPSSettings)
    methods: MethodsSettings = field(default_factory=MethodsSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    t0: T0Settings = field(default_factory=T0Settings)
    trainer: dict[str, Any] = field(default_factory=dict)
    logger: LoggerSettings = field(default_factory=LoggerSettings)
    paths: dict[str, Any] = field(default_factory=dict)
    seed: int = 0


def register_schema() -> None:
    ConfigStore.instance().store(name=SCHEMA, node=RunConfig)


register_schema()


def one_line(err: BaseException) -> str:
    """Hydra's and OmegaConf's errors as one line that starts with the key concerned.

    OmegaConf reads "Value 'abc' of type 'str' could not be converted to Float / full_key:
    cwps.threshold / object_type=..."; Hydra wraps it as "Error merging override ...". The
    user needs the key, the message, and (for a missing config) the options.
    """
    from hydra.errors import MissingConfigException

    cause = err.__cause__ if err.__cause__ is not None else err
    if isinstance(err, MissingConfigException) and err.missing_cfg_file:
        group = err.missing_cfg_file.rsplit("/", 1)
        if err.options and len(group) == 2:
            # (a sweeper or launcher comes from a Hydra plugin: the project depends on these)
            plugin = {("hydra/sweeper", "optuna"): "hydra-optuna-sweeper",
                      ("hydra/launcher", "submitit_local"): "hydra-submitit-launcher",
                      ("hydra/launcher", "submitit_slurm"): "hydra-submitit-launcher",
                      }.get((group[0], group[1]))
            hint = f" (is {plugin} installed? pip install -e . installs it)" if plugin else ""
            return (f"{group[0]}={group[1]}: no such config; available: "
                    f"{', '.join(err.options)}{hint}")
        return f"cannot find config {err.missing_cfg_file!r}"
    full_key = getattr(cause, "full_key", None)
    msg = getattr(cause, "msg", None)
    if full_key and msg:
        msg = msg.strip().splitlines()[0].strip()
        parent, _, key = full_key.rpartition(".")  # (a top-level key: parent "", the root)
        accepted = schema_keys(parent) if "not in" in msg else None
        if accepted:
            return no_such_key(full_key, nearest_key(parent, key, accepted), accepted)
        elif (kind := _conversion_failed(msg)) is not None:
            value = getattr(cause, "value", None)
            return f"{full_key} must be {ACCEPTED_NUMBERS.get(full_key, kind)}, got {value!r}"
        elif "is not a ListConfig" in msg:  # (one value where a list goes: brackets)
            value = getattr(cause, "value", None)
            example = f"[{value}]" if isinstance(value, str | int | float) else "[a,b]"
            msg = f"a list is accepted, e.g. {full_key}={example}; got {value!r}"
        elif msg.startswith("Cannot merge DictConfig with ListConfig"):  # (either way round)
            if getattr(cause, "object_type", None) is list:
                msg = f"a list is accepted, e.g. {full_key}=[a,b]; got a dict"
            else:
                keys = schema_keys(full_key)
                msg = (f"a group of keys is accepted ({', '.join(keys)}), set one by one as "
                       f"{full_key}.<key>=...; got a list") if keys else msg
        return f"{full_key}: {msg}"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    lines = lines[: next((i for i, x in enumerate(lines) if x.startswith("Config search path")),
                         len(lines))]
    return "; ".join(lines) or type(err).__name__


#: OmegaConf's words for a value its typed node could not take, and what the node accepts
_CONVERSIONS = (("could not be converted to Float", "a number"),
                ("could not be converted to Integer", "a whole number"),
                ("is not a valid bool", "true or false"))
#: what a typed number takes where its check bounds it more than its type (the same words as
#: the check's own line)
ACCEPTED_NUMBERS = {"cwps.threshold": f"a number in {THRESHOLD_RANGE} (the paper's lambda)"}


def _conversion_failed(msg: str) -> str | None:
    """What the typed node accepts, if OmegaConf's ``msg`` says it could not take a value."""
    return next((kind for words, kind in _CONVERSIONS if words in msg), None)


#: keys by the paper's names (a typed node's key that is not there: the line names ours)
PAPER_NAMES = {key: ("cwps.threshold", "the paper's lambda")
               for key in ("cwps.lambda", "cwps.lam", "lambda", "lam")}


def nearest_key(parent: str, key: str, candidates: Sequence[str]) -> str | None:
    """What to say of the name nearest to the unknown ``key`` under ``parent``: ours for the
    paper's ("did you mean cwps.threshold (the paper's lambda)?"), what the job does with a
    Trainer argument it sets ("the nearest, trainer.max_epochs, is set per fit ..."), else
    "did you mean <parent>.<name>?"; None where no candidate is near."""
    import difflib

    full_key = f"{parent}.{key}" if parent else key
    if full_key in PAPER_NAMES:
        ours, why = PAPER_NAMES[full_key]
        return f"did you mean {ours} ({why})?"
    near = difflib.get_close_matches(key, candidates, n=1)
    if not near:
        return None
    name = f"{parent}.{near[0]}" if parent else near[0]
    if parent == "trainer" and near[0] in TRAINER_SET_BY_JOB:
        return f"the nearest, {name}, is {TRAINER_SET_BY_JOB[near[0]]}"
    return f"did you mean {name}?"


def no_such_key(full_key: str, near: str | None, accepted: Sequence[str],
                under: str = "") -> str:
    """The line for a key a typed node (or the top level) does not have: the nearest name,
    then every accepted one."""
    hint = f"{near} " if near else ""
    where = f" under {under}" if under else ""
    return f"{full_key}: no such key; {hint}accepted{where}: {', '.join(accepted)}"


def schema_keys(path: str) -> list[str] | None:
    """The keys the schema accepts under ``path`` (e.g. "cwps.stages"), or None if open."""
    cls: Any = RunConfig
    for part in path.split(".") if path else []:
        found = {f.name: f for f in dataclasses.fields(cls)}.get(part)
        if found is None:
            return None
        cls = typing.get_type_hints(cls).get(part)
        if not dataclasses.is_dataclass(cls):
            return None
    return [f.name for f in dataclasses.fields(cls)]


def unknown_keys(node: DictConfig, cls: type, prefix: str) -> list[str]:
    """Keys of ``node`` that ``cls`` (a settings dataclass) does not have, with their path.
    (``+cwps.x=1`` appends to a typed node past Hydra's own check.)"""
    hints = typing.get_type_hints(cls)
    out = []
    for key in node.keys():
        if key not in hints:
            out.append(f"{prefix}.{key}")
        elif dataclasses.is_dataclass(hints[key]) and isinstance(node[key], DictConfig):
            out += unknown_keys(node[key], hints[key], f"{prefix}.{key}")
    return out


def compose_config(overrides: Sequence[str], job_name: str = "cwps_lightning") -> DictConfig:
    """The run config exactly as ``python -m cwps_lightning.train <overrides>`` composes it,
    with ``hydra.*`` resolvable (``paths.*`` interpolate ``${hydra:runtime.cwd}``).
    A composition error (unknown group, key or type) becomes one ConfigError line."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if not (CONF_DIR / "config.yaml").is_file():
        raise ConfigError(f"cannot find the Hydra configs at {CONF_DIR}")
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3",
                                   job_name=job_name):
            try:
                cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
            except (HydraException, OmegaConfBaseException) as err:
                # (inside the context: the explanation composes the config once more)
                raise ConfigError(_open_node_keys(err, overrides) or one_line(err)) from None
            except ValueError as err:  # (Hydra's own, for trainer=null: a traceback)
                nulls = [o for o in overrides if o.split("=", 1)[-1] in ("null", "None", "~")
                         and "." not in o.split("=", 1)[0].split("@")[0]]
                if nulls:
                    raise ConfigError(f"{nulls[0]}: {one_line(err)}; a config group takes one "
                                      "of its options (python -m cwps_lightning.train --help "
                                      "lists them)") from None
                raise ConfigError(one_line(err)) from None
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(one_line(err)) from None
    HydraConfig.instance().set_config(cfg)
    return cfg


_CAPPED = ("left to the epochs cwps.stages and t0.epochs plan (a cap would cut a fit short of "
           "them); for a shorter run lower those, or use data.limit_per_task (digits) or "
           "+trainer.limit_train_batches")

#: trainer arguments the job sets itself for every fit (a config that sets one is refused)
TRAINER_SET_BY_JOB = {
    "max_epochs": "set per fit from cwps.stages and t0.epochs",
    "logger": "set per fit from the logger config (logger=csv / wandb, logger.kind=none)",
    "callbacks": "set per fit by the job (the mask stage switch, checkpoints)",
    # a cap would end a fit inside the epochs it was planned for (the mask fit before its hard
    # stage, the cosine schedule half run) and the run would still report it as trained
    "max_steps": _CAPPED,
    "max_time": _CAPPED,
}


@functools.cache
def trainer_arguments() -> tuple[str, ...]:
    """The arguments lightning.Trainer takes, in its signature's order (read once)."""
    import inspect

    from lightning import Trainer

    return tuple(p for p in inspect.signature(Trainer.__init__).parameters if p != "self")


def _open_node_keys(err: BaseException, overrides: Sequence[str]) -> str | None:
    """For an unknown key of a node the schema leaves open (``data.image_sise=64``: data,
    trainer, paths come from their YAML files), the line naming the keys the node has (the
    config composed without the override), the nearest one, and how to add a key; None for
    other errors."""
    from hydra import compose
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cause = err.__cause__ if err.__cause__ is not None else err
    full_key = getattr(cause, "full_key", None)
    if not full_key or "." not in full_key or "not in struct" not in str(
            getattr(cause, "msg", "")):
        return None
    parent, key = full_key.rsplit(".", 1)
    if schema_keys(parent) is not None:
        return None  # (a typed node: one_line lists the schema's keys)
    try:
        rest = [o.input_line for o in OverridesParser.create().parse_overrides(list(overrides))
                if o.key_or_group != full_key]
        node = OmegaConf.select(compose("config", overrides=rest), parent)
    except Exception:  # noqa: BLE001 - the plain message then
        return None
    if not isinstance(node, DictConfig):
        return None
    keys = [k for k in node.keys() if not str(k).startswith("_")]  # (_target_, _convert_)
    candidates = list(keys)
    if parent == "trainer":  # (a Trainer argument the YAML does not set is added with +)
        candidates += [p for p in trainer_arguments() if p not in keys]
    if parent == "trainer" and key in TRAINER_SET_BY_JOB:
        return f"{full_key}: {TRAINER_SET_BY_JOB[key]}; remove it"
    has = f"{parent} has: {', '.join(keys)}"
    if key in candidates:
        return f"{full_key}: not set in the {parent} config ({has}); add it with +{full_key}=..."
    near = nearest_key(parent, key, candidates)
    if near:
        return f"{full_key}: no such key; {near} ({has})"
    return f"{full_key}: no such key; {has}; add a key it lacks with +{full_key}=..."


_ABSENT = object()


def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """``cfg`` (e.g. the config a store was trained with) with ``key=value`` overrides, parsed
    by Hydra's own override grammar (quoting, lists and dicts as on the train command line); a
    plain override names a key ``cfg`` has (``+key=value`` adds one, ``~key`` deletes)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    cfg = cfg.copy()
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
        for o in parsed:
            if o.is_sweep_override() or o.key_or_group.startswith("hydra"):
                raise ConfigError(f"override {o.input_line!r}: give one value of a config key")
            key = o.key_or_group
            if not (o.is_add() or o.is_delete()) and OmegaConf.select(
                    cfg, key, default=_ABSENT) is _ABSENT:
                raise ConfigError(f"{key}: no such key in this config ({o.input_line!r}; "
                                  f"+{o.input_line} adds one)")
            if o.is_delete():
                OmegaConf.update(cfg, key, None, force_add=True)
            else:
                OmegaConf.update(cfg, key, o.value(), merge=True, force_add=o.is_add())
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(one_line(err)) from None
    return cfg


def instantiate_data(cfg: DictConfig):
    """The DataModule of ``cfg.data``; construction errors become one-line ConfigErrors."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf.errors import OmegaConfBaseException

    try:
        return instantiate(cfg.data)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, ConfigError):
            raise ConfigError(str(cause)) from err
        unknown = _unknown_argument(cause, cfg.data.get("_target_"), cfg.data.keys())
        if unknown:
            raise ConfigError(unknown) from err
        raise ConfigError(f"cannot build data={cfg.data.get('_target_')}: "
                          f"{' '.join(str(err).split())}") from err
    except OmegaConfBaseException as err:
        raise ConfigError(f"data: {one_line(err)}") from err


def locate(target) -> Any:
    """What a ``_target_`` names (a class or a function), or None where it does not import;
    as Hydra's instantiate finds it, without the lines hydra.utils.get_class logs."""
    from hydra._internal.utils import _locate

    try:
        return _locate(target) if isinstance(target, str) else None
    except Exception:  # noqa: BLE001 - instantiate_data names the import error
        return None


def init_arguments(cls) -> list[str]:
    """The keyword arguments ``cls(...)`` takes: its __init__'s, and where that passes
    ``**kwargs`` on, its bases' (in MRO order); a function's own."""
    import inspect

    if not isinstance(cls, type):
        try:
            return [p.name for p in inspect.signature(cls).parameters.values()
                    if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        except (TypeError, ValueError):
            return []
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names += [p.name for p in params if p.name != "self" and p.name not in names
                  and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names


def _unknown_argument(cause: BaseException | None, target: str | None,
                      given) -> str | None:
    """``data.<key>: no such argument`` with the DataModule's arguments, for the TypeError
    of an argument it does not take (``+data.image_sise=64``); None otherwise."""
    import re

    found = re.search(r"unexpected keyword argument '(\w+)'", str(cause))
    if not isinstance(cause, TypeError) or not found or not target:
        return None
    if found.group(1) not in given:  # (raised inside __init__, about something else)
        return None
    made_by = locate(target)
    if made_by is None:
        return None
    accepted = init_arguments(made_by)
    key = found.group(1)
    near = nearest_key("data", key, accepted)
    hint = f"{near} " if near else ""
    return (f"data.{key}: {target.rsplit('.', 1)[-1]} takes no such argument; {hint}"
            f"accepted: {', '.join(accepted)}")


def settings_of(node: DictConfig, cls: type, key: str):
    """The typed settings object of config node ``key``, its ``__post_init__`` checks run;
    their ValueError and unknown keys become a ConfigError."""
    from omegaconf.errors import OmegaConfBaseException

    bad = unknown_keys(node, cls, key)
    if bad:
        fields = [f.name for f in dataclasses.fields(cls)]
        parent, _, name = bad[0].rpartition(".")
        near = nearest_key(parent, name, schema_keys(parent) or fields)
        raise ConfigError(no_such_key(bad[0], near, fields, under=key))
    try:
        obj = OmegaConf.to_object(node)
    except (ValueError, OmegaConfBaseException) as err:
        raise ConfigError(one_line(err)) from None
    if not isinstance(obj, cls):  # a node that was not typed (e.g. a config saved as a dict)
        try:
            obj = cls(**obj)
        except (TypeError, ValueError) as err:
            raise ConfigError(str(err)) from None
    return obj
