"""TensorRT: what runs without a GPU (names, compatibility refusal, engine selection, the shared memory pool),
and build / refusal / runtime tests on a GPU with TensorRT, which skip with a reason elsewhere."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from asdm_export.build import build_engines
from asdm_export.errors import InputError, MissingBackendError
from asdm_export.runtime.backends import OrtBackend
from asdm_export.runtime.trt_backend import (EngineMismatchError, SharedDeviceMemory, TrtBackend, TrtPlatform,
                                             check_compatible, compatibility_problem, engine_file_name, select_engine,
                                             timing_cache_path)

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
    ({"version_compatible": True}, {"tensorrt": "10.7.0.23"}, "runs on TensorRT 10.x from 10.8.0.43 on"),
    ({"version_compatible": True}, {"tensorrt": "11.0.0.1"}, "this machine has TensorRT 11.0.0.1"),
    ({}, {"compute_capability": "8.6", "gpu": "NVIDIA A10"}, "built for compute capability 8.9 (NVIDIA L4); this GPU "
                                                             "(NVIDIA A10) has compute capability 8.6"),
    ({"hardware_compatibility": "same_compute_capability"}, {"gpu": "NVIDIA L40S"}, None),
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
    assert p == tmp_path / "t-10.8-sm89.cache"
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
    with pytest.raises(InputError, match="holds ort engines, not TensorRT ones"):
        TrtBackend(out)
    with pytest.raises(InputError, match="is not an asdm-export engines manifest"):
        TrtBackend(tiny_bundle)


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here: the missing-TensorRT path cannot be shown")
def test_trt_backend_without_tensorrt_says_what_to_install(tmp_path):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "manifest.json").write_text(json.dumps({"format": "asdm-export", **recorded_manifest()}))
    with pytest.raises(MissingBackendError, match=r'pip install "asdm-export\[tensorrt\]"'):
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
    out, _ = trt_engines
    trt, ort = TrtBackend(out), OrtBackend(tiny_bundle)
    for shape in ((2, 16, 16), (1, 8, 24), (4, 32, 32)):
        feeds = unet_feeds(trt.device, *shape)
        got = trt.run("unet", feeds)["noise_pred"]
        assert got.is_cuda and got.shape == (shape[0], 4, shape[1], shape[2])  # on the GPU: no host round trip
        want = ort.run("unet", {k: v.cpu() for k, v in feeds.items()})["noise_pred"]
        rel = (got.cpu() - want).norm() / want.norm()
        assert rel < 1e-3, rel
    sizes = [e.engine.device_memory_size_v2 for e in trt._loaded.values()]
    assert trt.shared_memory_bytes == max(sizes)  # one pool, as large as the largest engine needs
    with pytest.raises(InputError, match="no engine of graph 'unet' takes inputs of shapes"):
        trt.run("unet", unet_feeds(trt.device, 8, 16, 16))


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
# given, in host memory. This checks our side (profiles handed to polygraphy, names, manifest, reuse, engine
# selection, binding by data_ptr, shapes, dtypes, the shared pool); the GPU tests above check TensorRT's.

class _Enum:
    def __init__(self, **values):
        self.__dict__.update(values)


class StandInEngine:
    def __init__(self, plan: dict):
        import onnx
        import onnxruntime

        self.plan = plan
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        self.session = onnxruntime.InferenceSession(plan["onnx"], options, providers=["CPUExecutionProvider"])
        model = onnx.load(plan["onnx"], load_external_data=False)
        kinds = {1: "FLOAT", 10: "HALF", 6: "INT32", 7: "INT64"}
        inits = {i.name for i in model.graph.initializer}
        self.io = [(v.name, "INPUT", kinds[v.type.tensor_type.elem_type]) for v in model.graph.input
                   if v.name not in inits]
        self.io += [(v.name, "OUTPUT", kinds[v.type.tensor_type.elem_type]) for v in model.graph.output]
        self.num_io_tensors = len(self.io)
        self.device_memory_size_v2 = plan["scratch"]

    def get_tensor_name(self, i):
        return self.io[i][0]

    def get_tensor_mode(self, name):
        return next(m for n, m, _ in self.io if n == name)

    def get_tensor_dtype(self, name):
        return next(d for n, _, d in self.io if n == name)

    def create_execution_context(self, strategy):
        assert strategy == "USER_MANAGED"
        return StandInContext(self)


class StandInContext:
    NP = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64}

    def __init__(self, engine):
        self.engine, self.shapes, self.addresses, self.results, self.memory = engine, {}, {}, None, None

    def set_device_memory(self, address, size):
        assert size >= self.engine.device_memory_size_v2
        self.memory = (address, size)

    def set_input_shape(self, name, shape):
        self.shapes[name], self.results = tuple(shape), None

    def set_tensor_address(self, name, address):
        self.addresses[name] = address

    def _array(self, name, shape):
        import ctypes

        dtype = np.dtype(self.NP[self.engine.get_tensor_dtype(name)])
        n = int(np.prod(shape)) * dtype.itemsize
        return np.frombuffer((ctypes.c_char * n).from_address(self.addresses[name]), dtype=dtype).reshape(shape)

    def _run(self):
        if self.results is None:
            feeds = {n: self._array(n, s).copy() for n, s in self.shapes.items()}
            names = [o.name for o in self.engine.session.get_outputs()]
            self.results = dict(zip(names, self.engine.session.run(names, feeds)))
        return self.results

    def get_tensor_shape(self, name):
        return self._run()[name].shape

    def execute_async_v3(self, stream):
        assert self.memory is not None  # scratch memory was handed over before running
        for name, value in self._run().items():
            self._array(name, value.shape)[...] = value
        return True


def stand_in_tensorrt():
    import types

    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.8.0.43"
    trt.DataType = _Enum(FLOAT="FLOAT", HALF="HALF", INT32="INT32", INT64="INT64")
    trt.TensorIOMode = _Enum(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.ExecutionContextAllocationStrategy = _Enum(USER_MANAGED="USER_MANAGED")
    trt.HardwareCompatibilityLevel = _Enum(NONE=0, AMPERE_PLUS=1, SAME_COMPUTE_CAPABILITY=2)
    trt.OnnxParserFlag = _Enum(NATIVE_INSTANCENORM="NATIVE_INSTANCENORM")

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            pass

    class Runtime:
        def __init__(self, logger):
            self.engine_host_code_allowed = False

        def deserialize_cuda_engine(self, data):
            return StandInEngine(json.loads(data))

    trt.Logger, trt.Runtime = Logger, Runtime
    return trt


@pytest.fixture
def stand_in(monkeypatch):
    import contextlib
    import sys
    import types

    import polygraphy.backend.trt as pg

    calls = []
    monkeypatch.setitem(sys.modules, "tensorrt", stand_in_tensorrt())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L4")
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=0))

    def network_from_onnx_path(path, flags=None, strongly_typed=None):
        calls.append({"onnx": path, "flags": flags, "strongly_typed": strongly_typed})
        return path

    def engine_from_network(network, config=None, save_timing_cache=None):
        calls[-1].update(config=config, timing_cache=save_timing_cache)
        return {"onnx": network, "scratch": 1000 + 10 * len(calls)}

    def save_engine(engine, path):
        Path(path).write_text(json.dumps(engine))

    from pathlib import Path

    monkeypatch.setattr(pg, "network_from_onnx_path", network_from_onnx_path)
    monkeypatch.setattr(pg, "engine_from_network", engine_from_network)
    monkeypatch.setattr(pg, "save_engine", save_engine)
    monkeypatch.setattr("asdm_export.runtime.trt_backend.device_memory_size", lambda engine: engine["scratch"]
                        if isinstance(engine, dict) else engine.device_memory_size_v2)
    return calls


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
    assert stand_in[0]["timing_cache"] == str(tmp_path / "timing-10.8-89.cache")
    assert manifest["platform"] == L4 and manifest["build"]["built"] == len(stand_in) == 6
    # the TensorRT path shares the reuse logic: nothing is rebuilt
    again = build_engines(tiny_bundle, spec_file(tmp_path, two, "two"), tmp_path / "e2", cache=tmp_path / "c")
    assert again["build"]["built"] == 0 and len(stand_in) == 6

    trt = TrtBackend(tmp_path / "e", cuda_graphs="never")  # capture and replay need a GPU (tested above)
    trt.device = trt.pool.device = torch.device("cpu")  # host memory stands in for the GPU's
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
    assert trt.shared_memory_bytes == max(e.engine.device_memory_size_v2 for e in trt._loaded.values())
    assert len({c.memory for c in contexts}) == 1  # every context on the one pool
    assert set(trt.memory()) == {"unet", "text_encoder"}
