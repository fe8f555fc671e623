"""Distillation on the toy world: an ablation at one fixed training budget per row, and the headline rows.

Every ablation row assembles a bk-small student from asdm:toyworld, distils it for --steps steps of batch
--batch (the same budget for every row; incubation's steps come out of it), and scores it with `quality`
(256 samples, 20 DDIM steps, guidance 5, the shipped judge; the PyTorch student through diffusers' pipeline):

  plain      task loss only (the pruned student retrained as the teacher was trained)
  kd         + output KD
  feat       + feature KD (BK-SDM's three terms)
  sas        + semantic-aware supervision (cross-attention maps)
  condconv   + ME-CondConv (K=2, timestep router; experts of the removed resnets), scored as trained and as
             deployed: `reparam --bands 0:500:1000` folds each band into plain convolutions, and the bundle
             switches between the two folded UNets at t=500 (fp32 graphs, ORT CPU)
  incubate   + progressive incubation (a quarter of the budget: 4 levels x steps/16, then end to end)
  gri        + GRI attention in the outermost stages (window 8, pool 4 at the toy's 16x16 tokens)

`--student DIR` adds rows for an already distilled student (e.g. the long run shipped as asdm:toyworld-bk-small):
through diffusers, and exported with block inheritance (branch 0, uniform N=3) on ORT CPU, against the teacher's
fp32 graphs on ORT CPU in the same run (UNet time ratio).

    python benchmarks/bench_distill.py --out bench-distill [--steps 400] [--batch 32] [--only plain kd ...]
    python benchmarks/bench_distill.py --out bench-distill --only --student students/bk-small-kd [--student ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench_export import machine

TEACHER = "asdm:toyworld"
SAS = "task,kd,feat,sas"
ROWS = {  # name: (description, assemble kwargs, losses, incubation share)
    "plain": ("plain pruned student, task loss only", dict(experts=1), "task", 0),
    "kd": ("+ output KD", dict(experts=1), "task,kd", 0),
    "feat": ("+ feature KD (BK-SDM)", dict(experts=1), "task,kd,feat", 0),
    "sas": ("+ semantic-aware supervision", dict(experts=1), SAS, 0),
    "condconv": ("+ ME-CondConv (K=2, timestep router)", dict(experts=2, router="timestep"), SAS, 0),
    "incubate": ("+ progressive incubation", dict(experts=1), SAS, 4),
    "gri": ("+ GRI attention (outermost stages)",
            dict(experts=1, gri={"stages": ["down_blocks.0", "up_blocks.3"], "window": 8, "pool": 4}), SAS, 0),
}


def distil_row(name: str, work: Path, steps: int, batch: int) -> tuple[Path, float]:
    from asdm_export.assembly import assemble
    from asdm_export.distill import DistillRecipe, distill, parse_losses

    _, kwargs, losses, share = ROWS[name]
    out = work / f"student-{name}"
    if (out / "manifest.json").is_file():  # a row trained before, reused only at this budget
        record = json.loads((out / "distill.json").read_text())
        if record["recipe"]["batch"] == batch and record["recipe"]["steps"] + 4 * record["recipe"]["incubate_steps"] \
                == steps:
            return out, record["seconds"]["train"]
    assemble(TEACHER, "bk-small", work / f"assembled-{name}", overwrite=True, **kwargs)
    incubate = steps // 16 if share else 0  # 4 levels x steps/16 = a quarter of the budget
    recipe = DistillRecipe(losses=parse_losses(losses), steps=steps - 4 * incubate, incubate_steps=incubate,
                           batch=batch)
    manifest = distill(TEACHER, work / f"assembled-{name}", out, recipe=recipe, overwrite=True, progress=False)
    return out, manifest["seconds"]["train"]


def folded_bundle(student: Path, steps: int) -> Path:
    """The deployment form of a timestep-routed student: one folded UNet per band, switched by the schedule
    (with DDIM's leading spacing, steps 0..steps/2-1 have t >= 500)."""
    from asdm_export.assembly import reparam
    from asdm_export.export import export_bundle
    from asdm_export.graphs.schedule import Schedule

    bands, bundle = student.parent / f"{student.name}-bands", student.parent / f"{student.name}-bands-bundle"
    if not (bundle / "manifest.json").is_file():
        reparam(str(student), bands, bands="0:500:1000", overwrite=True)
        half = steps // 2
        switch = Schedule.parse("full", steps, f"early:0-{half - 1},unet:{half}-{steps - 1}", ("unet", "early"))
        export_bundle(str(student), bundle, schedule=switch, overwrite=True,
                      unets={"unet": str(bands / "band-0000-0500"), "early": str(bands / "band-0500-1000")})
    return bundle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-distill"))
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--only", nargs="*", default=None, help="Ablation rows to run (default: all).")
    ap.add_argument("--student", type=Path, action="append", default=[],
                    help="A distilled student for the headline rows; repeatable (one teacher row for all).")
    args = ap.parse_args()

    from asdm_export.artifacts import read_manifest
    from asdm_export.export import export_bundle
    from asdm_export.graphs.inheritance import InheritanceSpec
    from asdm_export.models.loading import resolve_model
    from asdm_export.graphs.schedule import Schedule
    from asdm_export.models.presets import SHIPPED_ROOT
    from asdm_export.toyworld.judge import load_judge
    from asdm_export.toyworld.quality import QualitySettings, measure_quality, paired_changes

    judge = load_judge(SHIPPED_ROOT / "judge")
    qs = QualitySettings(samples=args.samples, steps=20, guidance=5.0)
    args.out.mkdir(parents=True, exist_ok=True)

    def score(tag, **source):
        t0 = time.perf_counter()
        r = measure_quality(judge, qs, **source, out=args.out / f"q-{tag}", overwrite=True)
        print(f"{tag}: both {r['both']['accuracy']:.3f} ± {r['both']['se']:.3f} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
        return r

    rows = [{"name": "teacher", "what": "teacher (diffusers)", "train_min": None, **score("teacher", model=TEACHER)}]
    for name in (ROWS if args.only is None else args.only):
        folder, seconds = distil_row(name, args.out, args.steps, args.batch)
        rows.append({"name": name, "what": ROWS[name][0], "train_min": seconds / 60,
                     **score(name, model=str(folder))})
        if name == "condconv":
            rows.append({"name": "condconv-folded", "what": ROWS[name][0] + ", folded per band (ORT CPU)",
                         "train_min": seconds / 60, **score("condconv-folded", bundle=folded_bundle(folder, qs.steps))})
    full, n3 = Schedule.parse("full", qs.steps), Schedule.parse("uniform:3", qs.steps)
    heads = [("teacher-graphs", TEACHER, full, None, "teacher, fp32 graphs (ORT CPU)")] if args.student else []
    for k, student in enumerate(args.student):
        tag = "" if len(args.student) == 1 else f"-{k}"
        rows.append({"name": f"student{tag}", "what": f"distilled student {student.name} (diffusers)",
                     "train_min": None, **score(f"student{tag}", model=str(student))})
        heads += [(f"student-graphs{tag}", str(student), full, None,
                   f"distilled student {student.name}, fp32 graphs (ORT CPU)"),
                  (f"student-n3{tag}", str(student), n3, InheritanceSpec("block", branch=0),
                   f"distilled student {student.name} + block inheritance uniform N=3 (ORT CPU)")]
    for tag, model, schedule, inheritance, what in heads:  # the graph rows last, one after another
        folder = args.out / f"bundle-{tag}"
        if not (folder / "manifest.json").is_file() or read_manifest(folder, "bundle")["source"]["sha256"] != resolve_model(
                model).sha256:  # a bundle of this --out's earlier run is reused only for the same model
            export_bundle(model, folder, schedule=schedule, inheritance=inheritance, overwrite=True)
        rows.append({"name": tag, "what": what, "train_min": None, **score(tag, bundle=folder)})
    (args.out / "results.json").write_text(json.dumps({"machine": machine(), "steps": args.steps,
                                                       "batch": args.batch, "rows": rows}, indent=2))

    print(f"\nmachine: {machine()}; budget {args.steps} steps x batch {args.batch}; {args.samples} samples, "
          "20 DDIM steps, guidance 5\n")
    ref = rows[0]
    print("| row | colour | shape | both-correct | vs teacher: lost / gained | Frechet | UNet ms/image | train min |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        acc = " | ".join(f"{r[k]['accuracy']:.3f} ± {r[k]['se']:.3f}" for k in ("colour", "shape", "both"))
        flips = "{} / {}".format(*paired_changes(ref, r))
        train = f"{r['train_min']:.1f}" if r["train_min"] is not None else "-"
        print(f"| {r['what']} | {acc} | {flips} | {r['frechet']:.2f} | {1000 * r['seconds']['unet_per_image']:.0f} "
              f"| {train} |")
    graphs = {r["name"]: r for r in rows}
    for name, s in graphs.items():
        if name.startswith("student-n3"):
            t = graphs["teacher-graphs"]
            print(f"\n{s['what']} vs teacher graphs: both-correct ratio "
                  f"{s['both']['accuracy'] / t['both']['accuracy']:.3f}, UNet time "
                  f"{t['seconds']['unet_per_image'] / s['seconds']['unet_per_image']:.2f}x less")


if __name__ == "__main__":
    main()
