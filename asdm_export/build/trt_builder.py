"""TensorRT engines for ``build`` (polygraphy loaders), TensorRT 10 / 11.

One engine per graph and optimisation profile, from a strongly typed network (precision comes from the graph:
fp16 tensors, Q/DQ nodes), with the spec's builder optimisation level, timing cache, refit, version and hardware
compatibility. The serialized plan TensorRT builds is what is saved (written under a temporary name, then
renamed); it is deserialized only to read its scratch size. Names, platform and compatibility rules are the
runtime's (``runtime/trt_backend.py``), so that what is built is what runs.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..console import quiet_libraries
from ..errors import MissingBackendError, StageError
from ..runtime.trt_backend import (HARDWARE_LEVEL_SINCE, TrtPlatform, current_platform, device_memory_size,
                                   engine_file_name, gpu_slug, import_tensorrt, parse_version)


def timing_cache_path(template: str | None, platform: TrtPlatform) -> Path | None:
    """The spec's timing cache path, with ``{tensorrt}``, ``{sm}`` and ``{gpu}`` filled in: timing caches are
    per TensorRT version and GPU model (timings measured on one GPU say nothing of another of the same compute
    capability), so a template without ``{gpu}`` gets the GPU's name before its suffix."""
    if not template:
        return None
    major, minor = (parse_version(platform.tensorrt) + (0, 0))[:2]
    sm = platform.compute_capability.replace(".", "")
    gpu = gpu_slug(platform.gpu)
    path = Path(template.format(tensorrt=f"{major}.{minor}", sm=sm, gpu=gpu)).expanduser()
    if "{gpu}" not in template:
        path = path.with_name(f"{path.stem}-{gpu}{path.suffix}")
    return path


def hardware_compatibility_level(trt, name: str):
    """TensorRT's ``HardwareCompatibilityLevel`` for a spec's level (None for ``none``); a clear error when this
    TensorRT has no such level (``SAME_COMPUTE_CAPABILITY`` arrived in 10.9)."""
    if name == "none":
        return None
    level = getattr(trt.HardwareCompatibilityLevel, name.upper(), None)
    if level is None:
        raise MissingBackendError(f"hardware_compatibility: {name} needs TensorRT {HARDWARE_LEVEL_SINCE[name]} or "
                                  f"newer and this machine has TensorRT {trt.__version__}: upgrade TensorRT "
                                  "(pip install -U with your tensorrt-cu* extra) or use another level in the spec")
    return level


def write_plan(dest: Path, plan) -> None:
    """Write a serialized engine to ``dest`` under a temporary name first, so a failed write leaves no
    truncated or empty ``.plan`` behind."""
    data = memoryview(plan) if plan is not None else None
    if data is None or data.nbytes == 0:
        raise StageError(f"TensorRT returned an empty engine for '{dest.name}' (see the TensorRT log above)")
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def polygraphy_profile(shapes: dict[str, tuple]):
    """polygraphy's ``Profile`` (importable without TensorRT) for one engine."""
    from polygraphy.backend.trt import Profile

    profile = Profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.add(name, lo, opt, hi)
    return profile


class TrtBuilder:
    """Builds TensorRT engines for ``build`` (the interface ``build.OrtBuilder`` has too: ``backend``,
    ``platform``, ``artifact_name``, ``build``)."""

    backend = "trt"

    def __init__(self, spec):
        self.trt = import_tensorrt()
        self.spec = spec
        # before any build: a level this TensorRT lacks is one clear line, not an AttributeError mid-build
        self.hardware_level = hardware_compatibility_level(self.trt, spec.builder.hardware_compatibility)
        self.here = current_platform()
        self.platform = self.here.to_json()
        self.timing_cache = timing_cache_path(spec.builder.timing_cache, self.here)
        self.runtime = self.trt.Runtime(self.trt.Logger(self.trt.Logger.WARNING))
        if spec.builder.version_compatible:
            # version-compatible plans carry the lean runtime that runs them: host code TensorRT must trust
            self.runtime.engine_host_code_allowed = True

    def artifact_name(self, graph: str, index: int) -> str:
        return engine_file_name(graph, index, self.here)

    def build(self, src: Path, dest: Path, profile) -> dict:
        """Build one engine from ``src`` (ONNX) for one profile into ``dest``; return what the manifest records."""
        from polygraphy.backend.trt import CreateConfig, engine_bytes_from_network, network_from_onnx_path
        from polygraphy.exception import PolygraphyException

        trt, b = self.trt, self.spec.builder
        if self.timing_cache:
            self.timing_cache.parent.mkdir(parents=True, exist_ok=True)
        cache = str(self.timing_cache) if self.timing_cache else None
        try:
            with quiet_libraries():
                # Strongly typed: every layer runs in the type the graph gives it (TensorRT 10's recommended mode;
                # precision flags such as fp16 do not apply). Native InstanceNormalization, not the plugin, so
                # that version- / hardware-compatible engines hold no plugin.
                network = network_from_onnx_path(str(src), flags=[trt.OnnxParserFlag.NATIVE_INSTANCENORM],
                                                 strongly_typed=True)
                config = CreateConfig(
                    profiles=[polygraphy_profile(profile)],
                    builder_optimization_level=b.optimization_level,
                    load_timing_cache=cache,
                    refittable=b.refittable,
                    version_compatible=b.version_compatible,
                    hardware_compatibility_level=self.hardware_level,
                )
                # The plan as the builder serialized it is what gets saved: a version-compatible engine cannot be
                # serialized again once deserialized (its serialize() returns None).
                plan = engine_bytes_from_network(network, config=config, save_timing_cache=cache)
        except PolygraphyException as err:
            raise StageError(f"TensorRT could not build an engine from '{src.name}': "
                             f"{str(err).strip().splitlines()[-1][:300]}") from err
        engine = self.runtime.deserialize_cuda_engine(plan)  # only to read what the manifest records
        if engine is None:
            raise StageError(f"TensorRT built an engine from '{src.name}' that it cannot load (see the TensorRT "
                             "log above)")
        scratch = device_memory_size(engine)
        del engine  # frees its GPU memory before the next build
        write_plan(dest, plan)
        return {"device_memory_bytes": scratch}
