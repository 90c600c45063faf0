"""Image loader throughput: images/second through the training and evaluation DataLoaders of
the on-disk benchmarks, with the config's default loader settings (data.num_workers=auto, ...).

    .venv/bin/python benchmarks/loader_throughput.py                # 1024 224x224 JPEGs
    .venv/bin/python benchmarks/loader_throughput.py --images 4096 data.num_workers=8

Writes a tree of 224x224 JPEGs (ImageNet-to-Sketch layout: ``flowers`` goes through resize 256
-> random resized crop 224 + flip, ``cubs_cropped`` through resize 224 + flip), builds the
DataModule from the same Hydra config as training (``+experiment=imagenet_sketch``), and times
whole epochs of each loader after a warm-up epoch (worker start-up and the first reads, which the
page cache then holds, are not counted). Extra arguments are Hydra overrides.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cwps_lightning.data.check import compose_config, instantiate_data  # noqa: E402
from cwps_lightning.errors import ConfigError  # noqa: E402


def write_tree(root: Path, n_images: int, n_classes: int, size: int = 224) -> None:
    rng = random.Random(0)
    base = Image.linear_gradient("L").resize((size, size))
    for task in ("flowers", "cubs_cropped"):
        for i in range(n_images):
            cls = f"class_{i % n_classes:03d}"
            # (every fifth image of each class: each class is in train, as the loader needs)
            split = "test" if (i // n_classes) % 5 == 4 else "train"
            path = root / task / split / cls / f"{i:05d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            noise = Image.effect_noise((size, size), 40 + rng.randrange(40))
            img = Image.merge("RGB", (base, noise, base.rotate(rng.randrange(360))))
            img.save(path, quality=90)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def time_loader(loader, epochs: int) -> float:
    for _ in loader:  # warm-up epoch: worker start-up, first reads
        pass
    n, started = 0, time.perf_counter()
    for _ in range(epochs):
        for x, _y in loader:
            n += x.shape[0]
    return n / (time.perf_counter() - started)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1024, help="images per task (train + test)")
    p.add_argument("--classes", type=int, default=16)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs after the warm-up one")
    p.add_argument("--root", type=Path, default=None, help="where to write the tree (temp dir)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data.num_workers=4")
    args = p.parse_args()
    # (0 classes or epochs measure nothing; under 5 images a class, the test split is empty)
    for name, least in (("classes", 1), ("epochs", 1), ("images", 5 * max(args.classes, 1))):
        if getattr(args, name) < least:
            p.error(f"--{name} must be an integer >= {least}"
                    + (" (5 per class)" if name == "images" else "")
                    + f", got {getattr(args, name)}")

    tmp = None
    root = args.root
    if root is None:
        tmp = tempfile.TemporaryDirectory()
        root = Path(tmp.name)
    if not (root / "flowers").is_dir():
        started = time.perf_counter()
        write_tree(root, args.images, args.classes)
        print(f"wrote {2 * args.images} 224x224 JPEGs to {root} in "
              f"{time.perf_counter() - started:.1f} s")
    try:
        cfg = compose_config(["+experiment=imagenet_sketch", f"data.root={root}",
                              "data.tasks=[flowers,cubs_cropped]", *args.overrides])
        dm = instantiate_data(cfg)
    except ConfigError as err:
        if tmp is not None:
            tmp.cleanup()
        p.error(str(err))
    started = time.perf_counter()
    dm.task_names  # noqa: B018 - scan + header check of every image
    print(f"machine: {os.cpu_count()} CPUs ({cpu_name()}), torch threads "
          f"{__import__('torch').get_num_threads()}")
    print(f"settings: num_workers={dm.num_workers} (data.num_workers={cfg.data.num_workers}), "
          f"batch_size={dm.batch_size}, eval_batch_size={dm.eval_batch_size}, "
          f"pin_memory={dm.pin_memory}, persistent_workers={dm.persistent_workers}, "
          f"image_size={dm.image_size}")
    print(f"scan + header check of {2 * args.images} images: "
          f"{time.perf_counter() - started:.2f} s")
    for task in ("flowers", "cubs_cropped"):
        dm.use(task)
        policy = dm.policy_for(task)
        train = time_loader(dm.train_dataloader(), args.epochs)
        test = time_loader(dm.test_dataloader(), args.epochs)
        print(f"{task:<13} ({policy:<6}) train loader {train:7.1f} images/s, "
              f"test loader {test:7.1f} images/s")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
