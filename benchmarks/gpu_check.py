"""GPU checks of the CWPS layers: ``python benchmarks/gpu_check.py [--device cuda|cpu]``.

Every path a CWPS layer takes in the soft and hard stages, on the device:
  * small kernels composed with ordinary autograd ops (a layer made on its own);
  * large kernels (more than layers.KEEP_COMPOSED_NUMEL elements) through the custom autograd
    function _ComposedOp, which recomposes the weight in the backward;
  * convolutions with a 1x1 output, through _ComposedOp's window path (only the taps that meet
    the input);
  * a model's small kernels grouped by inject_cwps, composed together in one node
    (compose_group._GroupCompose).
For each: the forward and the gradients (input, child weights, biases, mask logits) equal a
naive autograd reference (fp32; under autocast fp16/bf16 within a mixed-precision tolerance);
the merged plain layer equals the wrapped layer in the hard stage; channels_last inputs give
the same result. The paths also run with channels_last kernels and inputs (the training job's
layout: a 1x1-output window is then read in place) and with hard masks that share every
channel or none. Each path's autograd function counts its calls, and a path that no case took
is a failure (the check would otherwise pass on paths it never ran).

``compose="step"`` (cwps/step_compose.py) is checked against the forward compose: a model with
each of those paths trains a few soft and hard steps both ways (StepComposeSGD, its step
compiled on the GPU, against torch's SGD with SharedChannelFreeze), in fp32 and bf16 autocast,
NCHW and channels_last; the weights, biases, mask scores and decisions must agree.

``--device cpu`` runs the same on the CPU (fp32 and bf16 autocast) for the tests; there the
layers take their CPU-only shortcuts, which the GPU never does. Prints one line per case and
exits non-zero if any fails.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from cwps_lightning.cwps import (
    CWPSConv2d,
    CWPSLinear,
    compose_group,
    cwps_layers,
    inject_cwps,
    layers,
    set_stage,
)
from cwps_lightning.cwps.freeze import SharedChannelFreeze
from cwps_lightning.cwps.layers import CWPS_LAYER_TYPES
from cwps_lightning.cwps.step_compose import StepComposeSGD, use_step_compose

CONVS = {
    "3x3 s1": dict(in_channels=16, out_channels=32, kernel_size=3, padding=1),
    "3x3 s2": dict(in_channels=16, out_channels=32, kernel_size=3, stride=2, padding=1),
    "dilated": dict(in_channels=16, out_channels=32, kernel_size=3, dilation=2, padding=2),
    "grouped": dict(in_channels=16, out_channels=32, kernel_size=3, groups=4, padding=1),
    "depthwise": dict(in_channels=16, out_channels=16, kernel_size=3, groups=16, padding=1),
    "1x1 nobias": dict(in_channels=16, out_channels=32, kernel_size=1, bias=False),
}
#: (layer arguments, input shape) of the paths a layer made on its own takes besides autograd's
PATH_CASES = {
    # 256 x 512 x 3 x 3 = 1.18M elements > KEEP_COMPOSED_NUMEL: _ComposedOp, recomposed
    "large 3x3": (dict(in_channels=256, out_channels=512, kernel_size=3, padding=1),
                  (2, 256, 5, 5)),
    # a 1x1 map: only the centre tap meets it
    "1x1-out 3x3": (dict(in_channels=32, out_channels=48, kernel_size=3, padding=1),
                    (8, 32, 1, 1)),
    # stride 2 from a 2x2 map to 1x1: the 2x2 window of taps
    "1x1-out s2": (dict(in_channels=32, out_channels=48, kernel_size=3, stride=2, padding=1),
                   (8, 32, 2, 2)),
}
#: the autograd functions of the paths, by name; each must be taken at least once
PATHS = ("composed-op large kernel", "composed-op window", "group compose")


class PathCounter:
    """Counts the calls of the layers' autograd functions while it is on (a ``with`` block)."""

    def __init__(self):
        self.calls: Counter[str] = Counter()
        self._saved: list[tuple[type, object]] = []

    def __enter__(self):
        self._wrap(layers._ComposedOp, lambda args: "composed-op window" if args[9] is not None
                   else "composed-op large kernel")
        self._wrap(compose_group._GroupCompose, lambda args: "group compose")
        return self

    def _wrap(self, cls, name_of):
        original = cls.apply
        self._saved.append((cls, cls.__dict__["apply"] if "apply" in cls.__dict__ else None))

        def apply(*args):
            self.calls[name_of(args)] += 1
            return original(*args)

        cls.apply = staticmethod(apply)

    def __exit__(self, *exc):
        for cls, saved in reversed(self._saved):
            if saved is None:
                del cls.apply
            else:
                cls.apply = saved
        self._saved = []


def reference(layer, x, stage):
    s = torch.sigmoid(layer.mask_logits)
    m = s if stage == "soft" else (s >= layer.threshold).to(s.dtype) + s - s.detach()
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    w = layer.parent_weight + m.view(shape) * (layer.weight - layer.parent_weight)
    b = None if layer.bias is None else layer.parent_bias + m * (layer.bias - layer.parent_bias)
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, w, b, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, w, b)


def reference_model(model: nn.Sequential, x, stage):
    """The model's forward with every CWPS layer replaced by its naive reference."""
    for module in model:
        x = reference(module, x, stage) if isinstance(module, CWPS_LAYER_TYPES) else module(x)
    return x


def small_model() -> nn.Sequential:
    """Convolutions and a linear layer, every kernel small: inject_cwps groups them all."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.ReLU(),
        nn.Conv2d(32, 32, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def randomise(layer, logits: float | None = None):
    """Random parents; random mask scores, or all ``logits`` (+3: every channel task-specific,
    -3: every channel shared, in the hard stage)."""
    with torch.no_grad():
        layer.parent_weight.copy_(torch.randn_like(layer.weight) * 0.1)
        if layer.bias is not None:
            layer.parent_bias.copy_(torch.randn_like(layer.bias))
        if logits is None:
            layer.mask_logits.copy_(torch.randn_like(layer.mask_logits) * 2)
        else:
            layer.mask_logits.fill_(logits)


def trainable(module: nn.Module) -> list[torch.Tensor]:
    """Child weights, mask scores and biases of every CWPS layer (``module`` itself if it is
    one: cwps_layers yields it)."""
    out = []
    for _, layer in cwps_layers(module):
        out += [layer.weight, layer.mask_logits] + ([layer.bias] if layer.bias is not None else [])
    return out


def grads(module, x, out):
    return torch.autograd.grad(out.float().square().mean(), [x, *trainable(module)])


def check(name, module, x, stage, dtype, forward_ref):
    set_stage(module, stage)
    device_type = x.device.type
    ctx = (torch.autocast(device_type, dtype=dtype) if dtype is not None
           else torch.autocast(device_type, enabled=False))
    with ctx:
        y, y_ref = module(x), forward_ref(module, x, stage)
        g, g_ref = grads(module, x, y), grads(module, x, y_ref)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype is None else dict(atol=2e-2, rtol=2e-2)
    ok = y.dtype == y_ref.dtype and torch.allclose(y.float(), y_ref.float(), **tol)
    for a, b in zip(g, g_ref, strict=True):
        ok &= a.dtype == b.dtype
        scale = b.abs().max().clamp_min(1e-6)
        ok &= bool(((a.float() - b.float()).abs().max() / scale) < (1e-4 if dtype is None else 3e-2))
    label = "fp32" if dtype is None else str(dtype).replace("torch.", "")
    print(f"{'ok ' if ok else 'FAIL'} {name:14s} {stage:4s} {label}", flush=True)
    return ok


def check_merged(name, module, shape, device):
    set_stage(module, "hard")
    x = torch.randn(shape, device=device)
    merged = module.to_plain()
    y = module(x)

    def close(a):  # to the outputs' scale: another memory format may take another convolution
        # algorithm, whose rounding grows with the sums (the large kernel's outputs reach 20)
        return bool((a - y).abs().max() <= 1e-5 * (1.0 + y.abs().max()))

    ok = close(merged(x))
    if x.dim() == 4:
        ok &= close(module(x.to(memory_format=torch.channels_last)))
    print(f"{'ok ' if ok else 'FAIL'} {name:14s} merged == wrapped (hard), channels_last",
          flush=True)
    return ok


def step_compose_net() -> nn.Sequential:
    """The forward compose's paths in one model: small kernels (grouped), a large kernel
    (recomposed in the backward) and a 1x1 output (its window); in the step compose each is
    a plain layer on its kept weight."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 256, 3, stride=2, padding=1, bias=False), nn.ReLU(),
        nn.Conv2d(256, 512, 3, stride=2, padding=1), nn.ReLU(),  # 1.18M elements: large
        nn.Conv2d(512, 32, 3), nn.Flatten(), nn.Linear(32, 10),  # 3x3 map -> 1x1: a window
    )


def check_step_compose(device, channels_last: bool, dtype, compiled: bool) -> bool:
    """compose="step" trains as the forward compose: 3 soft then 5 hard steps of the same model
    both ways (StepComposeSGD, its step compiled or eager; torch's SGD with
    SharedChannelFreeze), a mask lr that moves decisions in the hard stage; every parameter
    compared (relative to its scale) and the decisions after every step."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    a = step_compose_net()
    inject_cwps(a, exclude=[])
    for _, layer in cwps_layers(a):
        randomise(layer)
    a.to(device, memory_format=fmt)
    b = copy.deepcopy(a)
    use_step_compose(b)

    def groups(net):
        masks = {id(layer.mask_logits) for _, layer in cwps_layers(net)}
        return [{"params": [p for p in net.parameters() if id(p) not in masks]},
                {"params": [p for p in net.parameters() if id(p) in masks], "lr": 20.0,
                 "weight_decay": 0.0}]

    # (a weight lr at which the run stays stable: in a diverging one, a weight the compiled
    # step rounds by one ulp otherwise grows into any difference)
    hyper = dict(lr=0.02, momentum=0.9, weight_decay=5e-3)
    opt_a = torch.optim.SGD(groups(a), **hyper)
    SharedChannelFreeze(a).attach(opt_a)
    opt_b = StepComposeSGD(groups(b), **hyper, model=b, compiled=compiled)
    x = torch.randn(8, 3, 12, 12, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (8,), device=device)

    def decisions(net):
        return torch.cat([layer.task_specific() for _, layer in cwps_layers(net)])

    ok, seen = True, []
    for stage in ["soft"] * 3 + ["hard"] * 5:
        for net, opt in ((a, opt_a), (b, opt_b)):
            set_stage(net, stage)
            opt.zero_grad()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = F.cross_entropy(net(x).float(), y)
            loss.backward()
            opt.step()
        ok &= bool(torch.equal(decisions(a), decisions(b)))
        seen.append(decisions(a))
    with torch.no_grad():
        worst = max(float((pa - pb).abs().max() / pa.abs().max().clamp_min(1.0))
                    for pa, pb in zip(a.parameters(), b.parameters(), strict=True))
    ok &= worst < (1e-4 if dtype is None else 1e-3)
    flips = int(sum((s != t).sum() for s, t in zip(seen[3:-1], seen[4:], strict=True)))
    label = "fp32" if dtype is None else str(dtype).replace("torch.", "")
    label += (" cl" if channels_last else "") + (" compiled" if compiled else "")
    print(f"{'ok ' if ok else 'FAIL'} step compose   {label}: "
          f"largest difference {worst:.1e} of the scale, {flips} decision change(s) in the "
          "hard stage", flush=True)
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    torch.manual_seed(0)
    dev = torch.device(args.device)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    # CPU autocast runs bf16; fp16 autocast is the GPU's
    dtypes = (None, torch.float16, torch.bfloat16) if dev.type == "cuda" else (None, torch.bfloat16)
    all_ok = True
    # (name, module, input shape, channels_last, mask scores: None random, else all this)
    cases = [(n, CWPSConv2d(**kw), (8, kw["in_channels"], 20, 20), False, None)
             for n, kw in CONVS.items()]
    for n, (kw, shape) in PATH_CASES.items():
        cases += [(n, CWPSConv2d(**kw), shape, False, None),
                  (f"{n} cl", CWPSConv2d(**kw), shape, True, None),
                  (f"{n} shared", CWPSConv2d(**kw), shape, True, -3.0),
                  (f"{n} specific", CWPSConv2d(**kw), shape, False, 3.0)]
    cases.append(("linear 3-D", CWPSLinear(24, 40), (4, 7, 24), False, None))
    for label, cl, logits in (("", False, None), (" cl", True, None), (" shared", True, -3.0)):
        model = small_model()
        inject_cwps(model, exclude=[])
        cases.append((f"grouped model{label}", model, (4, 3, 12, 12), cl, logits))
    with PathCounter() as counter:
        for name, module, shape, cl, logits in cases:
            fmt = torch.channels_last if cl else torch.contiguous_format
            module.to(dev, memory_format=fmt)
            for _, layer in cwps_layers(module):
                randomise(layer, logits)
            forward_ref = reference_model if isinstance(module, nn.Sequential) else reference
            for stage in ("soft", "hard"):
                for dtype in dtypes:
                    x = torch.randn(shape, device=dev)
                    if x.dim() == 4:
                        x = x.contiguous(memory_format=fmt)
                    all_ok &= check(name, module, x.requires_grad_(), stage, dtype, forward_ref)
            if not isinstance(module, nn.Sequential):
                all_ok &= check_merged(name, module, shape, dev)
    for path in PATHS:
        ok = counter.calls[path] > 0
        print(f"{'ok ' if ok else 'FAIL'} path {path!r} taken {counter.calls[path]} time(s)")
        all_ok &= ok
    # the step compiled on the GPU in fp32 and the job's layout (channels_last): one graph per
    # stage. bf16 runs it eagerly: a composed weight that the compiled lerp rounds by an fp32
    # ulp otherwise than torch's can round to another bf16 value in the forward, and the
    # mask lr grows that into differences no tolerance tells from an error (on the CPU,
    # compiled: 7e-2 of the scale after 8 steps, eager: 3e-7). The CPU runs every case eagerly
    # (the tests compare the compiled step with the eager one there).
    for cl, dtype in ((False, None), (True, None), (True, torch.bfloat16)):
        compiled = dev.type == "cuda" and cl and dtype is None
        all_ok &= check_step_compose(dev, cl, dtype, compiled=compiled)
    print("ALL OK" if all_ok else "SOME CHECKS FAILED")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
