"""StepComposeSGD on 2 CPU ranks (gloo) whose gradients do not match in kind: rank 1's forward
leaves a CWPS layer out ("skip"), or only rank 0 has a penalty on that layer's scores
("penalty"), or that layer is in the finetune stage ("finetune": its child has a gradient of
its own on every rank, from different data), or ("switch") each rank runs a soft forward of
the CWPS layers, switches to the hard stage and runs the model before one backward (the soft
forward's gradient reaches the children and scores as the backward arrives at the weight the
switch let go, and the step averages it). DDP (the layers' children and scores left out of it) averages the head. Each rank saves its weights after one step; tests/integration/test_ddp_fit.py
checks that the ranks agree and equal a one-process replay that averages the two losses.

usage: python step_compose_ranks_script.py OUT_DIR SCENARIO PORT
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from cwps_lightning.cwps import (
    StepComposeSGD,
    cwps_layers,
    inject_cwps,
    set_stage,
    use_step_compose,
)


class Net(nn.Module):
    """conv -> pool -> fc1 -> fc2 -> head; ``skip``: fc2 takes no part in the forward."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 6))
        self.fc2 = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)
        self.skip = False

    def forward(self, x):
        h = self.body(x)
        return self.head(h if self.skip else self.fc2(h))


def model(scenario: str = "") -> nn.Module:
    torch.manual_seed(0)
    net = Net()
    inject_cwps(net)  # all but the head
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in cwps_layers(net):
            layer.set_parent(layer.weight + 0.2 * torch.randn(layer.weight.shape, generator=g),
                             layer.bias - 0.1)
            layer.mask_logits.copy_(torch.randn(layer.mask_logits.shape, generator=g))
    use_step_compose(net)
    set_stage(net, "soft")
    if scenario == "finetune":  # a plain layer on its child: the child's own gradient
        set_stage(net.fc2, "finetune")
    return net


def optimizer(net, group=None) -> StepComposeSGD:
    masks = [layer.mask_logits for _, layer in cwps_layers(net)]
    rest = [p for p in net.parameters() if all(p is not m for m in masks)]
    return StepComposeSGD([{"params": rest}, {"params": masks, "lr": 5.0, "weight_decay": 0.0}],
                          lr=0.1, momentum=0.9, weight_decay=0.01, model=net, compiled=False,
                          process_group=group)


def loss_of(net, rank: int, scenario: str) -> torch.Tensor:
    """``net``: the model, or its DDP wrapper."""
    g = torch.Generator().manual_seed(10 + rank)
    x, y = torch.randn(4, 3, 5, 5, generator=g), torch.randint(0, 3, (4,), generator=g)
    inner = getattr(net, "module", net)
    inner.skip = scenario == "skip" and rank == 1  # fc2 takes no part on this rank
    first = 0.0
    if scenario == "switch":  # a soft forward, not through DDP (no head), then the hard one
        set_stage(inner, "soft")
        first = inner.fc2(inner.body(x.flip(0))).square().mean()
        set_stage(inner, "hard")
    loss = F.cross_entropy(net(x), y) + first
    if scenario == "penalty" and rank == 0:
        loss = loss + inner.fc2.mask_logits.sigmoid().sum()
    return loss


def work(rank: int, out: str, scenario: str, port: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    net = model(scenario)
    # DDP for the head; the CWPS layers' children and scores are the step's to average
    ignored = [f"{name}.{kind}" for name, _ in cwps_layers(net)
               for kind in ("weight", "bias", "mask_logits")]
    DDP._set_params_and_buffers_to_ignore_for_model(net, ignored)
    wrapped = DDP(net)
    opt = optimizer(net, dist.group.WORLD)
    opt.zero_grad()
    loss_of(wrapped, rank, scenario).backward()
    opt.step()
    torch.save(net.state_dict(), Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(work, args=tuple(sys.argv[1:4]), nprocs=2)
