"""Entropy (KL) calibration ranges: this project's search against onnxruntime's own, on the same histograms, one run.

The tiny pipeline's README INT8 recipe (block branch 1, uniform:3, 10 steps; 3 calibration prompts, 4 steps each:
12 rows per UNet graph), onnxruntime's histogram collector over the `unet.full` graph's rows (2048 bins), then the
ranges of every tensor by `asdm_export.int8.quantize.entropy_ranges`, and of `--sample` of them by onnxruntime's
`HistogramCollector.get_entropy_threshold` (all of them would take minutes): seconds per tensor of each, their ratio,
and whether the ranges are equal.

    python benchmarks/bench_entropy.py [--sample 40]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_export import machine

PROMPTS = Path(__file__).resolve().parent.parent / "calibration" / "prompts.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sample", type=int, default=40, help="tensors timed with onnxruntime's search")
    args = ap.parse_args()

    from onnxruntime.quantization.calibrate import HistogramCollector

    from asdm_export.artifacts import read_manifest
    from asdm_export.export import export_bundle
    from asdm_export.graphs.inheritance import InheritanceSpec
    from asdm_export.graphs.schedule import Schedule
    from asdm_export.int8.calibrate import calibrate_bundle, read_calibration
    from asdm_export.int8.quantize import ENTROPY_BINS, _Rows, collect_histograms, entropy_ranges

    print(machine(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export_bundle("asdm:tiny", tmp / "fp32", inheritance=InheritanceSpec(level="block", branch=1),
                      schedule=Schedule.parse("uniform:3", 10))
        calibrate_bundle(tmp / "fp32", PROMPTS, tmp / "calib", samples=3, per_graph=4, progress=False)
        _, arrays = read_calibration(tmp / "calib", read_manifest(tmp / "fp32", "bundle"))
        graph = tmp / "fp32" / "graphs" / "unet.full.onnx"
        import onnx

        names = [i.name for i in onnx.load(str(graph), load_external_data=False).graph.input]
        rows = _Rows(arrays["unet.full"], names)
        histograms = collect_histograms(graph, rows, False, tmp, "entropy", 0.0).collector.histogram_dict
    t0 = time.perf_counter()
    ours = entropy_ranges(histograms, ENTROPY_BINS[1])
    ours_s = time.perf_counter() - t0
    sample = list(histograms)[:: max(1, len(histograms) // args.sample)][: args.sample]
    collector = HistogramCollector("entropy", True, ENTROPY_BINS[0], ENTROPY_BINS[1], 0.0, "same")
    same, t0 = 0, time.perf_counter()
    for name in sample:
        h = histograms[name]
        lo, hi = collector.get_entropy_threshold(h, ENTROPY_BINS[1])
        same += (float(lo), float(hi)) == tuple(float(v) for v in ours.data[name].range_value)
    ort_s = time.perf_counter() - t0
    bins = [h[0].size for h in histograms.values()]
    per_ours, per_ort = ours_s / len(histograms), ort_s / len(sample)
    print(f"unet.full: {len(histograms)} tensors, histogram bins {min(bins)}..{max(bins)} (median "
          f"{int(np.median(bins))})")
    print(f"ours: {ours_s:.1f} s for all ({per_ours * 1000:.0f} ms per tensor); onnxruntime: {ort_s:.1f} s for "
          f"{len(sample)} ({per_ort * 1000:.0f} ms per tensor, so about {per_ort * len(histograms):.0f} s for all)")
    print(f"onnxruntime / ours per tensor: {per_ort / per_ours:.1f}x; equal ranges: {same}/{len(sample)}")


if __name__ == "__main__":
    main()
