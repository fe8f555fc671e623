"""``assemble``: teacher UNet + pruning plan -> student folder with ME-CondConv layers (CLME experts).

Steps:
  1. ``resolve_plan`` checks the plan against the teacher's config and gives the student's config;
  2. every student weight is the teacher weight at the same position in the kept-layer order
     (student layer p of a stage <- teacher layer kept[p]); shapes are checked before any copy;
  3. in each stage that lost resnets, the chosen convolutions of every retained resnet become
     ``MECondConv``: expert 1 is the layer's own kernel, experts 2.. are the same-role kernels
     (conv1 with conv1, ...) of the stage's removed resnets with the same shape, nearest layer first;
     copies of the own kernel fill the remaining experts. The gate starts at zero, so the student
     computes exactly what the plain pruned student computes.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from ..artifacts import atomic_output_dir, check_output, write_manifest
from ..errors import InputError
from ..models import presets as model_presets
from ..models.condconv import ROUTERS, MECondConv
from ..models.gri import check_grid, install_gri, self_attention_layers
from ..models.loading import ModelSource, read_unet_config, resolve_model
from ..models.student import (AsdmUNet2DConditionModel, attach_router_hooks, install_layers, save_student, set_layer,
                              skeleton, unet_config)
from . import macs as macs_mod
from .plans import Layout, Plan, load_plan, plan_file, resolve_plan

log = logging.getLogger(__name__)

CONV_ROLES = ("conv1", "conv2", "conv_shortcut")
DEFAULT_CONVS = ("conv1", "conv2")  # the 3x3 convolutions hold the capacity; the 1x1 shortcut only adapts channels
DEFAULT_EXPERTS = 2  # SD-shaped plans remove one resnet per stage: own kernel + the removed one, no copies


# ---- the teacher's config without loading weights ----------------------------------------------------

def teacher_config(model: str | ModelSource, allow_pickle: bool = False, config: str | None = None) -> dict:
    """The teacher UNet's config; embedded presets and folders are read without loading any weights."""
    if isinstance(model, str) and model_presets.is_preset_id(model) and not model_presets.is_shipped(model):
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            return unet_config(UNet2DConditionModel(**model_presets.get_preset(model).unet).config)
    source = model if isinstance(model, ModelSource) else resolve_model(model, allow_pickle, config)
    folder = source.unet_folder
    if folder is not None and (folder / "config.json").is_file():
        return unet_config(read_unet_config(folder / "config.json"))
    return unet_config(source.load_unet().config)


def _refuse_condconv_teacher(folder: Path | None) -> None:
    from ..models.student import is_student_folder, read_spec

    if folder is not None and is_student_folder(folder) and read_spec(folder).get("layers"):
        raise InputError(f"'{folder}' is a student with ME-CondConv layers; assemble from a plain UNet "
                         "(fold its experts first with `asdm-export reparam`)")


# ---- plan -> weight mapping and CLME experts -----------------------------------------------------------

def weight_map(layout: Layout, teacher_shapes: dict[str, tuple], student_shapes: dict[str, tuple]) -> dict[str, str]:
    """Student weight -> teacher weight, checking that every shape matches, or differs only where
    ``partial_input`` allows (the deep input of the first up stage after a removed innermost stage)."""
    mapping = {}
    for key, shape in student_shapes.items():
        source = layout.teacher_key(key)
        if source not in teacher_shapes:
            raise InputError(f"plan '{layout.plan.name}': student weight '{key}' has no teacher weight '{source}'")
        if tuple(teacher_shapes[source]) != tuple(shape) and partial_input(layout, key, teacher_shapes[source],
                                                                           shape) is None:
            s_layer, t_layer, leaf = _layer_of(key), _layer_of(source), key[len(_layer_of(key)) + 1:]
            raise InputError(
                f"plan '{layout.plan.name}': student {s_layer} would inherit teacher {t_layer}, whose {leaf} has "
                f"shape {tuple(teacher_shapes[source])} where the student needs {tuple(shape)}; a down stage's first "
                "kept resnet must be the one taking the stage's input channels (0), an up stage's last kept resnet "
                "the one taking the outer skip (its last)")
        mapping[key] = source
    return mapping


_INPUT_LEAVES = {"norm1.weight": 0, "norm1.bias": 0, "conv1.weight": 1, "conv_shortcut.weight": 1}


def partial_input(layout: Layout, key: str, t_shape: tuple, s_shape: tuple) -> tuple[int, int] | None:
    """(channel axis, skip channels) where a student weight may inherit only part of its teacher's: the first
    resnet of the student's first up stage, when removing the innermost stage (and the mid block) changed the
    width of its deep input. Its input is ``cat(deep, skip)``: the skip channels mean what they meant in the
    teacher and inherit its weights; the deep channels now come from another layer (the teacher fed this resnet
    from the removed stage, the student feeds it the down path's last output) and have no teacher weights:
    their kernels start at zero (GroupNorm: scale 1, shift 0), so the assembled stage first computes what its
    skip part computes, and distillation learns the rest. None: not such a weight (shapes must match)."""
    parts = key.split(".")
    leaf = ".".join(parts[4:])
    if not layout.dropped or parts[:4] != ["up_blocks", "0", "resnets", "0"] or leaf not in _INPUT_LEAVES:
        return None
    axis = _INPUT_LEAVES[leaf]
    if len(t_shape) != len(s_shape) or any(a != b for i, (a, b) in enumerate(zip(t_shape, s_shape)) if i != axis):
        return None
    t_index = layout.dropped  # the teacher's up stage this one inherits; the stage before it was removed
    teacher_deep = list(reversed(layout.teacher_config["block_out_channels"]))[t_index - 1]
    skip = t_shape[axis] - teacher_deep
    return (axis, skip) if 0 < skip < s_shape[axis] else None


def _fit(layout: Layout, key: str, weight: torch.Tensor, shape: tuple) -> torch.Tensor:
    """A teacher weight for student weight ``key``: itself, or its part that ``partial_input`` allows."""
    if tuple(weight.shape) == shape:
        return weight.detach().clone()
    return inherit_partial(weight.detach(), shape, *partial_input(layout, key, tuple(weight.shape), shape),
                           key.split(".", 4)[4])


def inherit_partial(teacher: torch.Tensor, shape: tuple, axis: int, skip: int, leaf: str) -> torch.Tensor:
    """The student weight of ``partial_input``: the teacher's skip channels (the last ``skip`` along ``axis``)
    in place, the new deep channels at their neutral value."""
    out = torch.ones(shape, dtype=teacher.dtype) if leaf == "norm1.weight" else torch.zeros(shape, dtype=teacher.dtype)
    out.narrow(axis, shape[axis] - skip, skip).copy_(teacher.narrow(axis, teacher.shape[axis] - skip, skip))
    return out


def _layer_of(key: str) -> str:
    """``down_blocks.1.resnets.0.norm1.weight`` -> ``down_blocks.1.resnets.0`` (the key itself otherwise)."""
    parts = key.split(".")
    return ".".join(parts[:4]) if len(parts) > 4 and parts[2] in ("resnets", "attentions") else key.rpartition(".")[0]


def clme_sites(layout: Layout, teacher_shapes: dict[str, tuple], experts: int, convs: tuple[str, ...]) -> dict:
    """One entry per ME-CondConv: student conv name -> expert sources (teacher conv names, own first)."""
    sites = {}
    for stage in layout.stages:
        if stage.student is None or not stage.removed or stage.teacher == "mid_block":
            continue
        for p, t in enumerate(stage.kept):
            for role in convs:
                own = f"{stage.teacher}.resnets.{t}.{role}"
                if f"{own}.weight" not in teacher_shapes:
                    continue  # e.g. no conv_shortcut in a resnet that keeps its channel count
                shape = teacher_shapes[f"{own}.weight"]
                nearest = sorted(stage.removed, key=lambda r: (abs(r - t), r))
                donors = [f"{stage.teacher}.resnets.{r}.{role}" for r in nearest]
                donors = [d for d in donors if tuple(teacher_shapes.get(f"{d}.weight", ())) == tuple(shape)]
                sources = [own] + donors[:experts - 1]
                sources += [own] * (experts - len(sources))  # copies of the own kernel
                sites[f"{stage.student}.resnets.{p}.{role}"] = sources
    return sites


def _check_settings(experts: int, router: str, convs) -> tuple[str, ...]:
    if not isinstance(experts, int) or experts < 1:
        raise InputError(f"--experts must be 1 (plain pruned student) or more, got {experts}")
    if router not in ROUTERS:
        raise InputError(f"unknown router '{router}'; choose one of: {', '.join(ROUTERS)}")
    convs = tuple(convs)
    bad = [c for c in convs if c not in CONV_ROLES]
    if bad or not convs:
        raise InputError(f"--convs takes a comma-separated subset of {', '.join(CONV_ROLES)}, got "
                         f"'{','.join(convs)}'")
    return convs


def plan_student(plan: str | Plan, teacher_cfg: dict, experts: int = DEFAULT_EXPERTS, router: str = "input",
                 convs=DEFAULT_CONVS) -> tuple[Layout, dict[str, dict], AsdmUNet2DConditionModel]:
    """Resolve a plan without weights: the layout, the ME-CondConv layer entries and a meta-device student."""
    convs = _check_settings(experts, router, convs)
    layout = resolve_plan(load_plan(plan), teacher_cfg)
    teacher = skeleton(teacher_cfg)
    teacher_shapes = {k: tuple(v.shape) for k, v in teacher.state_dict().items()}
    student = skeleton(layout.config)
    weight_map(layout, teacher_shapes, {k: tuple(v.shape) for k, v in student.state_dict().items()})
    layers = {}
    if experts > 1:
        for name, sources in clme_sites(layout, teacher_shapes, experts, convs).items():
            layers[name] = {"module": "MECondConv", "experts": experts, "router": router, "impl": "aggregate",
                            "sources": sources}
        install_layers(student, layers)
        attach_router_hooks(student)
    return layout, layers, student


def build_student(teacher: torch.nn.Module, plan: str | Plan, experts: int = DEFAULT_EXPERTS, router: str = "input",
                  convs=DEFAULT_CONVS, gri: dict | None = None) -> tuple[AsdmUNet2DConditionModel, dict]:
    """The assembled student in memory (float32, eval) and its spec (the content of asdm_student.json)."""
    convs = _check_settings(experts, router, convs)
    teacher_cfg = unet_config(teacher.config)
    layout, layers, _ = plan_student(plan, teacher_cfg, experts, router, convs)
    t_state = teacher.state_dict()
    student = skeleton(layout.config)
    s_shapes = {k: tuple(v.shape) for k, v in student.state_dict().items()}
    mapping = weight_map(layout, {k: tuple(v.shape) for k, v in t_state.items()}, s_shapes)
    student.load_state_dict({k: _fit(layout, k, t_state[src], s_shapes[k]) for k, src in mapping.items()},
                            strict=True, assign=True)
    for name, entry in layers.items():
        resnet = student.get_submodule(name.rpartition(".")[0])
        conv = student.get_submodule(name)
        temb_dim = resnet.time_emb_proj.in_features if resnet.time_emb_proj is not None else None
        kernels = [(_fit(layout, f"{name}.weight", t_state[f"{src}.weight"], tuple(conv.weight.shape)),
                    t_state.get(f"{src}.bias")) for src in entry["sources"]]
        set_layer(student, name, MECondConv.from_kernels(conv, kernels, router, temb_dim, name=name))
    attach_router_hooks(student)
    spec = {
        "plan": layout.plan.to_dict(),
        "condconv": {"experts": experts, "router": router, "convs": list(convs)} if experts > 1 else None,
        "layers": layers,
    }
    if gri:
        spec["gri"] = gri_spec(student, gri)
        install_gri(student, spec["gri"])
    student.asdm_spec = spec
    return student.float().eval(), spec


def gri_spec(student, gri: dict) -> dict:
    """``{"stages": [...], "window": w, "pool": p}`` -> the student's GRI entry (its attn1 layers), checked
    against the native latent size."""
    spec = {"layers": self_attention_layers(student, list(gri["stages"])), "window": int(gri.get("window", 8)),
            "pool": int(gri.get("pool", 8))}
    check_grid(student, spec, int(student.config.sample_size))
    return spec


# ---- tables --------------------------------------------------------------------------------------------

def comparison(layout: Layout, teacher_cfg: dict, student: torch.nn.Module, latent: int | None = None) -> dict:
    """Parameters and MACs per teacher stage, teacher vs student (both counted on the meta device)."""
    latent = latent or int(teacher_cfg["sample_size"])
    teacher = skeleton(teacher_cfg)
    t_prof = macs_mod.profile(teacher, latent)
    s_prof = macs_mod.profile(student, latent)
    rows = []
    for name in macs_mod.stage_names(teacher):
        if name == macs_mod.OTHER or name == "total":
            s_name = name
        else:
            s_name = layout.stage(name).student
        rows.append({"stage": name, "student_stage": s_name,
                     "teacher_params": t_prof["params"][name], "student_params": s_prof["params"].get(s_name, 0),
                     "teacher_macs": t_prof["macs"][name], "student_macs": s_prof["macs"].get(s_name, 0)})
    rows.append({"stage": "total", "student_stage": "total",
                 "teacher_params": t_prof["params"]["total"], "student_params": s_prof["params"]["total"],
                 "teacher_macs": t_prof["macs"]["total"], "student_macs": s_prof["macs"]["total"]})
    return {"latent": latent, "batch": 1, "rows": rows}


def plan_table(model: str, plans: list[str] | None = None, latent: int | None = None, allow_pickle: bool = False,
               config: str | None = None) -> dict:
    """Teacher and plain pruned students for ``plans`` (default: every preset): parameters and MACs.

    Listing every preset, one that does not fit this teacher (say, its channel widths) becomes a row
    with no counts and the reason; a plan asked for by name raises instead."""
    from .plans import PRESETS

    cfg = teacher_config(model, allow_pickle, config)
    latent = latent or int(cfg["sample_size"])
    teacher = macs_mod.profile(skeleton(cfg), latent)
    rows = [{"plan": "teacher", "description": "", "params": teacher["params"]["total"],
             "macs": teacher["macs"]["total"]}]
    for name in plans or list(PRESETS):
        try:
            layout, _, student = plan_student(name, cfg, experts=1)
        except InputError as err:
            if plans:
                raise
            rows.append({"plan": name, "description": f"does not fit this teacher: {err}", "params": None,
                         "macs": None})
            continue
        prof = macs_mod.profile(student, latent)
        rows.append({"plan": layout.plan.name, "description": layout.plan.description,
                     "params": prof["params"]["total"], "macs": prof["macs"]["total"]})
    return {"model": str(model), "latent": latent, "batch": 1, "rows": rows}


# ---- the stage -----------------------------------------------------------------------------------------

def assemble(model: str | ModelSource, plan: str | Plan, out: Path | str, *, experts: int = DEFAULT_EXPERTS,
             router: str = "input", convs=DEFAULT_CONVS, gri: dict | None = None, overwrite: bool = False,
             allow_pickle: bool = False, config: str | None = None, latent: int | None = None) -> dict:
    """Assemble a student from ``model`` following ``plan``; write it to ``out``; return the manifest."""
    convs = _check_settings(experts, router, convs)
    plan, plan_path = load_plan(plan), plan_file(plan)
    source = model if isinstance(model, ModelSource) else resolve_model(model, allow_pickle, config)
    _refuse_condconv_teacher(source.unet_folder)
    out = check_output(out, overwrite, reads=(source.path, plan_path))
    # Check the plan on the config before loading (and copying) any weights; a single-file checkpoint
    # has no config of its own, so it is loaded once, first.
    teacher = source.load_unet() if source.kind == "single-file" else None
    teacher_cfg = unet_config(teacher.config) if teacher is not None else teacher_config(source)
    layout, _, meta_student = plan_student(plan, teacher_cfg, experts, router, convs)
    if gri:
        gri_spec(meta_student, gri)  # a bad --gri is refused before any weight is loaded
    table = comparison(layout, teacher_cfg, meta_student, latent)
    t0 = time.perf_counter()
    if teacher is None:
        teacher = source.load_unet()
    student, spec = build_student(teacher, plan, experts, router, convs, gri)
    del teacher
    spec["teacher"] = source.describe()
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        save_student(student, tmp, spec)
        manifest = write_manifest(tmp, {
            "kind": "student",
            "source": source.describe(),
            "plan": spec["plan"],
            "condconv": spec["condconv"],
            "condconv_layers": len(spec["layers"]),
            "gri": spec.get("gri"),
            "comparison": table,
            "assemble_seconds": round(time.perf_counter() - t0, 2),
        })
    log.info("wrote student %s (%d ME-CondConv layers)", out, len(spec["layers"]))
    return manifest
