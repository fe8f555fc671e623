"""The quality cost of each acceleration on the trained toy world (asdm:toyworld), read by the shipped judge.

Every setting generates the same --samples images (sample i: class i mod 24, seed i), 20 DDIM steps,
guidance 5, and is scored with `quality` (colour / shape / both-correct accuracy with standard errors,
Frechet distance of judge features to real images, with its real-vs-real floor). Settings:
  * the teacher through diffusers (PyTorch reference) and as an fp32 bundle on ORT CPU;
  * the teacher with block-level feature inheritance (branch 0), uniform N=3 and N=5;
  * the teacher's UNet exported fp16; the fp32 bundle quantized to INT8 (calibrated on toy-world captions);
  * a bk-small student assembled from the teacher (untrained: what pruning costs before any distillation);
  * the shipped distilled bk-small student (asdm:toyworld-bk-small), alone and with block inheritance N=3.
UNet time is the time spent inside the UNet (graphs or module) per image, in this one run.

    python benchmarks/bench_quality.py [--samples 256] [--out bench-quality] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench_export import machine


ROWS = [  # (name, description), in the table's order
    ("teacher-diffusers", "teacher, diffusers (PyTorch eager)"),
    ("teacher-fp32", "teacher, fp32 graphs"),
    ("inherit-n3", "teacher + block inheritance (branch 0), uniform N=3"),
    ("inherit-n5", "teacher + block inheritance (branch 0), uniform N=5"),
    ("teacher-fp16", "teacher, fp16 graphs"),
    ("teacher-int8", "teacher, INT8 UNet (Q/DQ, minmax, 24 captions)"),
    ("bk-small", "bk-small student, assembled, not distilled"),
    ("bk-small-distilled", "bk-small student, distilled (asdm:toyworld-bk-small), fp32 graphs"),
    ("bk-small-distilled-n3", "distilled bk-small + block inheritance (branch 0), uniform N=3"),
]


def bundles(work: Path, steps: int):
    """A function from a row's name to its bundle folder (None for the diffusers row).

    Bundles are built on first use and kept under WORK/bundles-<steps>steps (a bundle's schedule is made for
    its step count); the INT8 row builds the fp32 bundle it quantizes when that is missing."""
    from asdm_export.assembly import assemble
    from asdm_export.export import export_bundle
    from asdm_export.graphs.inheritance import InheritanceSpec
    from asdm_export.graphs.schedule import Schedule
    from asdm_export.int8.calibrate import calibrate_bundle
    from asdm_export.int8.quantize import quantize_bundle
    from asdm_export.toyworld import world

    full = Schedule.parse("full", steps)
    model = "asdm:toyworld"
    root = work / f"bundles-{steps}steps"

    def inheritance(n):
        return lambda out: export_bundle(model, out, inheritance=InheritanceSpec("block", branch=0),
                                         schedule=Schedule.parse(f"uniform:{n}", steps))

    def int8(out):
        prompts = root / "toy-prompts.txt"
        prompts.write_text("\n".join(world.caption(c, s) for c, s in world.classes()) + "\n")
        calibrate_bundle(bundle("teacher-fp32"), prompts, root / "calib", samples=24, steps=steps, guidance=5.0,
                         overwrite=True, progress=False)
        quantize_bundle(bundle("teacher-fp32"), root / "calib", out, overwrite=True)

    def student(out):
        assemble(model, "bk-small", root / "bk-small-student", overwrite=True)
        export_bundle(model, out, unets={"unet": str(root / "bk-small-student")}, schedule=full)

    builders = {
        "teacher-fp32": lambda out: export_bundle(model, out, schedule=full),
        "inherit-n3": inheritance(3),
        "inherit-n5": inheritance(5),
        "teacher-fp16": lambda out: export_bundle(model, out, precision="fp16", schedule=full),
        "teacher-int8": int8,
        "bk-small": student,
        "bk-small-distilled": lambda out: export_bundle("asdm:toyworld-bk-small", out, schedule=full),
        "bk-small-distilled-n3": lambda out: export_bundle("asdm:toyworld-bk-small", out,
                                                           inheritance=InheritanceSpec("block", branch=0),
                                                           schedule=Schedule.parse("uniform:3", steps)),
    }

    def bundle(name):
        if name not in builders:  # the diffusers row
            return None
        folder = root / name
        if not (folder / "manifest.json").is_file():
            root.mkdir(parents=True, exist_ok=True)
            builders[name](folder)
        return folder

    return bundle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--out", type=Path, default=Path("bench-quality"))
    ap.add_argument("--only", nargs="*", default=None, help="Names of the settings to run (default: all).")
    args = ap.parse_args()

    from asdm_export.models.presets import SHIPPED_ROOT
    from asdm_export.toyworld.judge import load_judge
    from asdm_export.toyworld.quality import QualitySettings, measure_quality, paired_changes

    judge = load_judge(SHIPPED_ROOT / "judge")
    qs = QualitySettings(samples=args.samples, steps=args.steps, guidance=args.guidance)
    args.out.mkdir(parents=True, exist_ok=True)
    bundle = bundles(args.out, args.steps)
    rows = []
    for name, what in ROWS:
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        folder = bundle(name)
        source = {"model": "asdm:toyworld"} if folder is None else {"bundle": folder}
        r = measure_quality(judge, qs, **source, out=args.out / f"q-{name}", overwrite=True)
        rows.append({"name": name, "what": what, **r})
        print(f"{name}: both {r['both']['accuracy']:.3f} ± {r['both']['se']:.3f} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    (args.out / "results.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))

    print(f"\nmachine: {machine()}; {args.samples} samples, {args.steps} DDIM steps, guidance {args.guidance:g}\n")
    ref = next((r for r in rows if r["name"] == "teacher-fp32"), None)
    print("| setting | colour | shape | both-correct | vs fp32 teacher: lost / gained | Frechet | UNet ms/image |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        acc = " | ".join(f"{r[k]['accuracy']:.3f} ± {r[k]['se']:.3f}" for k in ("colour", "shape", "both"))
        flips = "{} / {}".format(*paired_changes(ref, r)) if ref else "-"
        print(f"| {r['what']} | {acc} | {flips} | {r['frechet']:.2f} | {1000 * r['seconds']['unet_per_image']:.0f} |")
    if rows:
        print(f"\nFrechet floor (two independent real sets of {args.samples}): {rows[0]['frechet_real_floor']:.2f}")


if __name__ == "__main__":
    main()
