"""Shared fixtures: one cache of embedded models and one exported tiny bundle per test session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """Embedded models are written into a per-session cache, so tests exercise the real write path."""
    cache = tmp_path_factory.mktemp("asdm-cache")
    old = os.environ.get("ASDM_EXPORT_CACHE")
    os.environ["ASDM_EXPORT_CACHE"] = str(cache)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
    yield cache
    if old is None:
        os.environ.pop("ASDM_EXPORT_CACHE", None)
    else:
        os.environ["ASDM_EXPORT_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_dir(model_cache) -> Path:
    from asdm_export.models.presets import materialize

    return materialize("asdm:tiny")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_dir) -> Path:
    """The tiny model exported once (fp32). Tests that modify it work on a copy (``bundle_copy``)."""
    from asdm_export.export import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny-fp32"
    export_bundle("asdm:tiny", out)
    return out


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst
