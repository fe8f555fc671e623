"""GRI attention on the SD1.5-shaped UNet: one UNet step with GRI in the 64x64-token layers vs full attention.

asdm:sd15's UNet (random weights; speed does not depend on them) at 64x64 latents (512x512 images), batch 2
(classifier-free guidance), exported twice to ONNX with static shapes: as is, and with GRI attention (window 8,
pool 8: 128 keys per query instead of 4096) in the self-attention of down_blocks.0 and up_blocks.3, the stages
at 64x64 tokens. Both graphs run on ONNX Runtime CPU in the same process, alternating, median of --repeats;
both are linted against TensorRT's operator list.

    python benchmarks/bench_gri.py [--repeats 3] [--latent 64] [--work DIR]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from bench_export import machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--pool", type=int, default=8)
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()

    import onnxruntime as ort

    from asdm_export.build.lint import lint_paths
    from asdm_export.graphs.graphs import UNetForExport
    from asdm_export.models.gri import install_gri, self_attention_layers
    from asdm_export.models.loading import resolve_model

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-gri-"))
    work.mkdir(parents=True, exist_ok=True)
    unet = resolve_model("asdm:sd15").load_unet()
    gri = copy.deepcopy(unet)
    layers = self_attention_layers(gri, ["down_blocks.0", "up_blocks.3"])
    install_gri(gri, {"layers": layers, "window": args.window, "pool": args.pool})
    n = args.latent
    inputs = {"sample": torch.randn(2, 4, n, n), "timestep": torch.tensor([500, 500]),
              "encoder_hidden_states": torch.randn(2, 77, unet.config.cross_attention_dim)}
    files = {}
    for name, model in (("full attention", unet), ("GRI", gri)):
        path = work / f"{name.split()[0].lower()}.onnx"
        t0 = time.perf_counter()
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            torch.onnx.export(UNetForExport(model), tuple(inputs.values()), str(path), dynamo=False, opset_version=17,
                              input_names=list(inputs), output_names=["noise_pred"], do_constant_folding=True)
        files[name] = path
        print(f"exported {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    del unet, gri

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sessions = {k: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for k, p in files.items()}
    feeds = {k: v.numpy() for k, v in inputs.items()}
    times = {k: [] for k in sessions}
    outs = {}
    for k, s in sessions.items():  # warm-up, untimed
        outs[k] = s.run(None, feeds)[0]
    for _ in range(args.repeats):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feeds)
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    lint = lint_paths(list(files.values()))

    print(f"\nmachine: {machine()}; ONNX Runtime {ort.__version__} CPU; asdm:sd15 UNet, batch 2, latent {n}x{n} "
          f"({n * n} tokens in the outermost stages), window {args.window}, pool {args.pool} "
          f"({args.window ** 2 + args.pool ** 2} keys per query); GRI in {len(layers)} layers\n")
    print("| UNet step | median s | x full attention | TensorRT lint |")
    print("|---|---|---|---|")
    for (k, m), g in zip(med.items(), lint["graphs"]):
        print(f"| {k} | {m:.2f} | {m / med['full attention']:.2f} | {'PASS' if g['errors'] == 0 else 'FAIL'} "
              f"({g['errors']} errors) |")
    diff = np.abs(outs["GRI"] - outs["full attention"])
    print(f"\n(GRI changes the function: max |GRI - full| {diff.max():.3g} on random weights; distillation trains "
          "the student to it)")


if __name__ == "__main__":
    main()
