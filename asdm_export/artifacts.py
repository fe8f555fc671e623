"""Artifact folders: atomic writes, manifests, file hashes, tool versions.

Every stage writes its output folder through ``atomic_output_dir``: the work happens in a hidden
sibling folder that is renamed into place only when the stage succeeds, so an error or Ctrl-C never
leaves a half-written artifact behind.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .errors import InputError, OutputExistsError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1  # of every manifest this release writes; newer ones are refused, not misread


def check_output(out: Path | str, overwrite: bool, reads: Iterable[Path | str | None] = ()) -> Path:
    """Refuse an existing output unless ``overwrite``, one whose replacing would delete an input
    (``refuse_replacing_inputs``) or the current folder, and one inside an input folder; stages call this before
    slow work too."""
    out = Path(out)
    refuse_replacing_inputs(out, reads, new_inside=False)
    if out.exists() and not out.is_dir():
        raise InputError(f"output path '{out}' exists and is not a folder; choose another --out")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output folder '{out}' already exists; pass --overwrite to replace it")
    cwd = Path.cwd().resolve()
    if out.exists() and (out.resolve() == cwd or out.resolve() in cwd.parents):
        raise InputError(f"output '{out}' is the current folder or holds it, which replacing would delete; "
                         "choose another --out")
    check_writable(out)
    return out


def refuse_replacing_inputs(out: Path, reads: Iterable[Path | str | None], new_inside: bool = True) -> None:
    """InputError for an output that is, or holds, a folder or file the stage ``reads``, or that exists inside
    one (``--out BUNDLE/graphs --overwrite``): replacing it would delete the input, or part of it, mid-read.
    A new output inside an input folder deletes nothing; it is allowed where ``new_inside`` (a report file),
    not for a folder output: a model or bundle with a folder added is no longer what was recorded of it (a
    bundle's source model hash, a student's teacher)."""
    target = out.resolve()
    for src in reads:
        if src is None or not Path(src).exists():  # model ids (asdm:tiny, org/name) are not paths
            continue
        source = Path(src).resolve()
        if target == source or target in source.parents:
            what = "is" if target == source else "holds"
            raise InputError(f"output '{out}' {what} the input '{src}', which writing it would delete; "
                             "choose another --out")
        if source in target.parents and out.exists():
            raise InputError(f"output '{out}' is part of the input '{src}', which replacing it would damage; "
                             "choose an output outside it")
        if source in target.parents and not new_inside:
            raise InputError(f"output '{out}' is inside the input '{src}', which would then no longer be what "
                             "was read (its recorded hash changes); choose an output outside it")


def check_writable(path: Path | str) -> None:
    """Refuse a ``path`` that cannot be written: its nearest existing folder is a file, or writing there fails
    (a read-only or virtual file system). Nothing is created, so a refusal leaves no empty parent behind."""
    parent = Path(path).absolute().parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir():
        raise InputError(f"cannot create the folder '{Path(path).parent}' for '{path}' ('{existing}' is not a "
                         f"folder); {CHOOSE_ANOTHER}")
    try:  # a real write: permission bits say nothing to root, nor about read-only or virtual file systems
        os.rmdir(tempfile.mkdtemp(prefix=".asdm-probe-", dir=existing))
    except OSError as err:
        raise unwritable(Path(path), err) from None


def make_parent(path: Path) -> Path:
    """``path``'s folder, created if missing, when the output is written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise unwritable(path, err) from None
    return path.parent


def unwritable(path: Path, err: OSError) -> InputError:
    return InputError(f"cannot write '{path}' ({err.strerror or err}); {CHOOSE_ANOTHER}")


CHOOSE_ANOTHER = "choose another output path"  # what an unwritable output's line asks for


def umask() -> int:
    """The process's file-creation mask, read without changing it where the system says (Linux)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(ln for ln in status if ln.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it
    os.umask(mask)
    return mask


def readable_tree(folder: Path) -> None:
    """Give ``folder`` and everything in it the permissions ``mkdir`` and ``open`` give under this umask.
    ``mkdtemp`` makes a folder 0700 and safetensors writes its files 0600, and a rename keeps both: without
    this, a Triton container running as another user, or a colleague, could not read the output."""
    mask = umask()
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode & 0o7777
        want = (0o777 if path.is_dir() else 0o666) & ~mask
        if mode | want != mode:  # adds bits, never removes one a writer set
            with contextlib.suppress(PermissionError):  # a file linked from another user's cache keeps its own
                path.chmod(mode | want)


@contextlib.contextmanager
def atomic_output_dir(out: Path | str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``out`` when the block finishes without an exception."""
    out = check_output(out, overwrite)
    parent, tmp = make_parent(out), None
    try:
        try:
            tmp = temp_dir(parent, out.name)
        except OSError as err:
            raise unwritable(out, err) from None
        yield tmp
        readable_tree(tmp)
        if out.exists() and not overwrite:  # another run wrote it while this one worked: keep theirs
            raise OutputExistsError(f"output folder '{out}' appeared while writing it (another run?); "
                                    "pass --overwrite to replace it")
        if out.exists():
            replace_dir(tmp, out)
        else:
            try:
                tmp.replace(out)
            except OSError as err:  # someone else created it meanwhile
                raise OutputExistsError(f"output folder '{out}' appeared while writing it") from err
    finally:
        # a signal that lands between the folder's creation and ``tmp`` leaves it unnamed here: it is found by
        # this process's id in its name
        for path in [tmp] if tmp is not None else parent.glob(f"{glob.escape(_temp_prefix(out.name))}*"):
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)


TEMP_KINDS = ("tmp", "old", "reused")  # a folder being written; a previous output moved aside; build's staging


def _temp_stem(name: str) -> str:
    """``name`` as a temporary folder's name holds it: a long one cut, with a hash, so that the folder's name
    stays within a file system's 255 bytes."""
    if len(name.encode()) <= 180:
        return name
    return name.encode()[:160].decode(errors="ignore") + "~" + hashlib.sha256(name.encode()).hexdigest()[:12]


def _temp_prefix(name: str, kind: str = "tmp") -> str:
    return f".{_temp_stem(name)}.{kind}-{_host()}-{os.getpid()}-"


def temp_dir(parent: Path, name: str, kind: str = "tmp") -> Path:
    """A new hidden folder ``.NAME.KIND-HOST-PID-XXXXXXXX`` in ``parent``, where output ``name`` is written (or
    its previous version moved aside: ``old``) until a rename; what killed runs left of ``name`` goes first
    (``remove_orphans``)."""
    if kind not in TEMP_KINDS:
        raise ValueError(f"temporary folder kind {kind!r} is not one of {TEMP_KINDS}")
    remove_orphans(parent, name)
    return Path(tempfile.mkdtemp(prefix=_temp_prefix(name, kind), dir=parent))


def remove_orphans(parent: Path, name: str) -> list[Path]:
    """Remove the ``temp_dir`` folders of output ``name`` whose process (of this host and PID namespace: ``_host``)
    died without its cleanup (SIGKILL, the out-of-memory killer, a power cut): each can hold a whole output,
    gigabytes for an SD-sized model, where ``ls`` does not show it. A previous output moved aside (``old``) goes only once ``name``
    exists again: a kill between ``replace_dir``'s two renames left it the only copy. Returns what went."""
    stem = _temp_stem(name)
    # mkdtemp's random part: 8 of [a-z0-9_]; a folder of any other form is not ours to remove
    owned = re.compile(rf"\.{re.escape(stem)}\.({'|'.join(TEMP_KINDS)})-{re.escape(_host())}-(\d+)-[a-z0-9_]{{8}}")
    removed = []
    for path in Path(parent).glob(f".{glob.escape(stem)}.*"):
        match = owned.fullmatch(path.name)
        superseded = match and (match[1] != "old" or (Path(parent) / name).exists())
        if superseded and path.is_dir() and not _alive(int(match[2])):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        log.info("removed %d folder(s) that killed runs left beside '%s'", len(removed), Path(parent) / name)
    return removed


@functools.cache
def _host() -> str:
    """Who may judge a temporary folder's process by its id: this host and PID namespace (containers that share
    a host name, or a file system, have processes of their own under the same ids), as 12 hex digits."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # not Linux
        namespace = 0
    return hashlib.sha256(f"{socket.gethostname()}/{namespace}".encode()).hexdigest()[:12]


def _alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (another user's too)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it runs, as someone else
        return True
    return True


def replace_dir(new: Path, target: Path) -> None:
    """``new`` becomes ``target``: an existing ``target`` is moved aside first (``.NAME.old-*/x``, where a stop
    between the two renames leaves it) and removed after."""
    old = None
    if target.exists():
        old = temp_dir(target.parent, target.name, "old")
        target.replace(old / "x")
    new.replace(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_file_output(path: Path | str, reads: Iterable[Path | str | None] = ()) -> Path:
    """Refuse a file output that is a folder, is part of what the command ``reads``, or cannot be written;
    commands call this before slow work."""
    path = Path(path)
    refuse_replacing_inputs(path, reads)
    if path.is_dir():
        raise InputError(f"'{path}' is a folder; give the path of a file to write")
    check_writable(path)
    return path


def atomic_write_file(path: Path | str, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` into a hidden temporary file beside ``path``, renamed into place when it succeeds: a file
    output is whole or absent. A folder at ``path`` or an unwritable place is one line."""
    path = check_file_output(path)
    tmp = path.with_name(f".{path.name}.tmp")
    make_parent(path)
    try:
        write(tmp)
        tmp.replace(path)
    except OSError as err:
        raise unwritable(path, err) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def link_or_copy(src: Path, dst: Path) -> None:
    """Built artifacts are never modified in place, so a hard link is as good as a copy (and free)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_files(folder: Path, exclude: tuple[str, ...] = (MANIFEST,), times: bool = False) -> dict[str, dict]:
    """``{relative path: {sha256, bytes}}`` for every file under ``folder``, sorted; ``times`` adds each file's
    modification time (``mtime_ns``), which lets ``changed_files`` skip hashing files nobody touched."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel in exclude:
            continue
        stat = path.stat()
        files[rel] = {"sha256": sha256_file(path), "bytes": stat.st_size}
        if times:
            files[rel]["mtime_ns"] = stat.st_mtime_ns
    return files


def hash_folder(folder: Path) -> str:
    """One sha256 for a whole folder (paths and contents), used to identify a source model."""
    h = hashlib.sha256()
    for rel, info in hash_files(folder, exclude=()).items():
        h.update(f"{rel}\0{info['sha256']}\n".encode())
    return h.hexdigest()


_TOOLS = ("asdm-export", "torch", "diffusers", "transformers", "onnx", "onnxruntime-gpu", "onnxruntime",
          "onnx-graphsurgeon", "polygraphy", "tensorrt", "safetensors", "numpy")


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in _TOOLS:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[dist] = importlib.metadata.version(dist)
    return versions


def write_manifest(folder: Path, data: dict, times: bool = False) -> dict:
    """Write ``manifest.json`` with the stage's data plus tool versions and the hash of every file (and its
    modification time with ``times``: for folders that are opened often and are large, see ``changed_files``)."""
    manifest = {
        "format": "asdm-export",
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **data,
        "tools": tool_versions(),
        "files": hash_files(folder, times=times),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(folder: Path | str, kind: str | tuple[str, ...]) -> dict:
    """Read and validate an artifact folder's manifest; ``kind`` is e.g. ``"bundle"``, or a tuple of the
    kinds accepted (``("bundle", "engines")``)."""
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    kind = " or ".join(kinds)
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.exists():
        raise InputError(f"'{folder}' does not exist; expected an asdm-export {kind}")
    if not folder.is_dir():
        raise InputError(f"'{folder}' is not a folder; expected an asdm-export {kind}")
    if not path.is_file():
        raise InputError(f"'{folder}' has no {MANIFEST}; is it an asdm-export {kind}?")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"'{path}' is not valid JSON ({err}); re-create the {kind}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != "asdm-export":
        raise InputError(f"'{path}' is not an asdm-export {kind} manifest (no \"format\": \"asdm-export\"); give a "
                         f"folder asdm-export wrote, or re-create the {kind}")
    if manifest.get("kind") not in kinds:
        found = manifest.get("kind")
        hint = f" (it is an asdm-export {found})" if isinstance(found, str) else ""
        raise InputError(f"'{folder}' is not an asdm-export {kind}{hint}")
    version = manifest.get("format_version", 1)
    if not isinstance(version, int):
        raise InputError(f"'{path}' has no valid format_version; re-create the {kind}")
    if version > FORMAT_VERSION:
        raise InputError(f"'{path}' has format version {version}, newer than this asdm-export reads "
                         f"({FORMAT_VERSION}); upgrade asdm-export, or re-create the {kind} with this one")
    shape = dict(_SHAPES.get(manifest["kind"], {}))
    shape.update(_SHAPES.get(f"{manifest['kind']}:{manifest.get('backend')}", {}))
    wrong = shape_error(manifest, shape, "") or _unlisted_file(manifest) or _inconsistency(manifest)
    if wrong:
        raise InputError(f"'{path}' is damaged ({wrong}); re-create the {kind}")
    return manifest


ENGINE_KINDS = {"trt": "TensorRT engines", "ort": "ONNX Runtime graphs", "torch": "PyTorch programs"}


def require_engines(folder: Path | str, manifest: dict, backend: str, instead: str | None = None) -> None:
    """InputError unless ``folder`` (whose manifest was read) is an engine folder of ``backend``: one line that
    says what it holds, then ``instead`` (what the command can do with it; default: run it with its own
    ``--backend``), then how to build what was asked for."""
    own = manifest.get("backend") if manifest.get("kind") == "engines" else None
    if own == backend:
        return
    held = ENGINE_KINDS.get(own, f"{own} engines") if own else "a bundle's ONNX graphs"
    if instead is None and own in ENGINE_KINDS:
        instead = f"run it with --backend {own}"
    source = "a bundle" if own else "it"
    raise InputError(f"'{folder}' holds {held}, not {ENGINE_KINDS[backend]}; {instead + ', or ' if instead else ''}"
                     f"build {ENGINE_KINDS[backend]} from {source} with `asdm-export build --backend {backend}`")


def _unlisted_file(manifest: dict) -> str | None:
    """Where a graph, engine or program names a file that the manifest's ``files`` does not list (so it is never
    hashed: a path outside the folder, ``../other/unet.onnx``, would be run and deployed unverified)."""
    listed, graphs = manifest.get("files"), manifest.get("graphs")
    if not isinstance(listed, dict) or not isinstance(graphs, list):
        return None  # kinds without a file list or graph list (a calibration folder's graphs are a dict)
    named = [(f"graphs[{i}]", g) for i, g in enumerate(graphs)]
    named += [(f"graphs[{i}].engines[{j}]", e) for i, g in enumerate(graphs)
              for j, e in enumerate(g.get("engines") or [])]
    named += [(f"programs[{i}]", p) for i, p in enumerate(manifest.get("programs") or [])]
    for where, entry in named:
        if not isinstance(entry.get("file"), str):  # a torch folder's graph entries: the bundle's, files not copied
            continue
        for rel in [entry["file"], *(entry.get("data_files") or [])]:
            if isinstance(rel, str) and rel not in listed:
                return f"{where} names '{rel}', which its files do not list"
    return None


# What the code reads from each kind of manifest, as ``{key: shape}`` (a trailing ``?``: optional), ``[shape]`` (a
# list of them), ``{str: shape}`` (any keys), ``(shape, ...)`` (any one of them), ``None``, ``COUNT`` (an int >= 1)
# or a type: a manifest edited by hand or damaged is one line naming what is wrong, not a KeyError (or a zero-length
# tensor) deep inside a stage.
COUNT = "count"
_FILES = {str: {"sha256": str, "bytes": int}}
_GRAPH = {"name": str, "inputs": [{"name": str, "shape": list}], "outputs": [{"name": str}],
          "data_files?": [str], "profile?": {str: {"min": COUNT, "opt": COUNT, "max": COUNT, "multiple?": COUNT}},
          "role?": str, "owner?": str, "component?": str, "precision?": str}
_PIPELINE = {"tokenizer": str, "scheduler": str, "vae_scale_factor": COUNT, "latent_channels": COUNT,
             "sample_size": COUNT, "text_length": COUNT}
# a bundle's graphs say what they are and the shapes they take (the runtime picks its graphs and sizes by them)
_BUNDLE_GRAPH = {**{k: v for k, v in _GRAPH.items() if k not in ("component?", "profile?")},
                 "component": str, "profile": _GRAPH["profile?"], "file": str}
# a model a bundle was exported from, as ``ModelSource.describe`` writes it (re-opened to rebuild the reference)
_SOURCE = {"model": str, "kind": str, "path": str, "sha256": str, "config?": (str, None)}
_BUNDLE = {"precision": str, "graphs": [_BUNDLE_GRAPH], "source": _SOURCE,
           "unets": {str: {"graphs": {str: str}, "source": _SOURCE, "inheritance": dict}},
           "schedule": {"steps": COUNT, "mode": str, "interval": COUNT}, "pipeline?": (_PIPELINE, None),
           "files": _FILES}
COMPONENTS = ("unet", "text_encoder", "vae")  # what a bundle graph is part of (its "component")
PROGRAM_RECORD = {"name": str, "file": str, "inputs": dict, "outputs": list, "dtype": str}  # a torch folder's
_SHAPES = {
    "bundle": _BUNDLE,
    "engines": {"backend": str},
    # TensorRT engines and optimised ONNX Runtime graphs: a bundle's manifest, each graph with its engines
    "engines:ort": {**_BUNDLE, "bundle": {"path": str, "manifest_sha256": str}, "spec": dict,
                    "graphs": [{**_BUNDLE_GRAPH, "engines": [{"file": str}]}]},
    "engines:trt": {**_BUNDLE, "bundle": {"path": str, "manifest_sha256": str}, "spec": dict, "platform": dict,
                    "graphs": [{**_BUNDLE_GRAPH, "engines": [{"file": str}]}]},
    # PyTorch programs: ``save_programs`` alone writes the programs; ``build`` adds the bundle's keys
    # (its "source": the bundle's model when ``build`` wrote it, else the programs' graph name -> sha256)
    "engines:torch": {**{f"{k}?": v for k, v in _BUNDLE.items()}, "source?": (_SOURCE, {str: str}),
                      "graphs?": [_GRAPH], "dtype": str, "platform": dict,
                      "programs": [PROGRAM_RECORD]},
    "calibration": {"bundle": {"path": str, "graphs": {str: str}}, "graphs": {str: {"file": str, "inputs": dict}},
                    "files": _FILES},
}


def _inconsistency(manifest: dict) -> str | None:
    """Where a well-formed manifest contradicts itself (a UNet naming a graph it does not have, a profile whose
    min exceeds its max, a schedule no run could follow, a pipeline size its graphs do not take): each ended
    in a KeyError, a division by zero or a wrong image further on."""
    graphs = manifest.get("graphs")
    if graphs is None or "unets" not in manifest:
        return None
    if not graphs:
        return "graphs is empty"
    names = [g["name"] for g in graphs]
    if len(set(names)) != len(names):
        return f"graph '{next(n for n in names if names.count(n) > 1)}' is listed twice"
    component = {g["name"]: g.get("component") for g in graphs}
    if odd := next((n for n, c in component.items() if c is not None and c not in COMPONENTS), None):
        return f"graph {odd}: component '{component[odd]}' is not one of {', '.join(COMPONENTS)}"
    if "unet" not in manifest["unets"]:  # the main UNet (others are named by --unet): its model is the reference
        return "unets has no 'unet'" + (" (it is empty)" if not manifest["unets"] else "")
    for unet, info in manifest["unets"].items():
        roles = info["graphs"]
        if not ("plain" in roles or {"full", "inherit"} <= set(roles)):
            return f"unets.{unet}.graphs has neither 'plain' nor both 'full' and 'inherit'"
        if missing := [g for g in roles.values() if g not in names]:
            return f"unets.{unet}.graphs names graph '{missing[0]}', which graphs does not list"
        if other := next((g for g in roles.values() if component[g] not in ("unet", None)), None):
            return f"unets.{unet}.graphs names graph '{other}', whose component is {component[other]}, not unet"
    for g in graphs:
        for dim, r in (g.get("profile") or {}).items():
            if not r["min"] <= r["opt"] <= r["max"]:
                return f"graph {g['name']}: profile {dim} does not have min <= opt <= max"
    if wrong := schedule_problem(manifest["schedule"], list(manifest["unets"])):
        return f"schedule: {wrong}"
    info = manifest.get("pipeline")
    if info and (lacking := [c for c in ("text_encoder", "vae") if c not in component.values()]):
        return f"pipeline is set, but graphs has no {lacking[0]} graph"
    if info:  # the sizes run() feeds, against the graphs' fixed dimensions
        for g in graphs:
            shapes = {i["name"]: i["shape"] for i in g["inputs"]}
            want = {"sample": (1, info["latent_channels"]), "input_ids": (1, info["text_length"])}
            for name, (axis, size) in want.items():
                shape = shapes.get(name)
                if shape and len(shape) > axis and isinstance(shape[axis], int) and shape[axis] != size:
                    return f"pipeline says {name} axis {axis} is {size}; graph {g['name']} takes {shape[axis]}"
    return None


SCHEDULE_MODES = ("full", "uniform", "quadratic", "explicit")
QUADRATIC_POWER = 1.4  # the default, DeepCache's
QUADRATIC_POWER_MAX = 10  # the placement lowers it 0.02 at a time: 1e300 never moved and hung


def schedule_problem(schedule: dict, unets: list[str] | tuple[str, ...]) -> str | None:
    """What a run could not follow in a schedule's data (a manifest's, or ``Schedule``'s fields, whose
    ``validate`` says it as an error): here, in the layer that reads manifests, which imports nothing above it."""
    steps, mode = schedule["steps"], schedule["mode"]
    if mode not in SCHEDULE_MODES:
        return f"unknown schedule mode '{mode}'; choose one of {', '.join(SCHEDULE_MODES)}"
    interval, power = schedule.get("interval", 1), schedule.get("power", QUADRATIC_POWER)
    if mode in ("uniform", "quadratic") and not (isinstance(interval, int) and interval >= 1):
        return "the schedule interval must be at least 1"
    if mode == "quadratic" and not (isinstance(power, (int, float)) and 1 < power <= QUADRATIC_POWER_MAX):
        return f"the quadratic schedule's power must be above 1 and at most {QUADRATIC_POWER_MAX}, not {power}"
    explicit = schedule.get("explicit", ())
    if mode == "explicit" and not explicit:
        return "an explicit schedule needs at least one full step, e.g. explicit:0,4,9"
    if mode == "explicit" and not all(isinstance(s, int) and 0 <= s < steps for s in explicit):
        return f"explicit full steps must lie in 0..{steps - 1}"
    switch = schedule.get("switch", ())
    if not isinstance(switch, (list, tuple)) or not all(
            isinstance(seg, (list, tuple)) and len(seg) == 3 and isinstance(seg[0], str)
            and all(isinstance(x, int) for x in seg[1:]) for seg in switch):
        return f"the switch {switch} is not a list of (UNet, first step, last step)"
    for name, *_ in switch:
        if name not in unets:
            return f"--switch names UNet '{name}', but the bundle has {', '.join(unets)}"
    if switch and sorted(s for _, a, b in switch for s in range(a, b + 1)) != list(range(steps)):
        return f"--switch must cover steps 0..{steps - 1} exactly once, in ranges like teacher:0-9"
    return None


def unet_entries(manifest: dict) -> list[dict]:
    """A bundle's (or engine folder's) UNet graph entries, in manifest order: the first is the main UNet's first
    graph, whose profile every UNet graph of a bundle shares."""
    return [g for g in manifest["graphs"] if g["component"] == "unet"]


def shape_error(value, shape, where: str = "") -> str | None:
    """Where ``value`` does not have ``shape`` (see ``_SHAPES``): e.g. ``graphs[2].file is missing``."""
    if isinstance(shape, tuple):
        wrongs = [shape_error(value, one, where) for one in shape]
        return None if None in wrongs else next(w for w, one in zip(wrongs, shape) if one is not None)
    if shape is None:
        return None if value is None else f"{where} is not null"
    if shape is COUNT:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        return None if ok else f"{where} is not a whole number >= 1"
    if isinstance(shape, list):
        if not isinstance(value, list):
            return f"{where or 'it'} is not a list"
        for i, item in enumerate(value):
            if wrong := shape_error(item, shape[0], f"{where}[{i}]"):
                return wrong
        return None
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return f"{where or 'it'} is not a mapping"
        if str in shape:
            items = [(k, shape[str]) for k in value]
        else:
            items = [(k.rstrip("?"), sub) for k, sub in shape.items() if not k.endswith("?") or k[:-1] in value]
        for key, sub in items:
            at = f"{where}.{key}" if where else key
            if key not in value:
                return f"{at} is missing"
            if wrong := shape_error(value[key], sub, at):
                return wrong
        return None
    ok = isinstance(value, shape) and not (shape is int and isinstance(value, bool))
    return None if ok else f"{where} is not {getattr(shape, '__name__', 'of the right type')}"


def missing_files(folder: Path, manifest: dict) -> list[str]:
    """Files the manifest lists that are gone or no longer have their recorded size: a ``stat`` each, cheap
    enough for every open (``changed_files`` hashes, for what a size cannot tell)."""
    gone = []
    for rel, info in manifest.get("files", {}).items():
        path = folder / rel
        if not path.is_file() or path.stat().st_size != info["bytes"]:
            gone.append(rel)
    return gone


def require_files(folder: Path, manifest: dict) -> None:
    """Refuse a folder whose listed files are missing or truncated, naming the first, before they are used."""
    gone = missing_files(Path(folder), manifest)
    if gone:
        more = f" (and {len(gone) - 1} more)" if len(gone) > 1 else ""
        raise InputError(f"'{folder}' is incomplete: '{gone[0]}'{more} is missing or not the size its manifest "
                         f"records; copy the whole folder again, or re-create the {manifest['kind']}")


def changed_files(folder: Path, manifest: dict, trust_times: bool = False,
                  hashed: list[str] | None = None) -> list[str]:
    """Files whose content no longer matches the manifest (missing files included).

    With ``trust_times``, a file whose size and modification time are still those the manifest recorded is
    taken as unchanged without hashing it (as git and make decide): opening a GB-sized engine folder then
    costs a ``stat`` per file instead of seconds of sha256. A file that was copied or touched is hashed.
    ``hashed`` collects the files that were."""
    changed = []
    for rel, info in manifest.get("files", {}).items():
        path = folder / rel
        stat = path.stat() if path.is_file() else None
        if stat is None or stat.st_size != info["bytes"]:
            changed.append(rel)
        elif trust_times and info.get("mtime_ns") == stat.st_mtime_ns:
            continue
        else:
            if hashed is not None:
                hashed.append(rel)
            if sha256_file(path) != info["sha256"]:
                changed.append(rel)
    return changed
