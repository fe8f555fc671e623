"""CPU threads (`--threads`) on a CPU that other work shares: UNet seconds per image, one run.

For ONNX Runtime and the PyTorch program runtime (`--backend torch --device cpu`), each with the libraries'
default threads (one per core) and with `--threads 1`, on an idle machine and beside one busy process (a
Python loop, started for the rows that say so). PyTorch's OpenMP threads wait for each other at every op, so a
preempted thread stalls all of them; ONNX Runtime's thread pool degrades less.

    python benchmarks/bench_threads.py [--model asdm:tiny] [--steps 20] [--images 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_export import machine


def unet_seconds(pipe, images: int, steps: int) -> list[float]:
    from asdm_export.runtime.pipeline import Timings

    out = []
    for i in range(images):
        t = Timings()
        pipe(f"image {i}", steps=steps, seed=i, timings=t)
        out.append(t.unet_graphs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="asdm:tiny")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--images", type=int, default=3, help="timed images per row (after one warm-up)")
    args = ap.parse_args()

    import torch

    from asdm_export.export import export_bundle
    from asdm_export.graphs.inheritance import InheritanceSpec
    from asdm_export.graphs.schedule import Schedule
    from asdm_export.runtime.pipeline import AsdmPipeline

    default_threads = torch.get_num_threads()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "b"
        export_bundle(args.model, bundle, inheritance=InheritanceSpec("block", branch=0),
                      schedule=Schedule.parse("uniform:3", args.steps))
        for backend in ("ort", "torch"):
            for threads in (0, 1):
                torch.set_num_threads(default_threads)  # the previous row's setting is process-wide
                pipe = AsdmPipeline.from_bundle(bundle, backend=backend, threads=threads)
                pipe("warm-up", steps=args.steps)  # sessions / program export, first-use costs
                idle = unet_seconds(pipe, args.images, args.steps)
                neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                try:
                    busy = unet_seconds(pipe, args.images, args.steps)
                finally:
                    neighbour.kill()
                    neighbour.wait()
                rows.append((backend, threads or f"default ({default_threads})", idle, busy))
                del pipe

    print(f"\nmachine: {machine()}")
    print(f"model {args.model}, block 0, uniform N=3, {args.steps} steps, CFG 7.5, "
          f"median of {args.images} images after a warm-up\n")
    print("| backend | threads | UNet s / image, idle | beside one busy process | busy / idle |")
    print("| --- | --- | --- | --- | --- |")
    for backend, threads, idle, busy in rows:
        i, b = statistics.median(idle), statistics.median(busy)
        print(f"| {backend} | {threads} | {i:.3f} | {b:.3f} (max {max(busy):.3f}) | {b / i:.1f}x |")


if __name__ == "__main__":
    main()
