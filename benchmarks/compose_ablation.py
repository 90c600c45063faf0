"""Where the CWPS step's weight-sized work goes: the hard stage with each piece switched off.

    python benchmarks/compose_ablation.py [--size 32] [--rounds 30] [--batch 32] [--channels-last]

Timing only: apart from ``full`` these are NOT CWPS steps. On every layer whose output is larger
than 1x1 (the 1x1-output window path is the real layer's in all of them) a variant drops one or
more of
  fwd   the forward's compose  w = parent + m * (child - parent)  (it convolves the child),
  bwd   the backward's recompose of w  (it differentiates at the child); as in the real layer,
        only a kernel larger than layers.KEEP_COMPOSED_NUMEL recomposes, a smaller one keeps
        the forward's w (so at 32 px, where resnet18's large kernels meet 1x1 maps, this
        variant is ``full``),
  mask  the mask gradient  <dL/dw, child - parent>  (zeros),
  gmul  the child gradient's scaling by m.
``full`` is the layer's own arithmetic (tests/test_benchmark_ablation.py checks it against
layers._ComposedOp), run through one Python autograd function per layer: the real layer
composes small kernels with ordinary autograd ops instead (the same numbers; the cost of the
Python function is not theirs). ``none`` drops all four. Fine-tuning and the variants run round-robin,
and each is reported as the median over rounds of its step time over fine-tuning's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import layer_overhead as lo  # noqa: E402

from cwps_lightning.cwps import layers as L  # noqa: E402
from cwps_lightning.cwps.layers import CWPSConv2d, CWPSLinear  # noqa: E402

PIECES = ("fwd", "bwd", "mask", "gmul")
VARIANTS = {"full": (), "no-fwd": ("fwd",), "no-bwd": ("bwd",), "no-mask": ("mask",),
            "no-gmul": ("gmul",), "none": PIECES}


def ablated_op(dropped: tuple[str, ...]) -> type[torch.autograd.Function]:
    """_ComposedOp's general path (fp32, no autocast) without the ``dropped`` pieces."""
    drop = set(dropped)

    class Op(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, wc, bc, logits, wp, bp, hard, threshold, op, window=None,
                    mask_grad="sigmoid"):
            ctx.real = window is not None
            if ctx.real:
                return L._ComposedOp.forward(ctx, x, wc, bc, logits, wp, bp, hard, threshold,
                                             op, window, mask_grad)
            mask, sig = L._stage_mask(logits, hard, threshold)
            m = mask.view(-1, *([1] * (wc.dim() - 1)))
            keep = wc.numel() <= L.KEEP_COMPOSED_NUMEL
            if "fwd" in drop:
                w = wc
            else:
                w = torch.lerp(wp, wc, m, out=None if keep else L._SCRATCH.like(wc))
            b = None if bc is None else torch.lerp(bp, bc, mask)
            ctx.kept = w if keep else None
            ctx.save_for_backward(x, wc, bc, wp, bp)
            ctx.m, ctx.op = m, op
            ctx.slope = L.mask_slope(sig, hard, mask_grad)
            return op.forward(x, w, b)

        @staticmethod
        def backward(ctx, grad_y):
            if ctx.real:
                return L._ComposedOp.backward(ctx, grad_y)
            x, wc, bc, wp, bp = ctx.saved_tensors
            m = ctx.m
            if ctx.kept is not None:
                w = ctx.kept
            elif "bwd" in drop:
                w = wc
            else:
                w = torch.lerp(wp, wc, m, out=L._SCRATCH.like(wc))
            gx, gw, gb = ctx.op.backward(grad_y, x, w, bc is not None, ctx.needs_input_grad[0])
            if "mask" in drop:
                grad_logits = torch.zeros_like(ctx.slope)
            else:
                prod = torch.sub(wc, wp, out=None if w is wc else w).mul_(gw)
                dm = prod.sum(dim=tuple(range(1, prod.dim())))
                if bc is not None:
                    dm.addcmul_(gb, bc - bp)
                grad_logits = dm.mul_(ctx.slope)
            grad_child = gw if "gmul" in drop else gw.mul_(m)
            grad_bias = None if bc is None else gb * m.view(-1)
            return (gx, grad_child, grad_bias, grad_logits) + (None,) * 7

    return Op


def ablated_model(cwps_model: torch.nn.Module, dropped: tuple[str, ...]) -> torch.nn.Module:
    """``cwps_model`` (in place) with every CWPS layer on ablated_op(dropped)."""
    op = ablated_op(dropped)
    # every kernel through the ablated function (small kernels otherwise compose by autograd)
    attrs = {"_composed_op": op, "_small_kernels_by_autograd": False}
    lo.reclass_layers(cwps_model, {
        CWPSConv2d: type("AblatedConv2d", (CWPSConv2d,), attrs),
        CWPSLinear: type("AblatedLinear", (CWPSLinear,), attrs),
    })
    return cwps_model


def main(argv=None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--channels-last", action="store_true",
                    help="models and batch in channels_last (the training job's format)")
    args = ap.parse_args(argv)
    lo.check_args(ap, args, {"size": 8, "batch": 1, "rounds": 1, "warmup": 0})
    torch.manual_seed(0)
    bench = lo.parse_args(["--size", str(args.size), "--batch", str(args.batch)]
                          + (["--channels-last"] if args.channels_last else []))
    base = lo.build_base(args.model, 0)
    cwps = lo.make_cwps(base, 0)
    models = {"finetune": lo.make_variant("finetune", base, cwps, 0)}
    for name, dropped in VARIANTS.items():
        models[name] = ablated_model(lo.make_variant("cwps-hard", base, cwps, 0), dropped)
    if args.channels_last:
        models = {n: m.to(memory_format=torch.channels_last) for n, m in models.items()}
    x, y = lo.make_batch(bench, torch.device("cpu"), lo.num_classes_of(models["finetune"]))
    opts = {n: lo.make_optimizer(m) for n, m in models.items()}
    names = list(models)
    for _ in range(args.warmup):
        for n in names:
            lo.train_step(models[n], opts[n], x, y)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:  # rotate the order
            start = time.perf_counter()
            lo.train_step(models[n], opts[n], x, y)
            times[n].append(time.perf_counter() - start)
    fmt = "channels_last" if args.channels_last else "NCHW"
    print(f"{args.model}, batch {args.batch}, {args.size} px, {fmt}, hard stage, "
          f"{args.rounds} rounds ({lo.cpu_name()})")
    ratios = {}
    for n in names:
        ratios[n] = statistics.median(a / b for a, b in zip(times[n], times["finetune"],
                                                              strict=True))
        dropped = ",".join(VARIANTS.get(n, ())) or "-"
        print(f"  {n:9s} drops {dropped:17s} median {statistics.median(times[n]) * 1e3:7.1f} ms"
              f"  paired x fine-tuning {ratios[n]:.3f}")
    return ratios


if __name__ == "__main__":
    main()
