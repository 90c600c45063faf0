"""Image transforms of the paper's benchmarks, at a configurable working size.

Three policies, each a (train, test) pair; ``image_size`` is the network's input size (224 in
the paper) and ``resize_size`` the shorter side images are resized to before a crop (default
``image_size * 256 / 224``, i.e. 256 at 224):

``resize``  -- Piggyback / TAPS for the ``*_cropped`` sets (CUBS, Stanford Cars): resize to
               ``image_size`` x ``image_size`` (+ horizontal flip in training).
``crop``    -- Piggyback / TAPS for the other ImageNet-to-Sketch sets: train resize
               ``resize_size`` -> random resized crop ``image_size`` + flip; test resize
               ``resize_size`` -> centre crop ``image_size``.
``rrc``     -- TAPS for DomainNet: train random resized crop ``image_size`` of the original
               image + flip; test resize ``resize_size`` -> centre crop ``image_size``.

Every policy ends with ToTensor and a per-channel normalisation (ImageNet statistics by default;
ViTs trained with mean = std = 0.5 take ``data.mean`` / ``data.std``).
"""

from __future__ import annotations

from collections.abc import Sequence

from torchvision import transforms as T

from .base import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, DataConfigError, int_range

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POLICIES = ("resize", "crop", "rrc")


def default_resize_size(image_size: int) -> int:
    """The shorter side before cropping: 256 for 224, scaled alike for other sizes."""
    return int(round(image_size * 256 / 224))


def check_transform_settings(
    image_size, resize_size, mean: Sequence[float], std: Sequence[float]
) -> tuple[int, int, tuple[float, ...], tuple[float, ...]]:
    """Validate and normalise the transform settings of a data config."""
    if (isinstance(image_size, bool) or not isinstance(image_size, int)
            or not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE):
        raise DataConfigError(f"data.image_size must be "
                              f"{int_range(MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)}, "
                              f"got {image_size!r}")
    if resize_size is None:
        resize_size = default_resize_size(image_size)
    if (isinstance(resize_size, bool) or not isinstance(resize_size, int)
            or not image_size <= resize_size <= 2 * MAX_IMAGE_SIZE):
        raise DataConfigError(
            f"data.resize_size must be null or an integer from data.image_size ({image_size}) "
            f"to {2 * MAX_IMAGE_SIZE}, "
            f"got {resize_size!r}"
        )
    for key, value in (("mean", mean), ("std", std)):
        try:
            ok = len(value) == 3 and all(float(v) == float(v) for v in value)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise DataConfigError(f"data.{key} must be a list of 3 numbers, got {value!r}")
    if any(float(s) <= 0 for s in std):
        raise DataConfigError(f"data.std must be positive, got {list(std)}")
    return image_size, resize_size, tuple(float(v) for v in mean), tuple(float(v) for v in std)


def build_transform(
    policy: str,
    train: bool,
    image_size: int = 224,
    resize_size: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> T.Compose:
    """The transform of ``policy`` for training (``train=True``) or evaluation."""
    if policy not in POLICIES:
        raise DataConfigError(f"data.transform must be one of {list(POLICIES)}, got {policy!r}")
    resize_size = resize_size or default_resize_size(image_size)
    if policy == "resize":
        steps = [T.Resize((image_size, image_size))]
        if train:
            steps.append(T.RandomHorizontalFlip())
    elif train and policy == "crop":
        steps = [T.Resize(resize_size), T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
    elif train:  # rrc
        steps = [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
    else:  # crop / rrc at test time
        steps = [T.Resize(resize_size), T.CenterCrop(image_size)]
    steps += [T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))]
    return T.Compose(steps)
