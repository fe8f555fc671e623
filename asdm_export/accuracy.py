"""Accuracy metrics and tolerances: how far a backend's output may drift from the PyTorch reference.

Metrics, for reference ``r`` and candidate ``c`` (both cast to float64):
  * ``max_abs``  = max |c - r|
  * ``rel_l2``   = ||c - r||_2 / ||r||_2
  * ``cosine``   = <c, r> / (||c||_2 ||r||_2)
  * ``nonfinite`` = number of NaN / Inf values in ``c`` that are finite in ``r``

An output passes when max_abs <= tol.max_abs, rel_l2 <= tol.rel_l2, cosine >= tol.min_cosine and
nonfinite == 0. Default tolerances per precision are in ``DEFAULT_TOLERANCES`` and README.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

from .errors import InputError


@dataclass(frozen=True)
class Tolerance:
    max_abs: float
    rel_l2: float
    min_cosine: float

    def with_overrides(self, **values) -> "Tolerance":
        return replace(self, **{k: v for k, v in values.items() if v is not None})

    def to_json(self) -> dict:
        return asdict(self)


# fp32: ORT and PyTorch differ only in summation order (measured ~1e-6 relative on the tiny model);
# 1e-4 leaves room for deep models and still catches any changed weight that matters.
# fp16: 10-bit mantissa, errors of ~1e-3 relative per op accumulate over ~100 layers.
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(max_abs=1e-3, rel_l2=1e-4, min_cosine=0.99999),
    "fp16": Tolerance(max_abs=5e-2, rel_l2=1e-2, min_cosine=0.9995),
}


def tolerance_for(precision: str) -> Tolerance:
    if precision not in DEFAULT_TOLERANCES:
        raise InputError(f"no tolerances for precision '{precision}'; choose one of {', '.join(DEFAULT_TOLERANCES)}")
    return DEFAULT_TOLERANCES[precision]


def compare_arrays(reference: np.ndarray, candidate: np.ndarray) -> dict:
    r = np.asarray(reference, dtype=np.float64)
    c = np.asarray(candidate, dtype=np.float64)
    if r.shape != c.shape:
        return {"shape_mismatch": [list(r.shape), list(c.shape)], "nonfinite": 0,
                "max_abs": float("inf"), "rel_l2": float("inf"), "cosine": 0.0}
    finite_ref = np.isfinite(r)
    nonfinite = int(np.count_nonzero(finite_ref & ~np.isfinite(c)))
    diff = np.where(finite_ref, c - r, 0.0)
    with np.errstate(invalid="ignore", over="ignore"):
        r_norm = float(np.linalg.norm(np.where(finite_ref, r, 0.0)))
        c_norm = float(np.linalg.norm(np.where(finite_ref, c, 0.0)))
        max_abs = float(np.max(np.abs(diff))) if diff.size else 0.0
        rel_l2 = float(np.linalg.norm(diff)) / max(r_norm, 1e-30)
        cosine = float(np.sum(np.where(finite_ref, c * r, 0.0))) / max(r_norm * c_norm, 1e-30)
    if nonfinite:
        max_abs, rel_l2, cosine = float("inf"), float("inf"), float("nan")
    return {"max_abs": max_abs, "rel_l2": rel_l2, "cosine": cosine, "nonfinite": nonfinite}


def passes(metrics: dict, tol: Tolerance) -> bool:
    return (
        "shape_mismatch" not in metrics
        and metrics["nonfinite"] == 0
        and metrics["max_abs"] <= tol.max_abs
        and metrics["rel_l2"] <= tol.rel_l2
        and metrics["cosine"] >= tol.min_cosine
    )
