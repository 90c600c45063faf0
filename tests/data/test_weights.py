"""T0 weights: from a checkpoint file (model.weights), from timm's hub (model.pretrained)."""

from __future__ import annotations

import logging

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


def test_mismatching_file_names_the_keys(tmp_path, caplog):
    write_checkpoint(tmp_path / "r34.pt", "resnet34", num_classes=5)
    caplog.set_level(logging.INFO)
    with pytest.raises(ModelConfigError) as err:
        load_backbone_weights("resnet18", tmp_path / "r34.pt")
    # the error is the one line: timm's own INFO lines of the load stay out
    assert not [r for r in caplog.records if r.name.startswith("timm")], caplog.text
    assert logging.getLogger("timm").level == logging.NOTSET  # (put back)
    msg = str(err.value)
    assert "r34.pt" in msg and "does not fit resnet18" in msg
    # (resnet34 has 96 keys resnet18 lacks: the count, the first five, how many more)
    assert "96 unexpected key(s) (layer1.2." in msg and ", ... and 91 more)" in msg
    assert "missing" not in msg and "Error(s) in loading" not in msg
    state = write_checkpoint(tmp_path / "r18.pt", "resnet18", num_classes=5)
    del state["layer2.0.conv1.weight"]
    state["layer1.0.conv2.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save(state, tmp_path / "r18_bad.pt")
    with pytest.raises(ModelConfigError) as err:
        load_backbone_weights("resnet18", tmp_path / "r18_bad.pt")
    msg = str(err.value)
    assert "1 missing key(s) (layer2.0.conv1.weight)" in msg
    assert "1 shape mismatch(es) (layer1.0.conv2.weight: file (64, 64, 1, 1) vs model (64, 64, " \
           "3, 3))" in msg
    assert "fc." not in msg  # (the head takes the file's class count: no mismatch)
    state = write_checkpoint(tmp_path / "r18_head.pt", "resnet18", num_classes=7)
    state["fc.bias"] = torch.zeros(5)  # a head whose bias has another class count
    torch.save(state, tmp_path / "r18_head.pt")
    with pytest.raises(ModelConfigError) as err:
        load_backbone_weights("resnet18", tmp_path / "r18_head.pt")
    assert str(err.value).endswith("does not fit resnet18: 1 shape mismatch(es) (fc.bias: file "
                                   "(5,) vs model (7,))"), err.value
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelConfigError, match=r"cannot read .*junk.pt' \(not a file torch.save "
                                               r"wrote: it starts with b'not '\); accepted: "):
        load_backbone_weights("resnet18", tmp_path / "junk.pt")  # (it said "KeyError: 110")
    with pytest.raises(ModelConfigError, match="no such file"):
        load_backbone_weights("resnet18", tmp_path / "absent.pt")


def test_acquire_t0_prefers_the_weights_file(tmp_path, i2s_root, caplog):
    caplog.set_level(logging.INFO)
    state = write_checkpoint(tmp_path / "t0.pt", "resnet18", num_classes=6)
    cfg = compose_config(["+experiment=imagenet_sketch", f"data.root={i2s_root}",
                          "model.name=resnet18", f"model.weights={tmp_path / 't0.pt'}"])
    assert cfg.model.pretrained is True  # the preset asks for hub weights; the file wins
    dm = ImageNetSketchDataModule(root=str(i2s_root), image_size=32, num_workers=0)
    model, info = acquire_t0(cfg, dm, settings=None, device="cpu")
    assert info == {"weights": str(tmp_path / "t0.pt")}
    assert_equal_state(model, state)
    # the job's own line names the file (timm's are quiet)
    assert f"T0: resnet18 from {tmp_path / 't0.pt'} (model.weights)" in caplog.messages


def fake_hub(monkeypatch, answer):
    """Stand in for the network only: timm's downloads of pretrained weights (from the Hugging
    Face hub or a URL) call ``answer(location)``; the rest of timm.create_model runs as is.
    Returns the locations asked for."""
    import timm.models._builder as builder

    asked = []

    def download(location, *args, **kwargs):
        asked.append(location)
        return answer(location)

    monkeypatch.setattr(builder, "load_state_dict_from_hf", download)
    monkeypatch.setattr(builder, "load_state_dict_from_url", download)
    return asked


def i2s_pretrained_config(i2s_root):
    cfg = compose_config(["+experiment=imagenet_sketch", f"data.root={i2s_root}",
                          "model.name=resnet18"])
    assert cfg.model.pretrained is True and not cfg.model.weights  # the preset asks the hub
    return cfg


def test_pretrained_failure_is_a_clear_error(monkeypatch, i2s_root):
    def offline(location):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files,\n"
                      "and couldn't find them in the cached files.")

    asked = fake_hub(monkeypatch, offline)
    dm = ImageNetSketchDataModule(root=str(i2s_root))
    with pytest.raises(ModelConfigError) as err:
        acquire_t0(i2s_pretrained_config(i2s_root), dm, settings=None, device="cpu")
    assert len(asked) == 1  # the error is the download's
    msg = str(err.value)
    assert "model.pretrained=true" in msg and "resnet18" in msg and "model.weights=" in msg
    assert "couldn't connect" in msg and "\n" not in msg


def test_pretrained_hub_weights_are_used(monkeypatch, i2s_root):
    import timm

    # the hub's resnet18: every tensor its own random values, the 1000-class ImageNet head too
    gen = torch.Generator().manual_seed(123)
    hub = {k: torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
           for k, v in timm.create_model("resnet18", pretrained=False).state_dict().items()}
    asked = fake_hub(monkeypatch, lambda location: {k: v.clone() for k, v in hub.items()})
    model, info = acquire_t0(i2s_pretrained_config(i2s_root),
                             ImageNetSketchDataModule(root=str(i2s_root)), None, "cpu")
    hub_id = timm.models.get_pretrained_cfg("resnet18").hf_hub_id
    assert asked in ([hub_id], [timm.models.get_pretrained_cfg("resnet18").url])
    assert info == {"pretrained": hub_id}
    assert_equal_state(model, hub)  # every weight the hub's, the head included
    assert model.get_classifier().out_features == 1000  # the ImageNet head stays T0's


def test_hub_and_file_weights_are_built_with_the_model_kwargs(monkeypatch, i2s_root, tmp_path):
    """model.kwargs reach timm for T0 from the hub and from a file alike."""
    import timm

    hub = timm.create_model("resnet18", pretrained=False).state_dict()
    fake_hub(monkeypatch, lambda location: {k: v.clone() for k, v in hub.items()})
    dm = ImageNetSketchDataModule(root=str(i2s_root))
    cfg = compose_config(["+experiment=imagenet_sketch", f"data.root={i2s_root}",
                          "model.name=resnet18", "+model.kwargs.drop_rate=0.25"])
    model, _ = acquire_t0(cfg, dm, None, "cpu")
    assert model.drop_rate == 0.25
    write_checkpoint(tmp_path / "t0.pt", "resnet18", num_classes=6)
    cfg = compose_config(["+experiment=imagenet_sketch", f"data.root={i2s_root}",
                          "model.name=resnet18", "+model.kwargs.drop_rate=0.25",
                          f"model.weights={tmp_path / 't0.pt'}"])
    model, _ = acquire_t0(cfg, dm, None, "cpu")
    assert model.drop_rate == 0.25


def test_no_t0_source_for_a_benchmark_without_pretraining(i2s_root):
    cfg = compose_config(["+experiment=imagenet_sketch", f"data.root={i2s_root}",
                          "model.name=resnet18", "model.pretrained=false"])
    with pytest.raises(ModelConfigError, match="model.pretrained=true .* or model.weights="):
        acquire_t0(cfg, ImageNetSketchDataModule(root=str(i2s_root)), None, "cpu")


def test_model_configs_share_keys():
    """Every model config fills the one typed schema (settings.ModelSettings)."""
    from cwps_lightning.config import compose_config, settings_of
    from cwps_lightning.settings import ModelSettings

    for name in ("resnet18", "resnet50", "densenet121", "vit_base_patch16_224"):
        cfg = compose_config([f"model={name}"])
        model = settings_of(cfg.model, ModelSettings, "model")
        assert model.name == name and model.pretrained is False and model.weights is None
        assert set(cfg.model) == {"name", "kwargs", "weights", "pretrained", "channels_last",
                                  "compile", "compile_mode"}


def test_a_checkpoint_is_read_as_timms_loader_reads_it(tmp_path):
    """What the checks accept is what the load takes: a top-level 'state_dict' or 'model' entry,
    keys with DDP's or torch.compile's prefix; any other wrapping is refused by its keys (not
    "does not fit" with nothing missing)."""
    state = write_checkpoint(tmp_path / "plain.pt", "resnet18", num_classes=4)
    for name, saved in (("ddp", {"model": {f"module.{k}": v for k, v in state.items()}}),
                        ("compiled", {f"_orig_mod.module.{k}": v for k, v in state.items()})):
        torch.save(saved, tmp_path / f"{name}.pt")
        assert_equal_state(load_backbone_weights("resnet18", tmp_path / f"{name}.pt"), state)
    for name, saved in (("module", {"module": state}),
                        ("nested", {"state_dict": {"model": state}, "epoch": 3})):
        torch.save(saved, tmp_path / f"{name}.pt")
        with pytest.raises(ModelConfigError) as err:
            load_backbone_weights("resnet18", tmp_path / f"{name}.pt")
        assert f"{name}.pt' holds no state dict of tensors (found ['" in str(err.value)
        assert "accepted: a state dict of tensors" in str(err.value)


def test_a_backbone_saved_without_its_head_is_refused_saying_so(tmp_path):
    """T0 keeps its head (the store holds T0 whole): a file without the classifier's keys is
    refused, and the line says that the head is all it lacks."""
    state = write_checkpoint(tmp_path / "r18.pt", "resnet18", num_classes=5)
    torch.save({k: v for k, v in state.items() if not k.startswith("fc.")}, tmp_path / "body.pt")
    with pytest.raises(ModelConfigError) as err:
        load_backbone_weights("resnet18", tmp_path / "body.pt")
    assert str(err.value).endswith("does not fit resnet18: 2 missing key(s) (fc.bias, fc.weight) "
                                   "(the classifier only: save the backbone with its head, of "
                                   "any class count)"), err.value
    del state["layer4.1.bn2.bias"], state["fc.bias"]  # more than the head: no such advice
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ModelConfigError, match=r"does not fit resnet18: 2 missing key\(s\) "
                                               r"\(fc.bias, layer4.1.bn2.bias\)$"):
        load_backbone_weights("resnet18", tmp_path / "bad.pt")
