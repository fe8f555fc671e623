"""Shared fixtures: one cache of embedded models and one exported tiny bundle per test session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The tests' models are tiny: intra-op threads gain nothing, and on a shared 2-core machine OpenMP's
    spinning threads wait for each other (measured: diffusers' pipeline on asdm:tiny, 10 steps, 57 s with
    2 threads while another process ran, 0.8 s with 1). The product's own thread settings are not touched."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
