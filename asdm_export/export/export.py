"""``export``: model -> export bundle (``manifest.json`` + ``graphs/*.onnx``).

Each graph is traced with torch's ONNX exporter, cleaned up (graphsurgeon, constant folding, shape
inference), optionally converted to fp16, and written into a temporary folder that is renamed into
place at the end, with a manifest describing every graph and hashing every file.
"""

from __future__ import annotations

import gc
import logging
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..artifacts import atomic_output_dir, check_output, write_manifest
from ..errors import InputError, StageError, first_line
from ..graphs.graphs import GraphDef, text_encoder_graph, unet_graphs, vae_decoder_graph, vae_scale_factor
from ..graphs.inheritance import InheritanceSpec
from ..graphs.schedule import DEFAULT_STEPS, Schedule, default_schedule
from ..models.loading import ModelSource, load_pipeline_part, load_scheduler, load_tokenizer, resolve_model
from ..models.student import condconv_layers, is_student_folder, read_spec
from . import onnx_passes

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")
MIN_OPSET = 17
# Names a UNet's graphs may not take: the text encoder's and VAE's graphs (a UNet named text_encoder crashed the
# export on the file its graph shares), and `asdm`, the loop model of a Triton repository (its graph model would
# replace the loop).
RESERVED_UNET_NAMES = ("text_encoder", "vae_decoder", "asdm")


@dataclass
class Traced:
    """A graph traced to a raw ONNX file, with what its manifest entry needs from the GraphDef."""

    meta: dict
    raw: Path
    opt_shapes: dict[str, tuple[int, ...]]
    seconds: float


def trace_graph(gdef: GraphDef, scratch: Path, precision: str, opset: int) -> Traced:
    """Trace ``gdef`` with torch's ONNX exporter into ``scratch``; nothing else needs torch after this."""
    folder = scratch / gdef.name
    folder.mkdir(parents=True)
    raw = folder / f"{gdef.name}.onnx"
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
        raise StageError(f"ONNX export of '{gdef.name}' failed: {first_line(err)}") from err
    meta = {"name": gdef.name, "component": gdef.component, "owner": gdef.owner, "role": gdef.role,
            "precision": precision, "profile": gdef.profile_json(),
            "output_shapes": {n: [d if isinstance(d, (int, str)) else d.name for d in shape]
                              for n, shape in gdef.outputs.items()}}
    return Traced(meta, raw, {n: gdef.shape_of(n, gdef.opt_dims()) for n in gdef.inputs}, time.perf_counter() - t0)


def finish_graph(traced: Traced, folder: Path) -> dict:
    """Clean up a traced graph, convert its precision, save it into ``folder/graphs``; return its entry."""
    t0 = time.perf_counter()
    name, precision = traced.meta["name"], traced.meta["precision"]
    log.info("cleaning up %s (graphsurgeon, constant folding, shape inference)", name)
    model = onnx_passes.optimize(onnx_passes.load_onnx(traced.raw))
    onnx_passes.set_output_shapes(model, traced.meta["output_shapes"])
    if precision == "fp16":
        log.info("converting %s to fp16 (normalisations and the timestep projection stay fp32)", name)
        model = onnx_passes.to_fp16(model)
    graphs = folder / "graphs"
    graphs.mkdir(exist_ok=True)
    files = onnx_passes.save_onnx(model, graphs / f"{name}.onnx")
    shutil.rmtree(traced.raw.parent, ignore_errors=True)
    return {
        **{k: traced.meta[k] for k in ("name", "component")},
        "file": f"graphs/{name}.onnx",
        "data_files": [f"graphs/{p.name}" for p in files[1:]],
        "precision": precision,
        **onnx_passes.io_specs(model),
        **{k: traced.meta[k] for k in ("owner", "role", "profile")},
        "macs_at_opt": onnx_passes.count_macs(model, traced.opt_shapes),
        "nodes": len(model.graph.node),
        "ops": onnx_passes.op_counts(model),
        "export_seconds": round(traced.seconds + time.perf_counter() - t0, 2),
    }


def export_graph(gdef: GraphDef, folder: Path, precision: str, opset: int = MIN_OPSET) -> dict:
    """Trace and finish one graph into ``folder/graphs``; return its manifest entry."""
    return finish_graph(trace_graph(gdef, folder / "_scratch", precision, opset), folder)


def build_graphs(sources: dict[str, ModelSource], spec: InheritanceSpec = InheritanceSpec(), batch=(1, 2, 4),
                 latent=None, pipeline: ModelSource | None = None) -> list[GraphDef]:
    """The graphs a bundle holds: for each named UNet, one plain graph or its full + inherit pair; and
    the text encoder and VAE decoder of ``pipeline`` (a whole pipeline) when given."""
    graphs, first = [], None
    for name, source in sources.items():
        unet = source.load_unet()
        warn_naive_condconv(name, unet)
        first = first or (name, source, unet.config)
        check_same_interface(first, (name, source, unet.config))
        graphs += unet_graphs(unet, name, spec, batch=batch, latent=latent, text_len=text_length(pipeline or source))
    if pipeline is not None:
        unet_graph = graphs[0]
        latent_range = (unet_graph.axes["height"].min, unet_graph.axes["height"].opt, unet_graph.axes["height"].max)
        text_encoder, vae = load_pipeline_part(pipeline, "text_encoder"), load_pipeline_part(pipeline, "vae")
        _, _, cfg = first
        pairs = {"text encoder's hidden size": (text_encoder.config.hidden_size, cfg.cross_attention_dim),
                 "VAE's latent channels": (vae.config.latent_channels, cfg.in_channels)}
        for what, (theirs, ours) in pairs.items():
            if theirs != ours:
                raise InputError(f"the {what} is {theirs} but the UNets take {ours}: the UNets come from another "
                                 f"model than '{pipeline.spec}'; export them with the model they were made from")
        graphs.append(text_encoder_graph(text_encoder, batch=batch))
        graphs.append(vae_decoder_graph(vae, latent_range))
    return graphs


def warn_naive_condconv(name: str, unet: torch.nn.Module) -> None:
    """A warning for ME-CondConv layers in the naive form (``reparam --dynamic naive``): their graphs run K
    convolutions per layer, which a deployed graph should not (the aggregated form runs one)."""
    from ..models.condconv import MECondConv

    naive = [m for m in condconv_layers(unet).values() if isinstance(m, MECondConv) and m.impl == "naive"]
    if naive:
        log.warning("UNet '%s' has %d ME-CondConv layer(s) in the naive form (%d convolutions each): kept for "
                    "comparison, not deployment; for deployment, `reparam --dynamic aggregate` (the default)",
                    name, len(naive), naive[0].experts)


def warn_steps_outside_bands(sources: dict[str, ModelSource], schedule: Schedule, source: ModelSource) -> None:
    """A warning for each UNet folded for a timestep band (``reparam --bands``) that the schedule runs at
    timesteps outside its band, by the model's scheduler: a fold is exact at its band's centre and drifts away
    from it, so this is usually a ``--switch`` that maps steps to the wrong band."""
    bands = {}
    for name, src in sources.items():
        folder = src.unet_folder
        if folder is not None and is_student_folder(folder):
            band = (read_spec(folder).get("reparam") or {}).get("band")
            if band:
                bands[name] = band
    if not bands or not source.has_pipeline:
        return
    try:
        scheduler = source.load_pipeline().scheduler if source.kind == "single-file" else load_scheduler(
            source.path / "scheduler")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # check_text_parts says what is wrong
        return
    scheduler.set_timesteps(schedule.steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    if len(timesteps) != schedule.steps:  # schedulers that call the UNet more than once a step: mapped at run time
        return
    outside: dict[str, list[int]] = {}
    for step, (unet, _) in enumerate(schedule.plan()):
        if unet in bands and not bands[unet][0] <= timesteps[step] < bands[unet][1]:
            outside.setdefault(unet, []).append(step)
    for unet, steps in outside.items():
        lo, hi = bands[unet]
        log.warning("UNet '%s' is folded for timesteps %d-%d, but the schedule runs it at %d step(s) outside them "
                    "(step %d: t %d); with %s at %d steps, give it the steps whose timesteps fall in its band "
                    "(--switch)", unet, lo, hi - 1, len(steps), steps[0], timesteps[steps[0]],
                    type(scheduler).__name__, schedule.steps)


def check_same_interface(first: tuple, other: tuple) -> None:
    """The UNets of one bundle run on the same latents and text embeddings: the same channels and
    cross-attention width (InputError naming the first difference)."""
    (name_a, src_a, a), (name_b, src_b, b) = first, other
    for key in ("in_channels", "out_channels", "cross_attention_dim"):
        if a.get(key) != b.get(key):
            raise InputError(f"UNet '{name_b}' ({src_b.spec}) has {key} {b.get(key)} but '{name_a}' ({src_a.spec}) "
                             f"has {a.get(key)}: the UNets of one bundle share latents and text embeddings; "
                             "use a student assembled from this model")


def pipeline_info(source: ModelSource, graphs: list[GraphDef]) -> dict | None:
    """What the runtime needs besides the graphs (folders copied into the bundle, sizes)."""
    vae = next((g for g in graphs if g.name == "vae_decoder"), None)
    if vae is None:
        return None
    unet = graphs[0].module.unet.config
    return {
        "tokenizer": "tokenizer",
        "scheduler": "scheduler",
        "vae_scale_factor": vae_scale_factor(vae.module.vae),
        "latent_channels": int(unet.in_channels),
        "sample_size": int(unet.sample_size),
        "text_length": text_length(source),
    }


def text_length(source: ModelSource) -> int:
    """Token count of the text encoder's output (77 for SD1.x / SD2.x)."""
    import json

    if source.kind == "single-file":
        return int(source.load_pipeline().text_encoder.config.max_position_embeddings) if source.has_pipeline else 77
    cfg = source.path / "text_encoder" / "config.json" if source.has_pipeline else None
    if cfg is not None and cfg.is_file():
        try:
            return int(json.loads(cfg.read_text()).get("max_position_embeddings", 77))
        except (OSError, ValueError, AttributeError, TypeError) as err:  # bad JSON, bytes, not an object
            raise InputError(f"'{cfg}' is not a readable text encoder config ({first_line(err, with_type=True)}); "
                             "re-create it") from None
    return 77


def check_text_parts(source: ModelSource) -> None:
    """The tokenizer and scheduler a bundle copies from a pipeline folder, and its text encoder's config:
    readable, said before minutes of export rather than after (or, for a scheduler, at the first `run`)."""
    if source.kind == "single-file" or not source.has_pipeline:
        return
    for part in ("tokenizer", "scheduler"):
        if not (source.path / part).is_dir():
            raise InputError(f"'{source.path}' has no {part}/ folder, which a bundle that runs needs; add it, or "
                             "export with --unet-only")
    load_tokenizer(source.path / "tokenizer", what="model's tokenizer/ folder")
    try:
        load_scheduler(source.path / "scheduler")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise InputError(f"cannot read the scheduler in '{source.path / 'scheduler'}' "
                         f"({first_line(err, with_type=True)}); re-create it") from None
    text_length(source)


def copy_text_parts(source: ModelSource, out: Path) -> None:
    """Tokenizer and scheduler into the bundle: copied from a pipeline folder, saved from the loaded pipeline
    for a single file (diffusers built them from --config or the hub)."""
    if source.kind == "single-file":
        pipe = source.load_pipeline()
        pipe.tokenizer.save_pretrained(str(out / "tokenizer"))
        pipe.scheduler.save_pretrained(str(out / "scheduler"))
        return
    for part in ("tokenizer", "scheduler"):
        shutil.copytree(source.path / part, out / part)


def _max_opset() -> int:
    """The newest opset the TorchScript-based exporter (``dynamo=False``) writes with this torch."""
    try:
        from torch.onnx import _constants
        return int(_constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
    except (ImportError, AttributeError):  # a private constant: where a torch lacks it, let the exporter judge
        return 10**6


def export_bundle(model: str | ModelSource, out: Path | str, *, precision: str = "fp32", opset: int = MIN_OPSET,
                  batch: tuple[int, int, int] = (1, 2, 4), latent: tuple[int, int, int] | None = None,
                  overwrite: bool = False, allow_pickle: bool = False, config: str | None = None,
                  inheritance: InheritanceSpec | None = None, schedule: Schedule | None = None,
                  unets: dict[str, str] | None = None, unet_only: bool = False) -> dict:
    """Export ``model`` to a bundle folder at ``out``; return the manifest.

    ``unets`` adds named UNets (e.g. students) beside the model's own, which is named ``unet``
    (``unets={"unet": STUDENT}`` replaces it, keeping the model's text encoder and VAE);
    ``inheritance`` applies to every UNet; ``schedule`` says which steps run which graph of which UNet.
    ``unet_only`` leaves out the text encoder and VAE decoder (the bundle then cannot ``run``).
    """
    if precision not in PRECISIONS:
        raise InputError(f"precision '{precision}' is not supported; choose one of {', '.join(PRECISIONS)}")
    if opset < MIN_OPSET:
        raise InputError(f"opset {opset} is too old; use {MIN_OPSET} or newer")
    max_opset = _max_opset()
    if opset > max_opset:
        raise InputError(f"opset {opset} is newer than torch's ONNX exporter writes ({max_opset}); "
                         f"use {MIN_OPSET} to {max_opset}")
    spec = inheritance or InheritanceSpec()
    source = model if isinstance(model, ModelSource) else resolve_model(model, allow_pickle, config)
    sources = {"unet": source}
    for name, spec_text in (unets or {}).items():
        if not name.isidentifier():
            raise InputError(f"UNet name '{name}' is not a plain name (letters, digits, _)")
        if name in RESERVED_UNET_NAMES:
            raise InputError(f"UNet name '{name}' is taken (a UNet's graphs may not be named "
                             f"{', '.join(RESERVED_UNET_NAMES)}); choose another")
        sources[name] = resolve_model(spec_text, allow_pickle)
    schedule = schedule or Schedule.parse(default_schedule(spec.enabled), DEFAULT_STEPS, None, tuple(sources))
    schedule.validate(tuple(sources))
    if not spec.enabled and schedule.mode != "full":
        raise InputError("a schedule with inherit steps needs an inheritance level (--level block|layer|unit)")
    out = check_output(out, overwrite, reads=[s.path for s in sources.values()])  # before the (slow) load
    if not unet_only:
        check_text_parts(source)
    warn_steps_outside_bands(sources, schedule, source)
    graphs = build_graphs(sources, spec, batch=batch, latent=latent,
                          pipeline=source if source.has_pipeline and not unet_only else None)
    if not source.has_pipeline and not unet_only:  # after the load: a file that cannot load says only that
        log.warning("'%s' holds a UNet only: the bundle gets no text encoder / VAE graphs, so it can be checked "
                    "and built but not run", source.spec)
    pipeline = pipeline_info(source, graphs)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        traced = [trace_graph(g, tmp / "_scratch", g.precision or precision, opset) for g in graphs]
        del graphs  # the torch modules: the ONNX passes below need the memory (SD1.5: 3.4 GB per UNet)
        gc.collect()
        entries = [finish_graph(t, tmp) for t in traced]
        shutil.rmtree(tmp / "_scratch", ignore_errors=True)
        if pipeline:
            copy_text_parts(source, tmp)
        manifest = write_manifest(tmp, {
            "kind": "bundle",
            "source": source.describe(),
            "precision": precision,
            "opset": opset,
            "unets": {
                name: {
                    "source": src.describe(),
                    "inheritance": spec.to_json(),
                    "points": [o["name"][len("cache."):] for e in entries if e["owner"] == name and e["role"] == "full"
                               for o in e["outputs"] if o["name"].startswith("cache.")],
                    "graphs": {e["role"]: e["name"] for e in entries if e["owner"] == name and e["component"] == "unet"},
                }
                for name, src in sources.items()
            },
            "schedule": schedule.to_json(),
            "pipeline": pipeline,
            "graphs": entries,
        })
    log.info("wrote bundle %s (%d graphs)", out, len(entries))
    return manifest
