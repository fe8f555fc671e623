"""Rebuilding a bundle's reference: the PyTorch modules its graphs were exported from, re-opened from the source
models its manifest records (verified by sha256) with the inheritance and profile recorded at export. Used by
``TorchBackend.from_bundle`` and by ``check``.
"""

from __future__ import annotations

from ..errors import InputError
from ..export.export import build_graphs
from ..graphs.inheritance import InheritanceSpec
from ..models.loading import ModelSource, resolve_model


# what a command without --model can do instead of the model a bundle was exported from (run, serve and build on
# the PyTorch program runtime)
WITHOUT_MODEL = "re-export the bundle from it, or use its ONNX graphs (--backend ort)"


def _recorded_source(recorded: dict, what: str, allow_pickle: bool, instead: str | None):
    """Re-open a model the manifest records, and make sure it is the same one (sha256)."""
    try:
        source = resolve_model(ModelSource.reopen_spec(recorded), allow_pickle, recorded.get("config"))
    except InputError as err:
        raise InputError(f"the bundle's source model for '{what}' is not available ({err}); "
                         f"{instead or 'pass --model or re-export'}") from err
    if source.sha256 != recorded["sha256"]:
        raise InputError(f"the bundle's source model '{recorded['model']}' changed since export (sha256 differs); "
                         f"{instead or 're-export, or pass --model to compare against it anyway'}")
    return source


def reference_sources(manifest: dict, model: str | None = None, allow_pickle: bool = False,
                      config: str | None = None, instead: str | None = None):
    """``(unets, pipeline)``: the models a bundle was exported from, verified by sha256. ``model``
    overrides the main UNet's model (and the pipeline's, when they were the same). ``instead``: what a missing
    or changed model's line says to do (default: pass --model, as ``check`` takes it, or re-export)."""
    override = resolve_model(model, allow_pickle, config) if model is not None else None
    main = manifest["unets"]["unet"]["source"]
    unets = {name: override if (name == "unet" and override) else
             _recorded_source(u["source"], name, allow_pickle, instead) for name, u in manifest["unets"].items()}
    pipeline = None
    if manifest.get("pipeline"):
        same = manifest["source"]["sha256"] == main["sha256"]
        pipeline = override if (override and same) else _recorded_source(manifest["source"], "pipeline",
                                                                          allow_pickle, instead)
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
    for entry in entries:
        differs = _interface_difference(entry, defs[entry["name"]])
        if differs:
            raise InputError(f"graph {entry['name']}: {differs}; is --model the model the bundle was exported from?")
    return defs


def _interface_difference(entry: dict, gdef) -> str | None:
    """Where the rebuilt module's inputs / outputs differ from the exported graph's (another model's widths):
    said here, not as ONNX Runtime's shape errors on inputs made for the other one."""
    for kind, ours in (("inputs", gdef.inputs), ("outputs", gdef.outputs)):
        theirs = {t["name"]: t.get("shape") for t in entry[kind]}
        # the exporter drops inputs a graph does not use (a unit-level inherit graph's text embeddings)
        unknown = sorted(set(theirs) - set(ours)) if kind == "inputs" else sorted(set(theirs) ^ set(ours))
        if unknown:
            return f"the reference has {kind} {sorted(ours)}, the bundle's graph {sorted(theirs)}"
        for name, shape in theirs.items():
            fixed = [(a, b) for a, b in zip(shape or (), ours[name]) if isinstance(a, int) and isinstance(b, int)]
            if shape is not None and (len(shape) != len(ours[name]) or any(a != b for a, b in fixed)):
                show = [d if isinstance(d, (int, str)) else getattr(d, "name", "?") for d in ours[name]]
                return f"the reference's {name} has shape {show}, the bundle's {shape}"
    return None
