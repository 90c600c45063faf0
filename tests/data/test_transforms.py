"""Transforms: output sizes at the configured image size, normalisation, bad settings."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from cwps_lightning.data import DataConfigError
from cwps_lightning.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    POLICIES,
    build_transform,
    check_transform_settings,
    default_resize_size,
)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("size", [32, 224])
def test_output_size_is_the_image_size(policy, train, size):
    img = Image.new("RGB", (301, 157), (10, 200, 30))  # not square, not the target size
    out = build_transform(policy, train, image_size=size)(img)
    assert out.shape == (3, size, size)
    assert out.dtype == torch.float32


def test_default_size_is_224_and_resize_256():
    img = Image.new("RGB", (500, 400))
    assert build_transform("crop", train=False)(img).shape == (3, 224, 224)
    assert default_resize_size(224) == 256
    assert default_resize_size(32) == 37
    assert check_transform_settings(224, None, IMAGENET_MEAN, IMAGENET_STD)[1] == 256


def test_normalisation_uses_mean_and_std():
    img = Image.new("RGB", (40, 40), (255, 0, 128))
    out = build_transform("resize", False, 16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(img)
    assert torch.allclose(out[0], torch.ones(16, 16))
    assert torch.allclose(out[1], -torch.ones(16, 16))
    imagenet = build_transform("resize", False, 16)(img)
    assert torch.allclose(imagenet[0], torch.full((16, 16), (1 - 0.485) / 0.229), atol=1e-5)


def test_test_transforms_are_deterministic_and_train_ones_flip():
    img = Image.new("RGB", (64, 48))
    for x in range(10):  # an asymmetric pattern
        img.putpixel((x, 5), (255, 255, 255))
    test_tf = build_transform("resize", False, 32)
    assert torch.equal(test_tf(img), test_tf(img))
    train_tf = build_transform("resize", True, 32)
    torch.manual_seed(0)
    outs = {tuple(train_tf(img)[0, 3].tolist()) for _ in range(20)}
    assert len(outs) == 2  # flipped and not flipped


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(image_size=4), "data.image_size"),
        (dict(image_size="224"), "data.image_size"),
        (dict(resize_size=16), "data.resize_size"),
        (dict(image_size=2049), r"data\.image_size must be an integer from 8 to 2048, got 2049"),
        (dict(resize_size=4097), r"data\.resize_size must be null or an integer from "
                                 r"data\.image_size \(224\) to 4096, got 4097"),
        (dict(mean=[0.5, 0.5]), "data.mean"),
        (dict(std=[0.2, 0.0, 0.2]), "data.std"),
    ],
)
def test_bad_settings_are_named(kwargs, fragment):
    args = dict(image_size=224, resize_size=None, mean=IMAGENET_MEAN, std=IMAGENET_STD, **{})
    args.update(kwargs)
    with pytest.raises(DataConfigError, match=fragment):
        check_transform_settings(**args)


def test_unknown_policy():
    with pytest.raises(DataConfigError, match="data.transform"):
        build_transform("zoom", True)


def test_imagenet_normalisation_of_every_channel():
    img = Image.new("RGB", (40, 40), (255, 0, 128))
    out = build_transform("resize", False, 16)(img)
    for c, value in enumerate((1.0, 0.0, 128 / 255)):
        want = (value - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        assert torch.allclose(out[c], torch.full((16, 16), want), atol=1e-5), c
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)


def sizes_of(tf) -> list[tuple[str, object]]:
    return [(type(t).__name__, getattr(t, "size", None)) for t in tf.transforms[:-2]]


def test_crop_resizes_to_resize_size_before_cropping():
    assert sizes_of(build_transform("crop", True, 224)) == [
        ("Resize", 256), ("RandomResizedCrop", (224, 224)), ("RandomHorizontalFlip", None)]
    for policy in ("crop", "rrc"):
        assert sizes_of(build_transform(policy, False, 224)) == [
            ("Resize", 256), ("CenterCrop", (224, 224))]
        assert sizes_of(build_transform(policy, False, 32, resize_size=48)) == [
            ("Resize", 48), ("CenterCrop", (32, 32))]
    assert sizes_of(build_transform("crop", True, 32, resize_size=40))[0] == ("Resize", 40)


def test_settings_at_their_limits_are_taken_and_returned_as_given():
    assert check_transform_settings(8, 8, [0.5, 0.4, 0.3], [0.2, 0.25, 1]) == (
        8, 8, (0.5, 0.4, 0.3), (0.2, 0.25, 1.0))
    assert check_transform_settings(2048, 4096, IMAGENET_MEAN, IMAGENET_STD)[:2] == (2048, 4096)
