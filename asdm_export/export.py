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
from .graphs import GraphDef, unet_graph
from .loading import ModelSource, resolve_model

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
        "profile": gdef.profile_json(),
        "nodes": len(model.graph.node),
        "ops": onnx_passes.op_counts(model),
        "export_seconds": round(time.perf_counter() - t0, 2),
    }


def build_graphs(source: ModelSource, batch=(1, 2, 4), latent=None) -> list[GraphDef]:
    """The graphs a bundle holds for this model (the UNet for now)."""
    unet = source.load_unet()
    return [unet_graph(unet, batch=batch, latent=latent, text_len=text_length(source))]


def text_length(source: ModelSource) -> int:
    """Token count of the text encoder's output (77 for SD1.x / SD2.x)."""
    import json

    cfg = source.path / "text_encoder" / "config.json" if source.has_pipeline else None
    if cfg is not None and cfg.is_file():
        return int(json.loads(cfg.read_text()).get("max_position_embeddings", 77))
    return 77


def export_bundle(model: str | ModelSource, out: Path | str, *, precision: str = "fp32", opset: int = MIN_OPSET,
                  batch: tuple[int, int, int] = (1, 2, 4), latent: tuple[int, int, int] | None = None,
                  overwrite: bool = False, allow_pickle: bool = False, config: str | None = None) -> dict:
    """Export ``model`` to a bundle folder at ``out``; return the manifest."""
    if precision not in PRECISIONS:
        raise InputError(f"precision '{precision}' is not supported; choose one of {', '.join(PRECISIONS)}")
    if opset < MIN_OPSET:
        raise InputError(f"opset {opset} is too old; use {MIN_OPSET} or newer")
    source = model if isinstance(model, ModelSource) else resolve_model(model, allow_pickle, config)
    out = check_output(out, overwrite)  # fail before the (slow) model load
    graphs = build_graphs(source, batch=batch, latent=latent)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        entries = [export_graph(g, tmp, precision, opset) for g in graphs]
        manifest = write_manifest(tmp, {
            "kind": "bundle",
            "source": source.describe(),
            "precision": precision,
            "opset": opset,
            "graphs": entries,
        })
    log.info("wrote bundle %s (%d graphs)", out, len(entries))
    return manifest
