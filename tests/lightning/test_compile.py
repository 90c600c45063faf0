"""model.compile=true: the compiled training forward of a CWPS model gives the eager loss and
gradients, soft and hard, and a Lightning fit with it trains the model itself (not a copy)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from cwps_lightning.cwps import cwps_layers, inject_cwps, set_stage
from cwps_lightning.models.lit_module import CWPSLitModule

from ..helpers import Small


def _model():
    torch.manual_seed(0)
    model = Small()
    inject_cwps(model)
    with torch.no_grad():
        for _, layer in cwps_layers(model):
            layer.weight.add_(0.1 * torch.randn_like(layer.weight))  # child != parent
            layer.mask_logits.normal_()
    return model


@pytest.mark.parametrize("stage, hw", [("soft", 8), ("hard", 8), ("hard", 1)])
def test_compiled_forward_matches_eager_loss_and_gradients(stage, hw):
    """hw 1: both convs have a 1x1 output and take the window path (cwps/small_input.py), one
    of them grouped."""
    torch.set_num_threads(1)
    model = _model()
    set_stage(model, stage)
    module = CWPSLitModule(model, num_classes=3, compile_mode="default")
    x = torch.randn(4, 3, hw, hw, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 1])
    grads = {}
    for name, forward in (("eager", model), ("compiled", module._compiled)):
        model.zero_grad()
        loss = F.cross_entropy(forward(x), y)
        loss.backward()
        grads[name] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                       if p.grad is not None})
    (loss_e, g_e), (loss_c, g_c) = grads["eager"], grads["compiled"]
    assert torch.allclose(loss_c, loss_e, atol=1e-5)
    assert g_e.keys() == g_c.keys() and any(n.endswith("mask_logits") for n in g_e)
    for n in g_e:
        assert torch.allclose(g_c[n], g_e[n], atol=1e-5, rtol=1e-4), n
    # the compiled forward is not a second set of parameters
    assert set(module.state_dict()) == {f"model.{k}" for k in model.state_dict()}


@pytest.mark.parametrize("stage, hw, large", [
    ("soft", 1, False), ("hard", 1, False), ("soft", 8, True), ("hard", 8, True)])
def test_compiled_step_has_no_graph_break_with_whole_masks(stage, hw, large, monkeypatch):
    """Eager, on the CPU, hard-stage layers whose mask keeps every channel or none read the
    mask to take a shortcut (large kernels and 1x1-output windows: hw 1 takes the window path),
    and large kernels compose into a scratch buffer the CPU keeps (large: every kernel counts
    as large). Compiled, forward and backward trace as one graph (fullgraph=True raises at a
    graph break) and give eager's output and gradients."""
    from cwps_lightning.cwps import layers

    torch.set_num_threads(1)
    torch.compiler.reset()  # (the cases compile the same forward: no recompile limit here)
    if large:
        monkeypatch.setattr(layers, "KEEP_COMPOSED_NUMEL", 0)
        monkeypatch.setattr(layers._SCRATCH, "buffers", {})  # as in a fresh process
    model = _model()
    set_stage(model, stage)
    with torch.no_grad():
        for i, (_, layer) in enumerate(cwps_layers(model)):
            layer.mask_logits.fill_(4.0 if i % 2 else -4.0)  # all specific / all shared
    x = torch.randn(4, 3, hw, hw, generator=torch.Generator().manual_seed(1))
    runs = {}
    for name, forward in (("compiled", torch.compile(model, fullgraph=True)), ("eager", model)):
        model.zero_grad()
        out = forward(x)
        out.square().mean().backward()
        runs[name] = (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                     if p.grad is not None})
    assert torch.allclose(runs["compiled"][0], runs["eager"][0], atol=1e-5)
    grads_c, grads_e = runs["compiled"][1], runs["eager"][1]
    assert grads_c.keys() == grads_e.keys() and any(n.endswith(".weight") for n in grads_e)
    for n, g in grads_e.items():
        assert torch.allclose(grads_c[n], g, atol=1e-5, rtol=1e-4), n


def test_a_fit_with_compile_trains_the_model_itself():
    torch.set_num_threads(1)
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 8, 8), torch.randint(0, 3, (16,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    module = CWPSLitModule(model, num_classes=3, compile_mode="default")
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.endswith("conv1.weight") for k in moved)


def test_compiled_small_input_convs_match_eager():
    """A plain model (the fine-tuning baseline's) on a 1x1 map, compiled: the window path
    gives the eager loss and gradients."""
    from cwps_lightning.cwps.small_input import use_small_input_convs

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Small()
    assert use_small_input_convs(model) == 2
    compiled = torch.compile(model)
    x = torch.randn(4, 3, 1, 1, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 1])
    out = {}
    for name, forward in (("eager", model), ("compiled", compiled)):
        model.zero_grad()
        loss = F.cross_entropy(forward(x), y)
        loss.backward()
        out[name] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert torch.allclose(out["compiled"][0], out["eager"][0], atol=1e-5)
    for n, g in out["eager"][1].items():
        assert torch.allclose(out["compiled"][1][n], g, atol=1e-5, rtol=1e-4), n
    assert out["eager"][1]["conv1.weight"][:, :, 0].abs().sum() == 0  # outside the window


def test_every_fit_compiles_past_the_recompile_limit():
    """Each fit's module compiles its own graphs: many fits in one process (tasks with other
    heads, soft and hard stages) would otherwise pass torch._dynamo's recompile limit, after
    which the forward runs eager (the limit lowered to 2 here: a fit's soft and hard stage)."""
    from torch._dynamo.utils import counters

    torch.set_num_threads(1)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch._dynamo.config.patch(recompile_limit=2):
        for task in range(3):
            model = _model()
            model.head = torch.nn.Linear(10, 3 + task)  # another task's head
            module = CWPSLitModule(model, num_classes=3 + task, compile_mode="default")
            for stage in ("soft", "hard"):
                set_stage(model, stage)
                before = counters["stats"]["unique_graphs"]
                module._compiled(x).square().mean().backward()
                assert counters["stats"]["unique_graphs"] > before, (task, stage)
