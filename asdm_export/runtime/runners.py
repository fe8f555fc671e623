"""Polygraphy runners: our PyTorch reference runner and ONNX Runtime sessions.

Polygraphy's own PytRunner moves the model to CUDA, so the reference on CPU machines is ours: it
runs the very torch module a graph was exported from, in float32.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from ..errors import InputError, MissingBackendError
from ..graphs.graphs import GraphDef

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


def ort_session(path: Path, provider: str = "cpu", threads: int = 0):
    """An ONNX Runtime session on one execution provider (CPU as fallback for unsupported nodes).

    Raises ``MissingBackendError`` when the provider is not usable on this machine.
    """
    import onnxruntime as ort

    if provider not in ORT_PROVIDERS:
        raise InputError(f"unknown ONNX Runtime provider '{provider}'; choose from {', '.join(ORT_PROVIDERS)}")
    ep = ORT_PROVIDERS[provider]
    if ep not in ort.get_available_providers():
        raise MissingBackendError(f"ONNX Runtime here has no {ep}; install onnxruntime-gpu on a CUDA machine")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    providers = [ep] if ep == "CPUExecutionProvider" else [ep, "CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as err:  # ORT raises its own exception types for invalid graphs
        raise InputError(f"ONNX Runtime cannot load '{path}': {str(err).splitlines()[0][:300]}") from err
    if session.get_providers()[0] != ep:
        # ORT falls back to CPU silently when the CUDA / TensorRT libraries or the GPU are missing.
        raise MissingBackendError(f"{ep} is installed but not usable here (no GPU or CUDA libraries)")
    return session


def ort_runner(path: Path, provider: str = "cpu"):
    from polygraphy.backend.onnxrt import OnnxrtRunner

    return OnnxrtRunner(ort_session(path, provider), name=f"ort-{provider}")


def usable_providers(requested: list[str]) -> list[str]:
    """The requested providers, with ``auto`` expanded to every provider that works here."""
    import onnxruntime as ort

    if requested != ["auto"]:
        return requested
    available = ort.get_available_providers()
    found = ["cpu"]
    for short in ("cuda", "trt"):
        if ORT_PROVIDERS[short] in available and _gpu_present():
            found.append(short)
    return found


def _gpu_present() -> bool:
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if not exe:
        return False
    try:
        return subprocess.run([exe, "-L"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
