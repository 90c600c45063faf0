"""Fixtures: tiny ImageNet-to-Sketch and DomainNet trees (see helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import make_domainnet, make_imagenet_sketch


@pytest.fixture
def i2s_root(tmp_path) -> Path:
    return make_imagenet_sketch(tmp_path / "i2s")


@pytest.fixture
def dn_root(tmp_path) -> Path:
    return make_domainnet(tmp_path / "dn")
