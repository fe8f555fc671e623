"""``build``: bundle -> engine folder (TensorRT engines, ONNX Runtime graphs optimised offline, or PyTorch
programs: ``build_programs``).

Steps (TensorRT and ONNX Runtime; PyTorch programs are made from the graphs' modules, not the ONNX files, so
no lint): lint every graph (errors stop a TensorRT build; for ONNX Runtime, which runs any ONNX graph, they
are recorded), then for every graph and spec profile either reuse an artifact built before from the same
inputs or build it, then copy the bundle's other folders (tokenizer, scheduler, ...) and write the
manifest (kind ``"engines"``). The output folder is written atomically.

Reuse lives in one place for every backend, ``EngineCache``: an artifact is identified by its cache key,
the sha256 of (graph file sha256, the spec's build settings, the engine's profile, the backend's version
and device: TensorRT version + GPU, or onnxruntime version + execution provider, the artifact's name; for
PyTorch programs ``program_store.program_key``). It is found in the ``--cache`` folder or in the previous
output being overwritten, and checked against its recorded sha256 before it is used.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

from ..artifacts import (MANIFEST, PROGRAM_RECORD, atomic_output_dir, check_output, check_writable, link_or_copy,
                         read_manifest, readable_tree, require_files, sha256_file, shape_error, temp_dir,
                         write_manifest)
from ..errors import InputError, MissingBackendError, StageError, first_line
from ..runtime.profiles import is_static
from .engine_spec import EngineSpec, graph_profiles, load_spec, shapes_json
from .lint import LintError, first_error, lint_bundle, write_report

log = logging.getLogger(__name__)

ENGINES = "engines"  # the folder of built artifacts inside an engine folder
CACHE_FORMAT = 1


# ---- cache ---------------------------------------------------------------------------------------------

def graph_digest(bundle: Path, entry: dict, files: dict | None = None) -> str:
    """sha256 of a graph as its files are now (the ONNX file and its external data, in order). With ``files``
    (the bundle manifest's), a file whose sha256 is not the recorded one is refused: an engine built from it
    would be recorded as built from the bundle and pass for what was exported."""
    h = hashlib.sha256()
    for rel in [entry["file"], *entry.get("data_files", [])]:
        path = bundle / rel
        if not path.is_file():
            raise InputError(f"graph file '{rel}' of graph '{entry['name']}' is missing from '{bundle}'; re-export")
        digest = sha256_file(path)
        if files is not None and rel in files and files[rel]["sha256"] != digest:
            raise InputError(f"graph file '{rel}' of '{bundle}' changed since export (its sha256 is not the "
                             "manifest's); re-export the bundle")
        h.update(f"{Path(rel).name}\0{digest}\n".encode())
    return h.hexdigest()


def cache_key(backend: str, graph_sha256: str, settings: dict, platform: dict, profile: dict | None, name: str) -> str:
    """The identity of one built artifact (what must be equal for a previous build to be reused)."""
    data = {"format": CACHE_FORMAT, "backend": backend, "graph": graph_sha256, "settings": settings,
            "platform": platform, "profile": profile, "name": name}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def check_cache_folder(cache: Path | str | None, out: Path, bundle: Path) -> None:
    """A ``--cache`` that can be a folder of its own: not a file, not the output or inside it (the output is
    replaced as a whole), not inside the bundle (a build copies the bundle's folders into its output, and the
    bundle would no longer be what its manifest lists), and writable; said before any build."""
    if cache is None:
        return
    path = Path(cache).expanduser()
    if path.exists() and not path.is_dir():
        raise InputError(f"--cache '{cache}' is a file; give a folder for the engine cache")
    for folder, what in ((out, "the output folder"), (bundle, "the bundle")):
        if path.resolve() == folder.resolve() or folder.resolve() in path.resolve().parents:
            raise InputError(f"--cache '{cache}' is {what} or inside it; give the cache a folder of its own")
    check_writable(path)


def recorded_sources(manifest: dict) -> list[str]:
    """The source models a bundle records (the pipeline's and each UNet's): a torch build re-opens them, and
    an output that replaced one would leave the bundle without its reference."""
    sources = [manifest.get("source"), *(u.get("source") for u in manifest.get("unets", {}).values())]
    return [p for s in sources if isinstance(s, dict)  # a single file's --config folder is part of its model
            for p in (s.get("path"), s.get("config")) if isinstance(p, str)]


# what a found record must hold to be reused (one edited by hand is built again, not a KeyError further on)
REUSABLE = {"file": str, "data_files": [str]}


class EngineCache:
    """Artifacts built before, by cache key: in a cache folder, and in the previous output being replaced.
    ``record``: the shape a found record must have to be reused (``REUSABLE`` and what the backend reads)."""

    def __init__(self, folder: Path | str | None = None, previous: Path | str | None = None,
                 record: dict = REUSABLE):
        self.folder = Path(folder).expanduser() if folder else None
        self.record = record
        self.previous: dict[str, tuple[Path, dict, dict]] = {}
        if previous and Path(previous, MANIFEST).is_file():
            try:
                manifest = read_manifest(previous, "engines")
            except InputError:
                manifest = None  # not an engine folder: nothing to reuse (it is replaced all the same)
            records = [e for g in (manifest or {}).get("graphs", []) for e in g.get("engines", [])]
            records += [e for e in (manifest or {}).get("programs", []) if "file" in e]  # a torch folder's
            for e in records:
                if isinstance(e.get("cache_key"), str) and not shape_error(e, record):  # else built again
                    self.previous[e["cache_key"]] = (Path(previous), e, manifest.get("files", {}))

    def fetch(self, key: str, dest: Path) -> tuple[list[str], dict, str] | None:
        """Place the artifact ``key`` in folder ``dest``: ``(file names, its record, "cache" | "previous")``."""
        if key in self.previous:
            root, record, hashes = self.previous[key]
            names = [Path(f).name for f in [record["file"], *record.get("data_files", [])]]
            rels = [record["file"], *record.get("data_files", [])]
            if all((root / r).is_file() and hashes.get(r, {}).get("sha256") == sha256_file(root / r) for r in rels):
                for rel, name in zip(rels, names):
                    link_or_copy(root / rel, dest / name)
                return names, record, "previous"
            log.info("previous artifact %s changed on disk; not reused", record["file"])
        if self.folder is not None:
            entry = self.folder / key
            meta = entry / "entry.json"
            if meta.is_file():
                try:
                    info = json.loads(meta.read_text())
                    files, record = info["files"], info["record"]
                    intact = not shape_error(record, self.record) and bool(files) and all(
                        (entry / n).is_file() and sha256_file(entry / n) == sha for n, sha in files.items())
                except (OSError, ValueError, KeyError, TypeError, AttributeError):  # unreadable or edited entry.json
                    intact = False
                if intact:
                    for n in files:
                        link_or_copy(entry / n, dest / n)
                    return list(files), record, "cache"
                log.info("cache entry %s is damaged; rebuilding", entry)
        return None

    def store(self, key: str, src: Path, names: list[str], record: dict) -> None:
        """Keep an entry; a cache that cannot take it (a full disk) costs the next build the work, not this
        build its result (the engines are in its output already)."""
        if self.folder is None:
            return
        try:
            self._store(key, src, names, record)
        except OSError as err:
            log.warning("could not keep %s in the cache '%s' (%s); a later build makes it again", names[0],
                        self.folder, err.strerror or first_line(err))

    def _store(self, key: str, src: Path, names: list[str], record: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        entry = self.folder / key
        if entry.exists():
            shutil.rmtree(entry, ignore_errors=True)  # a damaged entry fetch() refused
        tmp = temp_dir(self.folder, key)
        try:
            for n in names:
                link_or_copy(src / n, tmp / n)
            files = {n: sha256_file(tmp / n) for n in names}
            (tmp / "entry.json").write_text(json.dumps({"key": key, "files": files, "record": record}, indent=2))
            readable_tree(tmp)  # a cache shared by a team
            try:
                tmp.replace(entry)
            except OSError:
                pass  # another build stored it meanwhile: same key, same content
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


# ---- ONNX Runtime --------------------------------------------------------------------------------------

class OrtBuilder:
    """ONNX Runtime "engines": each graph optimised offline (``SessionOptions.optimized_model_filepath``).

    The builder interface (``trt_builder.TrtBuilder`` has it too): ``backend``; ``platform``, the versions and
    device an artifact is tied to (recorded, and part of the cache key); ``artifact_name(graph, index)``;
    ``build(onnx, dest, profile)``, which writes ``dest`` (plus ``files`` it lists) and returns what the
    manifest records about it.
    """

    backend = "ort"

    def __init__(self, spec: EngineSpec):
        import onnxruntime as ort

        from ..runtime.runners import ORT_PROVIDERS

        self.ort, self.spec = ort, spec
        self.provider = spec.session.provider
        self.ep = ORT_PROVIDERS[self.provider]
        if self.ep not in ort.get_available_providers():
            raise MissingBackendError(f"ONNX Runtime here has no {self.ep}; install onnxruntime-gpu on a CUDA "
                                      "machine, or use a spec with provider: cpu")
        self.platform = {"onnxruntime": ort.__version__, "provider": self.provider}

    def artifact_name(self, graph: str, index: int) -> str:
        major, minor = self.ort.__version__.split(".")[:2]
        return f"{graph}.ort{major}.{minor}.{self.provider}.onnx"

    def build(self, src: Path, dest: Path, profile) -> dict:
        from ..runtime.runners import inference_session

        ort = self.ort
        levels = {"disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}
        options = ort.SessionOptions()
        options.graph_optimization_level = levels[self.spec.session.optimization_level]
        options.optimized_model_filepath = str(dest)
        options.log_severity_level = 3
        data = None
        if src.with_name(src.name + ".data").is_file():
            # models past protobuf's 2 GB limit keep their weights in one external file, as the bundle does
            data = dest.name + ".data"
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name", data)
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                             "1024")
        try:
            session = inference_session(src, options, self.ep)
        except MissingBackendError:
            raise
        except Exception as err:  # ORT raises its own exception types
            # a full disk reads as "Protobuf serialization failed": say what it was, and raise it from the
            # system's own error for it (the exit code of a full disk)
            free = shutil.disk_usage(dest.parent).free
            if free < src.stat().st_size:
                full = OSError(errno.ENOSPC, f"No space left on device: {free} bytes free", str(dest))
                full.__cause__ = err
                raise StageError(f"ONNX Runtime could not optimise '{src.name}': {first_line(err)} "
                                 f"({full.strerror})") from full
            raise StageError(f"ONNX Runtime could not optimise '{src.name}': {first_line(err)}") from err
        del session
        if not dest.is_file():
            raise StageError(f"ONNX Runtime wrote no optimised model for '{src.name}'")
        return {"files": [dest.name] + ([data] if data and (dest.parent / data).is_file() else []),
                "session": {"provider": self.provider, "optimization_level": self.spec.session.optimization_level,
                            "threads": self.spec.session.threads}}


def spec_profiles(spec: EngineSpec, graph: dict, manifest: dict) -> list:
    """The engines one graph gets: per TensorRT profile its input shapes; ONNX Runtime runs the graph's
    dynamic shapes as exported (one artifact, no profile)."""
    if spec.target == "ort":
        return [None]
    return graph_profiles(spec, graph, (manifest.get("pipeline") or {}).get("vae_scale_factor"))


def make_builder(spec: EngineSpec):
    if spec.target == "trt":
        from .trt_builder import TrtBuilder

        return TrtBuilder(spec)
    return OrtBuilder(spec)


# ---- the stage -----------------------------------------------------------------------------------------

def build_engines(bundle: Path | str, spec: Path | str | EngineSpec, out: Path | str, *, backend: str | None = None,
                  cache: Path | str | None = None, overwrite: bool = False, ops: Path | str | None = None,
                  on_engine=None) -> dict:
    """Build the engines of every graph of ``bundle`` as ``spec`` says into the folder ``out``; return its
    manifest. ``backend`` (``trt`` | ``ort`` | ``torch``) must match the spec's target when given. ``cache``: a folder
    of artifacts shared between builds. ``on_engine(graph, profile_index, status)`` reports progress."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle, "bundle")
    require_files(bundle, manifest)
    spec = spec if isinstance(spec, EngineSpec) else load_spec(spec)
    if backend is not None and backend != spec.target:
        example = {"ort": "ort-cpu", "trt": "trt-dynamic", "torch": "torch-cuda-512"}.get(backend, "ort-cpu")
        raise InputError(f"spec '{spec.name}' targets {spec.target}, not {backend}; pass a spec for {backend} "
                         f"(e.g. engines/{example}.yaml)")
    out = check_output(out, overwrite, reads=(bundle, cache, spec.path, ops, *recorded_sources(manifest)))
    check_cache_folder(cache, out, bundle)
    if spec.target == "torch":
        return build_programs(bundle, manifest, spec, out, cache=cache, overwrite=overwrite,
                              on_engine=on_engine)
    t_start = time.perf_counter()
    lint = lint_bundle(bundle, ops)
    if spec.target == "trt" and lint["errors"]:
        raise LintError(f"{lint['errors']} TensorRT lint error(s), first: {first_error(lint)}; see "
                        f"`asdm-export lint {bundle}`")
    jobs = []  # (graph entry, its digest, its distinct profiles): spec errors surface before any build
    for entry in manifest["graphs"]:
        profiles = []
        for p in spec_profiles(spec, entry, manifest):  # profiles giving this graph the same shapes build once
            if p not in profiles:
                profiles.append(p)
        jobs.append((entry, graph_digest(bundle, entry, manifest["files"]), profiles))
    builder = make_builder(spec)  # MissingBackendError here when TensorRT / the provider is absent
    settings = spec.build_settings()
    reuse = EngineCache(cache, out if overwrite and out.is_dir() else None)
    graphs, counts = [], {"built": 0, "reused": 0}
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        engines_dir = tmp / ENGINES
        engines_dir.mkdir()
        for entry, digest, profiles in jobs:
            records = []
            for index, profile in enumerate(profiles):
                name = builder.artifact_name(entry["name"], index)
                pjson = shapes_json(profile) if profile is not None else None
                key = cache_key(builder.backend, digest, settings, builder.platform, pjson, name)
                found = reuse.fetch(key, engines_dir)
                if found:
                    files, old, source = found
                    extra = {k: v for k, v in old.items() if k in ("session", "device_memory_bytes")}
                    record = {**_record(files, pjson, key, builder.platform), **extra, "reused": source,
                              "build_seconds": old.get("build_seconds")}
                    counts["reused"] += 1
                else:
                    if on_engine:
                        on_engine(entry["name"], index, "building")
                    t0 = time.perf_counter()
                    info = builder.build(bundle / entry["file"], engines_dir / name, profile)
                    files = info.pop("files", [name])
                    record = {**_record(files, pjson, key, builder.platform), **info, "reused": None,
                              "build_seconds": round(time.perf_counter() - t0, 2)}
                    reuse.store(key, engines_dir, files, record)
                    counts["built"] += 1
                if on_engine:
                    on_engine(entry["name"], index, record["reused"] or "built")
                records.append(record)
            graphs.append({**entry, "file": records[0]["file"], "data_files": records[0]["data_files"],
                           "source_file": entry["file"], "source_sha256": digest, "engines": records})
        for child in _bundle_folders(bundle):
            shutil.copytree(child, tmp / child.name)
        write_report(lint, tmp / "lint.json")
        result = write_manifest(tmp, {
            "kind": "engines",
            "backend": spec.target,
            **_from_bundle(bundle, manifest, spec),
            "platform": builder.platform,
            "lint": {"tensorrt": lint["target"]["tensorrt"], "errors": lint["errors"], "warnings": lint["warnings"],
                     "report": "lint.json"},
            "build": {**counts, "seconds": round(time.perf_counter() - t_start, 2)},
            "graphs": graphs,
        })
    log.info("wrote engines %s (%d built, %d reused)", out, counts["built"], counts["reused"])
    return result


def _bundle_folders(bundle: Path) -> list[Path]:
    """The bundle's folders an engine folder carries as they are: tokenizer/, scheduler/, whatever else it has."""
    return [child for child in sorted(bundle.iterdir())
            if child.is_dir() and child.name != "graphs" and not child.name.startswith(".")]


def _from_bundle(bundle: Path, manifest: dict, spec: EngineSpec) -> dict:
    """An engine folder's manifest fields that record its bundle and spec, and carry the bundle's own."""
    return {"bundle": {"path": str(bundle.resolve()), "manifest_sha256": sha256_file(bundle / MANIFEST),
                       "created": manifest.get("created")},
            "spec": spec.to_json(),
            **{k: manifest[k] for k in ("source", "precision", "opset", "unets", "schedule", "pipeline")
               if k in manifest}}


def build_programs(bundle: Path, manifest: dict, spec: EngineSpec, out: Path, *, cache: Path | str | None = None,
                   overwrite: bool = False, on_engine=None) -> dict:
    """The ``torch`` target: every graph of ``bundle`` at each spec profile's static shapes as a pruned
    PyTorch program (``ProgramBackend``), compiled with AOTInductor when the spec says so, saved with
    ``program_store.save_programs`` (JSON graphs, safetensors weights, native packages) plus what ``run``
    needs (schedule, pipeline info, tokenizer and scheduler). Programs are per shape, so a profile is one
    image size and one batch per component. A program whose key (``program_store.program_key``: bundle
    graph, shapes, settings, torch / CUDA / GPU) matches one in ``cache`` or in the folder being overwritten
    is linked in, not exported or compiled again; when every one is, the model is not even loaded."""
    from ..runtime.program_backend import ProgramBackend, resolve_options
    from ..runtime.program_store import graph_sources, platform_info, program_key, save_programs
    from ..runtime.programs import dtype_name

    t_start = time.perf_counter()
    settings = spec.program
    jobs = []  # (graph name, shapes): spec errors surface before the model is loaded
    for entry in manifest["graphs"]:
        # the programs come from the source models (verified as they load), but their records name the bundle's
        # graphs, so a bundle changed since export is refused here as by the other targets
        graph_digest(bundle, entry, manifest["files"])
        for p in graph_profiles(spec, entry, (manifest.get("pipeline") or {}).get("vae_scale_factor")):
            shapes = {n: triple[1] for n, triple in p.items()}
            if (entry["name"], shapes) not in jobs:
                jobs.append((entry["name"], shapes))
    device, dtype, _ = resolve_options(settings.device, settings.dtype)  # MissingBackendError: cuda without CUDA
    dtype = dtype_name(dtype)  # the spec's, or the device's default
    info = platform_info(device, settings.compile)
    source = graph_sources(manifest)
    reuse = EngineCache(cache, out if overwrite and out.is_dir() else None, record={**REUSABLE, **PROGRAM_RECORD})
    out.parent.mkdir(parents=True, exist_ok=True)  # found programs are linked into a folder beside the output
    staging = temp_dir(out.parent, out.name, "reused")
    try:
        reused, missing = [], []
        for name, shapes in jobs:
            # a graph the bundle's manifest has no sha256 for is keyed by its program (save_programs): made anew
            found = name in source and reuse.fetch(program_key(name, shapes, source[name], dtype, settings.compile,
                                                               info), staging)
            if found:
                reused.append((found[1], staging, found[2]))
                if on_engine:
                    on_engine(name, 0, found[2])
            else:
                missing.append((name, shapes))
        programs = []
        if missing:
            backend = ProgramBackend.from_bundle(bundle, device=device, dtype=dtype, cuda_graphs="off",
                                                 instead="re-export the bundle from it, or build its ONNX graphs "
                                                         "(an ort spec, e.g. --spec ort-cpu)")
            for name, shapes in missing:
                if on_engine:
                    on_engine(name, 0, "exporting")
                programs.append(backend.program(name, shapes))
        include = _bundle_folders(bundle)
        extra = {
            **_from_bundle(bundle, manifest, spec),
            # the bundle's graph entries (inputs, outputs, exported ranges), pointing at their bundle files
            "graphs": [{**{k: v for k, v in e.items() if k != "file"}, "source_file": e["file"],
                        "source_sha256": source.get(e["name"])}
                       for e in manifest["graphs"]],
        }
        result = save_programs(programs, out, dtype=dtype, compile=settings.compile, overwrite=overwrite,
                               source=source, extra=extra, include=include, reused=reused, device=device,
                               on_program=(lambda graph, state: on_engine(graph, 0, state)) if on_engine else None)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for e in result["programs"]:
        if not e["reused"]:
            reuse.store(e["cache_key"], out / "programs", [Path(f).name for f in (e["file"], *e["data_files"])], e)
    compiled = sum(bool(e.get("aoti")) for e in result["programs"])
    log.info("wrote torch programs %s (%d exported, %d reused, %d compiled, %.1f s)", out, len(programs),
             len(reused), compiled, time.perf_counter() - t_start)
    return result


def _record(files: list[str], profile: dict | None, key: str, platform: dict) -> dict:
    return {"file": f"{ENGINES}/{files[0]}", "data_files": [f"{ENGINES}/{f}" for f in files[1:]],
            "profile": profile, "static": is_static(profile),
            "cache_key": key, "platform": platform}
