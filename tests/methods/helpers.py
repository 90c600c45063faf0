"""What the TAPS and Piggyback layer tests share: conv variants, small models, a conv spy."""

from __future__ import annotations

import timm
import torch.nn.functional as F
from torch import nn

from cwps_lightning.cwps.small_input import use_small_input_convs

from ..helpers import Small

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


# name -> (Conv2d kwargs, input shape, small_input)
CONV_VARIANTS = {
    "basic": (dict(in_channels=4, out_channels=6, kernel_size=3, padding=1), (2, 4, 7, 7), False),
    "stride2": (
        dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1), (2, 4, 9, 9), True,
    ),
    "dilation2": (
        dict(in_channels=4, out_channels=6, kernel_size=3, dilation=2, padding=2), (2, 4, 9, 9),
        False,
    ),
    "groups2_no_bias": (
        dict(in_channels=8, out_channels=6, kernel_size=3, groups=2, padding=1, bias=False),
        (2, 8, 6, 6), True,
    ),
    "depthwise_same": (
        dict(in_channels=6, out_channels=6, kernel_size=3, groups=6, padding="same"),
        (2, 6, 5, 5), False,
    ),
    # 1x1 maps: the shortcut computes the centre tap's 1x1 conv (cwps/small_input.py)
    "input_1x1_shortcut": (
        dict(in_channels=4, out_channels=6, kernel_size=3, padding=1), (3, 4, 1, 1), True,
    ),
    "input_1x1_plain": (
        dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, bias=False), (3, 4, 1, 1),
        False,
    ),
}


def spy_conv2d(monkeypatch) -> list[tuple]:
    """Record every F.conv2d call as ("conv", kernel size) and every F.linear call as
    ("linear", weight shape) (SmallInputConv2d and nn.Conv2d both look them up in
    torch.nn.functional at call time)."""
    calls: list[tuple] = []
    conv2d, linear = F.conv2d, F.linear

    def spy_conv(x, w, *args, **kwargs):
        calls.append(("conv", tuple(w.shape[-2:])))
        return conv2d(x, w, *args, **kwargs)

    def spy_linear(x, w, *args, **kwargs):
        calls.append(("linear", tuple(w.shape)))
        return linear(x, w, *args, **kwargs)

    monkeypatch.setattr(F, "conv2d", spy_conv)
    monkeypatch.setattr(F, "linear", spy_linear)
    return calls


# ----------------------------------------------------------------------------------------------
def small_model(small_input: bool = False) -> nn.Module:
    model = Small().eval()
    if small_input:
        use_small_input_convs(model)  # as task models are built (models/backbone.py)
    return model


def resnet18() -> nn.Module:
    model = timm.create_model("resnet18", pretrained=False, num_classes=5).eval()
    use_small_input_convs(model)
    return model


# (model factory, input shape); on 1x1 inputs the 3x3 convs take the small-input shortcut
MODELS = {
    "small": (small_model, (2, 3, 8, 8)),
    "small_1x1": (small_model, (3, 3, 1, 1)),
    "small_1x1_small_input": (lambda: small_model(True), (3, 3, 1, 1)),
}


class PlanRecorder:
    """A method harness (methods/base.py Harness) that records the FitPlan of every fit it is
    asked for and trains nothing: new models are helpers.Small."""

    epochs, t0, shareable = 1, None, []

    def __init__(self):
        self.plans: list = []

    def new_model(self, task, iteration=0):
        return small_model()

    def seed(self, task, phase, iteration=0):
        return 0

    def step(self, message):
        pass

    def fit(self, model, task, plan, name):
        self.plans.append(plan)
        return model
