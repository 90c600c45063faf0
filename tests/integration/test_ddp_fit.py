"""A fit under DDP is the fit it should be: on 2 CPU ranks (gloo, Lightning's own launcher),
every training batch is full, the ranks' batches of an epoch are disjoint and cover the
epoch's images, and the weights equal a one-process replay of those batches that averages the
two ranks' gradients (what DDP computes), step for step."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from .ddp_fit_script import BATCH, EPOCHS, N_TRAIN, model
from .helpers import REPO, cli_env

pytestmark = pytest.mark.xdist_group("ddp")  # 2 processes: one such run at a time

SCRIPT = Path(__file__).with_name("ddp_fit_script.py")


@pytest.fixture(scope="module")
def ddp_fit(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp-fit")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out)], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    batches = [torch.load(out / f"batches{r}.pt") for r in range(2)]
    return batches, torch.load(out / "weights.pt")


def test_every_batch_is_full_and_the_ranks_split_each_epoch(ddp_fit):
    batches, _ = ddp_fit
    share = -(-N_TRAIN // 2)  # a rank's padded share: 23 images, 2 full batches of 8
    steps = share // BATCH
    assert [len(b) for b in batches] == [steps * EPOCHS] * 2
    assert {len(y) for rank in batches for _, y, _ in rank} == {BATCH}
    for epoch in range(EPOCHS):
        ids = [int(i) for rank in batches for x, _, _ in rank[epoch * steps:(epoch + 1) * steps]
               for i in x[:, 0, 0, 0]]
        assert len(ids) == len(set(ids)) == 2 * steps * BATCH  # no image twice in an epoch
        assert set(ids) <= set(range(N_TRAIN))
    first, second = ({int(i) for x, _, _ in batches[0][e * steps:(e + 1) * steps]
                      for i in x[:, 0, 0, 0]} for e in range(2))
    assert first != second  # each epoch reshuffles


def _replay(batches, ranks) -> dict:
    """One process, CWPSLitModule's fine-tuning optimiser (one group, SGD with momentum and
    decay) at each step's recorded rate, gradients averaged over ``ranks``' batches."""
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=1.0, momentum=0.9, weight_decay=5e-4)
    net.train()
    for steps in zip(*batches, strict=True):
        assert len({tuple(lrs) for _, _, lrs in steps}) == 1  # the ranks' schedules agree
        opt.param_groups[0]["lr"] = steps[0][2][0]
        opt.zero_grad()
        for x, y, _ in (steps[r] for r in ranks):
            (F.cross_entropy(net(x), y) / len(ranks)).backward()
        opt.step()
    return {name: p.detach() for name, p in net.named_parameters()}


def test_weights_equal_a_replay_that_averages_the_ranks_gradients(ddp_fit):
    batches, weights = ddp_fit
    replay = _replay(batches, ranks=(0, 1))
    for name, p in replay.items():
        torch.testing.assert_close(weights[name], p, rtol=0, atol=1e-6, msg=name)
    # rank 0's batches alone end elsewhere: the tolerance tells the two apart
    alone = _replay(batches, ranks=(0,))
    assert max(float((weights[n] - p).abs().max()) for n, p in alone.items()) > 1e-3


@pytest.mark.slow
def test_a_step_compose_fit_under_ddp_trains_as_the_forward_compose_fit(tmp_path):
    """cwps.compose=step under DDP: the children, scores and composed weights are left out of
    DDP, StepComposeSGD averages the composed weights' gradients over the ranks itself, and
    the mask fit ends where the forward compose's DDP fit ends (to rounding), decisions
    included."""
    weights = {}
    for compose in ("forward", "step"):
        proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), compose], cwd=REPO,
                              env=cli_env(), capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        weights[compose] = torch.load(tmp_path / f"weights_{compose}.pt")
    forward, step = weights["forward"], weights["step"]
    assert set(forward) == set(step) and not any("composed" in k for k in step)
    for name, value in forward.items():
        torch.testing.assert_close(step[name], value, rtol=1e-4, atol=1e-5, msg=name)
    # some layer shares channels and keeps others: both branches of the step ran
    scores = [k for k in forward if k.endswith("mask_logits")]
    assert scores and any(((forward[k] > 0).any() and (forward[k] <= 0).any()) for k in scores)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["skip", "penalty", "finetune", "switch"])
def test_step_compose_ranks_whose_gradients_differ_in_kind_agree(tmp_path, scenario):
    """A layer that one rank leaves out, a penalty one rank alone has: the ranks agree on which
    gradients exist before they average (a rank that lacks one adds a zero), so the
    all-reduce neither fails nor mixes tensors up, and both ranks end where a one-process
    replay of the two ranks' mean loss ends. A layer in the finetune stage: its child's
    gradient, which DDP leaves alone, is averaged by the step; so is the gradient of a soft
    forward whose composed weight a switch to the hard stage let go before the backward."""
    import socket

    from .step_compose_ranks_script import loss_of, model, optimizer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = Path(__file__).with_name("step_compose_ranks_script.py")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), scenario, port],
                          cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    net = model(scenario)
    opt = optimizer(net)
    opt.zero_grad()
    for rank in range(2):
        (loss_of(net, rank, scenario) / 2).backward()
    opt.step()
    for name, value in net.state_dict().items():
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-5, atol=1e-6, msg=name)
