"""Student folders: a diffusers UNet folder plus ``asdm_student.json``.

Layout of a student folder (loadable with ``--model DIR`` by every command):

    config.json                            the student's UNet2DConditionModel config (diffusers' own)
    diffusion_pytorch_model.safetensors    all weights, ME-CondConv experts included
    asdm_student.json                      the plan, the teacher, the ME-CondConv settings and one entry per
                                           ME-CondConv layer (module type, experts, router, expert sources)
    manifest.json                          asdm-export manifest (inputs, tool versions, file hashes)

Loading builds the diffusers UNet from ``config.json`` on the meta device, swaps in the ME-CondConv
modules that ``asdm_student.json`` lists, and assigns the saved tensors (strict: every key must match).
A student without ME-CondConv layers is a plain diffusers UNet folder that diffusers loads as well.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.resnet import ResnetBlock2D

from ..artifacts import COUNT, shape_error
from ..errors import InputError
from .loading import read_unet_config
from .condconv import CONDCONV_TYPES, AggregatedCondConv, MECondConv, _Routed
from .gri import install_gri

STUDENT_FILE = "asdm_student.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
FORMAT = "asdm-student"
FORMAT_VERSION = 1
MODULES = {"MECondConv": MECondConv, "AggregatedCondConv": AggregatedCondConv}


class AsdmUNet2DConditionModel(UNet2DConditionModel):
    """A diffusers UNet assembled by asdm-export: pruned, with ME-CondConv layers where the spec says.

    Forward is diffusers' own; the only addition is a pre-hook on resnets whose convolutions route on
    the timestep, which hands them the resnet's ``temb`` argument (see ``attach_router_hooks``).
    """

    asdm_spec: dict | None = None


def is_student_folder(folder: Path) -> bool:
    return (Path(folder) / STUDENT_FILE).is_file()


def unet_config(config: dict) -> dict:
    """A config without diffusers' private keys (``_class_name``, ``_use_default_values``, ...)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items() if not k.startswith("_")}


def skeleton(config: dict, device: str | torch.device = "meta") -> AsdmUNet2DConditionModel:
    """The student's UNet built from its config, without initialising weights (meta device by default)."""
    with torch.device(device):
        return AsdmUNet2DConditionModel.from_config(unet_config(config))


def _parent(unet: torch.nn.Module, name: str):
    parent_name, _, attr = name.rpartition(".")
    return unet.get_submodule(parent_name), attr


def layer_module(unet: torch.nn.Module, name: str, entry: dict) -> torch.nn.Module:
    """A fresh (uninitialised) module for ``entry``, shaped like the plain convolution at ``name``."""
    try:
        resnet, attr = _parent(unet, name)
    except AttributeError:  # no such submodule
        resnet, attr = None, ""
    conv = getattr(resnet, attr, None)
    if not isinstance(conv, torch.nn.Conv2d) or not isinstance(resnet, ResnetBlock2D):
        raise InputError(f"{STUDENT_FILE} lists '{name}', which is not a resnet convolution of this UNet")
    cls = MODULES.get(entry.get("module"))
    if cls is None:
        raise InputError(f"{STUDENT_FILE}: '{name}' has unknown module '{entry.get('module')}'; "
                         f"known: {', '.join(MODULES)}")
    temb_dim = resnet.time_emb_proj.in_features if resnet.time_emb_proj is not None else None
    kwargs = dict(experts=int(entry["experts"]), router=entry["router"], temb_dim=temb_dim)
    if cls is MECondConv:
        kwargs["impl"] = entry.get("impl", "aggregate")
    with torch.device(conv.weight.device):
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.padding, **kwargs)


def set_layer(unet: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, attr = _parent(unet, name)
    setattr(parent, attr, module)


def install_layers(unet: torch.nn.Module, layers: dict[str, dict]) -> None:
    for name, entry in layers.items():
        set_layer(unet, name, layer_module(unet, name, entry))


# ---- timestep routers get the resnet's time embedding -------------------------------------------------

def _timestep_convs(resnet):
    for attr in ("conv1", "conv2", "conv_shortcut"):
        conv = getattr(resnet, attr, None)
        if isinstance(conv, _Routed) and conv.router_kind == "timestep":
            yield conv


def _give_temb(resnet, args, kwargs):
    temb = args[1] if len(args) > 1 else kwargs.get("temb")
    for conv in _timestep_convs(resnet):
        conv.temb = temb


def _take_temb(resnet, args, kwargs, output):
    for conv in _timestep_convs(resnet):
        conv.temb = None  # do not keep the last batch's tensor alive


def attach_router_hooks(unet: torch.nn.Module) -> int:
    """Hook every resnet with a timestep-routed convolution; returns how many. Safe to call again.

    Old hooks are found by function, not by handle, so this also works on a deep copy.
    """
    n = 0
    for module in unet.modules():
        if not isinstance(module, ResnetBlock2D):
            continue
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, fn in hooks.items() if fn in (_give_temb, _take_temb)]:
                del hooks[key]
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_pre_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_always_called.pop(key, None)
        if any(True for _ in _timestep_convs(module)):
            module.register_forward_pre_hook(_give_temb, with_kwargs=True)
            module.register_forward_hook(_take_temb, with_kwargs=True)
            n += 1
    return n


def condconv_layers(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in unet.named_modules() if isinstance(m, CONDCONV_TYPES)}


# ---- save / load -------------------------------------------------------------------------------------

def save_student(unet: torch.nn.Module, folder: Path, spec: dict) -> None:
    """Write config.json, the safetensors weights and asdm_student.json into ``folder``."""
    from safetensors.torch import save_file

    import diffusers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers = spec.get("layers", {})
    ours = layers or spec.get("gri")  # diffusers alone would load it without its experts / GRI attention
    config = {"_class_name": "AsdmUNet2DConditionModel" if ours else "UNet2DConditionModel",
              "_diffusers_version": diffusers.__version__, **unet_config(unet.config)}
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    state = {k: v.detach().contiguous() for k, v in unet.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / STUDENT_FILE).write_text(json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **spec},
                                                  indent=2) + "\n")


# what loading reads of asdm_student.json (artifacts.shape_error's notation)
_SPEC = {"format_version?": int, "layers?": {str: {"module": str, "experts": COUNT, "router": str, "impl?": str}},
         "gri?": ({"layers": [str], "window": COUNT, "pool": COUNT}, None)}


def read_spec(folder: Path) -> dict:
    path = Path(folder) / STUDENT_FILE
    try:
        spec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"'{path}' is not readable JSON ({err}); re-create the student") from err
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise InputError(f"'{path}' is not an asdm-export student description")
    version = spec.get("format_version", 0)
    if isinstance(version, int) and version > FORMAT_VERSION:  # said before its fields, which may be new ones
        raise InputError(f"'{path}' has format version {version}; this asdm-export reads up to "
                         f"{FORMAT_VERSION}: upgrade asdm-export")
    if wrong := shape_error(spec, _SPEC):
        raise InputError(f"'{path}' is damaged ({wrong}); re-create the student")
    return spec


def load_student(folder: Path | str) -> AsdmUNet2DConditionModel:
    """Load a student folder (float32, CPU, eval mode)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    spec = read_spec(folder)
    config = read_unet_config(folder / "config.json")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise InputError(f"student '{folder}' has no {WEIGHTS_FILE}")
    unet = skeleton(config)
    install_layers(unet, spec.get("layers", {}))
    state = load_file(str(weights))
    expected = set(unet.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        what = f"missing '{missing[0]}'" if missing else f"unexpected '{unexpected[0]}'"
        raise InputError(f"student '{folder}': weights do not match {STUDENT_FILE} ({what}, "
                         f"{len(missing)} missing, {len(unexpected)} unexpected); re-create the student")
    for key, value in unet.state_dict().items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise InputError(f"student '{folder}': '{key}' has shape {tuple(state[key].shape)}, "
                             f"expected {tuple(value.shape)}; re-create the student")
    unet.load_state_dict(state, strict=True, assign=True)
    unet.asdm_spec = spec
    attach_router_hooks(unet)
    install_gri(unet, spec.get("gri"))
    return unet.float().eval()
