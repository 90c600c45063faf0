"""Backbones: any timm model, built offline, with a per-task classifier head."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from ..cwps.small_input import use_small_input_convs
from ..cwps.surgery import classifier_names
from ..errors import ConfigError, short_list


class ModelConfigError(ConfigError):
    """Unknown model name, bad weights file, ... ; the message says what and what is accepted."""


PAPER_BACKBONES = ("resnet18", "resnet50", "densenet121", "vit_base_patch16_224")


def check_model_name(name: str) -> str:
    if not timm.is_model(name):
        import difflib

        # names it begins; else the nearest by spelling; else the family of its first word,
        # shortest first (resnet_nope: resnet18, resnet26, ...; by spelling it was
        # resnet50_gn, tresnet_m); else a looser spelling; else names holding that word
        known = timm.list_models()
        word = name.split("_")[0]
        family = sorted((m for m in known if word and m.startswith(word)
                         and not m[len(word):len(word) + 1].isalpha()),
                        key=lambda m: (len(m), m))
        close = ([m for m in known if name and m.startswith(name)][:8]
                 or difflib.get_close_matches(name, known, n=8, cutoff=0.8)
                 or family[:8]
                 or difflib.get_close_matches(name, known, n=8, cutoff=0.7)
                 or (timm.list_models(f"*{word}*")[:8] if name else []))
        hint = f"; similar: {close}" if close else ""
        raise ModelConfigError(
            f"unknown model {name!r}: model.name takes any timm model name "
            f"(e.g. {', '.join(PAPER_BACKBONES)}){hint}"
        )
    return name


def create_backbone(
    name: str, num_classes: int, kwargs: Mapping[str, Any] | None = None
) -> nn.Module:
    """A randomly initialised timm model (pretrained weights are loaded separately)."""
    check_model_name(name)
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **dict(kwargs or {}))


def head_modules(model: nn.Module) -> list[nn.Module]:
    """The classifier head(s): those timm's ``get_classifier`` names (one module, or a tuple
    of them where a model has two heads: distilled DeiT and LeViT's ``head`` and
    ``head_dist``), then those of the core's ``classifier_names`` (the heads the bank and the
    methods' counts leave out) that are not inside them (VOLO's ``aux_head``)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    heads = [h for h in (head if isinstance(head, (tuple, list)) else (head,))
             if isinstance(h, nn.Module)]
    inside = {id(m) for h in heads for m in h.modules()}
    heads += [m for m in map(model.get_submodule, classifier_names(model))
              if id(m) not in inside]
    return heads


def head_classes(model: nn.Module) -> int | None:
    """The class count of the model's (first) head, or None where it has no sized head."""
    for head in head_modules(model):
        for attr in ("out_features", "out_channels"):
            count = getattr(head, attr, None)
            if isinstance(count, int):
                return count
    count = getattr(model, "num_classes", None)
    return count if isinstance(count, int) and count > 0 else None


def backbone_param_count(model: nn.Module) -> int:
    """Parameters of the backbone without its classifier head(s) (the param_ratio
    denominator)."""
    head_ids = {id(p) for head in head_modules(model) for p in head.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in head_ids)


def task_model(base: nn.Module, num_classes: int, seed: int | None = None) -> nn.Module:
    """A copy of ``base`` (T0) with a fresh head for ``num_classes`` classes.

    Everything but the head starts from T0; normalisation layers become the task's own. Its
    convolutions compute a convolution with a 1x1 output as a matmul of the taps that meet the
    input (the same function; much faster on CPU, see cwps/small_input.py).
    """
    model = copy.deepcopy(base)
    use_small_input_convs(model)
    if seed is not None:
        torch.manual_seed(seed)
    model.reset_classifier(num_classes)
    return model


WEIGHTS_ACCEPTED = ("a state dict of tensors saved with torch.save (model.state_dict(), "
                    "also under a top-level 'state_dict' / 'model' key) or a .safetensors file")


def check_weights_file(path: str | Path) -> None:
    """``model.weights`` names a file, not nothing, a directory or an empty file."""
    path = Path(path)
    if path.is_dir():
        raise ModelConfigError(f"model.weights={str(path)!r}: a directory; accepted: "
                               f"{WEIGHTS_ACCEPTED}")
    if not path.is_file():
        raise ModelConfigError(f"model.weights: no such file {str(path)!r}")
    if path.stat().st_size == 0:
        raise ModelConfigError(f"model.weights={str(path)!r}: an empty file; accepted: "
                               f"{WEIGHTS_ACCEPTED}")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any reader failure is a bad file to the user
        text = " ".join(str(err).split())
        try:
            with open(path, "rb") as file:
                first = file.read(4)
        except OSError:  # (no permission: the reader's own error says it)
            first = b"PK"
        if path.suffix != ".safetensors" and not first.startswith((b"PK", b"\x80")):
            # neither torch.save's zip archive nor its older pickle (a text file read as one
            # said "KeyError: 101", its first byte)
            reason = f"not a file torch.save wrote: it starts with {first!r}"
        elif "Weights only load failed" in text:  # (torch's advice to unpickle it is not ours)
            reason = "not a file of tensors that torch.load(weights_only=True) reads"
        else:
            reason = f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__
        raise ModelConfigError(f"model.weights: cannot read {str(path)!r} ({reason}); "
                               f"accepted: {WEIGHTS_ACCEPTED}") from err
    # what timm's loader (which does the load) takes: the top level, or its 'state_dict' or
    # else its 'model' entry, with DDP's / torch.compile's key prefixes dropped (timm's own
    # clean_state_dict); a check of anything else would pass a file the load then refuses
    if isinstance(state, dict):
        key = next((k for k in ("state_dict", "model") if k in state), None)
        state = state[key] if key else state
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        found = sorted(map(str, state))[:5] if isinstance(state, dict) else type(state).__name__
        raise ModelConfigError(f"model.weights: {str(path)!r} holds no state dict of tensors "
                               f"(found {found}); accepted: {WEIGHTS_ACCEPTED}")
    return timm.models.clean_state_dict(state)


@contextlib.contextmanager
def _timm_quiet() -> Iterator[None]:
    """timm's INFO lines of a load from a file ("Loading pretrained weights from file", "Loaded
    state_dict ..."): before a file that does not fit, they were two lines ahead of the one
    error line; the job logs the file it loads itself."""
    logger = logging.getLogger("timm")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_backbone_weights(
    name: str, path: str | Path, kwargs: Mapping[str, Any] | None = None
) -> nn.Module:
    """A timm model with weights from a local file, through timm's own pretrained loading
    (``pretrained_cfg_overlay=dict(file=...)``: the model's filter_fn applies, e.g. for ViT
    position embeddings). The head's class count is taken from the file, so T0 keeps its head.
    """
    check_model_name(name)
    path = Path(path)
    check_weights_file(path)
    state = _read_state_dict(path)
    probe = timm.create_model(name, pretrained=False, **dict(kwargs or {}))
    classifier = probe.pretrained_cfg.get("classifier") or ""
    head = ({f"{classifier}.weight", f"{classifier}.bias"} & set(probe.state_dict())
            if isinstance(classifier, str) and classifier else set())
    head_key = f"{classifier}.weight"
    num_classes = int(state[head_key].shape[0]) if head_key in state else probe.num_classes
    try:
        with _timm_quiet():
            model = timm.create_model(
                name, pretrained=True, num_classes=num_classes,
                pretrained_cfg_overlay=dict(file=str(path), num_classes=num_classes),
                **dict(kwargs or {}),
            )
    except RuntimeError as err:
        expected = timm.create_model(name, pretrained=False, num_classes=num_classes,
                                     **dict(kwargs or {})).state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        shapes = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                        for k, v in expected.items()
                        if k in state and tuple(state[k].shape) != tuple(v.shape))
        found = [f"{len(keys)} {what} ({short_list(keys, 5)})"
                 for what, keys in (("missing key(s)", missing), ("unexpected key(s)", unexpected),
                                    ("shape mismatch(es)", shapes)) if keys]
        # (the model's own filter, e.g. a ViT's, may have refused the file before the load)
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = "; ".join(found) if found else " ".join(lines[-1:] or [type(err).__name__])[:300]
        if head and set(missing) == head and not unexpected and not shapes:
            # (T0 keeps its head: the store holds T0 whole, and a task's copy gets a new one)
            reason += (" (the classifier only: save the backbone with its head, of any class "
                       "count)")
        raise ModelConfigError(
            f"model.weights: {str(path)!r} does not fit {name}: {reason}") from err
    return model
