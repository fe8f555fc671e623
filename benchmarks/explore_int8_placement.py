"""Exploration behind quantize's Q/DQ placement: int8 / fp32 UNet step and cosine for placement variants.

Exports the SD1.5-shaped UNet once (batch 2, 32x32 latent), calibrates once, then quantizes it per variant by
adjusting onnxruntime's quantizer options around ``quantize_bundle`` (the variants are not CLI options: this is
how the shipped defaults were chosen) and times each against fp32, alternating runs. Results in RESULTS.md.

    python benchmarks/explore_int8_placement.py [--work /tmp/int8-placement] [--variants shipped,outputs,...]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

PROMPTS = Path(__file__).resolve().parent.parent / "calibration" / "prompts.txt"

# variant -> (quantize every Conv/MatMul incl. activation products, keep shortcuts float, extra-option changes)
VARIANTS = {
    "outputs": (False, True, {"OpTypesToExcludeOutputQuantization": []}),
    "outputs+shortcuts": (False, False, {"OpTypesToExcludeOutputQuantization": []}),
    "outputs+attention": (True, True, {"OpTypesToExcludeOutputQuantization": [], "MatMulConstBOnly": False}),
    "outputs+per-tensor-matmul": (False, True, {"OpTypesToExcludeOutputQuantization": [],
                                                "QDQOpTypePerChannelSupportToAxis": None}),
    "shipped": (False, True, {}),
    "no-conv-outputs": (False, True, {"OpTypesToExcludeOutputQuantization": ["MatMul", "Conv"]}),
}


def quantize_variant(fp32: Path, calib: Path, out: Path, name: str) -> None:
    import onnxruntime.quantization as oq

    import asdm_export.int8.quantize as q

    every_matmul, keep_shortcuts, changes = VARIANTS[name]
    saved = oq.quantize_static, q.quantizable_nodes, q.DEFAULT_KEEP_FLOAT
    original = oq.quantize_static

    def patched(*args, **kwargs):
        extra = kwargs["extra_options"]
        for key, value in changes.items():
            if value is None:
                extra.pop(key, None)
            else:
                extra[key] = value
        return original(*args, **kwargs)

    oq.quantize_static = patched
    if every_matmul:
        q.quantizable_nodes = lambda model: [n for n in model.graph.node if n.op_type in ("Conv", "MatMul")]
    if not keep_shortcuts:
        q.DEFAULT_KEEP_FLOAT = ()
    try:
        q.quantize_bundle(fp32, calib, out)
    finally:
        oq.quantize_static, q.quantizable_nodes, q.DEFAULT_KEEP_FLOAT = saved


def main() -> None:
    import torch

    from asdm_export.artifacts import read_manifest
    from asdm_export.export import export_bundle
    from asdm_export.int8.calibrate import calibrate_bundle, read_calibration
    from asdm_export.runtime.backends import OrtBackend

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="asdm:sd15")
    ap.add_argument("--work", type=Path, default=Path("/tmp/int8-placement"), help="kept between runs")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--repeats", type=int, default=6)
    args = ap.parse_args()
    logging.getLogger().setLevel(logging.ERROR)
    fp32, calib = args.work / "fp32", args.work / "calib"
    if not fp32.exists():
        export_bundle(args.model, fp32, batch=(2, 2, 2), latent=(32, 32, 32))
    if not calib.exists():
        calibrate_bundle(fp32, PROMPTS, calib, samples=4, per_graph=4, steps=10, height=256, width=256,
                         progress=False)
    _, rows = read_calibration(calib, read_manifest(fp32, "bundle"))
    rows = rows["unet"]
    feeds = [{k: torch.from_numpy(v[i]) for k, v in rows.items()} for i in range(len(rows["sample"]))]
    print("| variant | int8 / fp32 | min cosine |\n| --- | --- | --- |")
    for name in args.variants.split(","):
        out = args.work / name
        if not out.exists():
            quantize_variant(fp32, calib, out, name)
        backends = {"fp32": OrtBackend(fp32), "int8": OrtBackend(out)}
        cosines = []
        for f in feeds[:8]:  # agreement, and every session warmed up
            a = backends["fp32"].run("unet", f)["noise_pred"].double().flatten()
            b = backends["int8"].run("unet", f)["noise_pred"].double().flatten()
            cosines.append(float(a @ b / (a.norm() * b.norm())))
        times = {"fp32": [], "int8": []}
        for r in range(args.repeats):
            for side in ("fp32", "int8") if r % 2 == 0 else ("int8", "fp32"):
                t0 = time.perf_counter()
                backends[side].run("unet", feeds[r % len(feeds)])
                times[side].append(time.perf_counter() - t0)
        ratio = statistics.median(times["int8"]) / statistics.median(times["fp32"])
        print(f"| {name} | {ratio:.2f} | {min(cosines):.4f} |", flush=True)


if __name__ == "__main__":
    main()
