"""GPU checks of the CWPS layers (needs CUDA): ``python benchmarks/gpu_check.py``.

For Conv2d variants and Linear, in the soft and hard stages, on the GPU:
  * forward and gradients (input, child weight, bias, mask logits) of the fused layer equal a
    naive autograd reference (fp32; and under autocast fp16/bf16 within a mixed-precision
    tolerance);
  * the merged plain layer equals the wrapped layer in the hard stage;
  * channels_last inputs give the same result.
Prints one line per case and exits non-zero if any fails.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from cwps_lightning.cwps import CWPSConv2d, CWPSLinear

CONVS = {
    "3x3 s1": dict(in_channels=16, out_channels=32, kernel_size=3, padding=1),
    "3x3 s2": dict(in_channels=16, out_channels=32, kernel_size=3, stride=2, padding=1),
    "dilated": dict(in_channels=16, out_channels=32, kernel_size=3, dilation=2, padding=2),
    "grouped": dict(in_channels=16, out_channels=32, kernel_size=3, groups=4, padding=1),
    "depthwise": dict(in_channels=16, out_channels=16, kernel_size=3, groups=16, padding=1),
    "1x1 nobias": dict(in_channels=16, out_channels=32, kernel_size=1, bias=False),
}


def reference(layer, x, stage):
    s = torch.sigmoid(layer.mask_logits)
    m = s if stage == "soft" else (s >= layer.threshold).to(s.dtype) + s - s.detach()
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    w = layer.parent_weight + m.view(shape) * (layer.weight - layer.parent_weight)
    b = None if layer.bias is None else layer.parent_bias + m * (layer.bias - layer.parent_bias)
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, w, b, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, w, b)


def randomise(layer):
    with torch.no_grad():
        layer.parent_weight.copy_(torch.randn_like(layer.weight) * 0.1)
        if layer.bias is not None:
            layer.parent_bias.copy_(torch.randn_like(layer.bias))
        layer.mask_logits.copy_(torch.randn_like(layer.mask_logits) * 2)


def grads(layer, x, out):
    params = [x, layer.weight, layer.mask_logits] + ([layer.bias] if layer.bias is not None else [])
    return torch.autograd.grad(out.float().square().mean(), params)


def check(name, layer, x, stage, dtype):
    layer.stage = stage
    ctx = (torch.autocast("cuda", dtype=dtype) if dtype is not None
           else torch.autocast("cuda", enabled=False))
    with ctx:
        y, y_ref = layer(x), reference(layer, x, stage)
        g, g_ref = grads(layer, x, y), grads(layer, x, y_ref)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype is None else dict(atol=2e-2, rtol=2e-2)
    ok = y.dtype == y_ref.dtype and torch.allclose(y.float(), y_ref.float(), **tol)
    for a, b in zip(g, g_ref, strict=True):
        scale = b.abs().max().clamp_min(1e-6)
        ok &= bool(((a.float() - b.float()).abs().max() / scale) < (1e-4 if dtype is None else 3e-2))
    label = "fp32" if dtype is None else str(dtype).replace("torch.", "")
    print(f"{'ok ' if ok else 'FAIL'} {name:12s} {stage:4s} {label}")
    return ok


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    torch.manual_seed(0)
    dev = torch.device("cuda")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    all_ok = True
    cases = [(n, CWPSConv2d(**kw).to(dev), (8, kw["in_channels"], 20, 20)) for n, kw in CONVS.items()]
    cases.append(("linear 3-D", CWPSLinear(24, 40).to(dev), (4, 7, 24)))
    for name, layer, shape in cases:
        randomise(layer)
        for stage in ("soft", "hard"):
            for dtype in (None, torch.float16, torch.bfloat16):
                x = torch.randn(shape, device=dev, requires_grad=True)
                all_ok &= check(name, layer, x, stage, dtype)
        layer.stage = "hard"
        x = torch.randn(shape, device=dev)
        merged = layer.to_plain()
        ok = torch.allclose(merged(x), layer(x), atol=1e-5)
        if x.dim() == 4:
            ok &= torch.allclose(layer(x.to(memory_format=torch.channels_last)), layer(x),
                                 atol=1e-5)
        print(f"{'ok ' if ok else 'FAIL'} {name:12s} merged == wrapped (hard), channels_last")
        all_ok &= ok
    print("ALL OK" if all_ok else "SOME CHECKS FAILED")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
