"""benchmarks/gpu_site.py: the pure-Python packages a GPU image lacks, copied for PYTHONPATH."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .helpers import load_benchmark


def test_the_copy_imports_from_itself_with_its_versions(tmp_path):
    site = load_benchmark("gpu_site")
    dest = tmp_path / "site"
    copied = site.copy_site(dest)
    assert [c.split()[0].lower() for c in copied] == list(site.PACKAGES)
    assert not list(dest.rglob("__pycache__")) and not (tmp_path / "site.tmp").exists()
    code = ("import importlib.metadata as m, hydra, omegaconf, antlr4, mlxtend;"
            "print(*[x.__file__ for x in (hydra, omegaconf, antlr4, mlxtend)]);"
            "print(m.version('hydra-core'))")
    env = {**os.environ, "PYTHONPATH": str(dest)}
    out = subprocess.run([sys.executable, "-B", "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.split("\n")
    assert all(f.startswith(str(dest)) for f in out[0].split())
    assert out[1] == copied[0].split()[1]  # hydra-core's version, from the copied dist-info


@pytest.mark.parametrize("packages, message", [
    ({"no-such-distribution": ["nope"]}, "no-such-distribution is not installed"),
    ({"numpy": ["numpy"]}, "numpy is not pure Python"),
])
def test_a_package_that_cannot_travel_is_named_and_dest_is_untouched(tmp_path, packages,
                                                                      message):
    site = load_benchmark("gpu_site")
    dest = tmp_path / "site"
    dest.mkdir()
    (dest / "kept.txt").write_text("from before")
    with pytest.raises(SystemExit, match=message):
        site.copy_site(dest, {"omegaconf": ["omegaconf"], **packages})
    assert [p.name for p in dest.iterdir()] == ["kept.txt"]


def test_an_existing_dest_is_replaced_whole(tmp_path):
    """DEST is written whole: what an earlier copy left there goes."""
    site = load_benchmark("gpu_site")
    dest = tmp_path / "site"
    dest.mkdir()
    (dest / "stale.txt").write_text("from an earlier copy")
    site.copy_site(dest, {"omegaconf": ["omegaconf"]})
    assert sorted(p.name for p in dest.iterdir())[0] == "omegaconf"
    assert not (dest / "stale.txt").exists() and (dest / "omegaconf" / "__init__.py").is_file()


def test_each_package_travels_with_its_dist_info(tmp_path):
    """The copy's own metadata (not the installed one a test interpreter would also find)."""
    import importlib.metadata as md

    site = load_benchmark("gpu_site")
    dest = tmp_path / "site"
    site.copy_site(dest, {"omegaconf": ["omegaconf"]})
    found = {d.metadata["Name"].lower(): d.version for d in md.distributions(path=[str(dest)])}
    assert found == {"omegaconf": md.version("omegaconf")}
