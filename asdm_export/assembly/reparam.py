"""``reparam``: a student's ME-CondConv layers in their deployment form.

Per layer:
  * static fold, when the mix is fixed for the graph: a plain ``Conv2d`` with ``W = sum_j c_j W_j`` and
    ``b = sum_j c_j b_j``. The mix is fixed when the gate is zero or the router's weights are zero
    (a frozen router: ``s = sigmoid(bias)``), or, for a timestep router, when a timestep band is asked
    for: the mix is then evaluated at the band's fold timestep ``t*`` (exact there, and the largest
    change of any mix weight inside the band is recorded);
  * dynamic aggregation otherwise: ``AggregatedCondConv`` (``W(x) = W_1 + sum_k s_k D_k``, one batched
    convolution); ``dynamic="naive"`` keeps the K-convolution form instead (benchmark contrast only).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

import torch

from ..artifacts import atomic_output_dir, check_output, write_manifest
from ..errors import InputError
from ..models.condconv import MECondConv
from ..models.loading import ModelSource, resolve_model
from ..models.student import attach_router_hooks, condconv_layers, is_student_folder, save_student, set_layer

log = logging.getLogger(__name__)

DYNAMIC_FORMS = ("aggregate", "naive")


def time_embedding(unet, timesteps: torch.Tensor) -> torch.Tensor:
    """The ``temb`` every resnet receives for ``timesteps`` (diffusers' forward, up to the down blocks)."""
    timesteps = torch.as_tensor(timesteps, dtype=torch.float32).reshape(-1)
    probe = torch.zeros(timesteps.shape[0], 1, 1, 1)
    t_emb = unet.get_time_embed(sample=probe, timestep=timesteps)
    emb = unet.time_embedding(t_emb, None)
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    return emb


def timestep_mix(layer: MECondConv, temb: torch.Tensor) -> torch.Tensor:
    """The mix (T, K) of a timestep-routed layer for time embeddings ``temb`` (T, D)."""
    layer.temb = temb
    try:
        return layer.mix(None)
    finally:
        layer.temb = None


def parse_bands(text: str, num_train_timesteps: int = 1000) -> list[tuple[int, int]]:
    """``"0:500:1000"`` -> [(0, 500), (500, 1000)]; a band [lo, hi) holds integer timesteps lo..hi-1."""
    try:
        edges = [int(v) for v in str(text).split(":")]
    except ValueError:
        raise InputError(f"--bands '{text}' must be increasing integer timesteps separated by ':', e.g. 0:500:1000")
    if len(edges) < 2 or edges != sorted(set(edges)) or edges[0] < 0 or edges[-1] > num_train_timesteps:
        raise InputError(f"--bands '{text}' must be at least two increasing timesteps within 0..{num_train_timesteps}, "
                         "e.g. 0:500:1000")
    return list(zip(edges[:-1], edges[1:]))


def fold_timestep(lo: int, hi: int) -> float:
    """The timestep a band folds at: the middle of its integer timesteps."""
    return (lo + hi - 1) / 2


def reparam_unet(unet, *, band: tuple[int, int] | None = None, dynamic: str = "aggregate"):
    """A deployment copy of ``unet``; returns ``(unet, report)``. The input model is left unchanged."""
    if dynamic not in DYNAMIC_FORMS:
        raise InputError(f"unknown dynamic form '{dynamic}'; choose one of: {', '.join(DYNAMIC_FORMS)}")
    unet = copy.deepcopy(unet)
    layers = {n: m for n, m in condconv_layers(unet).items() if isinstance(m, MECondConv)}
    spec = copy.deepcopy(getattr(unet, "asdm_spec", None) or {})
    entries = spec.setdefault("layers", {})
    report = {"folded": [], "dynamic": [], "dynamic_form": dynamic, "band": list(band) if band else None,
              "t_fold": None, "max_mix_deviation": None}
    if band is not None:
        if not any(m.router_kind == "timestep" for m in layers.values()):
            raise InputError("--bands folds timestep routers per band, but this student has no timestep-routed "
                             "ME-CondConv layer")
        t_star = fold_timestep(*band)
        report["t_fold"] = t_star
        with torch.no_grad():
            temb_star = time_embedding(unet, torch.tensor([t_star]))
            temb_band = time_embedding(unet, torch.arange(band[0], band[1], dtype=torch.float32))
    deviation = 0.0
    with torch.no_grad():
        for name, layer in layers.items():
            if band is not None and layer.router_kind == "timestep":
                c = timestep_mix(layer, temb_star)[0]
                deviation = max(deviation, float((timestep_mix(layer, temb_band) - c).abs().max()))
            elif layer.mix_is_fixed():
                c = layer.fixed_mix()
            else:
                c = None
            if c is not None:
                set_layer(unet, name, layer.folded(c))
                entries.pop(name, None)
                report["folded"].append(name)
            elif dynamic == "aggregate":
                set_layer(unet, name, layer.aggregated())
                entries[name] = {**entries.get(name, {}), "module": "AggregatedCondConv", "experts": layer.experts,
                                 "router": layer.router_kind}
                entries[name].pop("impl", None)
                report["dynamic"].append(name)
            else:
                layer.impl = "naive"
                entries[name] = {**entries.get(name, {}), "module": "MECondConv", "experts": layer.experts,
                                 "router": layer.router_kind, "impl": "naive"}
                report["dynamic"].append(name)
    if band is not None:
        report["max_mix_deviation"] = deviation
    attach_router_hooks(unet)
    spec["reparam"] = report
    unet.asdm_spec = spec
    return unet.eval(), report


def _student_source(model: str | ModelSource, allow_pickle: bool) -> ModelSource:
    source = model if isinstance(model, ModelSource) else resolve_model(model, allow_pickle)
    folder = source.unet_folder
    if folder is None or not is_student_folder(folder):
        raise InputError(f"'{source.spec}' is not an assembled student (no asdm_student.json); "
                         "make one with `asdm-export assemble`")
    return source


def reparam(model: str | ModelSource, out: Path | str, *, bands: str | list[tuple[int, int]] | None = None,
            dynamic: str = "aggregate", overwrite: bool = False, allow_pickle: bool = False) -> dict:
    """Write the deployment form of a student to ``out``; with ``bands``, one student folder per band."""
    source = _student_source(model, allow_pickle)
    out = check_output(out, overwrite, reads=(source.path,))
    student = source.load_unet()
    if isinstance(bands, str):
        bands = parse_bands(bands)
    t0 = time.perf_counter()
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        if not bands:
            unet, report = reparam_unet(student, dynamic=dynamic)
            manifest = _write(unet, tmp, source, report, t0)
        else:
            entries = []
            for lo, hi in bands:
                unet, report = reparam_unet(student, band=(lo, hi), dynamic=dynamic)
                name = f"band-{lo:04d}-{hi:04d}"
                _write(unet, tmp / name, source, report, t0)
                entries.append({"timesteps": [lo, hi], "t_fold": report["t_fold"], "model": name,
                                "max_mix_deviation": report["max_mix_deviation"],
                                "folded": len(report["folded"]), "dynamic": len(report["dynamic"])})
                del unet
            (tmp / "bands.json").write_text(json.dumps({"bands": entries}, indent=2) + "\n")
            manifest = write_manifest(tmp, {"kind": "student-bands", "source": source.describe(), "bands": entries,
                                            "reparam_seconds": round(time.perf_counter() - t0, 2)})
    log.info("wrote re-parameterized student %s", out)
    return manifest


def _write(unet, folder: Path, source: ModelSource, report: dict, t0: float) -> dict:
    spec = dict(unet.asdm_spec)
    spec["reparam"] = {**report, "from": source.describe()}
    save_student(unet, folder, spec)
    return write_manifest(folder, {
        "kind": "student",
        "source": source.describe(),
        "plan": spec.get("plan"),
        "condconv": spec.get("condconv"),
        "condconv_layers": len(spec.get("layers", {})),
        "reparam": {k: (len(v) if k in ("folded", "dynamic") else v) for k, v in report.items()},
        "reparam_seconds": round(time.perf_counter() - t0, 2),
    })
