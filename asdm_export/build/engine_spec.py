"""Engine specs: how ``build`` turns a bundle's graphs into engines, as data (``engines/*.yaml``).

A spec names its target (``trt``, ``ort`` or ``torch``). TensorRT specs carry the optimisation profiles (batch
per component and image size in pixels, as min/opt/max ranges or single sizes for static shapes) and the
builder settings; ONNX Runtime specs carry the session settings; PyTorch program specs carry static profiles
(one program per shape) and the program settings (device, dtype, compilation). ``graph_profiles`` translates a spec
profile into per-input min/opt/max shapes of one graph, from the graph's manifest entry alone (plain data:
no TensorRT needed); ``trt_builder.polygraphy_profile`` turns those into polygraphy's ``Profile``.
See engines/README.md for the format.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from ..artifacts import COMPONENTS  # a graph's "component" in a bundle manifest
from ..errors import InputError, first_line
from ..limits import THREADS_MAX

TARGETS = ("trt", "ort", "torch")
SHAPES = ("dynamic", "static")
HARDWARE_COMPATIBILITY = ("none", "ampere_plus", "same_compute_capability")  # TensorRT's enum, lower case
# Offline ORT levels whose saved model stays portable; "all" adds layout transforms (NCHWc) bound to this
# CPU, which ORT applies anyway when it loads the saved model.
ORT_LEVELS = ("disabled", "basic", "extended")
ORT_PROVIDERS = ("cpu", "cuda", "trt")
DEFAULT_VAE_SCALE = 8  # SD1.x / SD2.x; used when a bundle has no VAE to read it from

_TOP = {"trt": ("target", "shapes", "profiles", "builder", "description"),
        "ort": ("target", "session", "description"),
        "torch": ("target", "shapes", "profiles", "program", "description")}
_BUILDER = ("optimization_level", "timing_cache", "refittable", "version_compatible", "hardware_compatibility")
_SESSION = ("provider", "optimization_level", "threads")
_PROGRAM = ("device", "dtype", "compile")
TORCH_DEVICES = ("cuda", "cpu")
TORCH_DTYPES = ("fp16", "bf16", "fp32")
TORCH_COMPILE = ("off", "aoti")  # aoti: AOTInductor packages; program_store.SAVED_COMPILE (held equal in tests)
_PROFILE = ("image", "height", "width", "batch")


@dataclass(frozen=True)
class Range:
    min: int
    opt: int
    max: int

    @property
    def static(self) -> bool:
        return self.min == self.max

    def to_json(self) -> list[int]:
        return [self.min, self.opt, self.max]


@dataclass(frozen=True)
class ProfileSpec:
    """One optimisation profile: image height / width in pixels, batch per component (None: the graph's
    own exported batch range)."""

    height: Range
    width: Range
    batch: dict[str, Range | None]

    def to_json(self) -> dict:
        return {"height": self.height.to_json(), "width": self.width.to_json(),
                "batch": {k: v.to_json() if v else None for k, v in self.batch.items()}}


@dataclass(frozen=True)
class TrtSettings:
    optimization_level: int = 3
    timing_cache: str | None = None
    refittable: bool = False
    version_compatible: bool = False
    hardware_compatibility: str = "none"


@dataclass(frozen=True)
class OrtSettings:
    provider: str = "cpu"
    optimization_level: str = "extended"
    threads: int = 0  # intra-op threads; 0 = ONNX Runtime's default (one per core)


@dataclass(frozen=True)
class TorchSettings:
    device: str = "cuda"
    dtype: str | None = None  # None: fp16 on CUDA, fp32 on CPU
    compile: str = "aoti"


@dataclass(frozen=True)
class EngineSpec:
    name: str
    path: str | None
    target: str
    shapes: str = "dynamic"
    profiles: tuple[ProfileSpec, ...] = ()
    builder: TrtSettings | None = None
    session: OrtSettings | None = None
    program: TorchSettings | None = None
    description: str = ""

    def to_json(self) -> dict:
        data = {"name": self.name, "file": self.path, "target": self.target, "description": self.description}
        if self.target == "trt":
            data.update(shapes=self.shapes, profiles=[p.to_json() for p in self.profiles], builder=asdict(self.builder))
        elif self.target == "torch":
            data.update(shapes=self.shapes, profiles=[p.to_json() for p in self.profiles], program=asdict(self.program))
        else:
            data.update(session=asdict(self.session))
        return data

    def build_settings(self) -> dict:
        """What changes a built artifact (the cache key's spec part): not the timing cache's path, not threads."""
        if self.target == "trt":
            b = asdict(self.builder)
            b.pop("timing_cache")
            return {"target": "trt", **b}
        if self.target == "torch":
            return {"target": "torch", **asdict(self.program)}
        return {"target": "ort", "provider": self.session.provider,
                "optimization_level": self.session.optimization_level}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()


# ---- loading and validation ----------------------------------------------------------------------------

def resolve_spec_path(spec: Path | str) -> Path:
    """A path, or a bare name of a shipped spec (``ort-cpu`` -> ``engines/ort-cpu.yaml``)."""
    from ..data import ENGINES_DIR

    path = Path(spec)
    if path.is_file():
        return path
    if path.is_dir():
        raise InputError(f"engine spec '{spec}' is a folder; give a YAML file")
    if not path.suffix and path.parent == Path("."):
        shipped = ENGINES_DIR / f"{path.name}.yaml"
        if shipped.is_file():
            return shipped
    known = ", ".join(sorted(p.stem for p in ENGINES_DIR.glob("*.yaml") if p.stem != "tensorrt-onnx-ops"))
    raise InputError(f"engine spec '{spec}' not found; give a YAML file or one of: {known or '(none shipped)'}")


def load_spec(spec: Path | str) -> EngineSpec:
    import yaml

    path = resolve_spec_path(spec)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid YAML ({first_line(err)})") from err
    except OSError as err:  # a folder, or unreadable
        raise InputError(f"cannot read engine spec '{path}' ({err.strerror or err}); give a YAML file") from None
    return parse_spec(data, name=path.stem, path=str(path))


def parse_spec(data, name: str = "spec", path: str | None = None) -> EngineSpec:
    """Validate a spec given as plain data; every problem is one ``InputError`` line naming the key."""
    where = path or name

    def fail(key: str, msg: str):
        raise InputError(f"{where}: {key}: {msg}")

    if not isinstance(data, dict):
        raise InputError(f"{where}: an engine spec is a mapping with 'target: trt', 'target: ort' or 'target: torch'")
    target = data.get("target")
    if target not in TARGETS:
        fail("target", f"must be one of {', '.join(TARGETS)}, got {target!r}")
    _no_unknown(data, _TOP[target], "", fail, f"for target {target}")
    description = str(data.get("description", ""))
    if target == "ort":
        session = _section(data, "session", _SESSION, fail)
        provider = session.get("provider", "cpu")
        if provider not in ORT_PROVIDERS:
            fail("session.provider", f"must be one of {', '.join(ORT_PROVIDERS)}, got {provider!r}")
        level = session.get("optimization_level", "extended")
        if level == "all":
            fail("session.optimization_level", "'all' saves layout transforms bound to this machine's CPU; use "
                                                "'extended' (ONNX Runtime applies the rest when it loads the model)")
        if level not in ORT_LEVELS:
            fail("session.optimization_level", f"must be one of {', '.join(ORT_LEVELS)}, got {level!r}")
        threads = session.get("threads", 0)
        if not isinstance(threads, int) or isinstance(threads, bool) or not 0 <= threads <= THREADS_MAX:
            fail("session.threads", f"must be an integer from 0 (ONNX Runtime's default) to {THREADS_MAX}, "
                                    f"got {threads!r}")
        return EngineSpec(name, path, "ort", session=OrtSettings(provider, level, threads), description=description)

    shapes = data.get("shapes", "static" if target == "torch" else "dynamic")
    if shapes not in SHAPES:
        fail("shapes", f"must be one of {', '.join(SHAPES)}, got {shapes!r}")
    if target == "torch" and shapes != "static":
        fail("shapes", "PyTorch programs are exported (and compiled, captured) per static shape: use 'static', "
                       "with one profile per shape")
    raw = data.get("profiles")
    if not isinstance(raw, list) or not raw:
        fail("profiles", "give a list of one or more profiles (image size and batch per component)")
    profiles = tuple(_profile(p, f"profiles[{i}]", shapes, fail) for i, p in enumerate(raw))
    if target == "torch":
        prog = _section(data, "program", _PROGRAM, fail)
        device = prog.get("device", "cuda")
        if device not in TORCH_DEVICES:
            fail("program.device", f"must be one of {', '.join(TORCH_DEVICES)}, got {device!r}")
        dtype = prog.get("dtype")
        if dtype is not None and dtype not in TORCH_DTYPES:
            fail("program.dtype", f"must be one of {', '.join(TORCH_DTYPES)} (or left out: fp16 on CUDA, fp32 on "
                                  f"CPU), got {dtype!r}")
        compile_ = prog.get("compile", "aoti")
        compile_ = "off" if compile_ is False else compile_  # YAML 1.1 reads a bare `off` as false
        if compile_ not in TORCH_COMPILE:
            fail("program.compile", f"must be one of {', '.join(TORCH_COMPILE)}, got {compile_!r}")
        return EngineSpec(name, path, "torch", shapes, profiles,
                          program=TorchSettings(device, dtype or ("fp16" if device == "cuda" else "fp32"), compile_),
                          description=description)
    b = _section(data, "builder", _BUILDER, fail)
    level = b.get("optimization_level", 3)
    if not isinstance(level, int) or isinstance(level, bool) or not 0 <= level <= 5:
        fail("builder.optimization_level", f"must be an integer from 0 to 5 (TensorRT's default: 3), got {level!r}")
    cache = b.get("timing_cache")
    if cache is not None and (not isinstance(cache, str) or not cache.strip()):
        fail("builder.timing_cache",
             f"must be a path (may use {{tensorrt}}, {{sm}} and {{gpu}}) or null, got {cache!r}")
    flags = {}
    for key in ("refittable", "version_compatible"):
        flags[key] = b.get(key, False)
        if not isinstance(flags[key], bool):
            fail(f"builder.{key}", f"must be true or false, got {flags[key]!r}")
    hw = b.get("hardware_compatibility", "none")
    if hw not in HARDWARE_COMPATIBILITY:
        fail("builder.hardware_compatibility", f"must be one of {', '.join(HARDWARE_COMPATIBILITY)}, got {hw!r}")
    return EngineSpec(name, path, "trt", shapes, profiles, TrtSettings(level, cache, flags["refittable"],
                                                                      flags["version_compatible"], hw),
                      description=description)


def _no_unknown(data: dict, known, prefix: str, fail, context: str = "") -> None:
    for key in data:
        if key not in known:
            fail(f"{prefix}{key}", f"unknown key{' ' + context if context else ''} (known: {', '.join(known)})")


def _section(data: dict, key: str, known, fail) -> dict:
    section = data.get(key) or {}
    if not isinstance(section, dict):
        fail(key, "must be a mapping")
    _no_unknown(section, known, f"{key}.", fail)
    return section


def _range(value, key: str, shapes: str, fail) -> Range:
    """One size, or [min, opt, max]; static specs need min == opt == max."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value] * 3
    if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                 for v in value)):
        fail(key, f"expected one integer or [min, opt, max], got {value!r}")
    r = Range(*value)
    if not 1 <= r.min <= r.opt <= r.max:
        fail(key, f"need 1 <= min <= opt <= max, got {value}")
    if shapes == "static" and not r.static:
        fail(key, f"static shapes need one size (min = opt = max), got {value}")
    return r


def _profile(p, key: str, shapes: str, fail) -> ProfileSpec:
    if not isinstance(p, dict):
        fail(key, "a profile is a mapping with 'image' (or 'height' and 'width') and 'batch'")
    _no_unknown(p, _PROFILE, f"{key}.", fail)
    if "image" in p and ("height" in p or "width" in p):
        fail(key, "give 'image' (square) or 'height' and 'width', not both")
    if "image" in p:
        height = width = _range(p["image"], f"{key}.image", shapes, fail)
    elif "height" in p and "width" in p:
        height, width = _range(p["height"], f"{key}.height", shapes, fail), _range(p["width"], f"{key}.width",
                                                                                 shapes, fail)
    else:
        fail(key, "missing the image size: 'image' (pixels) or 'height' and 'width'")
    raw = p.get("batch")
    if raw is None:
        fail(f"{key}.batch", "missing; give one size / [min, opt, max] for every component, or a mapping "
                             f"per component ({', '.join(COMPONENTS)})")
    if isinstance(raw, dict):
        _no_unknown(raw, COMPONENTS, f"{key}.batch.", fail, "(components)")
        batch = {c: _range(raw[c], f"{key}.batch.{c}", shapes, fail) if c in raw else None for c in COMPONENTS}
        if shapes == "static" and None in batch.values():
            missing = [c for c, r in batch.items() if r is None]
            fail(f"{key}.batch", f"static shapes need a batch size for every component; missing {', '.join(missing)}")
    else:
        r = _range(raw, f"{key}.batch", shapes, fail)
        batch = {c: r for c in COMPONENTS}
    return ProfileSpec(height, width, batch)


# ---- spec profile -> per-input shapes of one graph -----------------------------------------------------

_DIM = re.compile(r"^([A-Za-z_]\w*)(?:/(\d+))?$")


def eval_dim(dim, dims: dict[str, int]) -> int:
    """A manifest dimension (int, axis name, or a product such as ``height/4*width/4`` / ``height*8``)."""
    if isinstance(dim, int):
        return dim
    total = 1
    for factor in str(dim).split("*"):
        factor = factor.strip()
        if factor.isdigit():
            total *= int(factor)
            continue
        m = _DIM.match(factor)
        if not m or m.group(1) not in dims:
            raise InputError(f"cannot evaluate dimension '{dim}' (known axes: {', '.join(dims)}); re-export the bundle")
        total *= dims[m.group(1)] // int(m.group(2) or 1)
    return total


ShapeTriple = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def graph_profiles(spec: EngineSpec, graph: dict, vae_scale_factor: int | None = None) -> list[dict[str, ShapeTriple]]:
    """Per spec profile, ``{input name: (min shape, opt shape, max shape)}`` for one graph of a bundle.

    Image sizes (pixels) become latent sizes (``/ vae_scale_factor``) for graphs with ``height`` / ``width``
    axes; the batch is the spec's for the graph's component. Every value must lie inside the range the
    graph was exported with, on its multiples.
    """
    scale = vae_scale_factor or DEFAULT_VAE_SCALE
    axes = graph.get("profile") or {}
    name = graph["name"]
    out = []
    for i, p in enumerate(spec.profiles):
        ranges: dict[str, Range] = {}
        for axis, exported in axes.items():
            if axis == "batch":
                r = p.batch.get(graph["component"])
                r = r or Range(exported["min"], exported["opt"], exported["max"])
                unit = "batch"
            elif axis in ("height", "width"):
                px = p.height if axis == "height" else p.width
                for v in px.to_json():
                    if v % scale:
                        raise InputError(f"{spec.name}: profiles[{i}]: {axis} {v} px is not a multiple of the VAE "
                                         f"scale factor {scale}")
                r = Range(px.min // scale, px.opt // scale, px.max // scale)
                unit = "latent"
            else:
                raise InputError(f"graph '{name}' has an axis '{axis}' that engine specs do not set; re-export it")
            lo, hi, mult = exported["min"], exported["max"], exported.get("multiple", 1)
            bad = [v for v in r.to_json() if not lo <= v <= hi or v % mult]
            if bad:
                shown = (f"{axis} {bad[0] * scale} px (latent {bad[0]})" if unit == "latent" else f"batch {bad[0]}")
                allowed = (f"{lo * scale}..{hi * scale} px in steps of {mult * scale}" if unit == "latent"
                           else f"{lo}..{hi}")
                raise InputError(f"{spec.name}: profiles[{i}]: {shown} is outside graph '{name}''s exported range "
                                 f"({allowed}); change the spec or re-export with wider --batch / --latent")
            ranges[axis] = r
        shapes = {}
        for inp in graph["inputs"]:
            triple = []
            for pick in ("min", "opt", "max"):
                dims = {a: getattr(r, pick) for a, r in ranges.items()}
                triple.append(tuple(eval_dim(d, dims) for d in inp["shape"]))
            shapes[inp["name"]] = tuple(triple)
        out.append(shapes)
    return out


def shapes_json(shapes: dict[str, ShapeTriple]) -> dict:
    return {n: {"min": list(t[0]), "opt": list(t[1]), "max": list(t[2])} for n, t in shapes.items()}
