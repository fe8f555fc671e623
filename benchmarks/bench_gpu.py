"""UNet time per image on the PyTorch program runtime (``ProgramBackend``) against diffusers and DeepCache.

On CUDA (defaults): SD1.5-shaped pipeline (``asdm:sd15``, random weights), 512x512 (64x64 latents), 50 DDIM
steps, classifier-free guidance 7.5 (batch 2), fp16 programs replayed as CUDA graphs, timed with CUDA events.
Rows: teacher; teacher + uniform N=3 (block level, branch 0); teacher + quadratic (as many full steps as
uniform:5, i.e. 10 of 50); bk-small student (ME-CondConv folded to plain convs) + uniform N=3; and in the same
run on the same GPU diffusers' own denoising loop (StableDiffusionPipeline, latents out, no VAE) and
diffusers + DeepCache (N=3, branch 0), both eager fp16, built from the same preset components.

On a CPU the same rows run at a small size (``asdm:tiny``, 16x16 latents, 10 steps, fp32) through the programs
and through the reference modules (``TorchBackend``) over the same graphs: the ratio is what the pruning and
the flat programs save (the issue's CPU target: inherit program / inherit module <= 0.3).

    python benchmarks/bench_gpu.py [--device auto|cuda|cpu] [--size 512] [--steps 50] [--images 1]
        [--rows teacher,uniform,quadratic,bk-small,diffusers,deepcache] [--dtype fp16] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench_export import machine

from asdm_export.runtime.denoise import GraphClock as Clock  # CUDA events on GPUs, perf_counter on CPUs

ROWS = ("teacher", "uniform", "quadratic", "bk-small", "diffusers", "deepcache")
LABELS = {"teacher": "teacher", "uniform": "teacher + uniform N=3 (branch 0)",
          "quadratic": "teacher + quadratic (uniform:5's full-step count)", "bk-small": "bk-small + uniform N=3",
          "diffusers": "diffusers (eager)", "deepcache": "diffusers + DeepCache (N=3, branch 0)"}
SCHEDULES = {"teacher": "full", "uniform": "uniform:3", "quadratic": "quadratic:5", "bk-small": "uniform:3"}


class TimedBackend:
    """Wraps a backend; ``clock`` spans every UNet graph call (the loop's own work stays outside)."""

    def __init__(self, backend, clock: Clock):
        self.backend, self.clock = backend, clock
        self.device, self.name = backend.device, backend.name

    def graph_names(self):
        return self.backend.graph_names()

    def run(self, graph, feeds):
        begin = self.clock.start()
        out = self.backend.run(graph, feeds)
        self.clock.stop(begin)
        return out


def manifest_of(graphs) -> dict:
    """The part of a bundle manifest the loop reads: which graph serves which role of UNet 'unet'."""
    return {"unets": {"unet": {"graphs": {g.role: g.name for g in graphs}}}}


def time_loop(backend, graphs, schedule, scheduler_config, inputs, images: int) -> dict:
    """One warm-up image (exports, captures), then ``images`` timed ones: UNet seconds and loop seconds per
    image."""
    from diffusers import DDIMScheduler

    from asdm_export.runtime.denoise import denoise

    latents, cond, uncond = inputs
    manifest = manifest_of(graphs)
    for timed in (False, True):
        unet_clock, loop_clock = Clock(backend.device), Clock(backend.device)
        for _ in range(images if timed else 1):
            begin = loop_clock.start()
            denoise(TimedBackend(backend, unet_clock), manifest, schedule, DDIMScheduler.from_config(scheduler_config),
                    latents.clone(), cond, uncond, 7.5)
            loop_clock.stop(begin)
    return {"unet_s": unet_clock.seconds() / images, "loop_s": loop_clock.seconds() / images}


def time_graphs(backend, graphs, feeds_of, repeats: int) -> dict[str, float]:
    """Median seconds of one call per graph (after a warm-up call)."""
    out = {}
    for g in graphs:
        feeds = feeds_of(g)
        backend.run(g.name, feeds)
        samples = []
        for _ in range(repeats):
            clock = Clock(backend.device)
            begin = clock.start()
            backend.run(g.name, feeds)
            clock.stop(begin)
            samples.append(clock.seconds())
        out[g.name] = statistics.median(samples)
    return out


def require_deepcache(leave_out: str) -> None:
    """Fail now, not after minutes of GPU rows, when a DeepCache baseline is asked for and DeepCache is missing."""
    try:
        import DeepCache  # noqa: F401
    except ImportError:
        raise SystemExit("the deepcache baseline needs DeepCache (pip install DeepCache; on a GPU machine: its wheel "
                         f"in .whl/, see benchmarks/gpu_wheels.sh), or leave it out with {leave_out}") from None


def enable_deepcache(pipe):
    """DeepCache on a diffusers pipeline at the schedule the rows compare against: N=3, branch 0. Returns its
    helper (``.disable()`` restores the pipeline)."""
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    return helper


def time_diffusers(pipe, inputs, steps: int, images: int, deepcache: bool) -> float:
    """Seconds per image of diffusers' own loop (text embeddings given, latents out: the UNet loop only)."""
    latents, cond, uncond = inputs
    helper = enable_deepcache(pipe) if deepcache else None
    dtype = pipe.unet.dtype
    kwargs = dict(prompt_embeds=cond.to(dtype), negative_prompt_embeds=uncond.to(dtype), num_inference_steps=steps,
                  guidance_scale=7.5, output_type="latent", height=latents.shape[2] * 8, width=latents.shape[3] * 8)
    try:
        pipe(latents=latents.clone().to(dtype), **kwargs)  # warm-up
        clock = Clock(latents.device)
        for _ in range(images):
            begin = clock.start()
            pipe(latents=latents.clone().to(dtype), **kwargs)
            clock.stop(begin)
        return clock.seconds() / images
    finally:
        if helper is not None:
            helper.disable()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cuda or cpu")
    ap.add_argument("--model", default=None, help="preset (default asdm:sd15 on CUDA, asdm:tiny on CPU)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    ap.add_argument("--size", type=int, default=None, help="image size in pixels (default 512 CUDA, 128 CPU)")
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50 CUDA, 10 CPU)")
    ap.add_argument("--images", type=int, default=1, help="timed images per row, after one warm-up image")
    ap.add_argument("--repeats", type=int, default=20, help="calls per graph in the per-graph table")
    ap.add_argument("--dtype", default=None, help="program dtype (default fp16 CUDA, fp32 CPU)")
    ap.add_argument("--cuda-graphs", default="auto", choices=["auto", "off"])
    ap.add_argument("--compile", default="off", choices=["off", "inductor"],
                    help="compile each program (inductor, channels_last) before capture; about a minute per SD1.5 "
                         "graph on an H200")
    ap.add_argument("--plan", default="bk-small")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU intra-op threads (default 1: at the CPU size a second thread only adds contention)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()

    from asdm_export.assembly import build_student, reparam_unet
    from asdm_export.runtime.backends import TorchBackend
    from asdm_export.graphs import unet_graphs
    from asdm_export.graphs.inheritance import InheritanceSpec
    from asdm_export.models.presets import build_pipeline, get_preset
    from asdm_export.models.tokenizer import write_tokenizer
    from asdm_export.runtime.program_backend import ProgramBackend
    from asdm_export.graphs.schedule import Schedule

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    model = args.model or ("asdm:sd15" if cuda else "asdm:tiny")
    size = args.size or (512 if cuda else 128)
    steps = args.steps or (50 if cuda else 10)
    dtype = args.dtype or ("fp16" if cuda else "fp32")
    if not cuda:
        torch.set_num_threads(args.threads)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        raise SystemExit(f"unknown rows {bad}; choose from {', '.join(ROWS)}")
    if "deepcache" in rows:
        require_deepcache("--rows")

    t_setup = time.perf_counter()
    preset = get_preset(model)
    with tempfile.TemporaryDirectory() as tmp:
        tok = Path(tmp) / "tokenizer"
        write_tokenizer(tok, max_length=preset.text_encoder["max_position_embeddings"])
        pipe = build_pipeline(preset, tok)  # random weights from the preset's seed, in memory
    pipe.set_progress_bar_config(disable=True)
    cfg = pipe.unet.config
    latent = size // 8
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, cfg.in_channels, latent, latent, generator=g),
              torch.randn(1, 77, cfg.cross_attention_dim, generator=g),
              torch.randn(1, 77, cfg.cross_attention_dim, generator=g))
    block0 = InheritanceSpec("block", branch=0)
    lat_range = (latent, latent, latent * 2)

    # the UNets our rows run: each backend moves (and owns) its own copy
    graph_sets = {}
    if "teacher" in rows:
        graph_sets["teacher"] = unet_graphs(copy.deepcopy(pipe.unet), "unet", latent=lat_range)
    if {"uniform", "quadratic"} & set(rows):
        graph_sets["teacher-block0"] = unet_graphs(copy.deepcopy(pipe.unet), "unet", block0, latent=lat_range)
    if "bk-small" in rows:
        student, _ = build_student(copy.deepcopy(pipe.unet), args.plan)
        deployed, report = reparam_unet(student)  # a fresh student's experts fold to plain convs
        graph_sets["bk-small-block0"] = unet_graphs(deployed, "unet", block0, latent=lat_range)
        del student
    backends = {k: ProgramBackend(v, device=device, dtype=dtype, cuda_graphs=args.cuda_graphs, compile=args.compile)
                for k, v in graph_sets.items()}
    references = {k: TorchBackend(v) for k, v in graph_sets.items()} if not cuda else {}
    which = {"teacher": "teacher", "uniform": "teacher-block0", "quadratic": "teacher-block0",
             "bk-small": "bk-small-block0"}
    sched_cfg = pipe.scheduler.config
    dev_inputs = tuple(t.to(device) for t in inputs)
    setup_s = time.perf_counter() - t_setup

    results = {"machine": machine(), "device": torch.cuda.get_device_name() if cuda else "cpu",
               "torch": torch.__version__, "cuda": torch.version.cuda, "model": model, "size": size,
               "steps": steps, "dtype": dtype, "cuda_graphs": args.cuda_graphs, "compile": args.compile,
               "rows": {}, "graphs": {}}
    t_rows = time.perf_counter()

    def save():  # after every row: a run cut off at its time limit keeps what it measured
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))

    for row in rows:
        if row in SCHEDULES:
            key = which[row]
            schedule = Schedule.parse(SCHEDULES[row], steps)
            t0 = time.perf_counter()
            res = time_loop(backends[key], graph_sets[key], schedule, sched_cfg, dev_inputs, args.images)
            res["full_steps"] = len(schedule.full_steps())
            if key in references:
                ref = time_loop(references[key], graph_sets[key], schedule, sched_cfg, inputs, args.images)
                res["module_unet_s"], res["module_loop_s"] = ref["unet_s"], ref["loop_s"]
            res["wall_s"] = time.perf_counter() - t0
        else:
            if cuda:
                pipe.to(device, torch.float16)
            res = {"unet_s": time_diffusers(pipe, dev_inputs, steps, args.images, row == "deepcache")}
            res["loop_s"] = res["unet_s"]
        results["rows"][row] = res
        print(f"{LABELS[row]}: UNet {res['unet_s']:.3f} s / image", flush=True)
        save()

    # per graph, one call: programs (CUDA graphs on CUDA), and on CPU the reference modules beside them
    def feeds_of(gdef):
        import numpy as np

        dims = {**gdef.opt_dims(), "batch": 2, "height": latent, "width": latent}
        feed = gdef.random_inputs(dims, np.random.default_rng(0))
        return {k: torch.from_numpy(v).to(device) for k, v in feed.items()}

    for key, backend in backends.items():
        progs = time_graphs(backend, graph_sets[key], feeds_of, args.repeats)
        for name, s in progs.items():
            gdef = backend.graphs[name]
            prog = next(p for (n, _), p in backend.programs.items() if n == name)
            entry = {"program_ms": s * 1e3, "ops": prog.ops, "ops_exported": prog.ops_exported}
            if key in references:
                mod = time_graphs(references[key], [gdef], lambda gd: {k: v.cpu() for k, v in feeds_of(gd).items()},
                                  args.repeats)
                entry["module_ms"] = mod[name] * 1e3
            results["graphs"][f"{key}: {name}"] = entry
    results["setup_s"], results["rows_s"] = setup_s, time.perf_counter() - t_rows
    save()

    print(f"\nmachine: {results['machine']}; device: {results['device']} (torch {results['torch']}, "
          f"CUDA {results['cuda']})")
    print(f"model {model}, {size}x{size} ({latent}x{latent} latents), {steps} DDIM steps, CFG 7.5 (batch 2), "
          f"programs {dtype}, compile {args.compile}, CUDA graphs {args.cuda_graphs if cuda else 'n/a'}; "
          f"{args.images} timed image(s) "
          f"per row after one warm-up; setup {setup_s:.0f} s, rows {results['rows_s']:.0f} s\n")
    ref_dc = results["rows"].get("deepcache", {}).get("loop_s")
    if cuda:
        # "vs": loop against loop (diffusers' rows time its whole loop: scheduler, guidance and UNet)
        print("| pipeline | full steps | UNet s / image | UNet ms / step | loop s / image | "
              "loop vs diffusers + DeepCache |")
        print("| --- | --- | --- | --- | --- | --- |")
    else:
        print("| pipeline | full steps | UNet s / image: programs | modules | programs / modules | "
              "loop s / image: programs | modules |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
    for row, r in results["rows"].items():
        full = r.get("full_steps", "-")
        if cuda:
            vs = f"{ref_dc / r['loop_s']:.2f}x" if ref_dc else "-"
            print(f"| {LABELS[row]} | {full} | {r['unet_s']:.3f} | {r['unet_s'] / steps * 1e3:.2f} | "
                  f"{r['loop_s']:.3f} | {vs} |")
        elif "module_unet_s" in r:
            print(f"| {LABELS[row]} | {full} | {r['unet_s']:.3f} | {r['module_unet_s']:.3f} | "
                  f"{r['unet_s'] / r['module_unet_s']:.2f} | {r['loop_s']:.3f} | {r['module_loop_s']:.3f} |")
        else:
            print(f"| {LABELS[row]} | {full} | - | {r['unet_s']:.3f} | - | - | {r['loop_s']:.3f} |")
    print("\n| graph (batch 2) | ops (exported -> pruned) | program ms / call |"
          + (" module ms / call | program / module |" if not cuda else ""))
    print("| --- | --- | --- |" + (" --- | --- |" if not cuda else ""))
    for name, e in results["graphs"].items():
        line = f"| {name} | {e['ops_exported']} -> {e['ops']} | {e['program_ms']:.2f} |"
        if "module_ms" in e:
            line += f" {e['module_ms']:.2f} | {e['program_ms'] / e['module_ms']:.2f} |"
        print(line)
    inherit = results["graphs"].get("teacher-block0: unet.inherit")
    if inherit and "module_ms" in inherit:
        ratio = inherit["program_ms"] / inherit["module_ms"]
        print(f"\nblock-0 inherit program / inherit module: {ratio:.2f} "
              f"(CPU target <= 0.3: {'met' if ratio <= 0.3 else 'NOT met'})")


if __name__ == "__main__":
    main()
