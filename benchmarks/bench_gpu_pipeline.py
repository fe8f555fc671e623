"""Whole-pipeline seconds per image on the PyTorch program runtime: text encoder, denoising loop and VAE.

Exports the SD1.5-shaped pipeline (``asdm:sd15``, random weights) once with block-0 inheritance (uniform N=3),
opens it with ``AsdmPipeline.from_bundle(..., backend="torch", device=...)``, makes one warm-up image (the
programs are exported and captured on first use) and then times ``--images`` images per schedule with the
pipeline's own ``Timings`` (synchronised at stage boundaries, UNet graphs by CUDA events).

    python benchmarks/bench_gpu_pipeline.py [--device cuda] [--steps 50] [--images 2] [--size 512]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bench_export import machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="asdm:sd15")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args()

    from asdm_export.export import export_bundle
    from asdm_export.graphs.inheritance import InheritanceSpec
    from asdm_export.graphs.schedule import Schedule
    from asdm_export.runtime.pipeline import AsdmPipeline, Timings

    latent = args.size // 8
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        export_bundle(args.model, Path(tmp) / "b", inheritance=InheritanceSpec("block", branch=0),
                      schedule=Schedule.parse("uniform:3", args.steps), batch=(1, 2, 2), latent=(latent,) * 3)
        t1 = time.perf_counter()
        pipe = AsdmPipeline.from_bundle(Path(tmp) / "b", backend="torch", device=args.device, dtype=args.dtype)
        t2 = time.perf_counter()
        print(f"\nmachine: {machine()}; backend {pipe.backend.name}; export {t1 - t0:.0f} s, open {t2 - t1:.0f} s")
        print(f"{args.model}, {args.size}x{args.size}, {args.steps} DDIM steps, CFG 7.5\n")
        print("| schedule | text encoder | UNet graphs | loop overhead | VAE | total s / image | first image |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        uniform = pipe.schedule
        for label, schedule in (("full (teacher)", Schedule(args.steps)), ("uniform N=3, branch 0", uniform)):
            pipe.schedule = schedule
            t0 = time.perf_counter()
            pipe("warm-up: programs are exported and captured here", steps=args.steps, height=args.size,
                 width=args.size)
            first = time.perf_counter() - t0
            timings = Timings()
            pipe([f"a photo of a red fox, {i}" for i in range(args.images)], steps=args.steps, height=args.size,
                 width=args.size, timings=timings)
            n = timings.images
            stages = dict(timings.rows())  # (a "first-use setup" row only where the warm-up missed a shape)
            cells = " | ".join(f"{1e3 * stages[k] / n:.1f} ms"
                               for k in ("text encoder", "UNet graphs", "loop overhead", "VAE decoder"))
            print(f"| {label} | {cells} | {timings.total / n:.3f} | {first:.1f} s |", flush=True)


if __name__ == "__main__":
    main()
