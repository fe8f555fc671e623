"""ORT CPU latency of an exported SD1.5-shaped UNet against PyTorch eager on the same module, one run.

Batch 2 (a classifier-free-guidance step), 32x32 latent (256x256 image). Runs alternate between the
two backends so that machine noise hits both alike; the result is the ratio of medians.

    python benchmarks/bench_export.py [--model asdm:sd15] [--repeats 5] [--fp16]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, torch {torch.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="asdm:sd15")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    args = ap.parse_args()

    from asdm_export.export import export_bundle
    from asdm_export.graphs import UNetForExport
    from asdm_export.models.loading import resolve_model
    from asdm_export.runtime.runners import ort_session

    t0 = time.perf_counter()
    source = resolve_model(args.model)
    unet = source.load_unet()
    print(f"model {args.model}: {sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M params "
          f"(ready in {time.perf_counter() - t0:.0f} s)")
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle"
        t0 = time.perf_counter()
        export_bundle(source, bundle, precision=args.precision)
        export_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        session = ort_session(bundle / "graphs" / "unet.onnx", "cpu")
        session_s = time.perf_counter() - t0

        rng = np.random.default_rng(0)
        b, h = args.batch, args.latent
        feed = {
            "sample": rng.normal(size=(b, 4, h, h)).astype(np.float32),
            "timestep": np.full((b,), 500.0, np.float32),
            "encoder_hidden_states": rng.normal(size=(b, 77, unet.config.cross_attention_dim)).astype(np.float32),
        }
        module = UNetForExport(unet).eval()
        targs = [torch.from_numpy(v) for v in feed.values()]

        def eager():
            with torch.inference_mode():
                return module(*targs).numpy()

        def ort_run():
            return session.run(None, feed)[0]

        ref, out = eager(), ort_run()  # warm-up, and a sanity check of the two results
        rel = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
        times = {"eager": [], "ort": []}
        for _ in range(args.repeats):
            for name, fn in (("eager", eager), ("ort", ort_run)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["ort"] / med["eager"]
    print(f"machine: {machine()}")
    print(f"export {export_s:.1f} s, ORT session {session_s:.1f} s, ORT vs eager rel L2 {rel:.1e}")
    print(f"eager runs: {', '.join(f'{t:.2f}' for t in times['eager'])} s")
    print(f"ORT   runs: {', '.join(f'{t:.2f}' for t in times['ort'])} s")
    print(f"| {args.model} | {args.precision} | {b} | {h}x{h} | {med['eager']:.2f} s | {med['ort']:.2f} s | "
          f"{ratio:.2f}x | target <= 0.75x: {'met' if ratio <= 0.75 else 'NOT met'} |")


if __name__ == "__main__":
    main()
