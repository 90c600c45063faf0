"""Dataset tooling: ``python -m cwps_lightning.data {check,download} [options] [overrides]``.

Both commands compose the same Hydra config as ``python -m cwps_lightning.train``, so a preset
and the overrides of a training run name the dataset to check or fetch::

    python -m cwps_lightning.data check +experiment=domainnet data.root=/data/domainnet
    python -m cwps_lightning.data check +experiment=imagenet_sketch data.root=/data/i2s --strict
    python -m cwps_lightning.data download +experiment=domainnet data.root=/data/domainnet \
        'data.tasks=[clipart,sketch]'

Exit status: 0 fine, 1 ``check`` found problems, 2 bad configuration or a failed download.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..errors import ConfigError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cwps_lightning.data",
        description="Check a dataset on disk, or download DomainNet. Overrides are Hydra "
                    "overrides, exactly as for python -m cwps_lightning.train.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="verify layout, split files, classes, counts and "
                                         "every image of the configured dataset")
    check.add_argument("--strict", action="store_true",
                       help="exit 1 on warnings too (e.g. counts that differ from the reference)")
    check.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. +experiment=domainnet "
                                                    "data.root=/data/domainnet")
    download = sub.add_parser("download", help="fetch, verify and extract DomainNet")
    download.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. "
                                                       "+experiment=domainnet data.root=/data/dn")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["check"] and "--strict" in argv[1:]:
        # --strict may stand anywhere among the overrides (argparse takes it only first)
        argv = ["check", "--strict", *[a for a in argv[1:] if a != "--strict"]]
    args = parser().parse_args(argv)
    try:
        if args.command == "check":
            from .check import run_check

            return run_check(args.overrides, strict=args.strict)
        from .download import run_download

        return run_download(args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (a partial download resumes when you rerun the command)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
