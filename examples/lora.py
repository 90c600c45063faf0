"""A LoRA-style adapter as a cwps-lightning method: this one file plus one config entry.

    python -m cwps_lightning.train 'cwps.baselines=[finetune,frozen,examples.lora:LoRA]'

Every Conv2d/Linear but the head keeps T0's weight frozen and learns a rank-RANK update
w = w0 + B A (A: RANK x fan-in, B: out x RANK, B zero-initialised, so training starts from
T0's function); normalisation layers and the head train per task. A task stores A, B, its
norms and its head. The runner does the rest: same heads, data order and budget as every other
method, test top-1, results.json, resuming.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cwps_lightning.methods.base import FitPlan, Method, Trained, split_param_count
from cwps_lightning.methods.weight_layers import (
    WeightConv2d,
    WeightLinear,
    WeightTransform,
    inject,
    layers_of,
    merge,
    to_buffer,
)

RANK = 4


class LoRAMixin(WeightTransform):
    def _init_state(self) -> None:
        to_buffer(self, "weight")
        to_buffer(self, "bias")
        w = self.weight
        rank = min(RANK, w.shape[0], w[0].numel())
        self.lora_a = nn.Parameter(w.new_empty(rank, w[0].numel()))
        self.lora_b = nn.Parameter(w.new_empty(w.shape[0], rank))

    @torch.no_grad()
    def _start_from(self, plain: nn.Module):
        self.weight.copy_(plain.weight)
        if plain.bias is not None:
            self.bias.copy_(plain.bias)
        nn.init.normal_(self.lora_a, std=self.lora_a.shape[1] ** -0.5)
        self.lora_b.zero_()
        self.train(plain.training)
        return self

    def effective_weight(self) -> Tensor:
        return self.weight + (self.lora_b @ self.lora_a).view_as(self.weight)


class LoRAConv2d(LoRAMixin, WeightConv2d):
    pass


class LoRALinear(LoRAMixin, WeightLinear):
    pass


class LoRA(Method):
    name = "lora"
    label = f"LoRA (rank {RANK})"

    def train(self, task, iteration, bank, harness) -> Trained:
        model = harness.new_model(task, iteration)
        names = inject(model, LoRAConv2d, LoRALinear, "LoRA")
        harness.step(f"lora {task}: {harness.epochs} epoch(s)")
        # "finetune" trains every parameter: A, B, norms, head (w0 and biases are buffers)
        plan = FitPlan(harness.epochs, seed=harness.seed(task, "fit", iteration))
        harness.fit(model, task, plan, name=task)
        layers = [layer for _, layer in layers_of(model, (LoRAConv2d, LoRALinear))]
        kernels = sum(layer.lora_a.numel() + layer.lora_b.numel() for layer in layers)
        own = split_param_count(model, names)["task_own"]
        merge(model, (LoRAConv2d, LoRALinear))
        return Trained(model, params={"kernels": kernels, "task_own": own})
