"""``export``: model -> export bundle (``manifest.json`` + ``graphs/*.onnx``).

Each graph is traced with torch's ONNX exporter, cleaned up (graphsurgeon, constant folding, shape
inference), optionally converted to fp16, and written into a temporary folder that is renamed into
place at the end, with a manifest describing every graph and hashing every file.
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from pathlib import Path

import torch

from . import onnx_passes
from .artifacts import atomic_output_dir, check_output, write_manifest
from .errors import InputError, StageError
from .graphs import GraphDef, unet_graphs
from .inheritance import InheritanceSpec
from .loading import ModelSource, resolve_model
from .schedule import Schedule

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")
MIN_OPSET = 17


def export_graph(gdef: GraphDef, folder: Path, precision: str, opset: int) -> dict:
    """Export one graph into ``folder/graphs``; return its manifest entry."""
    scratch = folder / "_scratch" / gdef.name
    scratch.mkdir(parents=True)
    raw = scratch / f"{gdef.name}.onnx"
    t0 = time.perf_counter()
    log.info("tracing %s to ONNX (opset %d)", gdef.name, opset)
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # tracer warnings about Python control flow are expected
            torch.onnx.export(
                gdef.module,
                gdef.example_inputs(),
                str(raw),
                dynamo=False,
                opset_version=opset,
                input_names=list(gdef.inputs),
                output_names=list(gdef.outputs),
                dynamic_axes=gdef.dynamic_axes(),
                do_constant_folding=True,
            )
    except (RuntimeError, TypeError, ValueError) as err:
        raise StageError(f"ONNX export of '{gdef.name}' failed: {str(err).splitlines()[0][:300]}") from err
    log.info("cleaning up %s (graphsurgeon, constant folding, shape inference)", gdef.name)
    model = onnx_passes.optimize(onnx_passes.load_onnx(raw))
    if precision == "fp16":
        log.info("converting %s to fp16 (normalisations and the timestep projection stay fp32)", gdef.name)
        model = onnx_passes.to_fp16(model)
    graphs = folder / "graphs"
    graphs.mkdir(exist_ok=True)
    files = onnx_passes.save_onnx(model, graphs / f"{gdef.name}.onnx")
    shutil.rmtree(scratch.parent, ignore_errors=True)
    return {
        "name": gdef.name,
        "component": gdef.component,
        "file": f"graphs/{gdef.name}.onnx",
        "data_files": [f"graphs/{p.name}" for p in files[1:]],
        "precision": precision,
        **onnx_passes.io_specs(model),
        "unet": gdef.owner,
        "role": gdef.role,
        "profile": gdef.profile_json(),
        "macs_at_opt": onnx_passes.count_macs(model, {n: gdef.shape_of(n, gdef.opt_dims()) for n in gdef.inputs}),
        "nodes": len(model.graph.node),
        "ops": onnx_passes.op_counts(model),
        "export_seconds": round(time.perf_counter() - t0, 2),
    }


def build_graphs(sources: dict[str, ModelSource], spec: InheritanceSpec = InheritanceSpec(), batch=(1, 2, 4),
                 latent=None) -> list[GraphDef]:
    """The graphs a bundle holds: for each named UNet, one plain graph or its full + inherit pair."""
    graphs = []
    for name, source in sources.items():
        graphs += unet_graphs(source.load_unet(), name, spec, batch=batch, latent=latent,
                              text_len=text_length(source))
    return graphs


def text_length(source: ModelSource) -> int:
    """Token count of the text encoder's output (77 for SD1.x / SD2.x)."""
    import json

    cfg = source.path / "text_encoder" / "config.json" if source.has_pipeline else None
    if cfg is not None and cfg.is_file():
        return int(json.loads(cfg.read_text()).get("max_position_embeddings", 77))
    return 77


def export_bundle(model: str | ModelSource, out: Path | str, *, precision: str = "fp32", opset: int = MIN_OPSET,
                  batch: tuple[int, int, int] = (1, 2, 4), latent: tuple[int, int, int] | None = None,
                  overwrite: bool = False, allow_pickle: bool = False, config: str | None = None,
                  inheritance: InheritanceSpec | None = None, schedule: Schedule | None = None,
                  unets: dict[str, str] | None = None) -> dict:
    """Export ``model`` to a bundle folder at ``out``; return the manifest.

    ``unets`` adds named UNets (e.g. students) beside the model's own, which is named ``unet``;
    ``inheritance`` applies to every UNet; ``schedule`` says which steps run which graph of which UNet.
    """
    if precision not in PRECISIONS:
        raise InputError(f"precision '{precision}' is not supported; choose one of {', '.join(PRECISIONS)}")
    if opset < MIN_OPSET:
        raise InputError(f"opset {opset} is too old; use {MIN_OPSET} or newer")
    spec = inheritance or InheritanceSpec()
    source = model if isinstance(model, ModelSource) else resolve_model(model, allow_pickle, config)
    sources = {"unet": source}
    for name, spec_text in (unets or {}).items():
        if name in sources or not name.isidentifier():
            raise InputError(f"UNet name '{name}' is taken or not a plain name (letters, digits, _)")
        sources[name] = resolve_model(spec_text, allow_pickle)
    schedule = schedule or Schedule(steps=50)
    schedule.validate(tuple(sources))
    if not spec.enabled and schedule.mode != "full":
        raise InputError("a schedule with inherit steps needs an inheritance level (--level block|layer|unit)")
    out = check_output(out, overwrite)  # fail before the (slow) model load
    graphs = build_graphs(sources, spec, batch=batch, latent=latent)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        entries = [export_graph(g, tmp, precision, opset) for g in graphs]
        manifest = write_manifest(tmp, {
            "kind": "bundle",
            "source": source.describe(),
            "precision": precision,
            "opset": opset,
            "unets": {
                name: {
                    "source": src.describe(),
                    "inheritance": spec.to_json(),
                    "points": [o["name"][len("cache."):] for e in entries if e["unet"] == name and e["role"] == "full"
                               for o in e["outputs"] if o["name"].startswith("cache.")],
                    "graphs": {e["role"]: e["name"] for e in entries if e["unet"] == name},
                }
                for name, src in sources.items()
            },
            "schedule": schedule.to_json(),
            "graphs": entries,
        })
    log.info("wrote bundle %s (%d graphs)", out, len(entries))
    return manifest
