"""T0 weights: from a checkpoint file (model.weights), from timm's hub (model.pretrained)."""

from __future__ import annotations

import pytest
import torch

from cwps_lightning.data import ImageNetSketchDataModule
from cwps_lightning.data.check import compose_config
from cwps_lightning.models import ModelConfigError, load_backbone_weights
from cwps_lightning.pretrain import acquire_t0

from .helpers import write_checkpoint


def assert_equal_state(model, state):
    got = model.state_dict()
    assert set(got) == set(state)
    for key, value in state.items():
        assert torch.equal(got[key], value), key


@pytest.mark.parametrize("name, kwargs", [("resnet18", {}),
                                          ("vit_tiny_patch16_224", {"img_size": 32})])
def test_weights_file_gives_the_files_weights(tmp_path, name, kwargs):
    for suffix in (".pt", ".pth"):
        state = write_checkpoint(tmp_path / f"t0{suffix}", name, num_classes=7, **kwargs)
        model = load_backbone_weights(name, tmp_path / f"t0{suffix}", kwargs)
        assert_equal_state(model, state)
        assert model.get_classifier().out_features == 7  # T0 keeps the file's head


def test_safetensors_and_wrapped_checkpoints(tmp_path):
    from safetensors.torch import save_file

    state = write_checkpoint(tmp_path / "plain.pt", "resnet18", num_classes=4)
    save_file(state, str(tmp_path / "t0.safetensors"))
    assert_equal_state(load_backbone_weights("resnet18", tmp_path / "t0.safetensors"), state)
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "wrapped.pt")
    assert_equal_state(load_backbone_weights("resnet18", tmp_path / "wrapped.pt"), state)


def test_mismatching_file_names_the_keys(tmp_path):
    write_checkpoint(tmp_path / "r34.pt", "resnet34", num_classes=5)
    with pytest.raises(ModelConfigError) as err:
        load_backbone_weights("resnet18", tmp_path / "r34.pt")
    msg = str(err.value)
    assert "r34.pt" in msg and "does not fit resnet18" in msg
    assert "unexpected keys ['layer1.2." in msg
    state = write_checkpoint(tmp_path / "r18.pt", "resnet18", num_classes=5)
    del state["layer2.0.conv1.weight"]
    state["layer1.0.conv2.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save(state, tmp_path / "r18_bad.pt")
    with pytest.raises(ModelConfigError) as err:
        load_backbone_weights("resnet18", tmp_path / "r18_bad.pt")
    msg = str(err.value)
    assert "missing keys ['layer2.0.conv1.weight']" in msg
    assert "layer1.0.conv2.weight: file (64, 64, 1, 1) vs model (64, 64, 3, 3)" in msg
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelConfigError, match="cannot read .*junk.pt"):
        load_backbone_weights("resnet18", tmp_path / "junk.pt")
    with pytest.raises(ModelConfigError, match="no such file"):
        load_backbone_weights("resnet18", tmp_path / "absent.pt")


def test_acquire_t0_prefers_the_weights_file(tmp_path, i2s_root):
    state = write_checkpoint(tmp_path / "t0.pt", "resnet18", num_classes=6)
    cfg = compose_config(["+experiment=imagenet_sketch", f"data.root={i2s_root}",
                          "model.name=resnet18", f"model.weights={tmp_path / 't0.pt'}"])
    assert cfg.model.pretrained is True  # the preset asks for hub weights; the file wins
    dm = ImageNetSketchDataModule(root=str(i2s_root), image_size=32, num_workers=0)
    model, info = acquire_t0(cfg, dm, settings=None, device="cpu")
    assert info == {"weights": str(tmp_path / "t0.pt")}
    assert_equal_state(model, state)


def test_pretrained_failure_is_a_clear_error(monkeypatch, i2s_root):
    import timm

    real = timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    cfg = compose_config(["+experiment=imagenet_sketch", f"data.root={i2s_root}",
                          "model.name=resnet18"])
    dm = ImageNetSketchDataModule(root=str(i2s_root))
    with pytest.raises(ModelConfigError) as err:
        acquire_t0(cfg, dm, settings=None, device="cpu")
    msg = str(err.value)
    assert "model.pretrained=true" in msg and "resnet18" in msg and "model.weights=" in msg
    assert "couldn't connect" in msg and "\n" not in msg


def test_pretrained_hub_weights_are_used(monkeypatch, i2s_root):
    import timm

    real = timm.create_model
    calls = []

    def fake_hub(name, pretrained=False, **kwargs):
        calls.append(pretrained)
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", fake_hub)
    cfg = compose_config(["+experiment=imagenet_sketch", f"data.root={i2s_root}",
                          "model.name=resnet18"])
    model, info = acquire_t0(cfg, ImageNetSketchDataModule(root=str(i2s_root)), None, "cpu")
    assert calls == [True] and "pretrained" in info
    assert model.get_classifier().out_features == 1000  # the ImageNet head stays T0's


def test_no_t0_source_for_a_benchmark_without_pretraining(i2s_root):
    cfg = compose_config(["+experiment=imagenet_sketch", f"data.root={i2s_root}",
                          "model.name=resnet18", "model.pretrained=false"])
    with pytest.raises(ModelConfigError, match="model.pretrained=true .* or model.weights="):
        acquire_t0(cfg, ImageNetSketchDataModule(root=str(i2s_root)), None, "cpu")


def test_model_configs_share_keys():
    from omegaconf import OmegaConf

    from cwps_lightning.data.check import CONF_DIR

    base = set(OmegaConf.load(CONF_DIR / "model" / "resnet18.yaml"))
    assert {"name", "kwargs", "weights", "pretrained"} <= base
    for name in ("resnet50", "densenet121", "vit_base_patch16_224"):
        cfg = OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml")
        assert set(cfg) == base and cfg.name == name and cfg.pretrained is False
