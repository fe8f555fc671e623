"""Feature inheritance on an SD1.5-shaped UNet, ONNX Runtime CPU, batch 2 (CFG), 32x32 latent, one run.

1. inherit / full latency per level and branch (block 0 and 1 = DeepCache's branches, a layer-level and
   a unit-level configuration);
2. total UNet time of a 20-step uniform N=3 block-level schedule (branch 0) against the full graph at
   every step, both through the real denoising loop on ORT (target speed-up >= 2.3x, DeepCache's SD1.5
   figure);
3. the same schedule with DeepCache itself in PyTorch eager on the same model, for comparison.

    python benchmarks/bench_inheritance.py [--model asdm:sd15] [--repeats 3] [--skip-deepcache]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_export import machine

# The highest-resolution transformer layers (the costliest on SD), reused as residuals: reusing their
# *output* instead would make everything upstream of the last one dead, i.e. a block-level cache.
LAYER_POINTS = ("down_blocks.0.attentions.*", "up_blocks.3.attentions.*")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="asdm:sd15")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--skip-deepcache", action="store_true")
    args = ap.parse_args()

    from asdm_export.export import export_bundle, export_graph
    from asdm_export.graphs import unet_graphs
    from asdm_export.graphs.inheritance import InheritanceSpec
    from asdm_export.graphs.schedule import Schedule
    from asdm_export.models.loading import resolve_model
    from asdm_export.runtime.backends import OrtBackend
    from asdm_export.runtime.denoise import LoopStats, denoise
    from asdm_export.runtime.runners import ort_session

    source = resolve_model(args.model)
    h = args.latent
    latent = (h, h, 2 * h)
    schedule = Schedule.parse("uniform:3", args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        export_bundle(source, tmp / "plain", latent=latent, unet_only=True)
        block0 = export_bundle(source, tmp / "block0", latent=latent, unet_only=True,
                               inheritance=InheritanceSpec("block", branch=0), schedule=schedule)
        files = {"plain": tmp / "plain/graphs/unet.onnx", "full (block 0)": tmp / "block0/graphs/unet.full.onnx",
                 "inherit block 0": tmp / "block0/graphs/unet.inherit.onnx"}
        others = {"inherit block 1": InheritanceSpec("block", branch=1),
                  "inherit layer (hi-res attention, residual)": InheritanceSpec("layer", points=LAYER_POINTS,
                                                                                reuse="residual"),
                  "inherit unit (*.attn2)": InheritanceSpec("unit", points=("*.attn2",))}
        for label, spec in others.items():  # only the inherit graph is needed from these
            _, inherit = unet_graphs(source.load_unet(), "unet", spec, latent=latent)
            folder = tmp / label.replace(" ", "_").replace("(", "").replace(")", "").replace("*", "x")
            entry = export_graph(inherit, folder, "fp32", 17)
            files[label] = folder / entry["file"]
        print(f"exports done in {time.perf_counter() - t0:.0f} s")

        sessions = {k: ort_session(p) for k, p in files.items()}
        rng = np.random.default_rng(0)
        dim = int(sessions["plain"].get_inputs()[2].shape[2])  # cross-attention width (768 for SD1.5)
        base = {"sample": rng.normal(size=(2, 4, h, h)).astype(np.float32),
                "timestep": np.full((2,), 500.0, np.float32),
                "encoder_hidden_states": rng.normal(size=(2, 77, dim)).astype(np.float32)}

        def feed_for(sess):
            out = {}
            for i in sess.get_inputs():
                if i.name in base:
                    out[i.name] = base[i.name]
                else:  # a cached feature: shape from the graph, with batch 2 and the latent's scale
                    shape = [2 if d == "batch" else d if isinstance(d, int) else _eval_dim(d, h) for d in i.shape]
                    out[i.name] = rng.normal(size=shape).astype(np.float32)
            return out

        feeds = {k: feed_for(s) for k, s in sessions.items()}
        times = {k: [] for k in sessions}
        for k, s in sessions.items():
            s.run(None, feeds[k])  # warm-up
        for _ in range(args.repeats):
            for k, s in sessions.items():
                t0 = time.perf_counter()
                s.run(None, feeds[k])
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        del sessions  # each holds its graph's weights; free them before the loops below

        print(f"\nmachine: {machine()}")
        print(f"model {args.model}, batch 2, {h}x{h} latent, ORT CPU, median of {args.repeats}\n")
        print("| graph | latency | / full |")
        print("| --- | --- | --- |")
        for k, v in med.items():
            print(f"| {k} | {v * 1e3:.0f} ms | {v / med['full (block 0)']:.2f} |")

        # 2. the schedule through the real loop
        from diffusers import DDIMScheduler

        sched_cfg = DDIMScheduler.from_pretrained(str(source.path), subfolder="scheduler").config
        g = torch.Generator().manual_seed(0)
        lat = torch.randn((1, 4, h, h), generator=g)
        cond, uncond = torch.randn((1, 77, dim), generator=g), torch.randn((1, 77, dim), generator=g)
        runs = {}
        for label, bundle, sched in (("full every step", tmp / "plain", Schedule.parse("full", args.steps)),
                                     ("uniform N=3, block 0", tmp / "block0", schedule)):
            from asdm_export.artifacts import read_manifest

            backend, manifest = OrtBackend(bundle), read_manifest(bundle, "bundle")
            for graph in backend.graph_names():
                backend.session(graph)  # sessions are created lazily; their creation is not the loop's time
            for _ in range(2):  # the first loop warms up; the second is measured
                stats = LoopStats()
                denoise(backend, manifest, sched, DDIMScheduler.from_config(sched_cfg), lat.clone(), cond, uncond,
                        7.5, stats)
            runs[label] = stats
            del backend
        full_t, inh_t = runs["full every step"].graph_seconds, runs["uniform N=3, block 0"].graph_seconds
        print(f"\n{args.steps}-step loop on ORT: full every step {full_t:.1f} s, uniform N=3 block 0 {inh_t:.1f} s "
              f"-> {full_t / inh_t:.2f}x (target >= 2.3x: {'met' if full_t / inh_t >= 2.3 else 'NOT met'}); "
              f"full steps {block0['schedule']['full_steps']}")

    if not args.skip_deepcache:
        from DeepCache import DeepCacheSDHelper
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(str(source.path), safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        kwargs = dict(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=args.steps,
                      guidance_scale=7.5, latents=lat.clone(), output_type="latent")
        t0 = time.perf_counter()
        pipe(**kwargs)
        eager = time.perf_counter() - t0
        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=3, cache_branch_id=0)
        helper.enable()
        t0 = time.perf_counter()
        pipe(**kwargs)
        cached = time.perf_counter() - t0
        helper.disable()
        print(f"PyTorch eager, {args.steps} steps: plain {eager:.1f} s, DeepCache (N=3, branch 0) {cached:.1f} s "
              f"-> {eager / cached:.2f}x; ORT uniform N=3 vs DeepCache eager: {cached / inh_t:.2f}x faster")


def _eval_dim(name: str, h: int) -> int:
    """Evaluate a derived dim name such as 'height/4' or 'height/2*width/2' at height = width = h."""
    out = 1
    for term in name.split("*"):
        axis, _, div = term.partition("/")
        out *= h // int(div or 1)
    return out


if __name__ == "__main__":
    main()
