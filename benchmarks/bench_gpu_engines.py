"""Whole pipeline on built torch engine folders (`build --backend torch`: pruned programs, AOTInductor packages,
CUDA graphs) against diffusers and diffusers + DeepCache, one run, one GPU.

For the teacher (`asdm:sd15`, random weights) and the bk-small student (assembled from it, experts folded), each
exported with block-0 inheritance (uniform N=3): export the bundle, build its engine folder (the time a user pays
once), then open it in a new process, as a user's second `run` does (open time, first image, process wall time;
again with --repeat-start), with seconds per image and per stage (text encoder, UNet graphs, loop, VAE) for the
full schedule and for uniform N=3. Each measurement runs in a process of its own (a crash in a native library
loses one row, not the run). The fp16 engine image is compared with the fp32 programs' image (the reference
modules exported at fp32, TF32 off: equal to them within 1e-6, tests/test_torch_programs.py). diffusers (eager,
fp16, the same components, whole pipeline with VAE decode) runs the same prompts, with and without DeepCache
(N=3, branch 0).

The rows run first, then the baselines (diffusers, eager, about a minute each). A step that would not end by
--deadline (by the H200 durations in EXPECT_S) is skipped, and the JSON is written after each: set the deadline
inside the process's time limit. In 540 s the teacher row fits; bk-small and the baselines take a second run.

    python benchmarks/bench_gpu_engines.py [--device cuda] [--steps 50] [--images 2] [--size 512]
        [--compile aoti] [--rows teacher,bk-small] [--baselines diffusers,deepcache] [--deadline 540]
        [--repeat-start] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_export import machine
from bench_gpu import enable_deepcache, require_deepcache
from bench_start import collect_runtime_log

PROMPTS = ["a photo of a red fox in the snow", "a watercolour of a lighthouse at dusk"]
# what each step took for the SD1.5-shaped teacher on an H200 (RESULTS.md, GPU), with a margin: a step is started
# only where it would end by --deadline. A measurement is a new process's start (82.8 s there once, before packages
# lost their weights; 6.6 s + 1.7 s in a warm process) plus the timed images
EXPECT_S = {"export + build": 380, "measurement": 100, "fp32 reference": 60, "second start": 40, "baseline": 60}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def spec_for(args, latent_px: int):
    from asdm_export.build.engine_spec import parse_spec

    return parse_spec({"target": "torch", "shapes": "static",
                       "profiles": [{"image": latent_px, "batch": {"unet": 2, "text_encoder": 1, "vae": 1}}],
                       "program": {"device": args.device, "dtype": args.dtype, "compile": args.compile}},
                      name=f"torch-{args.device}-{latent_px}")


def child(args, *extra: str) -> tuple[dict | None, float, str]:
    """This script in a new process (``--measure`` / ``--reference``): its JSON result (None when it crashed
    before printing it; a crash after, at interpreter teardown, keeps the row and records the exit code as
    ``exit_code``), its wall seconds and the end of its output. A fresh process is what a user's second `run`
    is, and a crash there (a native library's) leaves the other rows standing."""
    cmd = [sys.executable, __file__, "--device", args.device, "--steps", str(args.steps), "--size", str(args.size),
           "--images", str(args.images), *extra]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-3:])
    try:
        result = json.loads(lines[-1][len("RESULT "):]) if lines else None
    except ValueError:  # cut off mid-line
        result = None
    if result is not None and done.returncode != 0:
        result["exit_code"] = done.returncode
    return result, wall, tail


def measure(folder: Path, args, schedules: list[str], image_out: Path) -> dict:
    """In this (new) process: open ``folder`` (engine folder or bundle), one image with its own schedule saved to
    ``image_out`` (the first image: programs loaded, CUDA graphs captured), then each schedule timed."""
    from asdm_export.graphs.schedule import Schedule
    from asdm_export.runtime.pipeline import AsdmPipeline

    t0 = time.perf_counter()
    records = collect_runtime_log(t0)  # the runtime's own account of the start
    reference = args.reference is not None
    if reference:  # fp32 means fp32: cuDNN's convolutions otherwise run in TF32 (10-bit mantissa) on Ampere+
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    pipe = (AsdmPipeline.from_bundle(folder, backend="torch", device=args.device, dtype="fp32") if reference
            else AsdmPipeline.from_bundle(folder))
    res = {"open_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    image = pipe(PROMPTS[0], steps=args.steps, height=args.size, width=args.size)[0]
    res["first_image_s"] = time.perf_counter() - t0
    res["log"] = list(records)
    np.save(image_out, image)
    own = pipe.schedule
    for label in schedules:
        res[label] = time_pipeline(pipe, Schedule(args.steps) if label == "full" else own, args)
    return res


def time_pipeline(pipe, schedule, args) -> dict:
    from asdm_export.runtime.pipeline import Timings

    pipe.schedule = schedule
    t0 = time.perf_counter()
    pipe("warm-up", steps=args.steps, height=args.size, width=args.size)
    first = time.perf_counter() - t0
    timings = Timings()
    pipe(PROMPTS[: args.images], steps=args.steps, height=args.size, width=args.size, timings=timings)
    n = timings.images
    return {"first_image_s": first, "s_per_image": timings.total / n,
            **{k: v / n for k, v in timings.rows()}}


def time_diffusers(args, deepcache: bool) -> float:
    """Seconds per image of diffusers' StableDiffusionPipeline, eager (fp16 on CUDA), whole pipeline (VAE too)."""
    from asdm_export.models.loading import resolve_model

    dtype = torch.float16 if args.device == "cuda" else torch.float32
    pipe = resolve_model(args.model).load_pipeline().to(args.device, dtype)
    pipe.set_progress_bar_config(disable=True)
    helper = enable_deepcache(pipe) if deepcache else None
    kwargs = dict(num_inference_steps=args.steps, guidance_scale=7.5, height=args.size, width=args.size,
                  output_type="np")
    pipe(PROMPTS[0], **kwargs)  # warm-up
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for p in PROMPTS[: args.images]:
        pipe(p, generator=torch.Generator().manual_seed(0), **kwargs)
    sync()
    seconds = (time.perf_counter() - t0) / args.images
    if helper is not None:
        helper.disable()
    del pipe
    return seconds


def measure_row(row: str, tmp: Path, args, res: dict, late, save) -> None:
    """Export, build and measure one row (``teacher`` or ``bk-small``) into ``res``; ``late(what, step)`` says
    whether a step is skipped for the deadline."""
    from asdm_export.assembly import assemble, reparam
    from asdm_export.build import build_engines
    from asdm_export.export import export_bundle
    from asdm_export.graphs.inheritance import InheritanceSpec
    from asdm_export.graphs.schedule import Schedule

    t0 = time.perf_counter()
    unets = None
    if row == "bk-small":
        assemble(args.model, "bk-small", tmp / "student")
        reparam(tmp / "student", tmp / "student-deployed")
        unets = {"unet": str(tmp / "student-deployed")}
    bundle, engines = tmp / f"{row}-bundle", tmp / f"{row}-engines"
    latent = args.size // 8
    export_bundle(args.model, bundle, unets=unets, inheritance=InheritanceSpec("block", branch=0),
                  schedule=Schedule.parse("uniform:3", args.steps), batch=(1, 2, 2), latent=(latent,) * 3)
    res["export_s"] = time.perf_counter() - t0
    save()
    t0 = time.perf_counter()
    manifest = build_engines(bundle, spec_for(args, args.size), engines)
    res["build_s"] = time.perf_counter() - t0
    res["compiled"] = {e["name"]: e.get("compile_seconds") if e.get("aoti") else None for e in manifest["programs"]}
    print(f"{row}: export {res['export_s']:.0f} s, build {res['build_s']:.0f} s, compiled {res['compiled']}",
          flush=True)
    save()
    if late(f"{row} measurement", "measurement"):
        return
    schedules = ["full", "uniform N=3"] if row == "teacher" else ["uniform N=3"]
    got, wall, tail = child(args, "--measure", str(engines), "--schedules", ",".join(schedules),
                            "--image", str(tmp / f"{row}.npy"))
    res["new_process_s"] = wall
    if got is None:
        print(f"{row}: the measuring process failed: {tail}", flush=True)
        return
    res.update(got)
    print(f"{row}: a new process opened the engine folder in {got['open_s']:.1f} s, made its first "
          f"{args.steps}-step image in {got['first_image_s']:.1f} s (process wall, imports included: "
          f"{wall:.1f} s)", flush=True)
    for label in schedules:
        r = got[label]
        stages = ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in r.items() if k not in ("first_image_s", "s_per_image"))
        print(f"{row} {label}: {r['s_per_image']:.3f} s / image ({stages})", flush=True)
    save()
    # fp16 engines against the fp32 programs: the same prompt, seed and schedule
    if not late(f"{row} fp32 reference", "fp32 reference"):
        ref, _, tail = child(args, "--reference", str(bundle), "--measure", str(bundle), "--schedules", "",
                             "--image", str(tmp / f"{row}-fp32.npy"))
        if ref is None:
            print(f"{row}: the fp32 reference process failed: {tail}", flush=True)
        else:
            res["psnr_fp16_vs_fp32_db"] = psnr(np.load(tmp / f"{row}.npy"), np.load(tmp / f"{row}-fp32.npy"))
            print(f"{row}: image of the {args.dtype} engines vs the fp32 programs: PSNR "
                  f"{res['psnr_fp16_vs_fp32_db']:.1f} dB", flush=True)
        save()
    if args.repeat_start and not late(f"{row} second start", "second start"):
        again, wall2, _ = child(args, "--measure", str(engines), "--schedules", "", "--image",
                                str(tmp / f"{row}-again.npy"))
        if again:
            res["second_process"] = {**again, "wall_s": wall2}
            print(f"{row}: another new process: open {again['open_s']:.1f} s, first image "
                  f"{again['first_image_s']:.1f} s, wall {wall2:.1f} s; its log:", flush=True)
            for at, message in again["log"]:
                print(f"  {at:7.2f} s  {message}", flush=True)
        save()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="asdm:sd15")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--compile", default="aoti", choices=["aoti", "off"])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rows", default="teacher,bk-small")
    ap.add_argument("--baselines", default="diffusers,deepcache")
    ap.add_argument("--deadline", type=float, default=540, help="seconds; a step that would end past it is skipped")
    ap.add_argument("--repeat-start", action="store_true", help="open each engine folder in a second new process")
    ap.add_argument("--json", default=None)
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # the child process's modes
    ap.add_argument("--reference", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--schedules", default="", help=argparse.SUPPRESS)
    ap.add_argument("--image", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.dtype = args.dtype or ("fp16" if args.device == "cuda" else "fp32")
    baselines = [b for b in args.baselines.split(",") if b]
    if "deepcache" in baselines and not args.measure:
        require_deepcache("--baselines diffusers")
    if args.measure:
        res = measure(Path(args.measure), args, [s for s in args.schedules.split(",") if s], Path(args.image))
        print("RESULT " + json.dumps(res), flush=True)
        return

    start = time.perf_counter()
    dev = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    results = {"machine": machine(), "device": dev, "torch": torch.__version__, "cuda": torch.version.cuda,
               "model": args.model, "size": args.size, "steps": args.steps, "dtype": args.dtype,
               "compile": args.compile, "rows": {}, "baselines": {}}

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))

    def late(what: str, step: str) -> bool:
        elapsed = time.perf_counter() - start
        if elapsed + EXPECT_S[step] <= args.deadline:
            return False
        print(f"{what}: skipped (at {elapsed:.0f} s it would not end by --deadline {args.deadline:.0f} s)",
              flush=True)
        return True

    print(f"machine: {machine()}; {dev}; torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for row in [r for r in args.rows.split(",") if r]:
            if late(row, "export + build"):
                continue
            measure_row(row, tmp, args, results["rows"].setdefault(row, {}), late, save)
            if args.device == "cuda":
                torch.cuda.empty_cache()
    for base in baselines:
        if late(base, "baseline"):
            continue
        results["baselines"][base] = time_diffusers(args, deepcache=base == "deepcache")
        precision = "fp16" if args.device == "cuda" else "fp32"
        print(f"{base}: {results['baselines'][base]:.3f} s / image (eager {precision}, whole pipeline)", flush=True)
        save()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
