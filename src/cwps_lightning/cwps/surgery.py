"""Model surgery: put CWPS layers into a backbone, and merge them back into plain layers."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from .compose_group import ComposeGroup, enter_forward, exit_forward
from .layers import (
    CWPS_LAYER_TYPES,
    KEEP_COMPOSED_NUMEL,
    CWPSConv2d,
    CWPSLinear,
    check_threshold,
)
from .transformed import transformed_class

CWPSLayer = CWPSConv2d | CWPSLinear


def check_model(model, caller: str) -> nn.Module:
    """``model`` if it is an nn.Module; else a TypeError naming ``caller`` and what it got
    (a model's name is not a model: the core takes the module itself)."""
    if not isinstance(model, nn.Module):
        hint = (f" {model!r} (a name is not a model: build it first, e.g. with "
                "timm.create_model)" if isinstance(model, str) else "")
        raise TypeError(f"{caller}: expected the model, an nn.Module; got "
                        f"{type(model).__name__}{hint}")
    return model


def cwps_layers(model: nn.Module) -> Iterator[tuple[str, CWPSLayer]]:
    """Iterate (qualified name, layer) over the CWPS layers of ``model``, in module order."""
    for name, module in check_model(model, "cwps_layers").named_modules():
        if isinstance(module, CWPS_LAYER_TYPES):
            yield name, module


def classifier_names(model: nn.Module) -> list[str]:
    """Name(s) of the task head, found the timm way (pretrained_cfg['classifier']).

    Falls back to the last nn.Linear of the model when no timm metadata is present.
    """
    check_model(model, "classifier_names")
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    names = cfg.get("classifier")
    if names:
        names = [names] if isinstance(names, str) else list(names)
        modules = dict(model.named_modules())
        found = [n for n in names if n in modules]
        if found:
            return found
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1:]


def _is_excluded(name: str, excluded: Iterable[str]) -> bool:
    return any(name == e or name.startswith(e + ".") for e in excluded)


def _plain_forward(module: nn.Module) -> bool:
    """True for Conv2d/Linear whose forward is the stock one (so the wrap is exact)."""
    if isinstance(module, nn.Conv2d):
        return type(module).forward is nn.Conv2d.forward
    if isinstance(module, nn.Linear):
        return type(module).forward is nn.Linear.forward
    return False


def _cwps_class(module: nn.Module, transformed: bool = True) -> type | None:
    """The CWPS class that wraps ``module`` exactly, or None: CWPSConv2d / CWPSLinear for a
    stock forward, a cwps/transformed.py class for timm's StdConv2d, Conv2dSame, ...
    (``transformed=False``: stock forwards only)."""
    special = transformed_class(module) if transformed else None
    if special is not None:
        return special
    if _plain_forward(module):
        return CWPSConv2d if isinstance(module, nn.Conv2d) else CWPSLinear
    return None


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` wherever ``model`` holds the module named ``name``: a module registered
    under two names (the same conv as two attributes) stays one module, as it was; setting
    the one name left the other the plain layer, silently untied (a store then rebuilt the
    model from two different weights)."""
    old = model.get_submodule(name)
    for parent in model.modules():  # (each module once)
        for attr, child in list(parent._modules.items()):
            if child is old:
                setattr(parent, attr, new)


def shareable_layers(
    model: nn.Module, exclude: Iterable[str] | None = None, transformed: bool = True
) -> list[str]:
    """Names of the nn.Conv2d / nn.Linear layers CWPS shares (in module order).

    ``exclude`` names modules (or module prefixes) to leave alone; by default (None) the
    classifier head (see :func:`classifier_names`; a warning when it finds none). A list given
    replaces that default: to leave the head out as well, name it too
    (``exclude=[*classifier_names(model), "patch_embed.proj"]``). Normalisation layers are never shared: they stay per
    task (paper section 3.1). timm's weight-standardised and TF-"SAME" convolutions are shared
    through cwps/transformed.py; ``transformed=False`` leaves them out too (for wrappers that
    only reproduce the stock forward). Other Conv2d/Linear subclasses with a custom forward are
    left out with a warning, since wrapping them would change what they compute.
    """
    check_model(model, "shareable_layers")
    if isinstance(exclude, str):  # (one name; list("fc") would be ['f', 'c'])
        exclude = [exclude]
    excluded = list(classifier_names(model) if exclude is None else exclude)
    modules = dict(model.named_modules())
    unknown = [e for e in excluded if e not in modules]
    if exclude is not None and unknown:
        raise ValueError(f"exclude names not found in the model: {unknown}")
    targets, skipped = [], []
    if isinstance(model, (nn.Conv2d, nn.Linear)) and "" not in excluded:
        raise ValueError(
            f"the model itself is a {type(model).__name__}: it cannot be replaced in place; "
            "wrap it in a container (e.g. nn.Sequential) first"
        )
    for name, module in modules.items():
        if not name or not isinstance(module, (nn.Conv2d, nn.Linear)) or _is_excluded(name, excluded):
            continue
        (targets if _cwps_class(module, transformed) else skipped).append(name)
    if skipped:
        classes = sorted({type(modules[n]).__name__ for n in skipped})
        warnings.warn(
            f"left {len(skipped)} Conv2d/Linear subclass(es) with a custom forward unwrapped "
            f"({', '.join(classes)}): {skipped[:5]}",
            stacklevel=3,
        )
    if not targets:
        raise ValueError(
            f"found no nn.Conv2d/nn.Linear to share in {type(model).__name__} "
            f"(excluded: {excluded})"
        )
    if exclude is None and not excluded:
        # No timm metadata and no nn.Linear: a convolutional head (a 1x1 Conv2d classifier)
        # would be shared across tasks with different class counts, so say so.
        warnings.warn(
            f"found no classifier head in {type(model).__name__} (no timm "
            "pretrained_cfg['classifier'], no nn.Linear): every Conv2d is shared; pass "
            "exclude=[<head name>] to keep a convolutional head per task",
            stacklevel=3,
        )
    return targets


def inject_cwps(
    model: nn.Module, exclude: Iterable[str] | None = None, threshold: float = 0.5,
    mask_grad: str = "sigmoid", fill_parents: bool = True,
) -> list[str]:
    """Replace every shareable nn.Conv2d / nn.Linear of ``model`` (in place) by its CWPS layer.

    See :func:`shareable_layers` for what is wrapped. The new layers start in the "finetune"
    stage with parent = child; each takes over its plain layer's weight and bias Parameters as
    its child (no copy: the plain layer leaves the model; a Parameter the model holds twice,
    tied weights, is copied instead, for each layer). ``fill_parents`` False leaves the parents
    unwritten, for a caller that installs every one next (search_parents does: a weight-sized
    copy saved); until then the layers refuse the soft and hard stages and the merge. Returns
    the names wrapped. Raises if the model already has CWPS layers, or if nothing matched.
    """
    check_model(model, "inject_cwps")
    threshold = check_threshold(threshold)
    already = [n for n, _ in cwps_layers(model)]
    if already:
        raise ValueError(
            f"model already has {len(already)} CWPS layer(s) (e.g. {already[0]!r}); "
            "inject_cwps refuses to wrap twice"
        )
    targets = shareable_layers(model, exclude)
    # a Parameter the model holds more than once (tied weights) is copied for each layer, as
    # every other weight was before the layers took theirs over
    held = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    for name in targets:
        module = model.get_submodule(name)
        cls = _cwps_class(module)
        take = all(held[id(p)] == 1 for p in module.parameters(recurse=False))
        if cls is CWPSLinear:
            new = CWPSLinear.from_linear(module, threshold=threshold, mask_grad=mask_grad,
                                         take=take, fill_parent=fill_parents)
        else:
            new = cls.from_conv(module, threshold=threshold, mask_grad=mask_grad, take=take,
                                fill_parent=fill_parents)
        replace_module(model, name, new)
    group_small_kernels(model)
    return targets


#: the most kernel elements one ComposeGroup composes (16 MiB in fp32). A group's gradients are
#: ready only once the backward has gone through all its layers; in module order, groups of
#: this size let DDP reduce the earlier ones while the backward goes on (its buckets are 25 MB).
GROUP_NUMEL = 1 << 22


def group_small_kernels(model: nn.Module) -> list[ComposeGroup]:
    """Put ``model``'s CWPS layers with small kernels (at most KEEP_COMPOSED_NUMEL elements) into
    ComposeGroups (compose_group.py) of consecutive layers in module order, at most GROUP_NUMEL
    kernel elements each, shared by the layers during ``model``'s forward (hooks on ``model``).
    Returns the groups.

    Every member's parameters take part in each grouped forward's graph: a member the forward did
    not use gets no gradient, as without a group, but tensor hooks on its parameters run (with
    None). Code that minds that can :func:`ungroup_small_kernels`."""
    ungroup_small_kernels(model)
    chunks: list[list] = []
    size = GROUP_NUMEL
    for _, layer in cwps_layers(model):
        n = layer.weight.numel()
        if type(layer) not in CWPS_LAYER_TYPES or n > KEEP_COMPOSED_NUMEL:
            continue
        if size + n > GROUP_NUMEL:
            chunks.append([])
            size = 0
        chunks[-1].append(layer)
        size += n
    groups = [ComposeGroup(chunk) for chunk in chunks]
    if groups:
        model.__dict__["_compose_groups"] = groups  # a plain attribute: not state
        model.register_forward_pre_hook(enter_forward)
        model.register_forward_hook(exit_forward, always_call=True)
    return groups


def ungroup_small_kernels(model: nn.Module) -> None:
    """Undo :func:`group_small_kernels`: every CWPS layer of ``model`` composes on its own."""
    for _, layer in cwps_layers(model):
        layer.__dict__.pop("_compose_group", None)
    model.__dict__.pop("_compose_groups", None)
    for key, hook in list(model._forward_pre_hooks.items()):
        if hook is enter_forward:
            del model._forward_pre_hooks[key]
    for key, hook in list(model._forward_hooks.items()):
        if hook is exit_forward:
            del model._forward_hooks[key]
            model._forward_hooks_always_called.pop(key, None)


def nonfinite_tensors(module: nn.Module) -> list[str]:
    """Names of ``module``'s floating-point parameters and buffers holding nan or inf."""
    return [k for k, t in module.state_dict().items()
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def merge_cwps(model: nn.Module) -> nn.Module:
    """Replace every CWPS layer (in place) by a plain layer holding its merged weights.

    The merge uses the hard mask (the paper's post-training stage), so the merged model equals
    the wrapped model in the hard stage (up to float rounding where a conv's output is 1x1:
    the wrapped layer computes it as a matmul of the taps that meet the input, the plain conv
    as a convolution). Returns ``model``. A layer whose merged weights are not
    finite (a diverged fit) raises ValueError before any layer is replaced, as PEFT's
    ``safe_merge`` does: the model stays as it was. A model with no CWPS layers (never
    injected, or merged already) raises ValueError: its merge would silently be nothing.
    """
    plain = {name: layer.to_plain() for name, layer in require_cwps_layers(model, "merge_cwps")}
    for name, layer in plain.items():
        bad = nonfinite_tensors(layer)
        if bad:
            raise ValueError(f"merge_cwps: {name}.{bad[0]} has nan/inf values after the merge "
                             f"(a diverged fit); nothing was merged")
    for name, layer in plain.items():
        replace_module(model, name, layer)
    ungroup_small_kernels(model)
    return model


def require_cwps_layers(model: nn.Module, caller: str) -> list[tuple[str, nn.Module]]:
    """The model's CWPS layers; a ValueError naming ``caller`` where it has none (a model
    not injected yet, or merged already), whose answer would be silently empty."""
    layers = list(cwps_layers(check_model(model, caller)))
    if not layers:
        raise ValueError(f"{caller}: the model has no CWPS layers (inject_cwps first; after "
                         "merge_cwps it has plain layers again)")
    return layers


def set_stage(model: nn.Module, stage: str) -> None:
    """Set the stage of every CWPS layer. The soft and hard stages need every layer's parent
    (refused, naming the layers, after ``inject_cwps(fill_parents=False)`` until
    search_parents or set_parent installs them)."""
    layers = require_cwps_layers(model, "set_stage")
    if stage in ("soft", "hard"):
        unset = [name for name, layer in layers if layer.parent_unset]
        if unset:
            shown = ", ".join(unset[:5]) + (f", ... ({len(unset)} in all)" if len(unset) > 5
                                             else "")
            raise RuntimeError(f"set_stage({stage!r}): no parent installed in {shown} "
                               f"(inject_cwps with fill_parents=False leaves it unwritten): "
                               f"run search_parents or set_parent first")
    for _, layer in layers:
        layer.stage = stage


def set_threshold(model: nn.Module, threshold: float) -> None:
    threshold = check_threshold(threshold)
    for _, layer in require_cwps_layers(model, "set_threshold"):
        layer.threshold = threshold


@torch.no_grad()
def specific_by_layer(model: nn.Module) -> dict[str, float]:
    """Per CWPS layer (in module order), the fraction of its output channels that are
    task-specific (hard mask)."""
    return {name: float(layer.task_specific().float().mean())
            for name, layer in require_cwps_layers(model, "specific_by_layer")}


def sharing_stats(model: nn.Module) -> dict[str, float]:
    """Channel and parameter fractions of the CWPS layers that are task-specific (hard mask)."""
    channels = specific_channels = 0
    params = specific_params = 0
    for _, layer in require_cwps_layers(model, "sharing_stats"):
        spec = layer.task_specific()
        per_channel = layer.weight[0].numel() + (1 if layer.bias is not None else 0)
        channels += spec.numel()
        specific_channels += int(spec.sum())
        params += spec.numel() * per_channel
        specific_params += int(spec.sum()) * per_channel
    return {
        "specific_channel_fraction": specific_channels / max(channels, 1),
        "specific_param_fraction": specific_params / max(params, 1),
    }


def mask_flips(model: nn.Module) -> dict[str, int]:
    """How many channels changed their hard decision (sigmoid(s) >= lambda) during the mask fit.

    ``soft``: between entering the soft stage (the initial masks) and entering the hard stage;
    ``hard``: between entering the hard stage and now; ``total``: between the initial masks and
    now (a channel that flips and flips back counts in both stages, not in the total). A stage
    the fit skipped counts 0. ``channels``: the channels counted.
    """
    flips = {"soft": 0, "hard": 0, "total": 0, "channels": 0}
    for _, layer in cwps_layers(model):
        now = layer.decision()
        seen = layer.decisions
        start = seen.get("soft", seen.get("hard", now))
        at_hard = seen.get("hard", now)
        flips["soft"] += int((start != at_hard).sum())
        flips["hard"] += int((at_hard != now).sum())
        flips["total"] += int((start != now).sum())
        flips["channels"] += now.numel()
    return flips
