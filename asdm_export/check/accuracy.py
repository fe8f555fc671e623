"""Accuracy metrics and tolerances: how far a backend's output may drift from the PyTorch reference.

Metrics, for reference ``r`` and candidate ``c`` (both cast to float64):
  * ``max_abs``  = max |c - r|
  * ``rel_l2``   = ||c - r||_2 / ||r||_2
  * ``cosine``   = <c, r> / (||c||_2 ||r||_2)
  * ``psnr``     = 20 log10(max|r| / rms(c - r))  dB (inf when equal); reported, not a bound
  * ``nonfinite`` = number of NaN / Inf values in ``c`` that are finite in ``r``

An output passes when max_abs <= tol.max_abs, rel_l2 <= tol.rel_l2, cosine >= tol.min_cosine and
nonfinite == 0. Default tolerances per precision are in ``DEFAULT_TOLERANCES`` and docs/accuracy.md;
``parse_overrides`` reads per-output overrides such as ``noise_pred:rel_l2=1e-3``.

Images (end to end) are compared with ``image_psnr`` and ``ssim`` on uint8 HxWx3 arrays.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import numpy as np

from ..errors import InputError


@dataclass(frozen=True)
class Tolerance:
    max_abs: float
    rel_l2: float
    min_cosine: float

    def with_overrides(self, **values) -> "Tolerance":
        return replace(self, **{k: v for k, v in values.items() if v is not None})

    def to_json(self) -> dict:
        return asdict(self)


# fp32: ORT and PyTorch differ only in summation order. Measured rel L2 on CPUs (ORT vs PyTorch; AVX-512 and
# AVX2 kernels): tiny UNet 1e-6, tiny VAE 3.2e-6, toy-world UNet 1.1e-6, SD1.5-shaped UNet / text encoder / VAE
# (random weights, 16x16 latents) 1.1e-6 / 8.5e-7 / 5.2e-6. 2e-5 leaves 4x over the worst. 1e-4, the bound
# before, passed planted export bugs that this one fails (tiny UNet): one mid-block conv's weight x1.02 (rel L2
# 5.5e-5), the output x1.00005 (5e-5). Every norm's epsilon reset to ONNX's default (1.9e-5) passes both.
# GPU fp32 (TensorRT without TF32, CUDA programs) is not measured yet: the CUDA tests measure it.
# max_abs stays loose: output scales differ (the VAE's pixels, the UNet's noise) and GPU kernels' more.
# fp16: 10-bit mantissa, errors of ~1e-3 relative per op accumulate over ~100 layers (tiny: ~4e-3).
# bf16: 7-bit mantissa, 8x coarser than fp16 per op (CPU programs in bf16 from an fp32 bundle: tiny UNet 1.4e-2,
# text encoder 7e-3).
# int8 (``quantize``): the bound is the cosine target of INT8 deployment, 0.99; for two vectors of equal
# norm that is a relative L2 of sqrt(2 x 0.01) = 0.14, hence 0.15 (tiny model, random inputs outside the
# calibrated ranges included: rel L2 0.04-0.12, cosine >= 0.993).
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(max_abs=1e-3, rel_l2=2e-5, min_cosine=0.99999),
    "fp16": Tolerance(max_abs=5e-2, rel_l2=1e-2, min_cosine=0.9995),
    "bf16": Tolerance(max_abs=2e-1, rel_l2=5e-2, min_cosine=0.998),
    "int8": Tolerance(max_abs=1.0, rel_l2=0.15, min_cosine=0.99),
}

# End to end (the whole pipeline on a backend vs. the PyTorch pipeline, same seed and schedule): the
# final image's minimum PSNR (dB, uint8 pixels). fp32 images differ by at most 1/255 per pixel (>= 48 dB);
# lower precisions drift along the trajectory, so the bound is on the image, not the per-step latents.
E2E_MIN_PSNR: dict[str, float] = {"fp32": 40.0, "fp16": 25.0, "bf16": 20.0, "int8": 18.0}

METRICS = tuple(f.name for f in fields(Tolerance))
METRIC_RANGE = {"max_abs": (0.0, math.inf), "rel_l2": (0.0, math.inf), "min_cosine": (-1.0, 1.0)}


def coarsest(*precisions: str | None) -> str:
    """The precision whose tolerances are the widest of ``precisions`` (None: not given)."""
    order = list(DEFAULT_TOLERANCES)  # fp32, fp16, bf16, int8: each looser than the one before
    return max((p for p in precisions if p), key=order.index)


def own_bounds(verdict: dict) -> str:
    """`` [fp16 tolerances]`` after the name of a backend a report holds to its own precision's bounds."""
    return f" [{verdict['tolerance_preset']} tolerances]" if verdict.get("tolerance_preset") else ""


def latent_of(e2e_verdict: dict) -> str:
    """`` [latent HxW]`` after the name of a backend whose end-to-end run took another size than the bundle's
    opt (engines built for that size only)."""
    latent = e2e_verdict.get("latent")
    return f" [latent {latent[0]}x{latent[1]}]" if latent else ""


def tolerance_for(precision: str) -> Tolerance:
    if precision not in DEFAULT_TOLERANCES:
        raise InputError(f"no tolerances for precision '{precision}'; choose one of {', '.join(DEFAULT_TOLERANCES)}")
    return DEFAULT_TOLERANCES[precision]


def parse_overrides(items) -> dict[str, dict[str, float]]:
    """``["noise_pred:rel_l2=1e-3", "images:max_abs=0.1,min_cosine=0.99"]`` -> {output: {metric: value}}."""
    out: dict[str, dict[str, float]] = {}
    for item in items or ():
        name, sep, rest = str(item).partition(":")
        if not sep or not name or not rest:
            raise InputError(f"bad --tolerance '{item}': expected OUTPUT:METRIC=VALUE, e.g. noise_pred:rel_l2=1e-3")
        for pair in rest.split(","):
            metric, eq, value = pair.partition("=")
            if not eq:
                raise InputError(f"bad --tolerance '{item}': expected METRIC=VALUE")
            if metric not in METRICS:
                raise InputError(f"bad --tolerance '{item}': metric '{metric}' is not one of {', '.join(METRICS)}")
            try:
                number = float(value)
                if not math.isfinite(number):
                    raise ValueError(value)
            except ValueError:
                raise InputError(f"bad --tolerance '{item}': '{value}' is not a number") from None
            low, high = METRIC_RANGE[metric]
            if not low <= number <= high:  # a bound nothing can meet fails every check, for no reason of the engine's
                raise InputError(f"bad --tolerance '{item}': {metric} must lie in [{low:g}, {high:g}]")
            out.setdefault(name, {})[metric] = number
    return out


def tolerance_of(output: str, base: Tolerance, overrides: dict[str, dict[str, float]]) -> Tolerance:
    return base.with_overrides(**overrides.get(output, {}))


def compare_arrays(reference: np.ndarray, candidate: np.ndarray | None) -> dict:
    """The metrics of ``candidate`` against ``reference``; None: the candidate has no such output (a graph whose
    outputs were renamed), which fails like a shape mismatch."""
    if candidate is None:
        return {"missing": True, "nonfinite": 0, "max_abs": float("inf"), "rel_l2": float("inf"), "cosine": 0.0,
                "psnr": float("-inf")}
    r = np.asarray(reference, dtype=np.float64)
    c = np.asarray(candidate, dtype=np.float64)
    if r.shape != c.shape:
        return {"shape_mismatch": [list(r.shape), list(c.shape)], "nonfinite": 0,
                "max_abs": float("inf"), "rel_l2": float("inf"), "cosine": 0.0, "psnr": float("-inf")}
    finite_ref = np.isfinite(r)
    nonfinite = int(np.count_nonzero(finite_ref & ~np.isfinite(c)))
    diff = np.where(finite_ref, c - r, 0.0)
    with np.errstate(invalid="ignore", over="ignore"):
        r_norm = float(np.linalg.norm(np.where(finite_ref, r, 0.0)))
        c_norm = float(np.linalg.norm(np.where(finite_ref, c, 0.0)))
        max_abs = float(np.max(np.abs(diff))) if diff.size else 0.0
        rel_l2 = float(np.linalg.norm(diff)) / max(r_norm, 1e-30)
        cosine = float(np.sum(np.where(finite_ref, c * r, 0.0))) / max(r_norm * c_norm, 1e-30)
        peak = float(np.max(np.abs(np.where(finite_ref, r, 0.0)))) if r.size else 0.0
        rms = float(np.sqrt(np.mean(diff**2))) if diff.size else 0.0
    psnr = float("inf") if rms == 0 else 20 * math.log10(max(peak, 1e-30) / rms)
    if nonfinite:
        max_abs, rel_l2, cosine, psnr = float("inf"), float("inf"), float("nan"), float("-inf")
    return {"max_abs": max_abs, "rel_l2": rel_l2, "cosine": cosine, "psnr": psnr, "nonfinite": nonfinite}


def passes(metrics: dict, tol: Tolerance) -> bool:
    return (
        "shape_mismatch" not in metrics
        and "missing" not in metrics
        and metrics["nonfinite"] == 0
        and metrics["max_abs"] <= tol.max_abs
        and metrics["rel_l2"] <= tol.rel_l2
        and metrics["cosine"] >= tol.min_cosine
    )


def image_psnr(reference: np.ndarray, candidate: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (peak 255); inf when identical."""
    mse = float(np.mean((reference.astype(np.float64) - candidate.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def ssim(reference: np.ndarray, candidate: np.ndarray, window: int = 7) -> float:
    """Mean SSIM (Wang et al. 2004) of two uint8 HxWxC images, per channel over ``window``-square uniform
    windows, with the usual K1=0.01, K2=0.03 and sample covariances: skimage's structural_similarity
    defaults (win_size 7, no Gaussian), in a few numpy lines rather than a scikit-image dependency."""
    from numpy.lib.stride_tricks import sliding_window_view

    x = reference.astype(np.float64)
    y = candidate.astype(np.float64)
    if x.ndim == 2:
        x, y = x[..., None], y[..., None]
    window = min(window, x.shape[0], x.shape[1])
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    n = window * window
    values = []
    for ch in range(x.shape[2]):
        wx = sliding_window_view(x[..., ch], (window, window)).reshape(-1, n)
        wy = sliding_window_view(y[..., ch], (window, window)).reshape(-1, n)
        mx, my = wx.mean(1), wy.mean(1)
        vx = wx.var(1, ddof=1)
        vy = wy.var(1, ddof=1)
        cov = ((wx - mx[:, None]) * (wy - my[:, None])).sum(1) / (n - 1)
        s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        values.append(s.mean())
    return float(np.mean(values))
