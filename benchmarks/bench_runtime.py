"""Seconds per image of the runtime on ONNX Runtime CPU, SD1.5-shaped pipeline, 256x256, 20 steps, one run.

Three bundles through the same `AsdmPipeline`: the teacher; the teacher with block-level inheritance
(branch 0, uniform N=3); an assembled bk-small student (ME-CondConv experts re-parameterized for
deployment) with the same inheritance. Also the runtime's own overhead: the denoising loop's time outside
the UNet graphs, as a share of the total (target <= 3%).

    python benchmarks/bench_runtime.py [--model asdm:sd15] [--steps 20] [--size 256] [--images 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench_export import machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="asdm:sd15")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--images", type=int, default=2, help="images per bundle (the first one warms up)")
    ap.add_argument("--plan", default="bk-small")
    args = ap.parse_args()

    from asdm_export.assembly.assemble import assemble
    from asdm_export.assembly.reparam import reparam
    from asdm_export.export import export_bundle
    from asdm_export.graphs.inheritance import InheritanceSpec
    from asdm_export.graphs.schedule import Schedule
    from asdm_export.runtime.pipeline import AsdmPipeline, Timings

    latent = args.size // 8
    lat_range = (latent, latent, latent * 2)
    batch = (1, 2, 2)
    block = InheritanceSpec("block", branch=0)
    uniform = Schedule.parse("uniform:3", args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        assemble(args.model, args.plan, tmp / "student")
        reparam(str(tmp / "student"), tmp / "student-deploy")
        bundles = {
            "teacher": export_bundle(args.model, tmp / "teacher", batch=batch, latent=lat_range,
                                     schedule=Schedule.parse("full", args.steps)),
            "teacher + inheritance": export_bundle(args.model, tmp / "teacher-inh", batch=batch, latent=lat_range,
                                                   inheritance=block, schedule=uniform),
            f"{args.plan} student + inheritance": export_bundle(
                args.model, tmp / "student-inh", batch=batch, latent=lat_range, inheritance=block, schedule=uniform,
                unets={"unet": str(tmp / "student-deploy")}),
        }
        folders = dict(zip(bundles, ("teacher", "teacher-inh", "student-inh")))
        print(f"assemble + export done in {time.perf_counter() - t0:.0f} s")

        rows = {}
        for label, folder in folders.items():
            pipe = AsdmPipeline.from_bundle(tmp / folder)
            pipe("warm-up", steps=args.steps, height=args.size, width=args.size)
            timings = Timings()
            pipe([f"image {i}" for i in range(args.images - 1)] or ["image"], steps=args.steps,
                 height=args.size, width=args.size, timings=timings)
            rows[label] = timings
            del pipe

    print(f"\nmachine: {machine()}")
    print(f"model {args.model}, {args.size}x{args.size}, {args.steps} steps, CFG 7.5, ORT CPU\n")
    print("| pipeline | s / image | UNet graphs | loop overhead | overhead / total | vs teacher |")
    print("| --- | --- | --- | --- | --- | --- |")
    base = rows["teacher"].total / rows["teacher"].images
    for label, t in rows.items():
        per = t.total / t.images
        overhead = t.loop - t.unet_graphs
        print(f"| {label} | {per:.2f} | {t.unet_graphs / t.images:.2f} s | {overhead / t.images * 1e3:.0f} ms | "
              f"{overhead / t.total:.2%} | {base / per:.2f}x |")
    worst = max((t.loop - t.unet_graphs) / t.total for t in rows.values())
    print(f"\nruntime overhead, worst case: {worst:.2%} of the total (target <= 3%: {'met' if worst <= 0.03 else 'NOT met'})")


if __name__ == "__main__":
    main()
