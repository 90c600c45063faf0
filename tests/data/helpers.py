"""Tiny image trees in each layout, written by the tests themselves (a few images per class),
and the subprocess runner for CLI tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[2]
I2S_TASKS = ("flowers", "wikiart", "sketches", "stanford_cars_cropped", "cubs_cropped")
DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
CLASSES = ("apple", "bee", "cat")


def write_image(path: Path, seed: int = 0, size: tuple[int, int] = (20, 16)) -> Path:
    """A small RGB image whose colours depend on ``seed`` (JPEG or PNG by the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, ((seed * 53) % 256, (seed * 97) % 256, (seed * 31) % 256))
    for x in range(0, size[0], 3):
        img.putpixel((x, (x + seed) % size[1]), (255, 255, 255))
    img.save(path)
    return path


def write_corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not an image at all")
    return path


def write_truncated(path: Path) -> Path:
    """A JPEG cut in half: its header reads, its pixels do not decode."""
    import random

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(7)
    img = Image.frombytes("RGB", (128, 128), bytes(rng.randrange(256) for _ in range(128 * 128 * 3)))
    img.save(path, format="JPEG", quality=95)  # noise: the pixel data dwarfs the header
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def make_folder_task(task_dir: Path, classes=CLASSES, n_train: int = 4, n_test: int = 2,
                     ext: str = ".jpg") -> Path:
    for ci, cls in enumerate(classes):
        for i in range(n_train):
            write_image(task_dir / "train" / cls / f"{cls}_{i}{ext}", seed=ci * 10 + i)
        for i in range(n_test):
            write_image(task_dir / "test" / cls / f"{cls}_t{i}{ext}", seed=ci * 10 + i + 5)
    return task_dir


def make_imagenet_sketch(root: Path, tasks=I2S_TASKS, classes=CLASSES, **kw) -> Path:
    for task in tasks:
        make_folder_task(root / task, classes, **kw)
    return root


def make_domainnet(root: Path, domains=DOMAINS, classes=CLASSES, n_train: int = 4,
                   n_test: int = 2, drop: dict | None = None) -> Path:
    """Official layout; ``drop={(domain, split): {class, ...}}`` leaves classes out of a split
    file (and their images off disk) while the labels of the others stay those of CLASSES."""
    drop = drop or {}
    for domain in domains:
        for split, n in (("train", n_train), ("test", n_test)):
            lines = []
            for label, cls in enumerate(classes):
                if cls in drop.get((domain, split), ()):
                    continue
                for i in range(n):
                    rel = f"{domain}/{cls}/{domain}_{cls}_{split}{i}.jpg"
                    write_image(root / rel, seed=label * 10 + i + (5 if split == "test" else 0))
                    lines.append(f"{rel} {label}")
            (root / f"{domain}_{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def write_checkpoint(path: Path, name: str = "resnet18", num_classes: int = 5, **kwargs) -> dict:
    """A timm model's state dict saved to ``path``; returns the state dict."""
    import timm
    import torch

    torch.manual_seed(123)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def run_cli(module: str, args: list[str], cwd: Path, timeout: int = 900,
            env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` in a subprocess. OMP_NUM_THREADS=1 makes torch use one
    thread there (torch.set_num_threads(1)): the machine is small and shared."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
           **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
