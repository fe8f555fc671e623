"""``check``: run every graph of a bundle on each backend against the PyTorch module it came from, and the
whole pipeline on each backend against the PyTorch pipeline.

Per graph, the cases are seeded random tensors at several shapes inside the graph's dynamic ranges, plus
inputs recorded from real denoising trajectories of the PyTorch pipeline (``record``): tokenized prompts,
UNet inputs at several steps (both halves of the guidance batch, cached features for ``inherit`` graphs),
the final latents. A bundle's graphs run through polygraphy's ``Comparator`` (our torch runner + ONNX Runtime
runners); engine folders (TensorRT, ONNX Runtime, PyTorch programs) through their runtime backends. Inputs
and outputs are saved in polygraphy's JSON format next to ``report.json`` so a case replays with
``polygraphy run`` (the exact command is in the report). End to end (``e2e``): images, the per-step latent
error plot and a side-by-side grid; ``report.html`` shows it all (``report_html``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..artifacts import atomic_output_dir, changed_files, check_output, read_manifest, unet_entries
from ..console import quiet_libraries
from ..errors import InputError
from ..export.onnx_passes import load_onnx
from ..graphs.schedule import Schedule
from ..runtime.backends import Backend, OrtBackend, TorchBackend
from ..runtime.reference import reference_graphs, reference_sources
from ..runtime.runners import TorchRunner, cpu_int8_kernels, ort_runner, set_torch_threads, usable_providers
from .accuracy import (E2E_MIN_PSNR, Tolerance, coarsest, compare_arrays, latent_of, own_bounds, passes,
                       tolerance_for, tolerance_of)
from .record import recorded_cases

log = logging.getLogger(__name__)


def default_report_dir(bundle: Path) -> Path:
    bundle = Path(bundle).resolve()
    return bundle.with_name(bundle.name + "-check")


# each metric of a graph output, and how the worst of several cases is taken
_WORST = {"max_abs": max, "rel_l2": max, "cosine": min, "psnr": min, "nonfinite": sum}
METRIC_KEYS = tuple(_WORST)


def _summarize(points: list[dict]) -> dict | None:
    """Worst case over the given cases and their outputs."""
    metrics = [m for p in points for m in p["outputs"].values()]
    if not metrics:
        return None
    return {key: worst(m[key] for m in metrics) for key, worst in _WORST.items()}


def _dims_of(gdef, feeds: dict) -> dict[str, int]:
    """The dynamic-axis values of a recorded feed (read off the input shapes)."""
    return _dims_of_shapes(gdef, {name: np.shape(value) for name, value in feeds.items()})


def _dims_of_shapes(gdef, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    dims = {}
    for name, spec in gdef.inputs.items():
        for axis, size in zip(spec, shapes[name]):
            if isinstance(axis, str):
                dims[axis] = int(size)
    return dims


def _in_range(gdef, dims: dict[str, int]) -> bool:
    return all(gdef.axes[a].min <= v <= gdef.axes[a].max for a, v in dims.items() if a in gdef.axes)


def engine_points(gdef, engine_backends: dict) -> list[dict[str, int]]:
    """Shapes the engines were built for that the bundle's check points miss (a static 128 px folder of a bundle
    whose opt is 64 px): checked too, or such engines would never be compared with the reference."""
    points, own = [], gdef.check_points()
    for backend in engine_backends.values():
        for shapes in backend.built_shapes(gdef.name):
            if set(gdef.inputs) <= set(shapes):
                dims = _dims_of_shapes(gdef, shapes)
                if _in_range(gdef, dims) and dims not in points and dims not in own:
                    points.append(dims)
    return points


REPLAY_SCRIPT = '''"""Our check's verdict inside polygraphy: `polygraphy run GRAPH.onnx --onnxrt --load-inputs NAME.inputs.json
--load-outputs NAME.reference.outputs.json --compare-func-script replay_compare.py`. Written by asdm-export check with
the tolerances of that check; the metrics and the pass rule are asdm_export.check.accuracy's.
"""
from collections import OrderedDict

from polygraphy.logger import G_LOGGER

from asdm_export.check.accuracy import Tolerance, compare_arrays, passes

BASE = Tolerance(**{base})
OVERRIDES = {overrides}


def compare_outputs(result, reference):
    """polygraphy compares each runner with the next: the live ONNX Runtime run, then the saved PyTorch outputs."""
    verdicts = OrderedDict()
    for name in reference.keys():
        m = compare_arrays(reference[name], result[name])
        verdicts[name] = passes(m, BASE.with_overrides(**OVERRIDES.get(name, {{}})))
        G_LOGGER.info(f"{{name}}: " + " ".join(f"{{k}}={{v}}" for k, v in m.items())
                      + (" PASSED" if verdicts[name] else " FAILED"))
    return verdicts
'''


def write_replay_script(folder: Path, tol: Tolerance, overrides: dict) -> Path:
    path = folder / "replay_compare.py"
    path.write_text(REPLAY_SCRIPT.format(base=repr(tol.to_json()), overrides=repr(overrides)))
    return path


def replay_commands(graph_file: str, bundle: Path, report_dir: Path, name: str, tol: Tolerance,
                    overrides: dict) -> dict[str, str]:
    """``polygraphy run`` commands that re-run this graph's cases on ONNX Runtime against the saved PyTorch
    outputs. Polygraphy compares each runner with the next, so the saved reference
    (``NAME.reference.outputs.json``) holds the torch runner alone.

    ``exact``: our metrics and bounds through ``--compare-func-script replay_compare.py`` (needs asdm-export
    installed), the same verdict as the check. ``builtin``: polygraphy's own comparators only: ``simple`` with
    the max statistic and rtol 0 is our max-abs bound, ``cosine_similarity`` our cosine bound, ``--validate``
    our NaN/Inf rule; relative L2 has no polygraphy equivalent (its ``l2`` is absolute), so a case that fails
    on relative L2 alone passes this one."""
    base = (f"polygraphy run {bundle / graph_file} --onnxrt --load-inputs {report_dir / (name + '.inputs.json')} "
            f"--load-outputs {report_dir / (name + '.reference.outputs.json')}")
    atol = [f"{tol.max_abs:g}"] + [f"{o}:{v['max_abs']:g}" for o, v in overrides.items() if "max_abs" in v]
    cos = [f"{tol.min_cosine:g}"] + [f"{o}:{v['min_cosine']:g}" for o, v in overrides.items() if "min_cosine" in v]
    return {
        "exact": f"{base} --compare-func-script {report_dir / 'replay_compare.py'}",
        "builtin": f"{base} --compare simple cosine_similarity --check-error-stat max --rtol 0 "
                   f"--atol {' '.join(atol)} --cosine-similarity-threshold {' '.join(cos)} --validate",
    }


def _first(seen: set, dims: dict) -> bool:
    key = tuple(sorted(dims.items()))
    if key in seen:
        return False
    seen.add(key)
    return True


TIMED_RUNS = 3  # the latency columns: the median of these, after a warm-up run at the same shape


def _runner_latency_ms(runner, feeds: dict[str, np.ndarray]) -> float:
    """A polygraphy runner's median latency on ``feeds``: the comparison runs each case once, and a shape's
    first run (PyTorch's or oneDNN's kernel set-up, allocation) would make a single time say more about the
    set-up than about the graph."""
    with runner:
        runner.infer(feeds)
        times = []
        for _ in range(TIMED_RUNS):
            runner.infer(feeds)
            times.append(runner.last_inference_time())
    return float(np.median(times)) * 1e3


def _run_backend(backend, graph: str, feeds: dict[str, np.ndarray], warm_up: bool):
    """``(outputs, seconds)`` of one case on an engine folder's backend; None when its engines do not take
    these shapes (a TensorRT profile narrower than the graph's exported range). ``warm_up`` runs the case once
    untimed first (a shape's first call deserializes, allocates or captures a CUDA graph); the time is the
    GPU's (CUDA events) on asynchronous backends, not the launch's."""
    import torch

    from ..runtime.denoise import GraphClock

    if not backend.covers(graph, {n: tuple(np.shape(v)) for n, v in feeds.items()}):
        return None
    tensors = {n: torch.from_numpy(np.ascontiguousarray(v)) for n, v in feeds.items()}
    if warm_up:
        backend.run(graph, tensors)
    clock = GraphClock(getattr(backend, "device", "cpu"))
    begin = clock.start()
    outputs = backend.run(graph, tensors)
    clock.stop(begin)
    seconds = clock.seconds()
    return {n: v.detach().float().cpu().numpy() for n, v in outputs.items()}, seconds


def backend_preset(preset: str | None, backend, graph: str | None = None) -> str | None:
    """The tolerance preset ``backend`` is held to (for ``graph``; for its coarsest graph when None) where its own
    precision is coarser than ``preset``, the bundle's; None where it is not, or where the user chose the
    tolerances (``preset`` None)."""
    if preset is None:
        return None
    own = coarsest(preset, *(backend.precision(g) for g in ([graph] if graph else backend.graph_names())))
    return own if own != preset else None


def _backend_verdict(gdef, cases: list[dict], reference, iterations: list, tol: Tolerance, own_preset: str | None,
                     overrides: dict) -> dict:
    """One backend's cases against the PyTorch outputs; ``iterations[i]`` is ``(outputs, seconds)`` or None
    (case not run: outside the engines' profiles). ``own_preset``: the preset of ``tol`` when it is not the
    report's (a backend of a coarser precision)."""
    per_case = []
    for index, (case, ref_it, cand) in enumerate(zip(cases, reference, iterations)):
        if cand is None:
            continue
        cand_out, seconds = cand
        outputs = {}
        for name in gdef.outputs:
            m = compare_arrays(ref_it[name], cand_out[name] if name in cand_out else None)
            outputs[name] = {**m, "passed": passes(m, tolerance_of(name, tol, overrides))}
        per_case.append({"index": index, "kind": case["kind"], "dims": case["dims"],
                         **{k: case[k] for k in ("prompt", "step", "timestep") if k in case},
                         "outputs": outputs, "latency_ms": seconds * 1e3,
                         "passed": all(o["passed"] for o in outputs.values())})
    if not per_case:
        raise InputError(f"no case of graph '{gdef.name}' fits the engines' profiles; check them with a spec whose "
                         "profiles include the graph's min and opt shapes")
    return {
        "passed": all(p["passed"] for p in per_case),
        **({"tolerance_preset": own_preset, "tolerance": tol.to_json()} if own_preset else {}),
        "worst": _summarize(per_case),
        "worst_random": _summarize([p for p in per_case if p["kind"] == "random"]),
        "worst_recorded": _summarize([p for p in per_case if p["kind"] != "random"]),
        "failed_cases": [p["index"] for p in per_case if not p["passed"]],
        "not_covered": len(cases) - len(per_case),
        "latency_ms_at_opt": None,  # timed apart (_check_graph)
        "points": per_case,
    }


def _check_graph(gdef, entry, bundle: Path, tmp: Path, out: Path, providers, tol: Tolerance, overrides: dict,
                 recorded: list[dict], seed: int, engine_backends: dict, engine_tol, threads: int = 0) -> dict:
    """``engine_tol(backend, graph) -> (Tolerance, own preset or None)``: an engine folder's bounds (``tol``, or
    those of the coarser precision it computes in)."""
    from polygraphy.comparator import Comparator, RunResults

    rng = np.random.default_rng(seed)
    cases = [{"kind": "random", "dims": d, "feeds": gdef.random_inputs(d, rng)}
             for d in gdef.check_points() + engine_points(gdef, engine_backends)]
    for case in recorded:
        feeds = {n: np.ascontiguousarray(case["feeds"][n], dtype=gdef.dtype_of(n)) for n in gdef.inputs}
        dims = _dims_of(gdef, feeds)
        if not _in_range(gdef, dims):
            continue  # outside the graph's profile (e.g. a guidance batch of 2 on a batch-1 graph)
        cases.append({**{k: v for k, v in case.items() if k != "label"}, "kind": case["label"],
                      "dims": dims, "feeds": feeds})
    runners = [TorchRunner(gdef)] + [ort_runner(bundle / entry["file"], p, threads) for p in providers]
    log.info("checking %s on %s: %d cases", gdef.name, ", ".join(r.name for r in runners[1:]), len(cases))
    with quiet_libraries():
        results = Comparator.run(runners, data_loader=[c["feeds"] for c in cases], warm_up=1,
                                 save_inputs_path=str(tmp / f"{gdef.name}.inputs.json"))
        results.save(str(tmp / f"{gdef.name}.outputs.json"))
        RunResults([results[0]]).save(str(tmp / f"{gdef.name}.reference.outputs.json"))
    reference = results[0][1]
    runs = {name: [(it, it.runtime) for it in iterations] for name, iterations in list(results.items())[1:]}
    for name, backend in engine_backends.items():
        seen = set()  # the first case of each shape warms it up
        runs[name] = [_run_backend(backend, gdef.name, c["feeds"], warm_up=_first(seen, c["dims"])) for c in cases]
    tols = {name: (tol, None) for name in runs} | {name: engine_tol(backend, gdef.name)
                                                   for name, backend in engine_backends.items()}
    backends = {name: _backend_verdict(gdef, cases, reference, iterations, *tols[name], overrides)
                for name, iterations in runs.items()}
    opt = next(c["feeds"] for c in cases if c["kind"] == "random" and c["dims"] == gdef.opt_dims())
    for runner in runners[1:]:
        backends[runner.name]["latency_ms_at_opt"] = _runner_latency_ms(runner, opt)
    for name, backend in engine_backends.items():
        timed = [_run_backend(backend, gdef.name, opt, warm_up=False) for _ in range(TIMED_RUNS)]
        if timed[0] is not None:  # None: its engines do not take the opt shape (warmed above where they do)
            backends[name]["latency_ms_at_opt"] = float(np.median([t[1] for t in timed])) * 1e3
    return {
        "name": gdef.name,
        "file": entry["file"],
        "torch_latency_ms_at_opt": _runner_latency_ms(runners[0], opt),
        "cases": {"random": sum(c["kind"] == "random" for c in cases),
                  "recorded": sum(c["kind"] != "random" for c in cases)},
        "passed": all(b["passed"] for b in backends.values()),
        "backends": backends,
        "replay": replay_commands(entry["file"], bundle.resolve(), out.resolve(), gdef.name, tol, overrides),
    }


def check_bundle(bundle: Path | str, *, out: Path | str | None = None, model: str | None = None,
                 providers: list[str] | tuple[str, ...] = ("cpu",), tolerance: Tolerance | None = None,
                 tolerance_preset: str | None = None, bounds: dict | None = None, overrides: dict | None = None,
                 seed: int = 0, allow_pickle: bool = False, config: str | None = None, overwrite: bool = False,
                 e2e: bool = True, prompts=None, steps: int | None = None, guidance: float = 7.5,
                 recorded_per_graph: int = 3, min_image_psnr: float | None = None, engines=(),
                 threads: int = 0) -> dict:
    """Check ``bundle``; write ``report.json``, ``report.html``, the PNGs and the saved inputs / outputs into
    ``out``.

    ``tolerance`` replaces the defaults of ``tolerance_preset`` (or of the bundle's precision, or of an engine
    folder's coarser one) for every backend; ``bounds`` ({metric: value}) replace single bounds of them;
    ``overrides`` ({output: {metric: value}}, ``accuracy.parse_overrides``) override single outputs.
    With ``e2e`` (and a bundle that holds the whole pipeline) the PyTorch pipeline runs ``prompts`` along
    the bundle's schedule (``steps`` to shorten it); its graph inputs become recorded cases and every
    backend's pipeline is compared with it. ``engines``: engine folders built from this bundle (``build``:
    TensorRT, ONNX Runtime or PyTorch programs), checked like the providers. ``threads``: CPU threads of the
    ONNX Runtime sessions and of PyTorch's (process-wide) pool (0: the libraries' defaults, an ORT engine
    folder's own).
    Returns the report; ``report["passed"]`` is the verdict.
    """
    from . import e2e as e2e_mod
    from .report_html import write_html

    bundle = Path(bundle)
    manifest = read_manifest(bundle, "bundle")
    out = check_output(out or default_report_dir(bundle), overwrite, reads=(bundle, model, *engines))
    set_torch_threads(threads)  # process-wide, as make_backend sets it for run: the reference runs on this pool
    preset = tolerance_preset or manifest["precision"]
    bounds = {k: v for k, v in (bounds or {}).items() if v is not None}
    tol = tolerance or tolerance_for(preset).with_overrides(**bounds)
    overrides = overrides or {}
    unknown = sorted(set(overrides) - {o for g in manifest["graphs"] for o in (x["name"] for x in g["outputs"])})
    if unknown:
        raise InputError(f"--tolerance names outputs {unknown} that no graph of this bundle has")
    min_psnr = min_image_psnr if min_image_psnr is not None else E2E_MIN_PSNR.get(preset, E2E_MIN_PSNR["fp32"])
    # without the user's bounds, an engine folder in a coarser precision than the bundle gets its precision's
    auto_graph = preset if tolerance is None and tolerance_preset is None else None
    auto_e2e = preset if min_image_psnr is None and tolerance_preset is None else None

    def engine_tol(backend, graph: str) -> tuple[Tolerance, str | None]:
        own = backend_preset(auto_graph, backend, graph)
        return (tolerance_for(own).with_overrides(**bounds), own) if own else (tol, None)

    changed = _changed_since_export(bundle, manifest)
    providers = usable_providers(list(providers))
    sources, pipeline = reference_sources(manifest, model, allow_pickle, config)
    defs = reference_graphs(manifest, sources, pipeline)
    engine_folders = open_engine_folders(bundle, engines, threads)
    engine_backends = {label: f.backend for label, f in engine_folders.items()}
    engines_changed = {label: f.changed_files for label, f in engine_folders.items() if f.changed_files}
    prompts = list(prompts or e2e_mod.DEFAULT_PROMPTS)

    report = {
        "kind": "check-report",
        "bundle": str(bundle.resolve()),
        "precision": manifest["precision"],
        "tolerance": tol.to_json(),
        "tolerance_preset": preset,
        "tolerance_overrides": overrides,
        "reference": {name: src.describe() for name, src in sources.items()},
        "changed_files": changed,
        **({"engines_changed_files": engines_changed} if engines_changed else {}),
        "seed": seed,
        "threads": threads or None,  # the latencies' CPU threads (None: not set)
        "graphs": [],
    }
    if manifest["precision"] == "int8" and "cpu" in providers:
        report["cpu_int8_kernels"] = cpu_int8_kernels()  # which ORT kernels the CPU rows measured
    skipped = _e2e_impossible(manifest, guidance) if e2e else "disabled (--no-e2e)"
    run_e2e = skipped is None
    reference, schedule = [], None
    if run_e2e:
        schedule = Schedule.from_json(manifest["schedule"])
        schedule = schedule.with_steps(steps) if steps else schedule
        torch_backend = TorchBackend(list(defs.values()))
        log.info("recording %d PyTorch trajectories (%d steps)", len(prompts), schedule.steps)
        reference = e2e_mod.run_trajectories(bundle, manifest, torch_backend, prompts, schedule=schedule,
                                             seed=seed, guidance=guidance)
    calls = [c for t in reference for c in t.calls]
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        pictures = {}
        write_replay_script(tmp, tol, overrides)
        for entry in manifest["graphs"]:
            gdef = defs[entry["name"]]
            recorded = recorded_cases(calls, gdef.name, recorded_per_graph, "recorded")
            graph = _check_graph(gdef, entry, bundle, tmp, out, providers, tol, overrides, recorded, seed,
                                 engine_backends, engine_tol, threads)
            graph["bytes"] = sum(manifest["files"][f]["bytes"] for f in [entry["file"], *entry["data_files"]])
            report["graphs"].append(graph)
        if run_e2e:
            backends = {"bundle": torch_backend, **teacher_backend(manifest, sources["unet"], pipeline, defs)}
            report["e2e"] = _end_to_end(bundle, manifest, providers, engine_folders, prompts, schedule, reference,
                                        backends, seed, guidance, min_psnr, auto_e2e, tmp, pictures, threads)
        else:
            report["e2e"] = {"skipped": skipped}
        report["passed"] = all(g["passed"] for g in report["graphs"]) and report["e2e"].get("passed", True)
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
        write_html(report, pictures, tmp / "report.html")
    report["report_dir"] = str(out)
    return report


def _changed_since_export(bundle: Path, manifest: dict) -> list[str]:
    """The bundle's files whose sha256 is not the manifest's, each said in a warning (a check measures a changed
    bundle rather than refusing it); a corrupt ONNX file is an error now, not in the middle of the check."""
    changed = changed_files(bundle, manifest)
    for rel in changed:
        if rel.endswith(".onnx"):
            load_onnx(bundle / rel, load_external_data=False)
        if not (bundle / rel).is_file():
            log.warning("%s is missing (the manifest lists it)", rel)
        else:
            log.warning("%s changed since export (sha256 differs from the manifest)", rel)
    return changed


def _e2e_impossible(manifest: dict, guidance: float) -> str | None:
    """Why the whole pipeline cannot run on this bundle, or None."""
    if not manifest.get("pipeline"):
        return "the bundle holds UNet graphs only (no text encoder / VAE to run the pipeline)"
    unet_batch_max = min(g["profile"]["batch"]["max"] for g in unet_entries(manifest))
    if guidance > 1 and unet_batch_max < 2:
        return f"the UNet graphs take at most batch {unet_batch_max}; a guidance step needs 2"
    return None


def teacher_backend(manifest: dict, main, pipeline, defs: dict) -> dict:
    """``{"teacher": TorchBackend}`` running the source pipeline's own UNet in place of the bundle's main UNet
    (under the graph names the main UNet's full / plain steps use), when that UNet is a student; else ``{}``."""
    from dataclasses import replace

    from ..export.export import text_length
    from ..graphs.graphs import unet_graphs

    if pipeline is None or main.sha256 == pipeline.sha256:
        return {}
    profile = unet_entries(manifest)[0]["profile"]
    as_tuple = lambda axis: (axis["min"], axis["opt"], axis["max"])  # noqa: E731
    (plain,) = unet_graphs(pipeline.load_unet(), "unet", batch=as_tuple(profile["batch"]),
                           latent=as_tuple(profile["height"]), text_len=text_length(pipeline))
    names = manifest["unets"]["unet"]["graphs"]
    teacher = [replace(plain, name=names[role]) for role in ("plain", "full") if role in names]
    return {"teacher": TorchBackend(teacher + [d for d in defs.values() if d.component != "unet"])}


def _end_to_end(bundle, manifest, providers, engine_folders, prompts, schedule, reference, torch_backends: dict,
                seed, guidance, min_psnr, auto_preset: str | None, tmp: Path, pictures: dict,
                threads: int = 0) -> dict:
    from . import e2e as e2e_mod

    backends, columns = {}, [("torch", [t.image for t in reference])]
    diffs = []
    candidates = {f"ort-{p}": OrtBackend(bundle, p, threads=threads) for p in providers} | {
        label: f.backend for label, f in engine_folders.items()}
    opt = e2e_mod.opt_latent(manifest)
    references = {opt: reference}
    for name, backend in candidates.items():
        log.info("end to end on %s", name)
        latent = e2e_mod.e2e_latent(manifest, backend)
        if latent not in references:  # engines built for another size only: the reference at theirs
            log.info("recording the PyTorch trajectories at latent %s, the size %s was built for", latent, name)
            references[latent] = e2e_mod.run_trajectories(bundle, manifest, torch_backends["bundle"], prompts,
                                                          schedule=schedule, seed=seed, guidance=guidance,
                                                          latent=latent)
        folder = engine_folders.get(name)
        pipeline_of = (folder.path, folder.manifest) if folder else (bundle, manifest)
        cand = e2e_mod.run_trajectories(*pipeline_of, backend, prompts, schedule=schedule, seed=seed, guidance=guidance,
                                        latent=latent)  # an engine folder's own tokenizer and scheduler
        rows = e2e_mod.compare_trajectories(references[latent], cand)
        finite = all(r["final_latent"]["nonfinite"] == 0 and r["image_nonfinite"] == 0 for r in rows)
        worst_psnr = min(r["image_psnr"] for r in rows)
        own = backend_preset(auto_preset, backend) if folder else None
        bound = E2E_MIN_PSNR[own] if own else min_psnr
        backends[name] = {
            "passed": finite and worst_psnr >= bound,
            **({"tolerance_preset": own, "min_image_psnr": bound} if own else {}),
            **({"latent": list(latent)} if latent != opt else {}),
            "image_psnr": worst_psnr,
            "image_ssim": min(r["image_ssim"] for r in rows),
            "final_latent_rel_l2": max(r["final_latent"]["rel_l2"] for r in rows),
            "nonfinite": sum(r["final_latent"]["nonfinite"] + r["image_nonfinite"] for r in rows),
            "prompts": rows,
        }
        columns.append((name, [t.image for t in cand]))
        diffs.append((f"|{name} - torch| x10", [e2e_mod.diff_image(a.image, b.image)
                                                for a, b in zip(references[latent], cand)]))
    columns += diffs
    e2e_mod.plot_latent_errors({k: v["prompts"] for k, v in backends.items()}, tmp / "e2e_latent_error.png",
                               reference[0].plan)
    e2e_mod.image_grid([[col[1][i] for col in columns] for i in range(len(prompts))], [c[0] for c in columns],
                       tmp / "e2e_grid.png")
    pictures["e2e_latent_error.png"] = "per-step latent error (relative L2 vs the PyTorch pipeline)"
    pictures["e2e_grid.png"] = "images: PyTorch, each backend, amplified differences"
    cost = e2e_mod.acceleration_cost(bundle, manifest, torch_backends, prompts, schedule, reference, seed, guidance)
    for name, c in cost.items():
        accel, base = c.pop("images")
        e2e_mod.image_grid([[b, a, e2e_mod.diff_image(a, b)] for a, b in zip(accel, base)],
                           ["baseline", "accelerated", "|diff| x10"], tmp / f"cost_{name}.png")
        pictures[f"cost_{name}.png"] = f"quality cost of {name}: {c['what']}"
    return {
        "prompts": prompts,
        "steps": schedule.steps,
        "seed": seed,
        "guidance": guidance,
        "plan": [list(p) for p in reference[0].plan],
        "min_image_psnr": min_psnr,
        "passed": all(b["passed"] for b in backends.values()),
        "backends": backends,
        "acceleration_cost": cost,
    }


PIPELINE_FILES = ("tokenizer/", "scheduler/")  # what an engine folder's pipeline reads besides its engines


@dataclass(frozen=True)
class EngineFolder:
    """An engine folder opened for checking: where it is, its manifest, the backend that runs its engines, and
    the files that changed since it was built."""
    path: Path
    manifest: dict
    backend: Backend
    changed_files: list[str]


def open_engine_folders(bundle: Path, folders, threads: int = 0) -> dict[str, EngineFolder]:
    """``{label: EngineFolder}`` (label ``backend@folder-name``) for engine folders built from ``bundle`` as it is
    now (its manifest's sha256), whose pipeline is the bundle's: the same schedule and tokenizer and scheduler
    files (their own copies are what `run` and a server read, and the end-to-end check runs them)."""
    from ..artifacts import MANIFEST, sha256_file
    from ..runtime.folders import make_backend

    current = sha256_file(bundle / MANIFEST)
    ours = read_manifest(bundle, "bundle")
    opened = {}
    for folder in map(Path, folders):
        manifest = read_manifest(folder, "engines")
        rebuild = f"rebuild it: asdm-export build --bundle {bundle} --spec ... --out {folder} --overwrite"
        if manifest["bundle"]["manifest_sha256"] != current:
            raise InputError(f"engine folder '{folder}' was built from another bundle (or this one changed since); "
                             f"{rebuild}")
        theirs = {k: v.get("sha256") for k, v in manifest["files"].items() if k.startswith(PIPELINE_FILES)}
        mine = {k: v.get("sha256") for k, v in ours["files"].items() if k.startswith(PIPELINE_FILES)}
        differ = [k for k in ("schedule", "pipeline") if manifest.get(k) != ours.get(k)] + sorted(
            k for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k))
        if differ:
            raise InputError(f"engine folder '{folder}' does not run this bundle's pipeline: its {differ[0]} differs "
                             f"from the bundle's; {rebuild}")
        # every file hashed (opening a torch folder trusts unchanged file times); as for the bundle's graphs, a
        # changed file is said, and its numbers measured
        changed = changed_files(folder, manifest)
        for rel in changed:
            log.warning("%s changed since build (sha256 differs from the manifest of %s)", rel, folder)
        backend = make_backend(folder, manifest, manifest["backend"], files_checked=True, threads=threads)
        label = f"{backend.name}@{folder.name}"
        if label in opened:
            raise InputError(f"two engine folders named '{folder.name}' on {backend.name}; give distinct folders")
        opened[label] = EngineFolder(folder, manifest, backend, changed)
    return opened


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def ci_lines(report: dict) -> list[str]:
    """One verdict line per graph and one for end to end: the worst case per backend, and which cases failed."""
    lines = []
    for g in report["graphs"]:
        parts = []
        for name, b in g["backends"].items():
            w = b["worst"]
            parts.append(f"{name}{own_bounds(b)} max_abs={w['max_abs']:.2e} rel_l2={w['rel_l2']:.2e} "
                         f"cosine={w['cosine']:.7f} psnr={w['psnr']:.1f}dB nonfinite={w['nonfinite']}"
                         + (f" failed_cases={b['failed_cases']}" if b["failed_cases"] else ""))
        cases = f"{g['cases']['random']} random + {g['cases']['recorded']} recorded cases"
        lines.append(f"{'PASS' if g['passed'] else 'FAIL'} graph {g['name']} ({cases}): {'; '.join(parts)}")
    changed = {"the bundle": report.get("changed_files", []), **report.get("engines_changed_files", {})}
    for where, files in changed.items():
        if files:  # their numbers are measured above; a drift within the bounds would leave no other trace
            lines.append(f"WARN {len(files)} file(s) of {where} changed since it was written (sha256 differs from "
                         f"its manifest): {', '.join(files)}")
    e2e = report.get("e2e", {})
    if "skipped" in e2e:
        lines.append(f"SKIP end-to-end: {e2e['skipped']}")
    else:
        parts = [f"{name}{own_bounds(b)}{latent_of(b)} image_psnr={b['image_psnr']:.2f}dB "
                 f"ssim={b['image_ssim']:.5f} "
                 f"final_latent_rel_l2={b['final_latent_rel_l2']:.2e} nonfinite={b['nonfinite']}"
                 for name, b in e2e["backends"].items()]
        lines.append(f"{'PASS' if e2e['passed'] else 'FAIL'} end-to-end ({len(e2e['prompts'])} prompts, "
                     f"{e2e['steps']} steps, image_psnr >= {e2e['min_image_psnr']:g}dB): {'; '.join(parts)}")
    return lines
