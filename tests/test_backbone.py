"""Backbones (models/backbone.py): a timm model per task with a fresh head from T0, the
parameter count of a backbone, and T0 weights from a file."""

from __future__ import annotations

import re

import pytest
import timm
import torch

from cwps_lightning.models import (
    ModelConfigError,
    backbone_param_count,
    check_model_name,
    create_backbone,
    head_classes,
    load_backbone_weights,
    task_model,
)

MODEL = "test_resnet"  # (timm's tiny ResNet)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_backbone_is_built_with_the_model_kwargs_and_the_tasks_classes():
    model = create_backbone(MODEL, 7, {"stem_width": 8, "drop_rate": 0.25})
    assert model.get_classifier().out_features == 7
    assert model.conv1[0].out_channels == 8 and model.drop_rate == 0.25


def test_the_backbone_count_leaves_out_the_head():
    model = create_backbone(MODEL, 7)
    head = model.get_classifier()
    every = sum(p.numel() for p in model.parameters())
    assert backbone_param_count(model) == every - head.weight.numel() - head.bias.numel()
    # the same backbone with another head: the same count
    assert backbone_param_count(create_backbone(MODEL, 100)) == backbone_param_count(model)


def test_a_model_with_two_heads_counts_and_sizes_by_both():
    """Distilled DeiT / LeViT: get_classifier() is (head, head_dist). The job stopped after
    T0's pretraining ('tuple' object has no attribute 'out_features'), and the backbone count
    took both heads in."""
    from cwps_lightning.models import head_classes

    kwargs = {"img_size": 32, "patch_size": 8, "depth": 1}
    model = create_backbone("deit_tiny_distilled_patch16_224", 7, kwargs)
    heads = [model.head, model.head_dist]
    every = sum(p.numel() for p in model.parameters())
    assert backbone_param_count(model) == every - sum(p.numel() for h in heads
                                                      for p in h.parameters())
    assert head_classes(model) == 7
    assert head_classes(create_backbone(MODEL, 5)) == 5


def test_a_task_model_is_t0_with_a_fresh_seeded_head_and_leaves_t0_alone():
    t0 = create_backbone(MODEL, 10)
    before = {k: v.clone() for k, v in t0.state_dict().items()}
    a = task_model(t0, 4, seed=1)
    assert a.get_classifier().out_features == 4
    assert t0.get_classifier().out_features == 10
    for model in (a, task_model(t0, 4, seed=1)):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # (training the task's model)
    assert same_weights(t0.state_dict(), before)
    body = {k: v for k, v in task_model(t0, 4, seed=1).state_dict().items()
            if not k.startswith("fc.")}
    assert same_weights(body, {k: v for k, v in before.items() if not k.startswith("fc.")})
    torch.rand(5)  # (whatever drew from the generator in between)
    heads = [task_model(t0, 4, seed=s).get_classifier().weight for s in (1, 1, 2)]
    assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], heads[2])


def test_an_unknown_name_far_from_any_lists_the_models_of_its_family():
    with pytest.raises(ModelConfigError) as err:
        check_model_name("efficientnet_zzzzzzzzzz")
    similar = re.search(r"; similar: \[(.*)\]$", str(err.value))
    assert similar, str(err.value)
    names = re.findall(r"'([^']+)'", similar.group(1))
    assert names and all("efficientnet" in name for name in names)
    # the family of its first word, shortest first (it was resnet50_gn, tresnet_m, tresnet_l;
    # vit_nope gave convit_* and crossvit_*), and a misspelling by spelling
    for name, first in (("resnet_nope", ["resnet18", "resnet26", "resnet34", "resnet50"]),
                        ("vit_nope", None), ("resnt18", ["resnet18"])):
        with pytest.raises(ModelConfigError) as err:
            check_model_name(name)
        names = re.findall(r"'([^']+)'", re.search(r"; similar: \[(.*)\]$",
                                                   str(err.value)).group(1))
        if first:
            assert names[:len(first)] == first, (name, names)
        else:
            assert names and all(n.startswith("vit_") for n in names), names


def test_a_checkpoint_wrapping_its_state_dict_under_model_loads(tmp_path):
    """(as training scripts save them: {"model": state_dict, "epoch": ...})"""
    torch.manual_seed(123)
    state = timm.create_model(MODEL, pretrained=False, num_classes=5).state_dict()
    torch.save({"model": state, "epoch": 3}, tmp_path / "wrapped.pt")
    model = load_backbone_weights(MODEL, tmp_path / "wrapped.pt")
    assert same_weights(model.state_dict(), state)


def test_a_file_of_other_values_than_tensors_is_refused(tmp_path):
    torch.save({"conv1.0.weight": torch.zeros(16, 3, 3, 3), "step": 3}, tmp_path / "mixed.pt")
    with pytest.raises(ModelConfigError, match=r"mixed\.pt' holds no state dict of tensors"):
        load_backbone_weights(MODEL, tmp_path / "mixed.pt")


def test_a_weights_file_takes_the_model_kwargs(tmp_path):
    torch.manual_seed(123)
    state = timm.create_model(MODEL, pretrained=False, num_classes=5, stem_width=8).state_dict()
    torch.save(state, tmp_path / "narrow.pt")
    model = load_backbone_weights(MODEL, tmp_path / "narrow.pt", {"stem_width": 8})
    assert same_weights(model.state_dict(), state)


def test_an_unreadable_weights_file_says_what_the_reader_said(tmp_path):
    torch.save(timm.create_model(MODEL, pretrained=False).state_dict(), tmp_path / "cut.pt")
    data = (tmp_path / "cut.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:len(data) // 2])  # (a copy that broke off)
    with pytest.raises(ModelConfigError, match=r"cannot read .*cut\.pt' \(RuntimeError: \S.*\); "
                                               r"accepted: "):
        load_backbone_weights(MODEL, tmp_path / "cut.pt")


def test_the_backbone_count_leaves_out_every_head_the_bank_leaves_out():
    """VOLO's aux_head is a head to the bank (classifier_names, from timm's metadata) and to
    reset_classifier, not to get_classifier(): the backbone count took it in. Heads that
    get_classifier() names whole (RepViT's head with its BatchNorms) stay out whole."""
    with torch.device("meta"):  # (shapes only: the counts need no weights)
        volo = create_backbone("volo_d1_224", 7)
        repvit = create_backbone("repvit_m0_9", 7)
    every = sum(p.numel() for p in volo.parameters())
    heads = sum(p.numel() for h in (volo.head, volo.aux_head) for p in h.parameters())
    assert backbone_param_count(volo) == every - heads
    every = sum(p.numel() for p in repvit.parameters())
    assert backbone_param_count(repvit) == every - sum(p.numel() for p in repvit.head.parameters())
    assert head_classes(volo) == head_classes(repvit) == 7
