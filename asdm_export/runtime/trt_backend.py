"""TensorRT: run engines (``TrtBackend``), TensorRT 10 / 11; what building and running share (the platform, engine
names, compatibility). ``build/trt_builder.py`` builds them.

Engines are named with the TensorRT version and the GPU's compute capability
(``unet.full.p0.trt10.8.sm89.plan``), and the engine folder's manifest records both and the GPU's name: an engine
built elsewhere is refused with a message before TensorRT is asked to load it.

Run: torch CUDA tensors bound by ``data_ptr`` (no host round trip, no sync), on a CUDA stream the backend
owns (never the legacy default stream, on which TensorRT adds device-wide synchronisation): it waits for
the caller's stream before each engine call and the caller's stream waits for it after, so inputs and
outputs stay ordered with the caller's work. One device-memory pool is shared by every execution context
(contexts run one at a time on that stream, so the largest engine's scratch memory is enough for all),
input shapes are set per call, and CUDA graphs are captured and replayed for static-shape engines, one
execution context per captured input shapes; an engine whose capture fails runs without graphs.

Nothing here imports TensorRT at module level: without it, ``TrtBackend`` (and the builder) raise
``MissingBackendError`` saying what to install, and the pure logic (names, compatibility) stays usable.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..artifacts import read_manifest, require_engines
from ..errors import InputError, MissingBackendError, StageError, first_line
from .backends import Backend
from .profiles import describe_profile, is_static, profile_points, select_engine

log = logging.getLogger(__name__)

# torch without CUDA (a CPU build): TensorRT needs a CUDA torch first, and the extra of that torch's CUDA major
INSTALL_HINT = ('on a machine with an NVIDIA GPU, with a CUDA build of torch: pip install "asdm-export[tensorrt-cu12]" '
                'or "asdm-export[tensorrt-cu13]", the CUDA major of that torch (README: TensorRT)')
MIN_TENSORRT = 10
# TensorRT's Python wheels come per CUDA major (tensorrt-cu12, tensorrt-cu13): the extras of the same names
TENSORRT_CUDA_MAJORS = (12, 13)
# Version-compatible plans also run on these later TensorRT majors (TensorRT's support matrix: 8 -> 9 and 10,
# 10 -> 11; no other pair across majors).
LATER_MAJORS = {8: (9, 10), 10: (11,)}
# The first TensorRT release with each hardware-compatibility level (older ones have no such enum value).
HARDWARE_LEVEL_SINCE = {"ampere_plus": "8.6", "same_compute_capability": "10.9"}


class EngineMismatchError(InputError):
    """An engine built for another TensorRT version or GPU."""


def install_hint() -> str:
    """What to install: the TensorRT wheels of torch's CUDA major (two CUDA runtimes in one process fail)."""
    major = torch_cuda_major()
    if major in TENSORRT_CUDA_MAJORS:
        return f'pip install "asdm-export[tensorrt-cu{major}]" (TensorRT for torch\'s CUDA {torch.version.cuda})'
    return INSTALL_HINT


def torch_cuda_major() -> int | None:
    return int(torch.version.cuda.split(".")[0]) if torch.version.cuda else None


def tensorrt_cuda_major() -> int | None:
    """The CUDA major of the installed TensorRT wheels (``tensorrt_cu12_bindings`` or ``tensorrt_cu13_bindings``
    hold the ``tensorrt`` module), read from the package metadata without importing TensorRT; None when unknown
    (a system install, or both)."""
    from importlib import metadata

    majors = []
    for major in TENSORRT_CUDA_MAJORS:
        try:
            metadata.distribution(f"tensorrt_cu{major}_bindings")
        except metadata.PackageNotFoundError:
            continue
        majors.append(major)
    return majors[0] if len(majors) == 1 else None


def import_tensorrt():
    """The ``tensorrt`` module, or ``MissingBackendError`` saying what to install."""
    trt_cuda, torch_cuda = tensorrt_cuda_major(), torch_cuda_major()
    if trt_cuda and torch_cuda and trt_cuda != torch_cuda:
        # checked before the import: TensorRT would load a second CUDA runtime beside torch's (or none at all
        # on a driver too old for it)
        raise MissingBackendError(f"the installed TensorRT is its CUDA {trt_cuda} build and torch is a CUDA "
                                  f"{torch.version.cuda} build: {install_hint()} instead, or a torch for CUDA "
                                  f"{trt_cuda}")
    try:
        import tensorrt as trt
    except ImportError as err:
        raise MissingBackendError(f"TensorRT is not installed: {install_hint()}") from err
    except OSError as err:  # the wheel is there, its CUDA libraries are not
        raise MissingBackendError(f"TensorRT is installed but cannot load its libraries ({err}); "
                                  f"{install_hint()} and a matching CUDA driver") from err
    if parse_version(trt.__version__)[0] < MIN_TENSORRT:
        raise MissingBackendError(f"TensorRT {trt.__version__} is too old: asdm-export needs TensorRT "
                                  f"{MIN_TENSORRT} or newer (strongly typed networks); {install_hint()}")
    return trt


def parse_version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in str(text).split(".") if p.isdigit())


@dataclass(frozen=True)
class TrtPlatform:
    """What a TensorRT engine is tied to: the TensorRT version and the GPU."""

    tensorrt: str  # full version, e.g. 10.8.0.43
    gpu: str
    compute_capability: str  # "8.9"

    @property
    def tag(self) -> str:
        """``trt10.8.sm89``: the part of engine file names that says where they run."""
        major, minor = (parse_version(self.tensorrt) + (0, 0))[:2]
        return f"trt{major}.{minor}.sm{self.compute_capability.replace('.', '')}"

    def to_json(self) -> dict:
        return {"tensorrt": self.tensorrt, "gpu": self.gpu, "compute_capability": self.compute_capability}


def current_platform(device: int | None = None) -> TrtPlatform:
    """This machine's TensorRT and GPU (``MissingBackendError`` without either)."""
    trt = import_tensorrt()
    if not torch.cuda.is_available():
        raise MissingBackendError("TensorRT needs an NVIDIA GPU visible to torch (torch.cuda.is_available() is "
                                  "False): install a CUDA build of torch on a machine with an NVIDIA GPU")
    device = torch.cuda.current_device() if device is None else device
    major, minor = torch.cuda.get_device_capability(device)
    return TrtPlatform(trt.__version__, torch.cuda.get_device_name(device), f"{major}.{minor}")


def engine_file_name(graph: str, profile_index: int, platform: TrtPlatform) -> str:
    return f"{graph}.p{profile_index}.{platform.tag}.plan"


def compatibility_problem(built: dict, here: dict) -> str | None:
    """Why an engine recorded as ``built`` (platform + builder settings) cannot run ``here``; None if it can.

    TensorRT plans run only on the TensorRT version that built them, unless built version-compatible (then
    on that major version from the building release on, and on the next major where TensorRT supports it:
    10 -> 11); and only on the GPU model they were built on, unless built hardware-compatible
    (``same_compute_capability``: any GPU of that compute capability; ``ampere_plus``: any of 8.0 or newer).
    """
    bv, hv = parse_version(built["tensorrt"]), parse_version(here["tensorrt"])
    if built.get("version_compatible"):
        majors = (bv[0], *LATER_MAJORS.get(bv[0], ()))
        if hv[0] not in majors or hv < bv:
            runs_on = " and ".join(f"{m}.x" for m in majors)
            return (f"it was built version-compatible with TensorRT {built['tensorrt']}, which runs on TensorRT "
                    f"{runs_on} from {built['tensorrt']} on; this machine has TensorRT {here['tensorrt']}")
    elif hv != bv:
        return (f"it was built with TensorRT {built['tensorrt']} and this machine has TensorRT {here['tensorrt']}: "
                "an engine runs only on the TensorRT version that built it")
    bcc, hcc = parse_version(built["compute_capability"]), parse_version(here["compute_capability"])
    hardware = built.get("hardware_compatibility", "none")
    if hardware == "ampere_plus":
        if hcc < (8, 0):
            return (f"it was built for Ampere or newer GPUs (compute capability >= 8.0); this GPU "
                    f"({here['gpu']}) has compute capability {here['compute_capability']}")
    elif bcc != hcc:
        return (f"it was built for compute capability {built['compute_capability']} ({built['gpu']}); this GPU "
                f"({here['gpu']}) has compute capability {here['compute_capability']}")
    elif hardware == "none" and built.get("gpu") != here.get("gpu"):
        # same compute capability is not enough: without hardware compatibility TensorRT picks kernels for
        # the building GPU model (its SM count, memory, clocks) and does not promise they run elsewhere
        return (f"it was built on a {built.get('gpu')} and this GPU is a {here.get('gpu')}: without hardware "
                "compatibility an engine runs only on the GPU model that built it (build with "
                "hardware_compatibility: same_compute_capability to share engines between GPUs of compute "
                f"capability {built['compute_capability']})")
    return None


def check_compatible(manifest: dict, here: TrtPlatform | dict) -> None:
    """Refuse an engine folder whose engines cannot run here (one line naming the first such engine)."""
    here = here.to_json() if isinstance(here, TrtPlatform) else here
    builder = (manifest.get("spec") or {}).get("builder") or {}
    for graph in manifest["graphs"]:
        for engine in graph.get("engines", []):
            built = {**builder, **manifest["platform"], **engine.get("platform", {})}
            problem = compatibility_problem(built, here)
            if problem:
                raise EngineMismatchError(f"engine '{engine['file']}' cannot run here: {problem}; rebuild the engines "
                                          "on this machine with `asdm-export build`")


def gpu_slug(name: str) -> str:
    """``NVIDIA GeForce RTX 4090`` -> ``nvidia-geforce-rtx-4090`` (for file names)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def device_memory_size(engine) -> int:
    # device_memory_size_v2 since TensorRT 10.1 (includes weight-streaming scratch); device_memory_size, the
    # only one on 10.0, is gone in 11
    return int(engine.device_memory_size_v2 if hasattr(engine, "device_memory_size_v2") else engine.device_memory_size)


# ---- running -------------------------------------------------------------------------------------------

class SharedDeviceMemory:
    """One device buffer for the scratch memory of every execution context.

    Contexts are enqueued one after another on one stream, so they never use scratch memory at the same
    time: the pool is as large as the largest engine needs. It grows when an engine that needs more is
    loaded; every context is then pointed at the new buffer, and ``generation`` tells captured CUDA graphs
    (which hold the old address) to re-capture. Every context gets its memory set, also when no engine
    needs any: a user-managed context refuses to run before it was given some (a null address with size 0
    is what TensorRT documents for that case).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.buffer: torch.Tensor | None = None
        self.contexts: list = []
        self.generation = 0

    @property
    def size(self) -> int:
        return 0 if self.buffer is None else self.buffer.numel()

    @property
    def address(self) -> int:
        return 0 if self.buffer is None else self.buffer.data_ptr()

    def attach(self, context, size: int) -> None:
        self.contexts.append(context)
        if size > self.size:
            # the old buffer returns to torch's caching allocator on the caller's stream (engines load inside
            # TrtBackend.run), which already waits for every engine run that used it: nothing reuses it early
            self.buffer = torch.empty(size, dtype=torch.uint8, device=self.device)
            self.generation += 1
            for ctx in self.contexts:
                _set_device_memory(ctx, self.address, self.size)
        else:
            _set_device_memory(context, self.address, self.size)


def _set_device_memory(context, address: int, size: int) -> None:
    if hasattr(context, "set_device_memory"):  # TensorRT >= 10.1: the size lets it check
        context.set_device_memory(address, size)
    else:
        context.device_memory = address


def _user_managed_context(trt, engine):
    """An execution context that allocates no scratch memory of its own."""
    strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
    if hasattr(engine, "create_runtime_config"):  # TensorRT >= 10.11: the runtime-config spelling
        config = engine.create_runtime_config()
        config.set_execution_context_allocation_strategy(strategy)
        context = engine.create_execution_context(config)
    else:
        context = engine.create_execution_context(strategy)
    if context is None:
        raise StageError("TensorRT could not create an execution context (out of GPU memory?)")
    return context


def _torch_dtypes(trt) -> dict:
    pairs = [("FLOAT", torch.float32), ("HALF", torch.float16), ("BF16", torch.bfloat16), ("INT32", torch.int32),
             ("INT64", torch.int64), ("INT8", torch.int8), ("UINT8", torch.uint8), ("BOOL", torch.bool)]
    return {getattr(trt.DataType, n): t for n, t in pairs if hasattr(trt.DataType, n)}


@dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]


class _Engine:
    """One deserialized engine (one graph, one profile) with its execution contexts: one for runs without a
    CUDA graph (shapes set per call), and one per captured input shapes (a captured graph's kernels read the
    shapes its context holds, so no other shapes may be set on that context afterwards)."""

    def __init__(self, trt, runtime, path: Path, record: dict, pool: SharedDeviceMemory):
        data = path.read_bytes()
        self.engine = runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise EngineMismatchError(f"TensorRT could not load engine '{path.name}' (corrupt, or built by another "
                                      "TensorRT); rebuild the engines with `asdm-export build`")
        self.trt = trt
        self.bytes = len(data)
        self.path, self.record, self.pool = path, record, pool
        self.scratch = device_memory_size(self.engine)
        self.context = self._new_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        dtypes = _torch_dtypes(trt)
        self.dtypes = {n: dtypes[self.engine.get_tensor_dtype(n)] for n in names}
        profile = record["profile"]
        self.static = is_static(profile)
        self.graph_contexts: dict[tuple, object] = {}  # input shapes -> the context its graph was captured on
        self.captured: dict[tuple, _Captured] = {}
        self.generation = pool.generation
        self.graphs_failed = False  # a capture failed once: this engine runs without CUDA graphs

    def _new_context(self):
        context = _user_managed_context(self.trt, self.engine)
        self.pool.attach(context, self.scratch)
        return context

    def _bind(self, ctx, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor] | None = None):
        for name, t in inputs.items():
            if not ctx.set_input_shape(name, tuple(t.shape)):
                raise InputError(f"engine '{self.path.name}' refuses input '{name}' of shape {list(t.shape)} (it "
                                 f"takes {describe_profile(self.record['profile'])}); rebuild with a spec whose "
                                 "profiles include it")
            ctx.set_tensor_address(name, t.data_ptr())
        if outputs is None:
            outputs = {n: torch.empty(tuple(ctx.get_tensor_shape(n)), dtype=self.dtypes[n], device=self.pool.device)
                       for n in self.outputs}
        for name, t in outputs.items():
            ctx.set_tensor_address(name, t.data_ptr())
        return outputs

    def _enqueue(self, ctx, stream) -> None:
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise StageError(f"TensorRT failed to run engine '{self.path.name}' (see the TensorRT log above)")

    def run(self, feeds: dict[str, torch.Tensor], cuda_graphs: bool, stream) -> tuple[dict[str, torch.Tensor], bool]:
        """Enqueue the engine on ``stream`` (which already waits for the caller's writes of ``feeds``). Returns the
        outputs and whether they are a captured graph's static buffers (overwritten by its next replay)."""
        if cuda_graphs and not self.graphs_failed:
            cap = self._graph(feeds, stream)
            if cap is not None:
                with torch.cuda.stream(stream):
                    for name, t in feeds.items():
                        cap.inputs[name].copy_(t)
                    cap.graph.replay()
                return cap.outputs, True
        outputs = self._bind(self.context, feeds)
        self._enqueue(self.context, stream)
        return outputs, False

    def _graph(self, feeds: dict[str, torch.Tensor], stream) -> _Captured | None:
        """The graph captured for these input shapes (captured now if new); None when capture fails."""
        if self.generation != self.pool.generation:  # the pool moved: captured graphs point at the old one
            self.captured.clear()
            self.generation = self.pool.generation
        key = tuple(tuple(feeds[n].shape) for n in self.inputs)
        cap = self.captured.get(key)
        if cap is not None:
            return cap
        ctx = self.graph_contexts.get(key)
        if ctx is None:
            ctx = self.graph_contexts[key] = self._new_context()
        with torch.cuda.stream(stream):  # static buffers and warm-up on the stream the graph replays on
            inputs = {n: t.clone() for n, t in feeds.items()}
            outputs = self._bind(ctx, inputs)
            # TensorRT must run once before capture (lazy set-up it may not do while capturing)
            self._enqueue(ctx, stream)
            graph = torch.cuda.CUDAGraph()
            error = None
            # thread-local mode, as trtexec: other threads' CUDA calls do not invalidate this capture
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                if not ctx.execute_async_v3(stream.cuda_stream):
                    error = "TensorRT could not enqueue the engine while capturing"
            except Exception as err:  # noqa: BLE001 - whatever broke the capture is reported below, then we run without
                error = f"{type(err).__name__}: {err}"
            finally:
                try:  # always end the capture, so the stream leaves capture mode
                    graph.capture_end()
                except RuntimeError as err:
                    error = error or first_line(err)
        if error is not None:
            # as trtexec does: an engine with work CUDA graphs cannot hold runs without one (the first error
            # is the one reported, not the capture end's that follows from it)
            self.graphs_failed = True
            log.warning("CUDA graph capture of engine '%s' failed (%s); running it without CUDA graphs",
                        self.path.name, str(error)[:300])
            return None
        cap = self.captured[key] = _Captured(graph, inputs, outputs)
        return cap


class TrtBackend(Backend):
    """An engine folder of TensorRT engines (``build --backend trt``) on this machine's GPU.

    ``cuda_graphs``: ``"static"`` (capture and replay engines whose profile is one shape), ``"always"``
    (also dynamic engines, one graph and execution context per input shapes), ``"never"``.
    Engines run on ``self.stream``, a stream the backend owns, ordered with the caller's current stream.
    """

    name = "trt"

    def __init__(self, engines_dir: Path | str, cuda_graphs: str = "static", device: int | None = None):
        if cuda_graphs not in ("static", "always", "never"):
            raise InputError(f"cuda_graphs must be static, always or never, got '{cuda_graphs}'")
        self.folder = Path(engines_dir)
        self.manifest = read_manifest(self.folder, "engines")
        require_engines(self.folder, self.manifest, "trt")
        self.trt = import_tensorrt()
        here = current_platform(device)
        check_compatible(self.manifest, here)
        self.device = torch.device("cuda", torch.cuda.current_device() if device is None else device)
        self.cuda_graphs = cuda_graphs
        self.runtime = self.trt.Runtime(self.trt.Logger(self.trt.Logger.WARNING))
        if (self.manifest.get("spec") or {}).get("builder", {}).get("version_compatible"):
            # version-compatible plans carry the lean runtime that runs them: host code TensorRT must trust
            self.runtime.engine_host_code_allowed = True
        self.pool = SharedDeviceMemory(self.device)
        # TensorRT's own stream: not the legacy default stream (on which TensorRT synchronises the device), and
        # the one stream warm-up, capture and replay all use
        self.stream = torch.cuda.Stream(device=self.device)
        self.records = {g["name"]: g["engines"] for g in self.manifest["graphs"]}
        for records in self.records.values():
            for r in records:
                if not (self.folder / r["file"]).is_file():
                    raise InputError(f"engine file '{r['file']}' is missing from '{self.folder}'; rebuild the engines")
        self._loaded: dict[tuple[str, int], _Engine] = {}

    def graph_names(self) -> list[str]:
        return list(self.records)

    def _engine(self, graph: str, shapes: dict[str, tuple[int, ...]]) -> _Engine:
        """The loaded engine of ``graph`` whose profile covers ``shapes`` (static ones first); loads on demand."""
        records = self.records[graph]
        i = select_engine(records, shapes)
        if i is not None:
            key = (graph, i)
            if key not in self._loaded:
                t0 = time.perf_counter()
                self._loaded[key] = _Engine(self.trt, self.runtime, self.folder / records[i]["file"], records[i],
                                            self.pool)
                log.info("loaded %s in %.1f s", records[i]["file"], time.perf_counter() - t0)
            return self._loaded[key]
        covered = "; ".join(describe_profile(r["profile"]) for r in records)
        raise InputError(f"no engine of graph '{graph}' takes inputs of shapes "
                         f"{ {n: list(s) for n, s in shapes.items()} } (its engines take: {covered}); rebuild with "
                         "a spec whose profiles include them")

    def run(self, graph, feeds):
        self._require(graph)
        tensors = {n: v if isinstance(v, torch.Tensor) else torch.as_tensor(v) for n, v in feeds.items()}
        with torch.cuda.device(self.device):
            engine = self._engine(graph, {n: tuple(t.shape) for n, t in tensors.items()})
            missing = [n for n in engine.inputs if n not in tensors]
            if missing:
                raise InputError(f"graph '{graph}' needs inputs {', '.join(missing)}")
            # no-ops when the caller already holds contiguous tensors of the engine's dtype on this GPU
            bound = {n: tensors[n].to(device=self.device, dtype=engine.dtypes[n]).contiguous() for n in engine.inputs}
            use_graph = self.cuda_graphs == "always" or (self.cuda_graphs == "static" and engine.static)
            caller = torch.cuda.current_stream(self.device)
            # the engine reads the inputs after the caller's stream wrote them, and writes its outputs after the
            # caller's stream is done with the memory they reuse
            self.stream.wait_stream(caller)
            outputs, static = engine.run(bound, use_graph, self.stream)
            # the caller's stream reads the outputs (and may free the inputs) only after the engine ran
            caller.wait_stream(self.stream)
            # a graph's static output buffers are overwritten by its next replay; callers keep outputs across steps
            return {n: t.clone() for n, t in outputs.items()} if static else outputs

    def covers(self, graph, shapes):
        return graph in self.records and select_engine(self.records[graph], shapes) is not None

    def built_shapes(self, graph):
        return profile_points([record["profile"] for record in self.records.get(graph, ())])

    def memory(self):
        out: dict[str, int] = {}
        for (graph, _), engine in self._loaded.items():
            out[graph] = out.get(graph, 0) + engine.bytes
        return out

    @property
    def shared_memory_bytes(self) -> int:
        """Size of the scratch memory pool all execution contexts share."""
        return self.pool.size

