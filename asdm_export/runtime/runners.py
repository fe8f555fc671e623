"""Polygraphy runners: our PyTorch reference runner and ONNX Runtime sessions.

Polygraphy's own PytRunner moves the model to CUDA, so the reference on CPU machines is ours: it
runs the very torch module a graph was exported from, in float32.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from ..errors import InputError, MissingBackendError, first_line
from ..graphs.graphs import GraphDef
from ..limits import THREADS_MAX

# Short names users type -> ONNX Runtime execution providers.
ORT_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}


class TorchRunner(BaseRunner):
    """Runs a ``GraphDef``'s torch module on CPU in float32."""

    def __init__(self, gdef: GraphDef, name: str | None = None):
        super().__init__(name=name or f"torch:{gdef.name}", prefix="torch")
        self.gdef = gdef

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        for name, shape in self.gdef.inputs.items():
            meta.add(name, np.dtype(self.gdef.dtype_of(name)), tuple(d if isinstance(d, int) else None for d in shape))
        return meta

    def infer_impl(self, feed_dict):
        args = [torch.from_numpy(np.ascontiguousarray(feed_dict[n])) for n in self.gdef.inputs]  # dtypes as fed
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.gdef.module(*args)
        self.inference_time = time.perf_counter() - start
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return OrderedDict((n, o.float().numpy()) for n, o in zip(self.gdef.outputs, outs))


def ort_session(path: Path, provider: str = "cpu", threads: int = 0, exact_int8: bool | None = None,
                gpu: int | None = None):
    """An ONNX Runtime session on one execution provider (CPU as fallback for unsupported nodes); ``gpu``: the
    device a GPU provider runs on (default: its own default, GPU 0).

    ``exact_int8``: ORT's exact U8U8 int8 kernels on CPU (None: where its U8S8 ones saturate, see
    ``cpu_int8_saturates``). Raises ``MissingBackendError`` when the provider is not usable on this machine.
    """
    import onnxruntime as ort

    ep = provider_here(provider, gpu_checked=False)  # a GPU's absence is said where the session fails
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if ep == "CPUExecutionProvider" and (cpu_int8_saturates() if exact_int8 is None else exact_int8):
        # exact int8 products on x86 CPUs without VNNI; a no-op for graphs without int8 weights
        options.add_session_config_entry("session.x64quantprecision", "1")
    try:
        return inference_session(path, options, ep, gpu)
    except MissingBackendError:
        raise
    except Exception as err:  # ORT raises its own exception types for invalid graphs
        raise InputError(f"ONNX Runtime cannot load '{path}': {first_line(err)}") from err


def inference_session(path: Path, options, ep: str, gpu: int | None = None):
    """``ort.InferenceSession`` on ``ep`` (CPU as fallback for unsupported nodes); ``MissingBackendError`` in
    one line when ORT could not start ``ep`` itself. ORT then falls back to CPU on its own, printing a
    banner to stdout and its loader's errors to stderr; a GPU provider's session is created with both
    captured, so a command's output stays one line per result (``check --ci``) and the line names the cause."""
    import onnxruntime as ort

    if ep == "CPUExecutionProvider":
        return ort.InferenceSession(str(path), sess_options=options, providers=[ep])
    first = ep if gpu is None else (ep, {"device_id": int(gpu)})
    with _captured_output() as said:
        session = ort.InferenceSession(str(path), sess_options=options, providers=[first, "CPUExecutionProvider"])
    if session.get_providers()[0] != ep:
        cause = re.search(r"with error: ([^\n]+)|Please install ([^\n.]+)", said["text"])
        why = next(g for g in cause.groups() if g).strip() if cause else "no GPU or CUDA libraries"
        if not gpu_present():  # its missing CUDA libraries are not what a machine without a GPU lacks
            raise MissingBackendError(_no_gpu(ep))
        raise MissingBackendError(f"{ep} is installed but not usable here ({why[:200]}); use --provider cpu, or "
                                  "install the CUDA / cuDNN libraries this onnxruntime-gpu needs")
    sys.stderr.write(said["text"])  # a provider that started: its warnings are the user's to see
    return session


class _captured_output:
    """File descriptors 1 and 2 into one temporary file for the block (native libraries write there, not to
    ``sys.stdout``); the text is in ``said["text"]`` after it."""

    def __enter__(self) -> dict:
        self.said = {"text": ""}
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        self.file = tempfile.TemporaryFile()
        self.saved = [os.dup(1), os.dup(2)]
        for fd in (1, 2):
            os.dup2(self.file.fileno(), fd)
        return self.said

    def __exit__(self, *exc) -> None:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for fd, saved in zip((1, 2), self.saved):
            os.dup2(saved, fd)
            os.close(saved)
        self.file.seek(0)
        self.said["text"] = re.sub(r"\x1b\[[0-9;]*m", "", self.file.read().decode(errors="replace"))
        self.file.close()


VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_int8_saturates(cpuinfo: str | None = None, machine: str | None = None) -> bool:
    """Whether ONNX Runtime's fast int8 (U8S8) kernels saturate on this CPU.

    Without VNNI, MLAS multiplies uint8 activations by int8 weights with VPMADDUBSW, which sums each pair of
    products into a saturating int16: 2 x 255 x 127 > 32767, so large activations times large weights clip
    (measured on an AVX2-only AMD EPYC, tiny UNet: rel L2 0.32 against fp32 where the exact Q/DQ arithmetic
    gives 0.077). VNNI's VPDPBUSD (and AMX) accumulate in int32. ONNX Runtime's documented remedy is the
    session option ``session.x64quantprecision``: int8 weights become uint8 (``w + 128``, zero point moved
    with them), and its U8U8 kernels compute the same products without the clamp. The bundle keeps full
    8-bit weights, so TensorRT and VNNI CPUs lose nothing. An x86 CPU whose flags cannot be read (no
    /proc/cpuinfo) counts as saturating: exact, if slower.
    """
    import platform

    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False  # ARM's int8 dot products accumulate in int32
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return True
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return not flags.intersection(VNNI_FLAGS)


def cpu_int8_kernels() -> str:
    """What ONNX Runtime's CPU provider multiplies int8 with here (recorded in check reports)."""
    return ("u8u8 (session.x64quantprecision: this x86 CPU has no VNNI, its u8s8 kernels saturate)"
            if cpu_int8_saturates() else "u8s8 (no saturation on this CPU)")


def set_torch_threads(threads: int) -> None:
    """PyTorch's (process-wide) intra-op pool at ``threads``; 0 leaves it as it is."""
    if isinstance(threads, bool) or not isinstance(threads, int) or not 0 <= threads <= THREADS_MAX:
        raise InputError(f"threads must be a whole number from 0 (the libraries' defaults) to {THREADS_MAX}, "
                         f"not {threads!r}")
    if threads:
        import torch

        torch.set_num_threads(threads)


def ort_runner(path: Path, provider: str = "cpu", threads: int = 0):
    from polygraphy.backend.onnxrt import OnnxrtRunner

    return OnnxrtRunner(ort_session(path, provider, threads=threads), name=f"ort-{provider}")


def provider_here(provider: str, gpu_checked: bool = True) -> str:
    """The execution provider of ``provider`` (cpu, cuda, trt), refused in one line where this machine cannot
    run it: not in this onnxruntime, or (``gpu_checked``) a GPU provider without a GPU."""
    import onnxruntime as ort

    if provider not in ORT_PROVIDERS:
        raise InputError(f"unknown ONNX Runtime provider '{provider}'; choose from {', '.join(ORT_PROVIDERS)}")
    ep = ORT_PROVIDERS[provider]
    if ep not in ort.get_available_providers():
        raise MissingBackendError(f"ONNX Runtime here has no {ep}; install onnxruntime-gpu on a CUDA machine")
    if gpu_checked and ep != "CPUExecutionProvider" and not gpu_present():
        raise MissingBackendError(_no_gpu(ep))
    return ep


def _no_gpu(ep: str) -> str:
    return f"{ep} needs an NVIDIA GPU and its driver; none is here: use --provider cpu"


def usable_providers(requested: list[str]) -> list[str]:
    """The requested providers, each once, with ``auto`` expanded to every provider that works here; a named
    one that cannot run here is refused now (``provider_here``), not after minutes of reference work."""
    import onnxruntime as ort

    found: list[str] = []
    for name in requested:
        if name != "auto":
            provider_here(name)
            found.append(name)
            continue
        available = ort.get_available_providers()
        found += ["cpu"] + [short for short in ("cuda", "trt") if ORT_PROVIDERS[short] in available and gpu_present()]
    return list(dict.fromkeys(found))


def gpu_present() -> bool:
    """An NVIDIA GPU and its driver are here: ``nvidia-smi -L`` lists one, or, where there is no nvidia-smi
    (containers may mount only the driver's libraries), libcuda loads. A subprocess and a library load rather
    than CUDA itself, so the process that asks has no CUDA context (a later fork stays safe)."""
    import ctypes
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if not exe:
        try:
            ctypes.CDLL("libcuda.so.1")
            return True
        except OSError:
            return False
    try:
        return subprocess.run([exe, "-L"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
