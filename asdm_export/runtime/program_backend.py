"""``ProgramBackend``: a bundle's graphs as exported, pruned programs (``programs``) on CPU or a CUDA GPU,
in fp32 / fp16 / bf16, replayed as CUDA graphs on the GPU (``cuda_graphs``).

The reference modules are rebuilt from the bundle's source models exactly as for ``TorchBackend``; a
program is exported per (graph, input shapes) on first use and kept. The backend owns its reference
modules and moves them to its device and dtype in place (no copies). On CUDA, ``run`` never waits for the
GPU: feeds stay on the device, replays and output copies are queued on the current stream.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ..artifacts import read_manifest
from ..errors import InputError, first_line
from ..graphs import GraphDef
from .backends import Backend
from .programs import (Program, compile_program, dtype_name, exact_fp32, export_program, module_at, parse_device,
                       parse_dtype, program_dtype)

log = logging.getLogger(__name__)

CUDA_GRAPHS = ("auto", "off")
JIT_COMPILE = ("off", "inductor")  # compiled in this process (saved folders: program_store)
MAX_CAPTURES = 4  # captured shapes per graph; beyond, new shapes run eagerly (each capture holds memory)


def resolve_options(device: str | torch.device = "cpu", dtype: str | None = None,
                    cuda_graphs: str = "auto") -> tuple[torch.device, torch.dtype, bool]:
    """``(device, dtype, capture)`` from the user's options; raises before anything is loaded."""
    device = parse_device(device)  # MissingBackendError for cuda without CUDA
    if cuda_graphs not in CUDA_GRAPHS:
        raise InputError(f"unknown cuda_graphs setting '{cuda_graphs}'; choose one of {', '.join(CUDA_GRAPHS)}")
    dt = parse_dtype(dtype or ("fp16" if device.type == "cuda" else "fp32"))
    return device, dt, device.type == "cuda" and cuda_graphs == "auto"


class ProgramBackend(Backend):
    """A bundle's graphs as pruned programs on ``device`` in ``dtype`` (default fp16 on CUDA, fp32 on CPU).

    ``cuda_graphs="auto"`` captures each (graph, shapes) as a CUDA graph on CUDA, up to ``max_captures``
    shapes per graph; ``"off"`` runs the programs eagerly. ``compile="inductor"`` compiles each program on
    first use (``programs.compile_program``; minutes for a full SD UNet). Outputs come back as ``out_dtype``
    (float32 by default; None keeps the program's dtype). ``programs``: ready programs (an engine folder's),
    used for their shapes; other shapes need the graph's reference module in ``graphs``.
    """

    def __init__(self, graphs: list[GraphDef], device: str | torch.device = "cpu", dtype: str | None = None,
                 cuda_graphs: str = "auto", max_captures: int = MAX_CAPTURES,
                 out_dtype: torch.dtype | None = torch.float32, compile: str = "off",
                 programs: list[Program] = ()):
        self.device, self.dtype, self.capture = resolve_options(device, dtype, cuda_graphs)
        if max_captures < 0:
            raise InputError(f"max_captures must be >= 0, got {max_captures}")
        if compile not in JIT_COMPILE:
            raise InputError(f"unknown compile setting '{compile}'; choose one of {', '.join(JIT_COMPILE)}")
        self.max_captures, self.out_dtype, self.compile = max_captures, out_dtype, compile
        self.name = f"torch-{self.device.type}-{dtype_name(self.dtype)}"
        self.graphs = {g.name: g for g in graphs}
        self._inputs = {g.name: tuple(g.inputs) for g in graphs}  # graph -> input names, in order
        self.programs: dict[tuple, Program] = {}  # (graph, shapes) -> program
        for p in programs:
            self._inputs.setdefault(p.name, tuple(p.inputs))
            self.programs[(p.name, tuple(p.inputs.values()))] = p
        self._runners: dict[tuple, object] = {}  # (graph, shapes) -> Program or CapturedProgram
        self._captures: dict[str, int] = {}
        self._pool = self._capture_stream = None
        self.source: dict[str, str] = {}  # graph -> sha256 of what it was built from (a bundle's graph file)

    @classmethod
    def from_bundle(cls, bundle: Path | str, model: str | None = None, instead: str | None = None,
                    **options) -> "ProgramBackend":
        """The bundle's reference modules (as ``TorchBackend.from_bundle`` builds them) as programs. ``instead``:
        what a missing source model's line says to do (default: re-export, or use the ONNX graphs)."""
        from .program_store import graph_sources
        from .reference import WITHOUT_MODEL, reference_graphs, reference_sources

        resolve_options(**{k: options[k] for k in ("device", "dtype", "cuda_graphs") if k in options})
        manifest = read_manifest(bundle, "bundle")
        sources = reference_sources(manifest, model, instead=instead or (None if model else WITHOUT_MODEL))
        backend = cls(list(reference_graphs(manifest, *sources).values()), **options)
        # what an engine folder saved from it is keyed by (with the settings and the platform)
        backend.source = graph_sources(manifest)
        return backend

    @classmethod
    def from_engines(cls, folder: Path | str, device: str | torch.device | None = None, files_checked: bool = False,
                     **options) -> "ProgramBackend":
        """The programs of an engine folder (``program_store.save_programs``): no model, no export, no
        compilation; only the shapes it was built for run. ``files_checked``: see ``load_programs``."""
        from .program_store import load_programs

        resolve_options(device or "cpu", cuda_graphs=options.get("cuda_graphs", "auto"))
        built, asked = read_manifest(folder, "engines")["dtype"], options.pop("dtype", None)
        if asked is not None and asked != built:  # the programs' weights are in the folder's dtype
            raise InputError(f"'{folder}' holds {built} programs, not {asked}; run it without --dtype, or build a "
                             f"folder with `dtype: {asked}` in its spec's program section")
        programs = load_programs(folder, device, files_checked=files_checked)
        return cls([], device=programs[0].device, dtype=built, programs=programs, **options)

    def save(self, out: Path | str, *, compile: str = "off", overwrite: bool = False, source: dict | None = None,
             **fields):
        """The programs made so far as an engine folder (``program_store.save_programs``; ``fields``: its
        ``extra``, ``include`` and ``on_program``)."""
        from .program_store import save_programs

        return save_programs(list(self.programs.values()), out, dtype=dtype_name(self.dtype), compile=compile,
                             overwrite=overwrite, source=source if source is not None else self.source, **fields)

    def graph_names(self) -> list[str]:
        return list(self._inputs)

    def precision(self, graph: str) -> str | None:
        built = [p.dtype for (g, _), p in self.programs.items() if g == graph]
        if built:
            return dtype_name(built[0])
        gdef = self.graphs.get(graph)
        return dtype_name(program_dtype(gdef, self.dtype) if gdef is not None else self.dtype)

    # ---- programs --------------------------------------------------------------------------------------
    def program(self, graph: str, shapes: dict[str, tuple[int, ...]]) -> Program:
        """The program of ``graph`` at ``shapes``, exported (and compiled, if asked) on first use."""
        self._require(graph)
        names = self._inputs[graph]
        key = (graph, tuple(tuple(int(d) for d in shapes[n]) for n in names if n in shapes))
        if key not in self.programs:
            gdef = self.graphs.get(graph)
            if gdef is None:
                built = [" ".join(f"{n}{list(s)}" for n, s in zip(names, k)) for g, k in self.programs if g == graph]
                raise InputError(f"graph '{graph}' was built for {' / '.join(built)} only; build the engine "
                                 "folder for these shapes too, or run from the bundle")
            compute = program_dtype(gdef, self.dtype)
            if not module_at(gdef.module, self.device, compute):
                gdef.module.to(device=self.device, dtype=compute)  # ours: moved once, shared by its graphs
            program = export_program(gdef, shapes, self.device, compute)
            if self.compile == "inductor":
                compile_program(program)
            self.programs[key] = program
        return self.programs[key]

    def _runner(self, graph: str, feeds: dict) -> object:
        names = self._inputs[graph]
        try:
            key = (graph, tuple(tuple(int(d) for d in feeds[n].shape) for n in names))
        except KeyError as err:
            raise InputError(f"graph '{graph}' needs input {err} (it takes {', '.join(names)})") from None
        runner = self._runners.get(key)
        if runner is None:
            t_setup = time.perf_counter()
            program = self.program(graph, dict(zip(names, key[1])))
            runner = program
            if self.capture and self._captures.get(graph, 0) < self.max_captures:
                t0 = time.perf_counter()
                runner = self._capture(program, feeds)
                if runner is not program:
                    log.info("%s %s: captured as a CUDA graph in %.2f s", graph, list(key[1]),
                             time.perf_counter() - t0)
            self._runners[key] = runner
            self.setup_seconds += time.perf_counter() - t_setup
        return runner

    def _capture(self, program: Program, feeds: dict):
        from .cuda_graphs import CapturedProgram

        if self._pool is None:  # one pool for every graph of this backend, captured on one stream of its GPU
            self._pool, self._capture_stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream(self.device)
        try:
            captured = CapturedProgram(program, feeds, self._pool, self._capture_stream)
        except Exception as err:  # a capture may fail in many ways; eager still works
            log.warning("CUDA graph capture of %s failed (%s); it runs eagerly", program.name,
                        first_line(err, 200))
            # the next capture starts afresh: some torch releases leave the allocator's capture state of a failed
            # capture behind (pool and stream); the graphs captured already keep theirs
            self._pool = self._capture_stream = None
            return program
        self._captures[program.name] = self._captures.get(program.name, 0) + 1
        return captured

    # ---- Backend ---------------------------------------------------------------------------------------
    def run(self, graph, feeds):
        self._require(graph)
        # fp32 programs on a GPU in fp32, not TF32 (captures and compiled kernels included)
        with exact_fp32(self.device.type == "cuda" and self.precision(graph) == "fp32"):
            return self._runner(graph, feeds)(feeds, self.out_dtype)

    def captured(self, graph: str) -> int:
        """How many shapes of ``graph`` run as CUDA graphs."""
        return self._captures.get(graph, 0)

    def memory(self):
        """Per loaded graph: bytes of the weights its programs use (each tensor once), plus CUDA graph buffers."""
        out: dict[str, int] = {}
        seen: dict[str, set] = {}
        for (graph, _), program in self.programs.items():
            for t in list(program.module.parameters()) + list(program.module.buffers()):
                key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
                if key not in seen.setdefault(graph, set()):
                    seen[graph].add(key)
                    out[graph] = out.get(graph, 0) + t.numel() * t.element_size()
        for (graph, _), runner in self._runners.items():
            if hasattr(runner, "buffer_bytes"):
                out[graph] = out.get(graph, 0) + runner.buffer_bytes()
        return out

    def built_shapes(self, graph):
        if graph in self.graphs:  # with the reference module, programs are made for any shape on first use
            return []
        names = self._inputs.get(graph, ())
        return [dict(zip(names, shapes)) for g, shapes in self.programs if g == graph]

    def covers(self, graph, shapes):
        """With the reference module: any shape it takes (names, ranks and fixed dims as the graph declares);
        without (an engine folder): the shapes built."""
        if graph not in self.graphs:
            names = self._inputs.get(graph, ())
            return (graph, tuple(tuple(shapes.get(n, ())) for n in names)) in self.programs
        spec = self.graphs[graph].inputs
        return all(n in shapes and len(shapes[n]) == len(s) and
                   all(not isinstance(d, int) or d == v for d, v in zip(s, shapes[n])) for n, s in spec.items())
