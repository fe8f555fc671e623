"""TensorRT: what runs without a GPU (names, compatibility refusal, engine selection, the shared memory pool, and
the build and run code paths against stand-ins of TensorRT and torch's CUDA streams and graphs), and build /
refusal / runtime tests on a GPU with TensorRT, which skip with a reason elsewhere."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from asdm_export.build import build_engines
from asdm_export.cli import main
from asdm_export.errors import InputError, MissingBackendError, StageError
from asdm_export.runtime.backends import OrtBackend
from asdm_export.build.trt_builder import timing_cache_path
from asdm_export.runtime.trt_backend import (EngineMismatchError, SharedDeviceMemory, TrtBackend, TrtPlatform,
                                             check_compatible, compatibility_problem, engine_file_name, select_engine)

ROOT = Path(__file__).resolve().parents[1]
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
L4 = {"tensorrt": "10.8.0.43", "gpu": "NVIDIA L4", "compute_capability": "8.9"}


# ---- without a GPU -------------------------------------------------------------------------------------

def test_engine_names_carry_version_and_gpu():
    p = TrtPlatform(**L4)
    assert p.tag == "trt10.8.sm89"
    assert engine_file_name("unet.full", 0, p) == "unet.full.p0.trt10.8.sm89.plan"
    assert engine_file_name("vae_decoder", 2, TrtPlatform("11.0.1.5", "H100", "9.0")) == \
        "vae_decoder.p2.trt11.0.sm90.plan"


@pytest.mark.parametrize("built, here, problem", [
    ({}, {}, None),
    ({}, {"tensorrt": "10.9.0.34"}, "built with TensorRT 10.8.0.43 and this machine has TensorRT 10.9.0.34"),
    ({}, {"tensorrt": "10.8.0.40"}, "runs only on the TensorRT version that built it"),
    ({"version_compatible": True}, {"tensorrt": "10.9.0.34"}, None),
    ({"version_compatible": True}, {"tensorrt": "10.7.0.23"}, "runs on TensorRT 10.x and 11.x from 10.8.0.43 on"),
    ({"version_compatible": True}, {"tensorrt": "11.0.0.1"}, None),  # 10 -> 11: TensorRT's support matrix
    ({"version_compatible": True}, {"tensorrt": "12.0.0.1"}, "runs on TensorRT 10.x and 11.x from 10.8.0.43 on"),
    ({}, {"tensorrt": "11.0.0.1"}, "runs only on the TensorRT version that built it"),
    ({}, {"compute_capability": "8.6", "gpu": "NVIDIA A10"}, "built for compute capability 8.9 (NVIDIA L4); this GPU "
                                                             "(NVIDIA A10) has compute capability 8.6"),
    ({}, {"gpu": "NVIDIA L40S"}, "built on a NVIDIA L4 and this GPU is a NVIDIA L40S"),  # same compute capability
    ({"hardware_compatibility": "same_compute_capability"}, {"gpu": "NVIDIA L40S"}, None),
    ({"hardware_compatibility": "ampere_plus"}, {"gpu": "NVIDIA L40S"}, None),
    ({"hardware_compatibility": "same_compute_capability"}, {"compute_capability": "9.0"}, "compute capability 8.9"),
    ({"hardware_compatibility": "ampere_plus"}, {"compute_capability": "8.0", "gpu": "A100"}, None),
    ({"hardware_compatibility": "ampere_plus"}, {"compute_capability": "7.5", "gpu": "T4"}, "Ampere or newer"),
])
def test_compatibility_problem(built, here, problem):
    found = compatibility_problem({**L4, **built}, {**L4, **here})
    assert found is None if problem is None else problem in found


def recorded_manifest(builder=None) -> dict:
    """An engine folder's manifest as `build --backend trt` writes it (the fields the refusal reads)."""
    profile = {"sample": {"min": [2, 4, 64, 64], "opt": [2, 4, 64, 64], "max": [2, 4, 64, 64]}}
    return {"kind": "engines", "backend": "trt", "platform": dict(L4),
            "spec": {"builder": {"version_compatible": False, "hardware_compatibility": "none", **(builder or {})}},
            "graphs": [{"name": "unet", "engines": [{"file": "engines/unet.p0.trt10.8.sm89.plan",
                                                     "profile": profile, "platform": dict(L4)}]}]}


def test_recorded_engines_are_refused_elsewhere():
    check_compatible(recorded_manifest(), TrtPlatform(**L4))  # where it was built: fine
    with pytest.raises(EngineMismatchError) as err:
        check_compatible(recorded_manifest(), {**L4, "tensorrt": "10.9.0.34"})
    msg = str(err.value)
    assert msg.startswith("engine 'engines/unet.p0.trt10.8.sm89.plan' cannot run here: it was built with TensorRT "
                          "10.8.0.43") and "rebuild the engines on this machine with `asdm-export build`" in msg
    assert "\n" not in msg and isinstance(err.value, InputError)
    with pytest.raises(EngineMismatchError, match="compute capability 8.9"):
        check_compatible(recorded_manifest(), {**L4, "compute_capability": "8.6", "gpu": "RTX 3090"})
    check_compatible(recorded_manifest({"hardware_compatibility": "ampere_plus"}),
                     {**L4, "compute_capability": "8.6", "gpu": "RTX 3090"})


def test_timing_cache_path_is_per_version_and_gpu(tmp_path):
    p = timing_cache_path(str(tmp_path / "t-{tensorrt}-sm{sm}.cache"), TrtPlatform(**L4))
    assert p == tmp_path / "t-10.8-sm89-nvidia-l4.cache"  # the GPU model too, {gpu} or not
    rtx = TrtPlatform("10.8.0.43", "NVIDIA GeForce RTX 4090", "8.9")
    p = timing_cache_path(str(tmp_path / "{gpu}" / "t.cache"), rtx)
    assert p == tmp_path / "nvidia-geforce-rtx-4090" / "t.cache"
    assert timing_cache_path(None, TrtPlatform(**L4)) is None


def test_engine_selection_by_profile():
    dyn = {"profile": {"x": {"min": [1, 8], "opt": [2, 16], "max": [4, 32]}}}
    static = {"profile": {"x": {"min": [2, 16], "opt": [2, 16], "max": [2, 16]}}}
    records = [dyn, static]
    assert select_engine(records, {"x": (2, 16)}) == 1  # the static engine of exactly these shapes
    assert select_engine(records, {"x": (3, 20)}) == 0
    assert select_engine(records, {"x": (8, 16)}) is None
    assert select_engine(records, {"x": (2, 16, 1)}) is None  # another rank
    assert select_engine(records, {"y": (2, 16)}) is None
    # a deployment's ONNX model takes any shape (profile None): after the static engine, never before it
    anything = {"profile": None}
    assert select_engine([anything, static], {"x": (2, 16)}) == 1
    assert select_engine([anything, static], {"x": (8, 16)}) == 0


class FakeContext:
    def __init__(self):
        self.memory = []

    def set_device_memory(self, address, size):
        self.memory.append((address, size))


def test_one_memory_pool_for_all_contexts():
    pool = SharedDeviceMemory(torch.device("cpu"))  # the logic is device-independent
    a, b, c = FakeContext(), FakeContext(), FakeContext()
    pool.attach(a, 1000)
    pool.attach(b, 400)  # fits: b gets the same buffer
    assert pool.size == 1000 and pool.generation == 1
    assert a.memory[-1] == b.memory[-1] == (pool.buffer.data_ptr(), 1000)
    pool.attach(c, 5000)  # grows: every context is pointed at the new buffer, captured graphs are told
    assert pool.size == 5000 and pool.generation == 2
    assert a.memory[-1] == b.memory[-1] == c.memory[-1] == (pool.buffer.data_ptr(), 5000)


def test_trt_backend_needs_a_tensorrt_engine_folder(tiny_bundle, tmp_path):
    out = tmp_path / "ort"
    build_engines(tiny_bundle, "ort-cpu", out)
    with pytest.raises(InputError, match="holds ONNX Runtime graphs, not TensorRT engines; run it with --backend ort"):
        TrtBackend(out)
    with pytest.raises(InputError, match="cuda_graphs must be static, always or never, got 'sometimes'"):
        TrtBackend(out, cuda_graphs="sometimes")
    with pytest.raises(InputError, match="is not an asdm-export engines .it is an asdm-export bundle."):
        TrtBackend(tiny_bundle)


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here: the missing-TensorRT path cannot be shown")
def test_trt_backend_without_tensorrt_says_what_to_install(tiny_bundle, tmp_path, monkeypatch):
    build_engines(tiny_bundle, "ort-cpu", tmp_path / "e")  # an engine folder, relabelled as TensorRT's
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    (tmp_path / "e" / "manifest.json").write_text(json.dumps({**manifest, "backend": "trt"}))
    with pytest.raises(MissingBackendError, match=r'pip install "asdm-export\[tensorrt(-cu1\d)?\]"'):
        TrtBackend(tmp_path / "e")
    monkeypatch.setattr(torch.version, "cuda", "12.8")  # a CUDA 12 torch: the TensorRT wheels of CUDA 12
    with pytest.raises(MissingBackendError, match=r'pip install "asdm-export\[tensorrt-cu12\]"'):
        TrtBackend(tmp_path / "e")


# ---- on a GPU with TensorRT ----------------------------------------------------------------------------

TINY_DYNAMIC = {
    "target": "trt", "shapes": "dynamic",
    "profiles": [{"image": [64, 128, 256], "batch": {"unet": [1, 2, 4], "text_encoder": [1, 1, 2], "vae": [1, 1, 2]}}],
    "builder": {"optimization_level": 2},
}
TINY_STATIC = {
    "target": "trt", "shapes": "static",
    "profiles": [{"image": 128, "batch": {"unet": 2, "text_encoder": 1, "vae": 1}}],
    "builder": {"optimization_level": 2},
}


@pytest.fixture(scope="module")
def trt_gpu():
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (its wheels come from NVIDIA's index "
                                                 "and need an NVIDIA GPU machine)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT is installed but no CUDA GPU is visible to torch")
    return trt


def spec_file(tmp, data, name) -> str:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**data, "builder": {**data["builder"],
                                                        "timing_cache": str(tmp / "timing-{tensorrt}-{sm}.cache")}}))
    return str(path)


@pytest.fixture(scope="module")
def trt_engines(trt_gpu, tiny_bundle, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trt")
    out = tmp / "dynamic"
    build_engines(tiny_bundle, spec_file(tmp, TINY_DYNAMIC, "dyn"), out, cache=tmp / "cache")
    return out, tmp


def test_trt_build_names_and_reuse(trt_engines, tiny_bundle):
    out, tmp = trt_engines
    from asdm_export.artifacts import read_manifest
    from asdm_export.runtime.trt_backend import current_platform

    here = current_platform()
    manifest = read_manifest(out, "engines")
    assert manifest["backend"] == "trt" and manifest["platform"] == here.to_json()
    for g in manifest["graphs"]:
        (engine,) = g["engines"]
        assert engine["file"] == f"engines/{g['name']}.p0.{here.tag}.plan" and (out / engine["file"]).stat().st_size
        assert engine["device_memory_bytes"] >= 0 and engine["profile"]
        # the recorded scratch size is the engine's own (not merely non-negative)
        import tensorrt

        from asdm_export.runtime.trt_backend import device_memory_size

        runtime = tensorrt.Runtime(tensorrt.Logger(tensorrt.Logger.WARNING))
        plan = runtime.deserialize_cuda_engine((out / engine["file"]).read_bytes())
        assert engine["device_memory_bytes"] == device_memory_size(plan)
    assert list(tmp.glob("timing-*.cache"))  # the timing cache was written
    again = build_engines(tiny_bundle, spec_file(tmp, TINY_DYNAMIC, "dyn"), tmp / "again", cache=tmp / "cache")
    assert again["build"]["built"] == 0 and again["build"]["reused"] == len(manifest["graphs"])


def test_trt_refuses_engines_from_elsewhere(trt_engines, tmp_path):
    out, _ = trt_engines
    for field, value in (("tensorrt", "9.3.0.1"), ("compute_capability", "5.0")):
        moved = tmp_path / field
        shutil.copytree(out, moved)
        manifest = json.loads((moved / "manifest.json").read_text())
        manifest["platform"][field] = value
        for g in manifest["graphs"]:
            for e in g["engines"]:
                e["platform"][field] = value
        (moved / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(EngineMismatchError, match="cannot run here"):
            TrtBackend(moved)


def unet_feeds(device, batch=2, h=16, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(batch, 4, h, w, generator=g).to(device),
            "timestep": torch.full((batch,), 500.0).to(device),
            "encoder_hidden_states": torch.randn(batch, 77, 32, generator=g).to(device)}


def test_trt_backend_matches_onnx_runtime(trt_engines, tiny_bundle):
    from asdm_export.runtime.trt_backend import device_memory_size

    out, _ = trt_engines
    trt, ort = TrtBackend(out), OrtBackend(tiny_bundle)
    for shape in ((2, 16, 16), (1, 8, 24), (4, 32, 32)):
        feeds = unet_feeds(trt.device, *shape)
        got = trt.run("unet", feeds)["noise_pred"]
        assert got.is_cuda and got.shape == (shape[0], 4, shape[1], shape[2])  # on the GPU: no host round trip
        want = ort.run("unet", {k: v.cpu() for k, v in feeds.items()})["noise_pred"]
        rel = (got.cpu() - want).norm() / want.norm()
        assert rel < 1e-3, rel
    sizes = [device_memory_size(e.engine) for e in trt._loaded.values()]
    assert trt.shared_memory_bytes == max(sizes)  # one pool, as large as the largest engine needs
    with pytest.raises(InputError, match="no engine of graph 'unet' takes inputs of shapes"):
        trt.run("unet", unet_feeds(trt.device, 8, 16, 16))
    # the product's own bound (fp32 tolerances, every graph, random and recorded cases), not 10x it
    from asdm_export.check import check_bundle

    report = check_bundle(tiny_bundle, out=out.parent / "check", engines=[out], e2e=False, overwrite=True)
    trt_verdicts = [b for g in report["graphs"] for name, b in g["backends"].items() if name.startswith("trt")]
    assert len(trt_verdicts) == len(report["graphs"]) and all(b["passed"] for b in trt_verdicts)


def test_trt_static_engines_replay_cuda_graphs(trt_gpu, tiny_bundle, tmp_path):
    out = tmp_path / "static"
    build_engines(tiny_bundle, spec_file(tmp_path, TINY_STATIC, "static"), out)
    trt = TrtBackend(out)
    direct = TrtBackend(out, cuda_graphs="never")
    a = trt.run("unet", unet_feeds(trt.device, seed=1))["noise_pred"]
    b = trt.run("unet", unet_feeds(trt.device, seed=2))["noise_pred"]  # replay with new inputs
    engine = next(iter(trt._loaded.values()))
    assert engine.static and len(engine.captured) == 1
    assert torch.allclose(a, direct.run("unet", unet_feeds(trt.device, seed=1))["noise_pred"], atol=1e-5)
    assert torch.allclose(b, direct.run("unet", unet_feeds(trt.device, seed=2))["noise_pred"], atol=1e-5)
    assert not torch.allclose(a, b)


def test_trt_runtime_loop_gives_the_onnx_runtime_image(trt_engines, tiny_bundle):
    from asdm_export.runtime.pipeline import AsdmPipeline

    out, _ = trt_engines
    (want,) = AsdmPipeline.from_bundle(tiny_bundle, backend="ort")("a red circle", steps=8, seed=0)
    (got,) = AsdmPipeline.from_bundle(out, backend="trt")("a red circle", steps=8, seed=0)
    assert want.std() > 10 and np.abs(want.astype(int) - got.astype(int)).max() <= 2


# ---- our TensorRT plumbing against a stand-in --------------------------------------------------------------
# No GPU here, so the build and run code paths are driven through a stand-in with the shape of TensorRT's Python
# API whose "engine" is the ONNX graph on ONNX Runtime, reading and writing tensors at the addresses it is
# given, in host memory; and a stand-in for torch's CUDA streams and graphs that logs what is queued where and
# replays captured work. The stand-ins behave as the real APIs document where our code depends on it:
# - a deserialized version-compatible engine's serialize() returns None; a runtime loads a version-compatible
#   plan only when host code is allowed, and another version's plan only when it is version-compatible
#   (10 -> 11 across majors);
# - a context's set_input_shape returns False for shapes outside the engine's profile; a user-managed context
#   runs only once given device memory (a null address is fine when the engine needs 0 bytes);
# - a captured graph replays with the shapes its context holds at replay (TensorRT's kernels read them from
#   the context); a layer not permitted under capture makes execute_async_v3 return False and invalidates the
#   capture, whose end then raises (cudaErrorStreamCaptureInvalidated);
# - per TensorRT version: HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY from 10.9, device_memory_size_v2
#   and set_device_memory from 10.1, device_memory_size until 10.x, create_runtime_config from 10.11.
# This checks our side; the GPU tests above check TensorRT's.

def _version(text):
    return tuple(int(p) for p in text.split(".")[:2])


class _Enum:
    def __init__(self, **values):
        self.__dict__.update(values)


class StandInCuda:
    """torch.cuda's streams and graphs as our code uses them, over host memory, with a log of queued work."""

    def __init__(self):
        self.log: list[tuple] = []
        self.legacy = StandInStream(self, 0)  # what current_stream() is unless a caller set one
        self.current = self.legacy
        self.capturing: dict[int, StandInGraph] = {}
        self.handles = 0

    def new_stream(self, device=None, priority=0):
        self.handles += 1
        return StandInStream(self, 100 + self.handles)

    @contextlib.contextmanager
    def stream(self, stream):
        previous, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = previous


class StandInStream:
    def __init__(self, cuda, handle):
        self.cuda, self.cuda_stream = cuda, handle

    def wait_stream(self, other):
        self.cuda.log.append(("wait", self.cuda_stream, other.cuda_stream))


class StandInGraph:
    def __init__(self, cuda):
        self.cuda, self.work, self.state, self.stream = cuda, [], "new", None

    def capture_begin(self, pool=None, capture_error_mode="global"):
        assert self.cuda.current.cuda_stream != 0, "CUDA cannot capture the legacy default stream"
        self.stream, self.state = self.cuda.current, "capturing"
        self.cuda.capturing[self.stream.cuda_stream] = self

    def capture_end(self):
        del self.cuda.capturing[self.stream.cuda_stream]
        if self.state == "invalidated":
            self.state = "failed"
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
        self.state = "captured"

    def replay(self):
        assert self.state == "captured"
        self.cuda.log.append(("replay", self.cuda.current.cuda_stream))
        for work in self.work:
            work()


class StandInGraphContext:
    """torch.cuda.graph: capture on a side stream; the capture ends in __exit__ whatever happened inside."""

    def __init__(self, cuda, graph, pool=None, stream=None, capture_error_mode="global"):
        self.cuda, self.graph, self.stream = cuda, graph, stream or cuda.new_stream()

    def __enter__(self):
        self.previous, self.cuda.current = self.cuda.current, self.stream
        self.graph.capture_begin()

    def __exit__(self, *exc):
        try:
            self.graph.capture_end()
        finally:
            self.cuda.current = self.previous


class StandInRuntimeConfig:
    strategy = None

    def set_execution_context_allocation_strategy(self, strategy):
        self.strategy = strategy


class StandInEngine:
    def __init__(self, plan: dict, version: str, cuda: StandInCuda):
        import onnx

        self.plan, self.version, self.cuda = plan, version, cuda
        model = onnx.load(plan["onnx"], load_external_data=False)
        kinds = {1: "FLOAT", 10: "HALF", 6: "INT32", 7: "INT64"}
        inits = {i.name for i in model.graph.initializer}
        self.io = [(v.name, "INPUT", kinds[v.type.tensor_type.elem_type]) for v in model.graph.input
                   if v.name not in inits]
        self.io += [(v.name, "OUTPUT", kinds[v.type.tensor_type.elem_type]) for v in model.graph.output]
        self.num_io_tensors = len(self.io)
        self.scratch = plan["scratch"]
        v = _version(version)
        if v >= (10, 1):
            self.device_memory_size_v2 = self.scratch
        if v < (11, 0):
            self.device_memory_size = self.scratch
        if v >= (10, 11):
            self.create_runtime_config = StandInRuntimeConfig
        self.contexts = []

    @functools.cached_property
    def session(self):  # made when first run: `build` deserializes only to read the scratch size
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        return onnxruntime.InferenceSession(self.plan["onnx"], options, providers=["CPUExecutionProvider"])

    def get_tensor_name(self, i):
        return self.io[i][0]

    def get_tensor_mode(self, name):
        return next(m for n, m, _ in self.io if n == name)

    def get_tensor_dtype(self, name):
        return next(d for n, _, d in self.io if n == name)

    def create_execution_context(self, arg):
        strategy = arg.strategy if isinstance(arg, StandInRuntimeConfig) else arg
        assert strategy == "USER_MANAGED"
        context = (StandInContext if _version(self.version) >= (10, 1) else StandInContextV1)(self)
        self.contexts.append(context)
        return context

    def serialize(self):
        # TensorRT: a version-compatible engine cannot be serialized again once deserialized
        return None if self.plan["version_compatible"] else json.dumps(self.plan).encode()


class StandInContextV1:
    """TensorRT 10.0's context: device memory only through the device_memory property."""

    NP = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64}

    def __init__(self, engine):
        self.engine, self.shapes, self.addresses, self.memory = engine, {}, {}, None

    def _set_memory(self, address):
        assert address or self.engine.scratch == 0  # null only when the engine needs no scratch memory
        self.memory = (address, None)

    device_memory = property(None, _set_memory)

    def set_input_shape(self, name, shape):
        p = self.engine.plan["profile"][name]
        if len(shape) != len(p["min"]) or not all(lo <= s <= hi for lo, s, hi in zip(p["min"], shape, p["max"])):
            return False  # TensorRT logs the error and keeps the previous shape
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, address):
        self.addresses[name] = address

    def _array(self, addresses, name, shape):
        import ctypes

        dtype = np.dtype(self.NP[self.engine.get_tensor_dtype(name)])
        n = int(np.prod(shape)) * dtype.itemsize
        return np.frombuffer((ctypes.c_char * n).from_address(addresses[name]), dtype=dtype).reshape(shape)

    def _compute(self, feeds):
        names = [o.name for o in self.engine.session.get_outputs()]
        return dict(zip(names, self.engine.session.run(names, feeds)))

    def get_tensor_shape(self, name):
        zeros = {n: np.zeros(s, self.NP[self.engine.get_tensor_dtype(n)]) for n, s in self.shapes.items()}
        return self._compute(zeros)[name].shape

    def execute_async_v3(self, stream):
        cuda = self.engine.cuda
        cuda.log.append(("enqueue", stream))
        if self.memory is None:
            return False  # a user-managed context that was given no device memory does not run
        graph = cuda.capturing.get(stream)
        if graph is not None:
            if not self.engine.plan.get("capturable", True):
                graph.state = "invalidated"  # a layer not permitted under stream capture
                return False
            addresses, shapes = dict(self.addresses), dict(self.shapes)
            graph.work.append(lambda: self._execute(addresses, shapes))
            return True
        self._execute(self.addresses, self.shapes)
        return True

    def _execute(self, addresses, shapes):
        # TensorRT's kernels read the input shapes from the context's state: a graph captured for some shapes,
        # replayed after the context was set to others, computes garbage
        assert shapes == self.shapes, (f"stand-in: a graph captured for {shapes} replayed on a context now "
                                       f"holding {self.shapes}")
        feeds = {n: self._array(addresses, n, s).copy() for n, s in shapes.items()}
        for name, value in self._compute(feeds).items():
            self._array(addresses, name, value.shape)[...] = value


class StandInContext(StandInContextV1):
    """TensorRT >= 10.1: set_device_memory(address, size)."""

    def set_device_memory(self, address, size):
        assert size >= self.engine.scratch and (address or size == 0)
        self.memory = (address, size)


def stand_in_tensorrt(version: str, cuda: StandInCuda):
    import types

    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.DataType = _Enum(FLOAT="FLOAT", HALF="HALF", INT32="INT32", INT64="INT64")
    trt.TensorIOMode = _Enum(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.ExecutionContextAllocationStrategy = _Enum(USER_MANAGED="USER_MANAGED")
    levels = {"NONE": 0, "AMPERE_PLUS": 1}
    if _version(version) >= (10, 9):
        levels["SAME_COMPUTE_CAPABILITY"] = 2
    trt.HardwareCompatibilityLevel = _Enum(**levels)
    trt.OnnxParserFlag = _Enum(NATIVE_INSTANCENORM="NATIVE_INSTANCENORM")

    class Logger:
        WARNING = 2

        def __init__(self, severity=None):
            pass

    class Runtime:
        def __init__(self, logger):
            self.engine_host_code_allowed = False

        def deserialize_cuda_engine(self, data):
            plan = json.loads(bytes(data))
            built, here = _version(plan["tensorrt"]), _version(version)
            if plan["version_compatible"]:
                runs = self.engine_host_code_allowed and here >= built and (
                    here[0] == built[0] or (built[0], here[0]) in {(8, 9), (8, 10), (10, 11)})
            else:
                runs = plan["tensorrt"] == version
            return StandInEngine(plan, version, cuda) if runs else None  # TensorRT logs why and returns None

    trt.Logger, trt.Runtime = Logger, Runtime
    return trt


class StandIn:
    """What the ``stand_in`` fixture gives a test: the builds it saw, the CUDA log, and knobs."""

    def __init__(self, monkeypatch):
        self.monkeypatch, self.calls, self.cuda = monkeypatch, [], StandInCuda()
        self.scratch = None  # None: 1000 + 10 per build; else every engine needs this many bytes
        self.capturable = True
        self.use(tensorrt="10.8.0.43", gpu="NVIDIA L4", capability=(8, 9))

    def use(self, tensorrt=None, gpu=None, capability=None):
        """Switch the machine: another TensorRT release, GPU model or compute capability."""
        import sys

        if tensorrt:
            self.trt = stand_in_tensorrt(tensorrt, self.cuda)
            self.monkeypatch.setitem(sys.modules, "tensorrt", self.trt)
        if gpu:
            self.monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu)
        if capability:
            self.monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)

    def __getitem__(self, i):
        return self.calls[i]

    def __len__(self):
        return len(self.calls)

    def backend(self, folder, **kwargs) -> TrtBackend:
        trt = TrtBackend(folder, **kwargs)
        trt.device = trt.pool.device = torch.device("cpu")  # host memory stands in for the GPU's
        return trt


@pytest.fixture
def stand_in(monkeypatch):
    import polygraphy.backend.trt as pg

    s = StandIn(monkeypatch)
    cuda = s.cuda
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: cuda.current)
    monkeypatch.setattr(torch.cuda, "Stream", cuda.new_stream)
    monkeypatch.setattr(torch.cuda, "stream", cuda.stream)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: StandInGraph(cuda))
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, **kw: StandInGraphContext(cuda, graph, **kw))

    def network_from_onnx_path(path, flags=None, strongly_typed=None):
        s.calls.append({"onnx": path, "flags": flags, "strongly_typed": strongly_typed})
        return path

    def engine_bytes_from_network(network, config=None, save_timing_cache=None):
        s.calls[-1].update(config=config, timing_cache=save_timing_cache)
        (profile,) = config.profiles
        level = config.hardware_compatibility_level
        plan = {"onnx": network, "tensorrt": s.trt.__version__, "version_compatible": bool(config.version_compatible),
                "hardware": level, "capturable": s.capturable,
                "scratch": 1000 + 10 * len(s.calls) if s.scratch is None else s.scratch,
                "profile": {n: {"min": list(t.min), "max": list(t.max)} for n, t in profile.items()}}
        return json.dumps(plan).encode()

    def engine_from_network(network, config=None, save_timing_cache=None):
        # polygraphy's: EngineFromBytes(EngineBytesFromNetwork(...)), whose runtime allows host code
        runtime = s.trt.Runtime(s.trt.Logger())
        runtime.engine_host_code_allowed = True
        return runtime.deserialize_cuda_engine(engine_bytes_from_network(network, config, save_timing_cache))

    monkeypatch.setattr(pg, "network_from_onnx_path", network_from_onnx_path)
    monkeypatch.setattr(pg, "engine_bytes_from_network", engine_bytes_from_network)
    monkeypatch.setattr(pg, "engine_from_network", engine_from_network)
    # polygraphy's own save_engine stays: it saves engine.serialize()
    return s


def stand_in_build(tiny_bundle, tmp, name, spec=None, **builder):
    spec = dict(spec or TINY_DYNAMIC)
    spec["builder"] = {**spec["builder"], **builder}
    out = tmp / name
    return build_engines(tiny_bundle, spec_file(tmp, spec, name), out), out


def test_trt_plumbing_against_a_stand_in(stand_in, tiny_bundle, tmp_path):
    two = {**TINY_DYNAMIC, "profiles": [*TINY_DYNAMIC["profiles"], {"image": 128, "batch": 2}]}
    manifest = build_engines(tiny_bundle, spec_file(tmp_path, two, "two"), tmp_path / "e", cache=tmp_path / "c")
    # one engine per graph and profile, strongly typed, with the spec's builder settings
    unet = next(g for g in manifest["graphs"] if g["name"] == "unet")
    assert [e["file"] for e in unet["engines"]] == ["engines/unet.p0.trt10.8.sm89.plan",
                                                     "engines/unet.p1.trt10.8.sm89.plan"]
    assert unet["engines"][1]["static"] and not unet["engines"][0]["static"]
    assert unet["engines"][0]["profile"]["sample"] == {"min": [1, 4, 8, 8], "opt": [2, 4, 16, 16],
                                                       "max": [4, 4, 32, 32]}
    assert all(c["strongly_typed"] and c["flags"] == ["NATIVE_INSTANCENORM"] for c in stand_in)
    config = stand_in[0]["config"]
    assert config.builder_optimization_level == 2 and config.refittable is False
    assert config.profiles[0]["sample"].opt == (2, 4, 16, 16)
    assert stand_in[0]["timing_cache"] == str(tmp_path / "timing-10.8-89-nvidia-l4.cache")
    assert manifest["platform"] == L4 and manifest["build"]["built"] == len(stand_in) == 6
    # the TensorRT path shares the reuse logic: nothing is rebuilt
    again = build_engines(tiny_bundle, spec_file(tmp_path, two, "two"), tmp_path / "e2", cache=tmp_path / "c")
    assert again["build"]["built"] == 0 and len(stand_in) == 6

    trt = stand_in.backend(tmp_path / "e", cuda_graphs="never")
    ort = OrtBackend(tiny_bundle)
    for batch, size in ((2, 16), (1, 8), (2, 24)):
        feeds = unet_feeds("cpu", batch, size, size)
        got = trt.run("unet", feeds)["noise_pred"]
        want = ort.run("unet", feeds)["noise_pred"]
        assert torch.allclose(got, want, atol=1e-5) and want.abs().max() > 0.1
    assert {k[1] for k in trt._loaded if k[0] == "unet"} == {0, 1}  # (2, 16, 16): the static engine; else p0
    ids = torch.randint(0, 400, (1, 77), dtype=torch.int64)  # converted to the engine's int32
    assert torch.allclose(trt.run("text_encoder", {"input_ids": ids})["last_hidden_state"],
                          ort.run("text_encoder", {"input_ids": ids})["last_hidden_state"], atol=1e-5)
    contexts = [e.context for e in trt._loaded.values()]
    assert trt.shared_memory_bytes == max(e.engine.scratch for e in trt._loaded.values())
    assert len({c.memory for c in contexts}) == 1  # every context on the one pool
    assert set(trt.memory()) == {"unet", "text_encoder"}
    # what `check` runs beside the bundle's points, and the size `run` / the end to end take
    from asdm_export.runtime.backends import latent_to_run

    built = [s["sample"] for s in trt.built_shapes("unet")]
    assert built == [(1, 4, 8, 8), (2, 4, 16, 16), (4, 4, 32, 32)]  # p0's min, opt, max; p1 (static) is p0's opt
    assert latent_to_run(trt, "unet", (16, 16)) == (16, 16) and latent_to_run(trt, "unet", (24, 24)) == (24, 24)


# ---- issue 19: each TensorRT defect against the stand-ins ------------------------------------------------

def test_version_compatible_plan_is_saved_as_built(stand_in, tiny_bundle, tmp_path):
    """Item 1: the builder's serialized plan is saved (a deserialized version-compatible engine cannot be
    serialized again); deserialized only to read its scratch size; never an empty .plan."""
    manifest, out = stand_in_build(tiny_bundle, tmp_path, "vc", version_compatible=True)
    for g in manifest["graphs"]:
        (engine,) = g["engines"]
        plan = json.loads((out / engine["file"]).read_bytes())
        assert plan["version_compatible"] and engine["device_memory_bytes"] == plan["scratch"]
    assert not [p for p in (out / "engines").iterdir() if not p.name.endswith(".plan")]  # no temporary left
    trt = stand_in.backend(out, cuda_graphs="never")  # and the saved plans load and run
    feeds = unet_feeds("cpu")
    assert torch.allclose(trt.run("unet", feeds)["noise_pred"],
                          OrtBackend(tiny_bundle).run("unet", feeds)["noise_pred"], atol=1e-5)

    from asdm_export.build import trt_builder

    dest = tmp_path / "x.plan"
    with pytest.raises(StageError, match="empty engine"):
        trt_builder.write_plan(dest, b"")
    assert not dest.exists() and not list(tmp_path.glob(".x.plan.tmp-*"))


def test_tensorrt_of_another_cuda_major_than_torch_is_refused(stand_in, monkeypatch):
    """Item 2: TensorRT's CUDA 13 wheels beside a CUDA 12 torch are refused with the extra to install."""
    from importlib import metadata

    from asdm_export.runtime import trt_backend

    def distribution(name):  # the CUDA 13 wheels are installed
        if name != "tensorrt_cu13_bindings":
            raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", distribution)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    with pytest.raises(MissingBackendError) as err:
        trt_backend.import_tensorrt()
    msg = str(err.value)
    assert "CUDA 13 build" in msg and 'pip install "asdm-export[tensorrt-cu12]"' in msg and "\n" not in msg
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert trt_backend.import_tensorrt() is stand_in.trt  # matching majors: fine


def _requirements(specs):
    from packaging.requirements import Requirement

    return {Requirement(s).name: Requirement(s) for s in specs}


def test_pyproject_extras_pin_tensorrt_to_a_cuda_major():
    """Item 2: one extra per CUDA major of TensorRT's wheels; none lets pip pick the variant."""
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for major in (12, 13):
        reqs = _requirements(extras[f"tensorrt-cu{major}"])
        trt = reqs[f"tensorrt-cu{major}"]
        assert "tensorrt" not in reqs  # the bare package installs whichever CUDA variant its release picks
        assert not trt.specifier.contains("12.0.0") and trt.specifier.contains("11.4.0.106")
        assert all(f"cu{other}" not in name for name in reqs for other in (12, 13) if other != major)
    plain = _requirements(extras["tensorrt"])
    assert "tensorrt" not in plain and {"tensorrt-cu12", "tensorrt-cu13"} & set(plain)  # [tensorrt] still installs


def test_ci_workflow_pins_tensorrt_to_its_torch_and_caches_outside_the_workspace():
    """Items 2 and 7: the GPU workflow installs the TensorRT of its torch's CUDA major, and keeps its venv and
    caches where actions/checkout does not clean them."""
    workflow = (ROOT / ".github" / "workflows" / "gpu-engines.yml").read_text()
    job = yaml.safe_load(workflow)["jobs"]["engines"]
    env = job["env"]
    cuda = re.search(r"\+cu(\d+)\d$", env["TORCH_SPEC"]).group(1)  # torch==2.13.0+cu128 -> 12
    assert f"/whl/cu{cuda}" in env["PIP_EXTRA_INDEX_URL"]
    runs = "\n".join(step.get("run", "") for step in job["steps"])
    runs = runs.replace("$TENSORRT_EXTRA", env.get("TENSORRT_EXTRA", ""))
    installs = re.findall(r'pip"? install -e "\.\[([^\]]*)\]"', runs)
    assert installs and all(f"tensorrt-cu{cuda}" in i.split(",") for i in installs if "tensorrt" in i)
    # nothing reused across runs lives in the workspace: no ./.venv, no cache under github.workspace
    assert "github.workspace" not in workflow and not re.search(r"(^|\s)\.venv/", runs)
    assert re.search(r"--cache \"\$\w+\"", runs) and "actions/checkout" in workflow


@pytest.mark.parametrize("graphs", ["never", "static"])
def test_engines_run_on_the_backends_own_stream(stand_in, tiny_bundle, tmp_path, graphs):
    """Item 3: execute_async_v3 on a stream the backend owns, not the legacy default one; warm-up, capture and
    replay on it; it waits for the caller's stream before, the caller's stream waits for it after."""
    _, out = stand_in_build(tiny_bundle, tmp_path, "s", TINY_STATIC)
    trt = stand_in.backend(out, cuda_graphs=graphs)
    log = stand_in.cuda.log
    ort = OrtBackend(tiny_bundle)
    want = {seed: ort.run("unet", unet_feeds("cpu", seed=seed))["noise_pred"] for seed in (1, 2)}
    caller = stand_in.cuda.new_stream()
    for current in (stand_in.cuda.legacy, caller):  # the default, then a stream the caller set
        with torch.cuda.stream(current):
            for seed in (1, 2):
                log.clear()
                got = trt.run("unet", unet_feeds("cpu", seed=seed))["noise_pred"]
                work = [e for e in log if e[0] in ("enqueue", "replay")]
                assert work and all(e[1] not in (0, current.cuda_stream) for e in work), work
                own = trt.stream.cuda_stream  # one stream of the backend's own for all of it
                assert all(e[1] == own for e in work)
                assert log[0] == ("wait", own, current.cuda_stream)  # inputs written on the caller's stream
                assert log[-1] == ("wait", current.cuda_stream, own)  # outputs read on the caller's stream
                assert torch.allclose(got, want[seed], atol=1e-5)
    engine = next(iter(trt._loaded.values()))
    assert len(engine.captured) == (1 if graphs == "static" else 0)


def test_failed_cuda_graph_capture_falls_back_without_a_graph(stand_in, tiny_bundle, tmp_path, caplog):
    """Item 4: a capture TensorRT cannot do ends cleanly, is reported in one line with the original error, and
    the engine runs without a graph from then on."""
    stand_in.capturable = False
    _, out = stand_in_build(tiny_bundle, tmp_path, "s", TINY_STATIC)
    trt = stand_in.backend(out)  # cuda_graphs="static": the UNet's engine is static
    ort = OrtBackend(tiny_bundle)
    with caplog.at_level(logging.WARNING, logger="asdm_export.runtime.trt_backend"):
        for seed in (1, 2):
            feeds = unet_feeds("cpu", seed=seed)
            assert torch.allclose(trt.run("unet", feeds)["noise_pred"], ort.run("unet", feeds)["noise_pred"],
                                  atol=1e-5)
    assert not stand_in.cuda.capturing  # the capture was ended
    (record,) = [r for r in caplog.records if "capture" in r.getMessage()]
    msg = record.getMessage()
    assert "unet.p0" in msg and "could not enqueue" in msg and "previous error during capture" not in msg
    assert "without CUDA graphs" in msg and "\n" not in msg
    engine = next(iter(trt._loaded.values()))
    assert engine.graphs_failed and not engine.captured


def test_engine_from_another_gpu_model_is_refused(stand_in, tiny_bundle, tmp_path):
    """Item 5: same compute capability, another GPU model: refused (one line, exit 2) unless built with a
    hardware-compatibility level that allows it; timing caches are per GPU model."""
    _, plain = stand_in_build(tiny_bundle, tmp_path, "plain")
    stand_in.use(tensorrt="10.9.0.34")
    _, shared = stand_in_build(tiny_bundle, tmp_path, "shared", hardware_compatibility="same_compute_capability")
    stand_in.use(tensorrt="10.8.0.43", gpu="NVIDIA L40S")  # also compute capability 8.9
    with pytest.raises(EngineMismatchError, match="built on a NVIDIA L4 and this GPU is a NVIDIA L40S"):
        stand_in.backend(plain)
    res = CliRunner().invoke(main, ["run", "--engines", str(plain), "--backend", "trt", "--prompt", "a red circle",
                                    "--out", str(tmp_path / "x.png")])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and "hardware_compatibility" in res.stderr
    stand_in.use(tensorrt="10.9.0.34")
    stand_in.backend(shared).run("unet", unet_feeds("cpu"))  # same_compute_capability: runs on the L40S
    l4, l40s = (timing_cache_path("t-{sm}.cache", TrtPlatform("10.8.0.43", gpu, "8.9"))
                for gpu in ("NVIDIA L4", "NVIDIA L40S"))
    assert l4 != l40s and l40s.name == "t-89-nvidia-l40s.cache"
    assert stand_in[-1]["timing_cache"].endswith("-nvidia-l4.cache")


def test_cuda_graphs_always_with_several_shapes(stand_in, tiny_bundle, tmp_path):
    """Item 8: a dynamic engine with cuda_graphs="always": one graph and one context per input shapes, so a
    replay never runs on a context set to other shapes since its capture."""
    _, out = stand_in_build(tiny_bundle, tmp_path, "d")
    trt = stand_in.backend(out, cuda_graphs="always")
    ort = OrtBackend(tiny_bundle)
    for batch, size, seed in ((2, 16, 1), (1, 8, 2), (2, 16, 3), (1, 8, 4)):  # A, B, A again, B again
        feeds = unet_feeds("cpu", batch, size, size, seed=seed)
        assert torch.allclose(trt.run("unet", feeds)["noise_pred"], ort.run("unet", feeds)["noise_pred"], atol=1e-5)
    engine = trt._loaded[("unet", 0)]
    assert len(engine.captured) == 2 and sum(e[0] == "replay" for e in stand_in.cuda.log) == 4
    contexts = {id(engine.context)} | {id(c) for c in engine.graph_contexts.values()}
    assert len(contexts) == 3


def test_trt10_version_compatible_engines_run_on_trt11(stand_in, tiny_bundle, tmp_path):
    """Item 8: a TensorRT 10 version-compatible engine runs on TensorRT 11 (TensorRT's support matrix)."""
    _, out = stand_in_build(tiny_bundle, tmp_path, "vc", version_compatible=True)
    _, plain = stand_in_build(tiny_bundle, tmp_path, "plain")
    stand_in.use(tensorrt="11.0.0.114")  # no device_memory_size, a runtime config for contexts
    feeds = unet_feeds("cpu")
    assert torch.allclose(stand_in.backend(out).run("unet", feeds)["noise_pred"],
                          OrtBackend(tiny_bundle).run("unet", feeds)["noise_pred"], atol=1e-5)
    with pytest.raises(EngineMismatchError, match="built with TensorRT 10.8.0.43 and this machine has TensorRT 11"):
        stand_in.backend(plain)
    stand_in.use(tensorrt="12.0.0.1")
    with pytest.raises(EngineMismatchError, match="runs on TensorRT 10.x and 11.x from 10.8.0.43 on"):
        stand_in.backend(out)


def test_same_compute_capability_needs_tensorrt_10_9(stand_in, tiny_bundle, tmp_path):
    """Item 8: HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY exists from TensorRT 10.9: one clear line
    before anything is built on an older one."""
    with pytest.raises(MissingBackendError) as err:
        stand_in_build(tiny_bundle, tmp_path, "old", hardware_compatibility="same_compute_capability")
    msg = str(err.value)
    assert "same_compute_capability needs TensorRT 10.9 or newer" in msg and "10.8.0.43" in msg and "\n" not in msg
    assert len(stand_in) == 0 and not (tmp_path / "old").exists()
    stand_in.use(tensorrt="10.9.0.34")
    manifest, _ = stand_in_build(tiny_bundle, tmp_path, "new", hardware_compatibility="same_compute_capability")
    assert manifest["build"]["built"] == 3 and all(c["config"].hardware_compatibility_level == 2 for c in stand_in)


def test_tensorrt_10_0_without_device_memory_size_v2(stand_in, tiny_bundle, tmp_path):
    """Item 8: TensorRT 10.0 has device_memory_size (no _v2) and the device_memory property (no
    set_device_memory)."""
    stand_in.use(tensorrt="10.0.1.6")
    manifest, out = stand_in_build(tiny_bundle, tmp_path, "e")
    assert all(g["engines"][0]["device_memory_bytes"] >= 1000 for g in manifest["graphs"])
    trt = stand_in.backend(out, cuda_graphs="never")
    feeds = unet_feeds("cpu")
    want = OrtBackend(tiny_bundle).run("unet", feeds)["noise_pred"]
    assert torch.allclose(trt.run("unet", feeds)["noise_pred"], want, atol=1e-5)
    assert not hasattr(trt._loaded[("unet", 0)].engine, "device_memory_size_v2")


def test_engines_that_need_no_scratch_memory_still_get_it_set(stand_in, tiny_bundle, tmp_path):
    """Item 8: when every engine needs 0 bytes, every context is still given device memory (null, size 0)."""
    pool = SharedDeviceMemory(torch.device("cpu"))
    a, b = FakeContext(), FakeContext()
    pool.attach(a, 0)
    pool.attach(b, 0)
    assert a.memory == b.memory == [(0, 0)] and pool.size == 0
    stand_in.scratch = 0
    _, out = stand_in_build(tiny_bundle, tmp_path, "e")
    trt = stand_in.backend(out)
    feeds = unet_feeds("cpu")
    want = OrtBackend(tiny_bundle).run("unet", feeds)["noise_pred"]
    assert torch.allclose(trt.run("unet", feeds)["noise_pred"], want, atol=1e-5)
    assert trt.shared_memory_bytes == 0


def test_check_times_a_warm_call_not_the_first_use(monkeypatch):
    """check's latency at the opt shape: a shape's first call (deserialization, allocation, CUDA-graph capture)
    is run untimed first, and the timed call is read through GraphClock (CUDA events on GPU backends)."""
    from asdm_export.check import check as check_module
    from asdm_export.runtime import denoise

    calls, clocks = [], []

    class Backend:
        device = "cpu"

        def covers(self, graph, shapes):
            return True

        def run(self, graph, tensors):
            calls.append(graph)
            return {"y": tensors["x"] * 2}

    class Clock(denoise.GraphClock):
        def __init__(self, device):
            super().__init__(device)
            clocks.append(device)

        def start(self):
            self.calls_before = len(calls)
            return super().start()

        def stop(self, begin):
            assert len(calls) == self.calls_before + 1  # exactly the timed call inside the span
            super().stop(begin)

    monkeypatch.setattr(denoise, "GraphClock", Clock)
    feeds = {"x": np.ones((1, 2), np.float32)}
    outputs, seconds = check_module._run_backend(Backend(), "g", feeds, warm_up=True)
    assert len(calls) == 2 and clocks == ["cpu"] and seconds >= 0
    np.testing.assert_array_equal(outputs["y"], 2 * feeds["x"])
    check_module._run_backend(Backend(), "g", feeds, warm_up=False)
    assert len(calls) == 3
    seen = set()
    assert [check_module._first(seen, d) for d in ({"b": 1}, {"b": 2}, {"b": 1})] == [True, True, False]
