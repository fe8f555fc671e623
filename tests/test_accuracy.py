"""Metrics and tolerances on arrays whose errors are known exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest

from asdm_export.check.accuracy import DEFAULT_TOLERANCES, Tolerance, compare_arrays, passes
from asdm_export.errors import MissingBackendError


def test_metrics_match_their_definitions():
    ref = np.array([3.0, 4.0, 0.0], np.float32)  # ||ref|| = 5
    cand = np.array([3.0, 4.0, 0.5], np.float32)
    m = compare_arrays(ref, cand)
    assert m["max_abs"] == 0.5
    assert math.isclose(m["rel_l2"], 0.5 / 5.0, rel_tol=1e-12)
    assert math.isclose(m["cosine"], 25.0 / (5.0 * math.sqrt(25.25)), rel_tol=1e-12)
    assert m["nonfinite"] == 0


def test_identical_arrays_pass_every_preset():
    x = np.random.default_rng(0).normal(size=(2, 4, 8, 8)).astype(np.float32)
    m = compare_arrays(x, x.copy())
    assert m["max_abs"] == 0 and m["rel_l2"] == 0 and math.isclose(m["cosine"], 1.0)
    assert all(passes(m, tol) for tol in DEFAULT_TOLERANCES.values())


def test_nan_and_inf_fail():
    x = np.ones(16, np.float32)
    y = x.copy()
    y[3] = np.nan
    y[5] = np.inf
    m = compare_arrays(x, y)
    assert m["nonfinite"] == 2
    assert not passes(m, Tolerance(max_abs=1e9, rel_l2=1e9, min_cosine=-1.0))


def test_each_bound_is_enforced():
    x = np.random.default_rng(1).normal(size=1000)
    y = x + 1e-3
    m = compare_arrays(x, y)
    loose = Tolerance(max_abs=1.0, rel_l2=1.0, min_cosine=0.0)
    assert passes(m, loose)
    assert not passes(m, loose.with_overrides(max_abs=1e-4))
    assert not passes(m, loose.with_overrides(rel_l2=1e-5))
    assert not passes(m, loose.with_overrides(min_cosine=1.0 + 1e-9))
    # each bound is inclusive and exact: the measured value passes, the next float beyond it fails
    for metric, key, beyond in (("max_abs", "max_abs", 0.0), ("rel_l2", "rel_l2", 0.0), ("cosine", "min_cosine", 2.0)):
        assert passes(m, loose.with_overrides(**{key: m[metric]})), metric
        assert not passes(m, loose.with_overrides(**{key: math.nextafter(m[metric], beyond)})), metric


def test_shape_mismatch_fails():
    m = compare_arrays(np.zeros((2, 3)), np.zeros((3, 2)))
    assert not passes(m, Tolerance(1e9, 1e9, -1.0))


def test_auto_provider_expands_wherever_it_is_named(monkeypatch):
    """`--provider auto` alone or beside named providers: every usable one, each once (cpu always)."""
    from asdm_export.runtime import runners

    import onnxruntime as ort

    monkeypatch.setattr(runners, "gpu_present", lambda: False)
    assert runners.usable_providers(["auto"]) == ["cpu"]
    assert runners.usable_providers(["cpu", "auto"]) == ["cpu"]
    for named in (["cuda", "auto"], ["trt"]):  # named ones are checked at once: minutes before a session fails
        with pytest.raises(MissingBackendError, match="needs an NVIDIA GPU and its driver; none is here"):
            runners.usable_providers(named)
    if "CUDAExecutionProvider" in ort.get_available_providers():  # onnxruntime-gpu (Linux)
        monkeypatch.setattr(runners, "gpu_present", lambda: True)
        assert runners.usable_providers(["cuda", "auto"])[:2] == ["cuda", "cpu"]  # a named one stays, first
