"""Engine folders of the torch backend: pruned programs saved once, loaded without re-exporting.

Exporting a UNet traces diffusers' Python (seconds per graph; minutes with compilation), so ``save_programs``
writes what ``export_program`` made, per (graph, shapes):

    manifest.json                 kind "engines", backend "torch": graphs, shapes, dtype, device, platform,
                                  cache keys, sha256 of every file
    programs/NAME.json            the program's graph: aten op names and their arguments (numbers, dtypes,
                                  devices, references to other nodes): data, no code
    programs/NAME.safetensors     its weights, each in the layout the program runs it in: a compiled program's
                                  4-d weights are channels_last, stored NHWC (listed in the file's metadata),
                                  so that loading them is a view of the file, not a 3.4 GB copy for SD1.5
    programs/NAME.aoti.pt2        optional (``compile="aoti"``): an AOTInductor package, native code compiled
                                  for this torch and this GPU (or CPU), like a TensorRT plan; without weights
                                  (but for tiny ones inductor writes into its code): at load it is handed the
                                  program's own (from its safetensors)

Opening a folder checks every file against the manifest by size and modification time, and hashes only the
files whose time changed (a copy made without keeping times): seconds of sha256 over GBs of weights at every
start otherwise. So a file changed in place with its time restored (or copied by ``cp -a`` / ``rsync -a`` from a
changed one) opens, native packages included, unhashed: ``check --engines`` hashes them all. Loading reads JSON
and safetensors only; nothing is unpickled (``torch.export.load`` would unpickle), and op names resolve only
inside ``torch.ops.aten`` (plus ``operator.getitem``). The graph format is our own rather than torch.export's
JSON schema because a pruned program is a flat aten graph that needs little, and torch's deserializer took 10 s
for the tiny UNet's 1200 nodes here (ours: 0.2 s for the same program, weights included). An AOTInductor
package is a shared library we built: it is used only where the platform it was built on (torch, CUDA, GPU)
matches.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import operator
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.fx

from ..artifacts import (atomic_output_dir, changed_files, link_or_copy, read_manifest, require_engines, sha256_file,
                         write_manifest)
from ..errors import InputError, StageError, first_line
from .programs import (Program, dtype_name, exact_fp32, op_count, parse_device, parse_dtype, to_channels_last,
                       to_contiguous)

log = logging.getLogger(__name__)

# 2: AOTInductor packages without weights (given the program's at load); a release that reads 1 only would run
# them without, and crash. 3: channels_last weights stored NHWC; a release that reads 2 would take them as
# NCHW. Older folders still load.
FORMAT_VERSION = 3
READABLE_FORMATS = (1, 2, 3)
NHWC_KEY = "asdm.nhwc"  # safetensors metadata: the tensors stored NHWC, to be read back as channels_last NCHW
SAVED_COMPILE = ("off", "aoti")  # what a saved folder may hold (engine_spec.TORCH_COMPILE)


def platform_info(device: torch.device, compile: str = "off") -> dict:
    """What a saved program depends on beyond its own files; with ``compile="aoti"`` also the CPU's vector
    extensions its packages' code was compiled for (``cpu_isa``)."""
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": device.type}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        info.update(cuda=torch.version.cuda, gpu=torch.cuda.get_device_name(index),
                    capability=".".join(map(str, torch.cuda.get_device_capability(index))))
    else:
        info["machine"] = platform.machine()
    if compile == "aoti":
        info["cpu_isa"] = compiled_isa()
    return info


EXTRA_ISA_FLAGS = {"-mavx512bf16": "avx512_bf16", "-mamx-fp16": "amx_fp16"}  # compiler flag -> CPU flag


def compiled_isa() -> str | None:
    """The vector extensions inductor compiles for on this machine (a CUDA package's host code too), as CPU
    flags: "avx512 avx512_vnni", "avx512 avx512_bf16", "avx2"; None where it compiles no vector code."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    isa = pick_vec_isa()
    if not isa:
        return None
    flags = str(isa).split()
    arch = isa.build_arch_flags()  # what the compiler is told; str() leaves out the optional extensions
    flags += [name for flag, name in EXTRA_ISA_FLAGS.items() if flag in arch.split()]
    return " ".join(flags)


def isa_lacking(isa: str | None) -> list[str]:
    """The extensions of ``isa`` this CPU lacks: a package compiled on an AVX-512 machine dies of an illegal
    instruction on an AVX2 one (torch's loader only warns). [] where unknown: no ISA recorded, or not x86 (the
    check covers x86 only)."""
    if not isa:
        return []
    from torch._inductor.cpu_vec_isa import x86_isa_checker

    have = set(x86_isa_checker())  # the CPU's flags, no compiler involved: a deployment machine may have none
    if not have:
        return []
    have |= {name for name in ("avx512_bf16", "amx_fp16")
             if getattr(torch.cpu, f"_is_{name}_supported", lambda: False)()}
    return [f for f in isa.split() if f not in have]


def shapes_key(shapes: dict[str, tuple[int, ...]]) -> str:
    return ",".join(f"{n}={'x'.join(map(str, s))}" for n, s in shapes.items())


def file_stem(program: Program) -> str:
    digest = hashlib.sha256(shapes_key(program.inputs).encode()).hexdigest()[:10]
    return f"{program.name}-{digest}"


def example_args(program: Program) -> tuple[torch.Tensor, ...]:
    return tuple(torch.zeros(s, dtype=program.input_dtypes[n], device=program.device)
                 for n, s in program.inputs.items())


# ---- the graph as JSON -------------------------------------------------------------------------------

def _encode(value):
    if isinstance(value, torch.fx.Node):
        return {"node": value.name}
    if isinstance(value, (list, tuple)):  # FX holds immutable_list / immutable_tuple subclasses
        return {"tuple" if isinstance(value, tuple) else "list": [_encode(v) for v in value]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    for kind in (torch.dtype, torch.device, torch.layout, torch.memory_format):
        if isinstance(value, kind):
            return {kind.__name__: str(value).removeprefix("torch.")}
    raise StageError(f"a program argument of type {type(value).__name__} cannot be saved")


def _target_name(target) -> str:
    if target is operator.getitem:
        return "getitem"
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten":
        return str(target)  # aten.NAME.OVERLOAD
    raise StageError(f"op {target} cannot be saved (only aten ops)")


def graph_to_json(gm: torch.fx.GraphModule) -> dict:
    nodes = []
    for n in gm.graph.nodes:
        if n.op == "call_function":
            nodes.append({"op": n.op, "name": n.name, "target": _target_name(n.target),
                          "args": _encode(n.args), "kwargs": {k: _encode(v) for k, v in n.kwargs.items()}})
        elif n.op in ("placeholder", "get_attr"):
            nodes.append({"op": n.op, "name": n.name, "target": n.target})
        elif n.op == "output":
            nodes.append({"op": n.op, "args": _encode(n.args)})
        else:
            raise StageError(f"program node {n.name} ({n.op}) cannot be saved")
    return {"nodes": nodes}


def _resolve(name: str):
    if name == "getitem":
        return operator.getitem
    space, op, overload = (name.split(".") + [""])[:3]
    packet = getattr(torch.ops.aten, op, None) if space == "aten" else None
    target = getattr(packet, overload, None) if packet is not None else None
    if not isinstance(target, torch._ops.OpOverload):
        raise InputError(f"op '{name}' does not exist in torch {torch.__version__}")
    return target


_KINDS = {"dtype": lambda v: getattr(torch, v, None), "layout": lambda v: getattr(torch, v, None),
          "memory_format": lambda v: getattr(torch, v, None)}


def _decode(value, env: dict, device: torch.device):
    if isinstance(value, dict):
        (kind, inner), = value.items()
        if kind == "node":
            return env[inner]
        if kind in ("list", "tuple"):
            items = [_decode(v, env, device) for v in inner]
            return items if kind == "list" else tuple(items)
        if kind == "device":  # the device it was saved on -> the device it loads on (same type)
            return device if torch.device(inner).type == device.type else torch.device(inner)
        value = _KINDS[kind](inner)
        if not isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            raise InputError(f"'{inner}' is not a torch {kind}")
        return value
    return value


def graph_from_json(data: dict, root: torch.nn.Module, device: torch.device) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    env: dict[str, torch.fx.Node] = {}
    for n in data["nodes"]:
        if n["op"] == "placeholder":
            env[n["name"]] = graph.placeholder(n["name"])
        elif n["op"] == "get_attr":
            env[n["name"]] = graph.get_attr(n["target"])
        elif n["op"] == "call_function":
            args = _decode(n["args"], env, device)
            kwargs = {k: _decode(v, env, device) for k, v in n["kwargs"].items()}
            env[n["name"]] = graph.call_function(_resolve(n["target"]), tuple(args), kwargs)
        elif n["op"] == "output":
            graph.output(_decode(n["args"], env, device)[0])
    gm = torch.fx.GraphModule(root, graph)
    gm.graph.lint()
    return gm


def exported_program(program: Program, channels_last: bool = False):
    """The pruned program as an ``ExportedProgram`` again, for AOTInductor (a flat aten graph re-exports in well
    under a second). ``channels_last``: 4-d weights and inputs in channels_last (what cuDNN and inductor's
    convolutions prefer); the program module is converted in place, the values stay the same."""
    args = example_args(program)
    if channels_last:
        to_channels_last(program.module)
        args = tuple(a.contiguous(memory_format=torch.channels_last) if a.dim() == 4 else a for a in args)
    return torch.export.export(program.module, args, strict=False)


def graph_sources(bundle_manifest: dict) -> dict[str, str]:
    """Graph name -> the sha256 of its bundle files, graph and external data (a graph over 2 GB keeps its weights
    only in the data file): what a program is made from, for its key."""
    files = bundle_manifest.get("files", {})
    sources = {}
    for e in bundle_manifest["graphs"]:
        rels = [e["file"], *e.get("data_files", [])]
        if all(r in files for r in rels):
            sources[e["name"]] = ":".join(files[r]["sha256"] for r in rels)
    return sources


def program_key(name: str, inputs: dict, source: str, dtype: str, compile: str, info: dict) -> str:
    """The identity of a saved program: what it was made from (``source``: its bundle graph's sha256), its input
    shapes, the backend's dtype and compile settings, the platform and this release. ``build`` computes it
    before exporting anything, to reuse a program saved before (``--cache``, or the folder it overwrites)."""
    from .. import __version__

    data = {"format": FORMAT_VERSION, "asdm-export": __version__, "name": name, "source": source,
            "inputs": {n: [int(d) for d in s] for n, s in inputs.items()}, "dtype": dtype, "compile": compile,
            "platform": info}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def save_programs(programs: list[Program], out: Path | str, *, dtype: str | None = None, compile: str = "off",
                  overwrite: bool = False, source: dict | None = None, extra: dict | None = None,
                  include: list[Path] = (), on_program=None, reused: list[tuple[dict, Path, str]] = (),
                  device: torch.device | None = None) -> dict:
    """Write ``programs`` as an engine folder at ``out`` (atomically); return its manifest.

    ``dtype``: the backend's setting (programs that force their precision, the VAE, keep theirs); default the
    first program's. ``compile="aoti"`` also compiles each program with AOTInductor; a compilation that fails
    leaves that program uncompiled, with one log line. ``source`` (graph name -> e.g. the bundle's graph
    sha256) goes into the manifest and the cache keys. ``extra``: more manifest fields (``build`` records the
    bundle, spec, schedule and pipeline); ``include``: folders copied in (the bundle's tokenizer, scheduler);
    ``on_program(name, state)`` reports progress. ``reused``: programs saved before, as ``(manifest entry,
    folder holding its files, how it was found)``, linked in unchanged; ``device``: where the programs run
    (default: the first program's)."""
    if compile not in SAVED_COMPILE:
        raise InputError(f"unknown compile setting '{compile}'; choose one of {', '.join(SAVED_COMPILE)}")
    if not programs and not reused:
        raise InputError("no programs to save; run the graphs once (or export them) first")
    if not programs and (dtype is None or device is None):
        raise InputError("saving reused programs alone needs the backend's dtype= and device=")
    device = device if device is not None else programs[0].device
    devices = {p.device.type for p in programs} | {device.type}
    if len(devices) > 1:
        raise InputError(f"programs on several devices ({', '.join(sorted(devices))}); save each device's apart")
    info = platform_info(device, compile)
    dtype = dtype or dtype_name(programs[0].dtype)
    entries = []
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        (tmp / "programs").mkdir()
        for folder in include:
            shutil.copytree(folder, tmp / Path(folder).name)
        for entry, folder, how in reused:
            for rel in (entry["file"], *entry["data_files"]):
                link_or_copy(Path(folder) / Path(rel).name, tmp / rel)
            entries.append({**entry, "reused": how})
        fresh = []
        for program in programs:
            if on_program:
                on_program(program.name, "compiling" if compile == "aoti" else "saving")
            stem = file_stem(program)
            graph_json = json.dumps(graph_to_json(program.module)).encode()
            (tmp / "programs" / f"{stem}.json").write_bytes(graph_json)
            compiled = {}
            if compile == "aoti":  # first: the weights are saved in the layout the package is compiled for
                t0 = time.perf_counter()
                aoti = _compile_aoti(program, tmp / "programs" / f"{stem}.aoti.pt2")
                compiled = {"aoti": aoti, "compile_seconds": round(time.perf_counter() - t0, 1),
                            "channels_last": bool(aoti), "aoti_weights": "safetensors" if aoti else None}
            weights = tmp / "programs" / f"{stem}.safetensors"
            _save_weights(program.module, weights)
            entry = {
                "name": program.name, "stem": stem,
                "inputs": {n: list(s) for n, s in program.inputs.items()},
                "input_dtypes": {n: str(d).removeprefix("torch.") for n, d in program.input_dtypes.items()},
                "outputs": list(program.outputs), "dtype": dtype_name(program.dtype), "ops": program.ops,
                "ops_exported": program.ops_exported,
                "graph_sha256": hashlib.sha256(graph_json).hexdigest(), "weights_sha256": sha256_file(weights),
                "reused": None, **compiled,
            }
            # saved without a bundle (the Python API), a program is identified by its own graph and weights
            made_from = (source or {}).get(program.name) or f"{entry['graph_sha256']}:{entry['weights_sha256']}"
            entry["cache_key"] = program_key(program.name, program.inputs, made_from, dtype, compile, info)
            fresh.append(entry)
        if compile == "aoti":
            _keep_verified(tmp, fresh, device)
        for entry in fresh:  # the files of each, as build's other engine records list theirs
            entry["file"] = f"programs/{entry['stem']}.json"
            entry["data_files"] = [f"programs/{entry['stem']}.safetensors"] + (
                [f"programs/{entry['aoti']}"] if entry.get("aoti") else [])
        entries += fresh
        return write_manifest(tmp, {"kind": "engines", "backend": "torch", "torch_format": FORMAT_VERSION,
                                    "dtype": dtype, "platform": info,
                                    "compile": compile, "source": source or {}, **(extra or {}),
                                    "programs": entries}, times=True)


def _keep_verified(folder: Path, entries: list[dict], device: torch.device) -> None:
    """Drop the packages that do not load or do not match their program (one log line each); record the
    error of the others."""
    for stem, (err, why) in verify_packages(folder, entries, device).items():
        entry = next(e for e in entries if e["stem"] == stem)
        bound = AOTI_TOLERANCE[entry["dtype"]]
        if err is not None and err <= bound:
            entry["aoti_rel_l2"] = err
            continue
        why = why or f"its outputs differ from the program's by rel L2 {err:.2e} (> {bound:g})"
        log.warning("the AOTInductor package of %s is left out: %s; it runs uncompiled", entry["name"], why)
        (folder / "programs" / entry["aoti"]).unlink(missing_ok=True)
        entry.update(aoti=None, channels_last=False, aoti_weights=None, aoti_failure=why)


def _compile_aoti(program: Program, path: Path) -> str | None:
    name = program.name
    try:
        # the weights stay out of the package: inside its shared library they were a second copy that every
        # load extracted and read (15 s of the sd15 folder's 16 s start on a CPU); the program's safetensors
        # already hold them, and at load the package uses those tensors in place
        torch._inductor.aoti_compile_and_package(exported_program(program, channels_last=True),
                                                 package_path=str(path),
                                                 inductor_configs={"aot_inductor.package_constants_in_so": False})
    except Exception as err:  # no compiler, unsupported op, ...: the JSON program still runs
        log.warning("AOTInductor compilation of %s failed (%s); it runs uncompiled",
                    name, first_line(err, 200))
        path.unlink(missing_ok=True)
        if not program.channels_last:  # back to the layout it was exported with (unless compiled in this
            to_contiguous(program.module)  # process): an op on a weight's layout (a view) fails on channels_last
        return None
    return path.name


def _save_weights(module: torch.nn.Module, path: Path) -> None:
    """The module's parameters and buffers, each as laid out in memory: a channels_last 4-d tensor is written
    NHWC (safetensors stores contiguous tensors), so ``_load_weights`` gives it back channels_last as a view."""
    from safetensors.torch import save_file

    params = {n for n, _ in module.named_parameters()}
    tensors, nhwc = {}, []
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        key = f"{'param' if name in params else 'buffer'}.{name}"
        t = t.detach()
        if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
            t = t.permute(0, 2, 3, 1)
            nhwc.append(key)
        tensors[key] = t.contiguous()
    # safetensors refuses tensors that share memory: those get copies of their own (copying every tensor
    # held a second 3.4 GB for the SD1.5 UNet while it was written)
    sharing = collections.Counter(t.untyped_storage().data_ptr() for t in tensors.values())
    tensors = {k: t.clone() if sharing[t.untyped_storage().data_ptr()] > 1 else t for k, t in tensors.items()}
    save_file(tensors, str(path), metadata={NHWC_KEY: json.dumps(nhwc)})


def _load_weights(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(device)) as f:
        nhwc = set(json.loads((f.metadata() or {}).get(NHWC_KEY, "[]")))
        return {k: f.get_tensor(k).permute(0, 3, 1, 2) if k in nhwc else f.get_tensor(k) for k in f.keys()}


def read_program(folder: Path, entry: dict, device: torch.device) -> Program:
    """One saved program (its JSON graph and safetensors weights), uncompiled, on ``device``."""
    stem = folder / "programs" / entry["stem"]
    inputs = {n: tuple(s) for n, s in entry["inputs"].items()}
    in_dtypes = {n: _KINDS["dtype"](d) for n, d in entry["input_dtypes"].items()}
    if not all(isinstance(d, torch.dtype) for d in in_dtypes.values()):
        raise InputError(f"'{folder}': program {entry['name']} has an unknown input dtype; build it again")
    tensors = _load_weights(Path(f"{stem}.safetensors"), device)
    root = torch.nn.Module()
    for key, t in tensors.items():
        kind, _, name = key.partition(".")
        if kind == "param":
            root.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))
        else:
            root.register_buffer(name, t)
    try:
        gm = graph_from_json(json.loads(Path(f"{stem}.json").read_bytes()), root, device)
    except (KeyError, ValueError, TypeError, AttributeError, RuntimeError) as err:
        raise InputError(f"'{folder}': program {entry['name']} cannot be read ({err}); build it again") from err
    gm.eval()
    return Program(entry["name"], gm, inputs, in_dtypes, tuple(entry["outputs"]), device,
                   parse_dtype(entry["dtype"]), op_count(gm), entry["ops_exported"],
                   meta={"engine": str(folder), "cache_key": entry.get("cache_key")})


# ---- AOTInductor packages checked in a process of their own --------------------------------------------

# rel L2 of a package's outputs against its uncompiled program on the same random inputs: inductor reorders
# reductions and fuses, fp32 stays near 1e-6, fp16 / bf16 near their rounding
AOTI_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2}


def verify_packages(folder: Path, entries: list[dict], device: torch.device) -> dict[str, tuple[float | None, str]]:
    """Load and run every AOTInductor package of ``entries`` in a new process against its uncompiled program:
    ``{stem: (rel L2 or None, why not)}``. A package is native code: loading one can crash the process (seen:
    a segmentation fault in torch 2.11's CUDA loader), which no ``try`` catches; in a child the crash costs
    that package only, and the build keeps the program uncompiled. Also the first load on a machine pays its
    one-time costs here, at build time."""
    remaining = [e["stem"] for e in entries if e.get("aoti")]
    results: dict[str, tuple[float | None, str]] = {}
    listing = folder / ".verify.json"
    while remaining:
        listing.write_text(json.dumps({"device": str(device), "entries": [e for e in entries
                                                                          if e["stem"] in remaining]}))
        done = subprocess.run(_verify_command(folder, listing), capture_output=True, text=True)
        for line in done.stdout.splitlines():
            kind, _, rest = line.partition(" ")
            if kind in ("OK", "FAIL"):
                stem, _, value = rest.partition(" ")
                results[stem] = (float(value), "") if kind == "OK" else (None, value)
        remaining = [s for s in remaining if s not in results]
        if remaining:  # the child died on the first of these
            code = done.returncode
            why = (f"the process loading it died (signal {-code})" if code < 0 else
                   f"the process loading it failed (exit {code}): "
                   f"{(done.stderr.strip().splitlines() or [''])[-1][:200]}")
            results[remaining.pop(0)] = (None, why)
    listing.unlink(missing_ok=True)
    return results


def _verify_command(folder: Path, listing: Path) -> list[str]:
    return [sys.executable, "-m", "asdm_export.runtime.program_store", str(folder), str(listing)]


def _verify_main(folder: str, listing: str) -> None:
    """The child of ``verify_packages``: one line per package, flushed before the next is loaded."""
    def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a.double(), b.double()
        return float((a - b).norm() / b.norm().clamp_min(1e-30))

    data = json.loads(Path(listing).read_text())
    device = torch.device(data["device"])
    for entry in data["entries"]:
        try:
            program = read_program(Path(folder), entry, device)
            gen = torch.Generator(device="cpu").manual_seed(0)
            feeds = {n: (torch.randn(s, generator=gen) if program.input_dtypes[n].is_floating_point else
                         torch.randint(0, 50, s, generator=gen)).to(program.input_dtypes[n])
                     for n, s in program.inputs.items()}
            # as each runs in use: the uncompiled program on NCHW weights (an op on a weight's layout fails on
            # channels_last), fp32 on a GPU without TF32 (ProgramBackend's exact_fp32)
            to_contiguous(program.module)
            with exact_fp32(device.type == "cuda" and program.dtype == torch.float32):
                want = program(feeds)
                attach_package(program, Path(folder), entry)
                got = program(feeds)
            err = max(rel_l2(got[n], want[n]) for n in want)
            print(f"OK {entry['stem']} {err:.3e}", flush=True)
        except Exception as e:  # a Python-level failure of one package; the next is still checked
            print(f"FAIL {entry['stem']} {first_line(e, 200, with_type=True)}",
                  flush=True)


def load_programs(folder: Path | str, device: str | torch.device | None = None, aoti: bool = True,
                  files_checked: bool = False) -> list[Program]:
    """The programs of an engine folder written by ``save_programs``, on ``device`` (default: the device type
    they were saved for). AOTInductor packages are used when ``aoti`` and the platform matches.
    ``files_checked``: the caller has hashed every file and said which changed (``check --engines``, which
    measures a changed folder rather than refusing it)."""
    folder = Path(folder)
    manifest = read_manifest(folder, "engines")
    require_engines(folder, manifest, "torch")
    if manifest.get("torch_format") not in READABLE_FORMATS:
        raise InputError(f"'{folder}' was written by another version of asdm-export; build it again")
    t0, hashed = time.perf_counter(), []
    changed = [] if files_checked else changed_files(folder, manifest, trust_times=True, hashed=hashed)
    if changed:
        raise InputError(f"'{folder}' changed since it was built ({', '.join(changed[:3])}); build it again")
    files = manifest.get("files", {})
    if not files_checked:
        log.info("checked %d files (%.2f GB) in %.2f s; %d hashed (%.2f GB: their times differ from the build's)",
                 len(files), sum(f["bytes"] for f in files.values()) / 1e9, time.perf_counter() - t0, len(hashed),
                 sum(files[r]["bytes"] for r in hashed) / 1e9)
    built = manifest["platform"]
    device = parse_device(device or built["device"])
    if device.type != built["device"]:
        raise InputError(f"'{folder}' holds programs for {built['device']}, not {device.type}; build it again for "
                         f"{device.type}")
    here = platform_info(device)
    if built["torch"] != torch.__version__:
        log.warning("'%s' was built with torch %s, this is %s; loading its programs anyway", folder,
                    built["torch"], torch.__version__)
    packaged = aoti and any(e.get("aoti") for e in manifest["programs"])
    not_here = [f"{k} {built.get(k)} (here {here.get(k)})" for k in sorted({*here, *built} - {"cpu_isa"})
                if here.get(k) != built.get(k)]
    if packaged and not not_here:
        lacking = isa_lacking(built.get("cpu_isa"))
        not_here = [f"a CPU with {', '.join(lacking)}"] if lacking else []
    if packaged and not_here:  # one line for the folder, not one per program
        log.warning("'%s': its AOTInductor packages were built for %s; its programs run uncompiled", folder,
                    "; ".join(not_here))
    programs = []
    for entry in manifest["programs"]:
        t0 = time.perf_counter()
        program = read_program(folder, entry, device)
        log.info("%s: program read in %.2f s", entry["name"], time.perf_counter() - t0)
        if packaged and entry.get("aoti") and not not_here:
            t0 = time.perf_counter()
            try:
                attach_package(program, folder, entry)
                log.info("%s: AOTInductor package loaded in %.2f s", entry["name"], time.perf_counter() - t0)
            except (RuntimeError, StageError) as err:  # the build loaded it; a changed machine may not
                program.compiled, program.channels_last = None, False
                log.warning("%s: its AOTInductor package did not load (%s); it runs uncompiled", entry["name"],
                            first_line(err, 200))
        if program.compiled is None:
            # runs as exported, also where its package is not used (left out by the build's check, another
            # machine, a failed load): weights stored NHWC for a package back to NCHW, since an op on a weight's
            # layout (a view) fails on channels_last; copies only those
            to_contiguous(program.module)
        programs.append(program)
    return programs


def attach_package(program: Program, folder: Path, entry: dict) -> None:
    """Run ``program`` through its entry's AOTInductor package, taking inputs in the layout it was compiled for.
    A package built without weights (``aoti_weights``) is given the program's: its module's tensors, in the
    layout the package was compiled for, shared rather than copied."""
    device = program.device
    # single-threaded: the package's own thread synchronisation would conflict with CUDA graph capture
    compiled = torch._inductor.aoti_load_package(str(folder / "programs" / entry["aoti"]), run_single_threaded=True,
                                                 device_index=device.index if device.type == "cuda" else -1)
    weights = None
    if entry.get("aoti_weights") == "safetensors":  # a package with its own weights (format 1) needs none of ours
        if entry.get("channels_last"):  # format 3 stores them so (no copy here); format 2 stored them NCHW
            to_channels_last(program.module)
        # the package holds only pointers to its weights: the closure keeps them alive even if the module's
        # parameters are later replaced (a .to() on it)
        weights = _give_weights(compiled, program, entry)
    program.compiled = lambda *args, _weights=weights: tuple(compiled(*args))
    program.channels_last = bool(entry.get("channels_last"))


def _give_weights(compiled, program: Program, entry: dict) -> dict[str, torch.Tensor]:
    tensors = {**dict(program.module.named_parameters()), **dict(program.module.named_buffers())}
    wanted = compiled.get_constant_fqns()
    missing = [n for n in wanted if n not in tensors]
    if missing:  # a package that ran without them would read null pointers
        raise StageError(f"the AOTInductor package of {entry['name']} needs weights its program lacks "
                         f"({', '.join(missing[:3])}); build it again")
    weights = {n: tensors[n].detach() for n in wanted}
    try:  # in place: the package reads our tensors
        compiled.load_constants(weights, check_full_update=True, user_managed=True)
    except TypeError:  # a torch whose loader copies them: nothing of ours to keep alive
        compiled.load_constants(weights, check_full_update=True)
        return {}
    return weights


if __name__ == "__main__":  # verify_packages' child
    _verify_main(*sys.argv[1:3])
