"""``check``: run every graph of a bundle on each backend against the PyTorch module it came from.

Inputs are seeded random tensors at several shapes inside each graph's dynamic ranges. Execution goes
through polygraphy's ``Comparator`` (our torch runner + ONNX Runtime runners); the inputs and outputs
are saved in polygraphy's JSON format next to ``report.json`` so a failure replays with
``polygraphy run graphs/unet.onnx --onnxrt --load-inputs unet.inputs.json --load-outputs ...``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from .accuracy import Tolerance, compare_arrays, passes, tolerance_for
from .artifacts import atomic_output_dir, changed_files, check_output, read_manifest
from .errors import InputError
from .export import build_graphs
from .inheritance import InheritanceSpec
from .loading import ModelSource, resolve_model
from .onnx_passes import load_onnx
from .runners import TorchRunner, ort_runner, usable_providers

log = logging.getLogger(__name__)


def default_report_dir(bundle: Path) -> Path:
    bundle = Path(bundle).resolve()
    return bundle.with_name(bundle.name + "-check")


def _recorded_source(recorded: dict, what: str, allow_pickle: bool):
    """Re-open a model the manifest records, and make sure it is the same one (sha256)."""
    try:
        source = resolve_model(ModelSource.reopen_spec(recorded), allow_pickle, recorded.get("config"))
    except InputError as err:
        raise InputError(f"the bundle's source model for '{what}' is not available ({err}); "
                         "pass --model or re-export") from err
    if source.sha256 != recorded["sha256"]:
        raise InputError(f"the bundle's source model '{recorded['model']}' changed since export (sha256 differs); "
                         "re-export, or pass --model to compare against it anyway")
    return source


def reference_sources(manifest: dict, model: str | None = None, allow_pickle: bool = False,
                      config: str | None = None):
    """``(unets, pipeline)``: the models a bundle was exported from, verified by sha256. ``model``
    overrides the main UNet's model (and the pipeline's, when they were the same)."""
    override = resolve_model(model, allow_pickle, config) if model is not None else None
    main = manifest["unets"]["unet"]["source"]
    unets = {name: override if (name == "unet" and override) else _recorded_source(u["source"], name, allow_pickle)
             for name, u in manifest["unets"].items()}
    pipeline = None
    if manifest.get("pipeline"):
        same = manifest["source"]["sha256"] == main["sha256"]
        pipeline = override if (override and same) else _recorded_source(manifest["source"], "pipeline", allow_pickle)
    return unets, pipeline


def reference_graphs(manifest: dict, unets: dict, pipeline=None) -> dict:
    """Rebuild each exported graph's torch module with the inheritance and profile recorded at export."""
    entries = manifest["graphs"]
    profile = entries[0]["profile"]
    as_tuple = lambda axis: (axis["min"], axis["opt"], axis["max"])  # noqa: E731
    spec = InheritanceSpec.from_json(next(iter(manifest["unets"].values()))["inheritance"])
    defs = {g.name: g for g in build_graphs(unets, spec, batch=as_tuple(profile["batch"]),
                                            latent=as_tuple(profile["height"]), pipeline=pipeline)}
    missing = [e["name"] for e in entries if e["name"] not in defs]
    if missing:
        raise InputError(f"graphs {missing} have no PyTorch reference in this model; is --model the right one?")
    return defs


def _summarize(points: list[dict]) -> dict:
    """Worst case over all shapes and outputs."""
    metrics = [m for p in points for m in p["outputs"].values()]
    return {
        "max_abs": max(m["max_abs"] for m in metrics),
        "rel_l2": max(m["rel_l2"] for m in metrics),
        "cosine": min(m["cosine"] for m in metrics),
        "nonfinite": sum(m["nonfinite"] for m in metrics),
    }


def check_bundle(bundle: Path | str, *, out: Path | str | None = None, model: str | None = None,
                 providers: list[str] | tuple[str, ...] = ("cpu",), tolerance: Tolerance | None = None,
                 tolerance_preset: str | None = None, seed: int = 0, allow_pickle: bool = False,
                 config: str | None = None, overwrite: bool = False) -> dict:
    """Check ``bundle``; write ``report.json`` (and the saved inputs / outputs) into ``out``.

    ``tolerance`` overrides everything; otherwise the defaults of ``tolerance_preset`` (or of the
    bundle's precision) apply. Returns the report; ``report["passed"]`` is the verdict.
    """
    from polygraphy.comparator import Comparator

    bundle = Path(bundle)
    manifest = read_manifest(bundle, "bundle")
    out = check_output(out or default_report_dir(bundle), overwrite)
    tol = tolerance or tolerance_for(tolerance_preset or manifest["precision"])
    changed = changed_files(bundle, manifest)
    for rel in changed:
        if rel.endswith(".onnx"):
            load_onnx(bundle / rel, load_external_data=False)  # corrupt or truncated: a clear error now
        log.warning("%s changed since export (sha256 differs from the manifest)", rel)
    sources, pipeline = reference_sources(manifest, model, allow_pickle, config)
    defs = reference_graphs(manifest, sources, pipeline)
    providers = usable_providers(list(providers))

    report = {
        "kind": "check-report",
        "bundle": str(bundle.resolve()),
        "precision": manifest["precision"],
        "tolerance": tol.to_json(),
        "tolerance_preset": tolerance_preset or manifest["precision"],
        "reference": {name: src.describe() for name, src in sources.items()},
        "changed_files": changed,
        "seed": seed,
        "graphs": [],
    }
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        for entry in manifest["graphs"]:
            gdef = defs[entry["name"]]
            rng = np.random.default_rng(seed)
            points = gdef.check_points()
            feeds = [gdef.random_inputs(p, rng) for p in points]
            runners = [TorchRunner(gdef)] + [ort_runner(bundle / entry["file"], p) for p in providers]
            log.info("checking %s on %s at %d shapes", gdef.name, ", ".join(r.name for r in runners[1:]),
                     len(points))
            results = Comparator.run(runners, data_loader=feeds, warm_up=1,
                                     save_inputs_path=str(tmp / f"{gdef.name}.inputs.json"))
            results.save(str(tmp / f"{gdef.name}.outputs.json"))
            reference = results[0][1]
            backends = {}
            for runner_name, iterations in list(results.items())[1:]:
                per_point = []
                for dims, ref_it, cand_it in zip(points, reference, iterations):
                    outputs = {}
                    for name in gdef.outputs:
                        m = compare_arrays(ref_it[name], cand_it[name])
                        outputs[name] = {**m, "passed": passes(m, tol)}
                    per_point.append({"dims": dims, "outputs": outputs, "latency_ms": cand_it.runtime * 1e3,
                                      "passed": all(o["passed"] for o in outputs.values())})
                opt = gdef.opt_dims()
                backends[runner_name] = {
                    "passed": all(p["passed"] for p in per_point),
                    "worst": _summarize(per_point),
                    "latency_ms_at_opt": next((p["latency_ms"] for p in per_point if p["dims"] == opt), None),
                    "points": per_point,
                }
            ref_latency = next((it.runtime * 1e3 for d, it in zip(points, reference)
                                if d == gdef.opt_dims()), None)
            report["graphs"].append({
                "name": gdef.name,
                "file": entry["file"],
                "bytes": sum(manifest["files"][f]["bytes"] for f in [entry["file"], *entry["data_files"]]),
                "torch_latency_ms_at_opt": ref_latency,
                "passed": all(b["passed"] for b in backends.values()),
                "backends": backends,
            })
        report["passed"] = all(g["passed"] for g in report["graphs"])
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    report["report_dir"] = str(out)
    return report
