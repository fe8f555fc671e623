"""ORT CPU step latency of assembled students: student / teacher per preset, and the cost of ME-CondConv.

Batch 2 (a classifier-free-guidance step), 32x32 latent, fp32, one run of this script. Each row compares
two graphs whose runs alternate (so machine noise hits both alike); the ratio is of the medians.

  * plain pruned student / teacher, per preset (target for bk-small <= 0.78, A-SDM's 22.4% speed-up);
  * re-parameterized ME-CondConv student / plain pruned student (target <= 1.05):
      - static: timestep router folded for one timestep band (what a per-band graph deploys),
      - dynamic: input router, per-sample kernel + one batched convolution (AggregatedCondConv);
  * naive: the K-convolution form of the same ME-CondConv student, for contrast.

ME-CondConv students get random open gates and routers (``randomize_routing``) so that nothing folds
trivially; latency does not depend on the values.

    python benchmarks/bench_assembly.py [--model asdm:sd15] [--plans bk-base,bk-small,bk-tiny,asdm-shallow]
                                        [--experts 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_export import machine  # noqa: E402


def export(unet, folder: Path, name: str) -> Path:
    """The same export path as `asdm-export export` (trace, clean-up, fold), without the manifest."""
    from asdm_export.export import export_graph
    from asdm_export.graphs import unet_graphs

    out = folder / name
    out.mkdir()
    t0 = time.perf_counter()
    entry = export_graph(unet_graphs(unet)[0], out, "fp32", 17)
    print(f"  exported {name}: {entry['nodes']} nodes, Conv {entry['ops'].get('Conv', 0)}, "
          f"MatMul {entry['ops'].get('MatMul', 0)} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return out / entry["file"]


def timed_pair(ref_path: Path, cand_path: Path, feed: dict, repeats: int, ref_session=None):
    """Median latency of both graphs over ``repeats`` alternating runs, and the candidate's max deviation."""
    from asdm_export.runtime.runners import ort_session

    ref = ref_session or ort_session(ref_path, "cpu")
    cand = ort_session(cand_path, "cpu")
    ref.run(None, feed), cand.run(None, feed)  # warm-up
    times = {"ref": [], "cand": []}
    for _ in range(repeats):
        for key, sess in (("ref", ref), ("cand", cand)):
            t0 = time.perf_counter()
            sess.run(None, feed)
            times[key].append(time.perf_counter() - t0)
    del cand
    gc.collect()
    return statistics.median(times["ref"]), statistics.median(times["cand"]), times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="asdm:sd15")
    ap.add_argument("--plans", default="bk-base,bk-small,bk-tiny,asdm-shallow")
    ap.add_argument("--me-plan", default="bk-small", help="Plan of the ME-CondConv students.")
    ap.add_argument("--experts", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()

    from asdm_export.assembly import build_student, randomize_routing, reparam_unet
    from asdm_export.console import setup_logging
    from asdm_export.models.loading import resolve_model
    from asdm_export.runtime.runners import ort_session

    setup_logging(0)  # warnings only: the exporter and ONNX Runtime are chatty
    t0 = time.perf_counter()
    teacher = resolve_model(args.model).load_unet()
    print(f"model {args.model}: {sum(p.numel() for p in teacher.parameters()) / 1e6:.1f}M params "
          f"(ready in {time.perf_counter() - t0:.0f} s)", flush=True)
    plans = [p for p in args.plans.split(",") if p]
    b, h = args.batch, args.latent
    rng = np.random.default_rng(0)
    cross = teacher.config.cross_attention_dim
    feed = {
        "sample": rng.normal(size=(b, 4, h, h)).astype(np.float32),
        "timestep": np.full((b,), 500.0, np.float32),
        "encoder_hidden_states": rng.normal(size=(b, 77, cross)).astype(np.float32),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        graphs = {"teacher": export(teacher, tmp, "teacher")}
        for plan in sorted(set(plans) | {args.me_plan}):
            student, _ = build_student(teacher, plan, experts=1)
            graphs[plan] = export(student, tmp, plan)
            del student
        # One ME-CondConv student at a time (an SD1.5-sized one is 3 GB, its deployed copy another 3 GB).
        student, _ = build_student(teacher, args.me_plan, experts=args.experts, router="timestep")
        randomize_routing(student)
        static, rep = reparam_unet(student, band=(400, 601))
        assert rep["folded"] and not rep["dynamic"]
        del student
        graphs["static"] = export(static, tmp, "me-static")
        del static
        student, _ = build_student(teacher, args.me_plan, experts=args.experts, router="input")
        del teacher
        gc.collect()
        randomize_routing(student)
        dynamic, rep = reparam_unet(student)
        assert rep["dynamic"]
        n_me = len(rep["dynamic"])
        graphs["dynamic"] = export(dynamic, tmp, "me-dynamic")
        del dynamic
        naive, _ = reparam_unet(student, dynamic="naive")
        del student
        graphs["naive"] = export(naive, tmp, "me-naive")
        del naive
        gc.collect()

        print("timing (alternating runs)...", flush=True)
        ref = ort_session(graphs["teacher"], "cpu")
        for plan in plans:
            t_ref, t_cand, _ = timed_pair(graphs["teacher"], graphs[plan], feed, args.repeats, ref)
            target = ""
            if plan == "bk-small":
                target = f" (target <= 0.78: {'met' if t_cand / t_ref <= 0.78 else 'NOT met'})"
            rows.append((f"{plan} / teacher", t_cand, t_ref, t_cand / t_ref, target))
        del ref
        gc.collect()
        ref = ort_session(graphs[args.me_plan], "cpu")
        for key, label in (("static", "ME static fold (timestep band)"), ("dynamic", "ME dynamic (input router)"),
                           ("naive", "ME naive K-conv (input router)")):
            t_ref, t_cand, _ = timed_pair(graphs[args.me_plan], graphs[key], feed, args.repeats, ref)
            target = ""
            if key != "naive":
                target = f" (target <= 1.05: {'met' if t_cand / t_ref <= 1.05 else 'NOT met'})"
            rows.append((f"{label} / plain {args.me_plan}", t_cand, t_ref, t_cand / t_ref, target))
        del ref

    print(f"\nmachine: {machine()}")
    print(f"{args.model}, ORT CPU fp32, batch {b}, latent {h}x{h}, {args.repeats} alternating runs per pair, "
          f"ME-CondConv: {n_me} layers, K={args.experts}")
    print("| comparison | candidate | reference | ratio |")
    print("| --- | --- | --- | --- |")
    for label, cand, ref, ratio, target in rows:
        print(f"| {label} | {cand:.3f} s | {ref:.3f} s | {ratio:.2f}{target} |")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
