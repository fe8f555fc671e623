"""The check's added metrics and options on inputs whose answers are known exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from asdm_export.check.accuracy import (DEFAULT_TOLERANCES, compare_arrays, image_psnr, parse_overrides, ssim,
                                        tolerance_of)
from asdm_export.check.record import RecordingBackend, spread
from asdm_export.errors import InputError
from asdm_export.runtime.backends import Backend


def test_psnr_of_arrays_and_images():
    ref = np.array([2.0, -4.0, 1.0, 0.0])
    cand = ref + np.array([0.4, 0.0, 0.0, 0.0])  # rms = 0.2, peak = 4
    assert math.isclose(compare_arrays(ref, cand)["psnr"], 20 * math.log10(4 / 0.2), rel_tol=1e-12)
    assert compare_arrays(ref, ref)["psnr"] == math.inf
    a = np.full((8, 8, 3), 100, np.uint8)
    assert math.isclose(image_psnr(a, a + 1), 20 * math.log10(255), rel_tol=1e-12)  # 1/255 everywhere: 48.1 dB


def test_an_output_the_candidate_lacks_fails_like_a_shape_mismatch():
    from asdm_export.check.accuracy import passes

    loose = DEFAULT_TOLERANCES["int8"]
    ref = np.ones((2, 3))
    assert passes(compare_arrays(ref, ref), loose)
    assert not passes(compare_arrays(ref, np.ones((3, 2))), loose)
    missing = compare_arrays(ref, None)
    assert missing["missing"] and missing["rel_l2"] == math.inf and not passes(missing, loose)


def test_ssim_known_values():
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    a, b = np.full((16, 16, 3), 100, np.uint8), np.full((16, 16, 3), 110, np.uint8)
    # flat images: only the luminance term is left
    assert math.isclose(ssim(a, b), (2 * 100 * 110 + c1) / (100**2 + 110**2 + c1), rel_tol=1e-12)
    x = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    assert ssim(x, x) == pytest.approx(1.0)
    assert ssim(x, 255 - x) < 0  # anti-correlated structure
    assert 0 < ssim(x, np.clip(x.astype(int) + 30, 0, 255).astype(np.uint8)) < 1


def test_ssim_of_one_window_computed_by_hand():
    """A 7x9 grey image holds three 7x7 windows (columns 0-6, 1-7, 2-8); SSIM is their mean, each from the
    window's means, sample variances and sample covariance (n - 1 = 48)."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    a = np.zeros((7, 9), np.uint8)
    a[:, 0] = 70  # column 0 bright: only the first window sees it
    b = np.full((7, 9), 10, np.uint8)
    b[:, 0] = 50
    # window 1 (columns 0-6): a = 70 on 7 of 49 pixels, b = 50 there and 10 elsewhere
    ma, mb = 70 * 7 / 49, (50 * 7 + 10 * 42) / 49
    va = (7 * (70 - ma) ** 2 + 42 * ma**2) / 48
    vb = (7 * (50 - mb) ** 2 + 42 * (10 - mb) ** 2) / 48
    cov = (7 * (70 - ma) * (50 - mb) + 42 * (0 - ma) * (10 - mb)) / 48
    first = (2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
    # windows 2 and 3: a = 0 and b = 10 everywhere: only the luminance term is left
    second = (2 * 0 * 10 + c1) / (0 + 10**2 + c1)
    assert math.isclose(ssim(a, b), (first + 2 * second) / 3, rel_tol=1e-12)
    assert math.isclose(ssim(np.dstack([a] * 3), np.dstack([b] * 3)), (first + 2 * second) / 3, rel_tol=1e-12)


def test_every_precision_has_tolerances_ordered_by_precision():
    order = ["fp32", "fp16", "bf16", "int8"]
    assert list(DEFAULT_TOLERANCES) == order
    for lo, hi in zip(order, order[1:]):
        a, b = DEFAULT_TOLERANCES[lo], DEFAULT_TOLERANCES[hi]
        assert a.max_abs < b.max_abs and a.rel_l2 < b.rel_l2 and a.min_cosine > b.min_cosine


def test_per_output_overrides():
    over = parse_overrides(["noise_pred:rel_l2=1e-3", "images:max_abs=0.1,min_cosine=0.99"])
    assert over == {"noise_pred": {"rel_l2": 1e-3}, "images": {"max_abs": 0.1, "min_cosine": 0.99}}
    base = DEFAULT_TOLERANCES["fp32"]
    assert tolerance_of("noise_pred", base, over).rel_l2 == 1e-3
    assert tolerance_of("noise_pred", base, over).max_abs == base.max_abs
    assert tolerance_of("last_hidden_state", base, over) == base
    for bad in ("noise_pred", "noise_pred:rel_l2", "noise_pred:psnr=3", "noise_pred:rel_l2=abc", ":rel_l2=1"):
        with pytest.raises(InputError):
            parse_overrides([bad])


class Doubler(Backend):
    name = "doubler"

    def graph_names(self):
        return ["g"]

    def run(self, graph, feeds):
        return {"y": feeds["x"] * 2}


def test_recording_backend_forwards_and_keeps_copies():
    rec = RecordingBackend(Doubler())
    x = torch.ones(2)
    assert torch.equal(rec.run("g", {"x": x})["y"], torch.full((2,), 2.0))
    x += 1  # the loop reuses its tensors: the record must not change with them
    rec.run("g", {"x": x})
    assert [c.feeds["x"].tolist() for c in rec.of("g")] == [[1.0, 1.0], [2.0, 2.0]]
    assert rec.calls[1].outputs["y"].tolist() == [4.0, 4.0]
    assert spread(list(range(10)), 3) == [0, 4, 9]  # first, middle (rounded), last
    assert spread([1, 2], 3) == [1, 2]


def test_batch_1_bundle_checks_graphs_and_says_why_there_is_no_end_to_end(tmp_path):
    from asdm_export.check import check_bundle
    from asdm_export.export import export_bundle

    export_bundle("asdm:tiny", tmp_path / "b", batch=(1, 1, 1), latent=(8, 8, 8))
    report = check_bundle(tmp_path / "b", out=tmp_path / "r")
    assert report["passed"]
    assert "batch 1" in report["e2e"]["skipped"]


def test_the_latency_columns_are_a_median_after_a_warm_up():
    """A shape's first run (kernel set-up) is not the graph's latency: one warm-up, then the median of the
    timed runs. A stand-in runner whose runs take 9 s (the first), then 3, 1 and 2 ms."""
    from asdm_export.check.check import TIMED_RUNS, _runner_latency_ms

    class Runner:
        def __init__(self):
            self.times, self.active = [9.0, 0.003, 0.001, 0.002], False

        def __enter__(self):
            self.active = True
            return self

        def __exit__(self, *exc):
            self.active = False

        def infer(self, feeds):
            assert self.active
            self.last = self.times.pop(0)

        def last_inference_time(self):
            return self.last

    runner = Runner()
    assert TIMED_RUNS == 3 and _runner_latency_ms(runner, {}) == pytest.approx(2.0) and not runner.times


def test_end_to_end_says_why_it_cannot_run():
    """A UNet-only bundle has no pipeline to run; UNet graphs of batch 1 cannot take a guidance step's 2."""
    from asdm_export.check.check import _e2e_impossible

    def manifest(batch_max, pipeline=True):
        return {"pipeline": {"vae_scale_factor": 8} if pipeline else None,
                "graphs": [{"component": "unet", "profile": {"batch": {"max": batch_max}}},
                           {"component": "vae_decoder", "profile": {"batch": {"max": 1}}}]}

    assert _e2e_impossible(manifest(2), guidance=7.5) is None
    assert "UNet graphs only" in _e2e_impossible(manifest(2, pipeline=False), guidance=7.5)
    assert "at most batch 1; a guidance step needs 2" in _e2e_impossible(manifest(1), guidance=7.5)
    assert _e2e_impossible(manifest(1), guidance=1.0) is None  # no guidance: batch 1 is enough
