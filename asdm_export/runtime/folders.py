"""A bundle or an engine folder opened to run: its manifest (files all there), the backend that runs it (chosen,
checked, made) and the batch its denoising loop takes. ``AsdmPipeline``, ``check``, ``serve`` and ``quality``
open folders through it."""

from __future__ import annotations

from pathlib import Path

from ..artifacts import ENGINE_KINDS, read_manifest, require_engines, require_files, unet_entries
from ..errors import InputError
from .backends import Backend, OrtBackend
from .runners import set_torch_threads

BACKENDS = ("ort", "trt", "torch")


def loop_batch_limit(manifest: dict) -> int:
    """Requests one denoising loop can take: the largest B for which every UNet graph runs each batch 2, 4, ...,
    2B (classifier-free guidance doubles a loop's batch; ``generate`` puts any number up to B in one loop). A
    bundle's graphs (and ONNX Runtime's) take their profile's batch range, TensorRT engines their profiles' only,
    torch programs the batches they were built at: a folder built for one image with guidance takes 1."""
    unets = unet_entries(manifest)
    programs = manifest.get("programs", []) if manifest.get("backend") == "torch" else None

    def runs(graph: dict, batch: int) -> bool:
        if programs is not None:
            return any(p["name"] == graph["name"] and p["inputs"]["sample"][0] == batch for p in programs)
        profiles = [e["profile"]["sample"] for e in graph.get("engines", []) if e.get("profile")]
        if profiles:
            return any(p["min"][0] <= batch <= p["max"][0] for p in profiles)
        return graph["profile"]["batch"]["min"] <= batch <= graph["profile"]["batch"]["max"]

    limit = 1
    while limit < 4096 and all(runs(g, 2 * (limit + 1)) for g in unets):
        limit += 1
    return limit


def open_manifest(folder: Path) -> dict:
    """A bundle's or an engine folder's manifest, its listed files all there."""
    manifest = read_manifest(folder, ("bundle", "engines"))
    require_files(Path(folder), manifest)
    return manifest


def default_backend(manifest: dict) -> str:
    """What runs a folder when no backend is named: an engine folder its own, a bundle ONNX Runtime."""
    return manifest.get("backend", "ort") if manifest["kind"] == "engines" else "ort"


def check_backend_choice(folder: Path, manifest: dict, backend: str | None, device: str | None = None,
                         dtype: str | None = None, provider: str | None = None) -> str:
    """The backend that will run ``folder`` (``backend`` or the folder's own), after the checks that need no
    backend loaded: InputError for a choice the folder or the options cannot take (``serve`` asks before it
    starts a server)."""
    backend = backend or default_backend(manifest)
    if backend not in BACKENDS:
        raise InputError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    if backend != "torch" and (device is not None or dtype is not None):
        raise InputError("--device and --dtype choose the PyTorch runtime's device and precision: use them with "
                         "--backend torch (ONNX Runtime takes --provider; TensorRT engines carry their precision)")
    if backend != "ort" and provider is not None:
        raise InputError(f"--provider chooses ONNX Runtime's execution provider, and '{folder}' runs on {backend}: "
                         "use it with --backend ort (--backend torch takes --device; TensorRT runs on the GPU)")
    own = manifest.get("backend") if manifest["kind"] == "engines" else None
    if backend == "trt":
        require_engines(folder, manifest, backend)
    elif own is not None:  # an engine folder runs on its own backend; a bundle on ort and torch as it is
        instead = f"run it with --backend {own}, or " if own in ENGINE_KINDS else ""
        require_engines(folder, manifest, backend, instead=f"{instead}run its bundle with --backend {backend}")
    return backend


def make_backend(folder: Path, manifest: dict, backend: str | None, provider: str | None = None,
                 device: str | None = None,
                 dtype: str | None = None, files_checked: bool = False, gpu: int | None = None,
                 threads: int = 0) -> Backend:
    """The backend that runs ``folder``'s graphs. ``torch`` is the PyTorch program runtime (``ProgramBackend``:
    each graph's module exported and pruned, CUDA graphs on GPUs) on ``device`` in ``dtype``; ``check`` keeps
    the eager reference modules (``TorchBackend``) as its reference. ``files_checked``: the caller hashed a
    torch engine folder's files and reported those that changed (``check``), so they are run, not refused.
    ``gpu``: the GPU index for whichever backend runs on one (a server's instance on each GPU): TensorRT, an
    ONNX Runtime GPU provider, ``--device cuda``; default: the current device. ``threads``: CPU threads, for
    ONNX Runtime's sessions and PyTorch's (process-wide) intra-op pool; 0 keeps the folder's and the
    libraries' defaults."""
    backend = check_backend_choice(folder, manifest, backend, device, dtype, provider)
    set_torch_threads(threads)  # PyTorch runs the loop, and a CPU program backend, on this pool
    if backend == "torch":
        from .program_backend import ProgramBackend

        # a server instance's GPU, where the device is CUDA without an index: --device cuda, or a CUDA engine
        # folder's own (an explicit cuda:N is the user's choice)
        built = (manifest.get("platform") or {}).get("device") if manifest["kind"] == "engines" else None
        if gpu is not None and (device or built) == "cuda":
            device = f"cuda:{gpu}"

        if manifest["kind"] == "engines":
            return ProgramBackend.from_engines(folder, device=device, dtype=dtype, files_checked=files_checked)
        return ProgramBackend.from_bundle(folder, device=device or "cpu", dtype=dtype)
    if backend == "trt":
        from .trt_backend import TrtBackend  # imports TensorRT only when opened: its errors say which wheel

        return TrtBackend(folder, device=gpu)
    return OrtBackend(folder, provider, gpu=gpu, threads=threads)
