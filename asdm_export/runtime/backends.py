"""Backends: one interface to run a bundle's named graphs, whatever executes them.

``backend.run(graph_name, feeds) -> outputs``: dicts of torch tensors on ``backend.device``, so a loop
written once (``denoise``) keeps its tensors where the backend computes: CPU tensors shared with numpy
for ONNX Runtime here, CUDA tensors for TensorRT (no host round trips). ``TorchBackend`` runs the
PyTorch modules the graphs were exported from (the reference); ``OrtBackend`` runs the exported ONNX
files on an ONNX Runtime execution provider. ``memory()`` says what each holds.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..artifacts import read_manifest, require_engines
from ..errors import InputError
from ..graphs.graphs import GraphDef


class Backend:
    name = "backend"
    device = torch.device("cpu")
    # host seconds spent so far readying graphs on their first use (an ONNX Runtime session, a program's export, a
    # CUDA graph capture): the pipeline reports them apart, so that a first image's stage times are the graphs'
    setup_seconds = 0.0

    def graph_names(self) -> list[str]:
        raise NotImplementedError

    def run(self, graph: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def memory(self) -> dict[str, int]:
        """Bytes held per graph that has been loaded (weights, plus activations where known)."""
        return {}

    def covers(self, graph: str, shapes: dict[str, tuple[int, ...]]) -> bool:
        """Whether ``graph`` takes inputs of these shapes here (engines with fixed profiles may not)."""
        return True

    def built_shapes(self, graph: str) -> list[dict[str, tuple[int, ...]]]:
        """The input shapes ``graph`` was built for here (each static program, each TensorRT profile's min, opt
        and max), which a check must run whatever sizes the bundle's own check points are; empty where any
        shape in the graph's exported range runs."""
        return []

    def precision(self, graph: str) -> str | None:
        """The precision ``graph`` computes in here when it is not its bundle's (PyTorch programs in fp16 from an
        fp32 bundle); None: the bundle's, as ONNX Runtime and TensorRT (strongly typed) run the graphs."""
        return None

    def _require(self, graph: str) -> None:
        if graph not in self.graph_names():
            raise InputError(f"graph '{graph}' is not in this bundle (it has {', '.join(self.graph_names())})")


def check_input_shapes(graph: str, spec: dict[str, tuple], shapes: dict[str, tuple[int, ...]]) \
        -> dict[str, tuple[int, ...]]:
    """``shapes`` in the graph's input order, checked against its symbolic ones ``spec`` (names, ranks, fixed
    dims; axis names take any size): one line for a feed that does not fit, where the libraries' own errors
    run to pages or name no input."""
    missing = [n for n in spec if n not in shapes]
    if missing:
        raise InputError(f"graph '{graph}' needs inputs {missing} (it takes {', '.join(spec)})")
    out = {}
    for name, want in spec.items():
        shape = tuple(int(d) for d in shapes[name])
        if len(shape) != len(want) or any(isinstance(d, int) and d != s for d, s in zip(want, shape)):
            raise InputError(f"graph '{graph}': input '{name}' has shape {shape}, expected {tuple(want)}")
        out[name] = shape
    return out


def latent_to_run(backend: Backend, graph: str, preferred: tuple[int, int]) -> tuple[int, int]:
    """``preferred`` (latent height, width) where ``backend`` runs UNet ``graph`` at it; else, for engines built
    for other sizes only (a static 128 px folder of a bundle whose opt is 64 px), the first size they were."""
    built = [s for s in backend.built_shapes(graph) if len(s.get("sample", ())) == 4]
    if not built or any(backend.covers(graph, {**s, "sample": (*s["sample"][:2], *preferred)}) for s in built):
        return tuple(preferred)
    return tuple(built[0]["sample"][2:])


class TorchBackend(Backend):
    """The PyTorch reference: the ``GraphDef`` modules, float32 on CPU."""

    name = "torch"

    def __init__(self, graphs: list[GraphDef]):
        self.graphs = {g.name: g for g in graphs}

    def graph_names(self) -> list[str]:
        return list(self.graphs)

    def run(self, graph, feeds):
        self._require(graph)
        g = self.graphs[graph]
        check_input_shapes(graph, g.inputs, {n: np.shape(v) for n, v in feeds.items()})
        with torch.inference_mode():
            out = g.module(*[torch.as_tensor(feeds[n]) for n in g.inputs])
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return {n: o for n, o in zip(g.outputs, outs)}

    def memory(self):
        return {name: sum(p.numel() * p.element_size() for p in g.module.parameters())
                for name, g in self.graphs.items()}

    @classmethod
    def from_bundle(cls, bundle: Path | str, model: str | None = None) -> "TorchBackend":
        """The reference modules of a bundle's graphs, rebuilt from its source models."""
        from .reference import reference_graphs, reference_sources

        manifest = read_manifest(bundle, "bundle")
        return cls(list(reference_graphs(manifest, *reference_sources(manifest, model)).values()))


class OrtBackend(Backend):
    """A bundle's ONNX graphs on ONNX Runtime; sessions are created on first use of each graph.

    Also opens an engine folder built for ONNX Runtime (``build --backend ort``): its graphs are the ones
    optimised offline for one execution provider, run with the spec's session settings. ``provider``
    defaults to ``cpu`` for a bundle and to the provider the engines were built for. ``exact_int8``: see
    ``runners.ort_session`` (None: decided by the CPU). ``gpu``: the GPU a GPU provider runs on. ``threads``:
    intra-op threads (0: the spec's, else ONNX Runtime's default).
    """

    def __init__(self, bundle: Path | str, provider: str | None = None, exact_int8: bool | None = None,
                 gpu: int | None = None, threads: int = 0):
        self.bundle = Path(bundle)
        self.exact_int8, self.gpu = exact_int8, gpu
        self.manifest = read_manifest(self.bundle, ("bundle", "engines"))
        self.threads = 0
        if self.manifest["kind"] == "engines":
            built = self.manifest.get("platform", {}).get("provider")
            require_engines(self.bundle, self.manifest, "ort")
            if provider is not None and provider != built:
                # an offline-optimised graph may hold nodes only its own execution provider runs
                raise InputError(f"'{self.bundle}' was optimised for the {built} provider, not {provider}; use "
                                 f"provider {built}, or build it again with a spec for {provider}")
            provider = built
            self.threads = int(self.manifest.get("spec", {}).get("session", {}).get("threads", 0))
        self.threads = threads or self.threads  # the caller's, else the spec's, else ONNX Runtime's default
        self.provider = provider or "cpu"
        self.name = f"ort-{self.provider}"
        self._files = {g["name"]: self.bundle / g["file"] for g in self.manifest["graphs"]}
        self._outputs = {g["name"]: [o["name"] for o in g["outputs"]] for g in self.manifest["graphs"]}
        self._inputs = {g["name"]: {i["name"]: tuple(i["shape"]) for i in g["inputs"]} for g in self.manifest["graphs"]}
        self._sessions = {}

    def graph_names(self) -> list[str]:
        return list(self._files)

    def session(self, graph: str):
        from .runners import ort_session

        self._require(graph)
        if graph not in self._sessions:
            t0 = time.perf_counter()
            session = ort_session(self._files[graph], self.provider, self.threads, self.exact_int8, self.gpu)
            self.setup_seconds += time.perf_counter() - t0
            found = [o.name for o in session.get_outputs()]
            if sorted(found) != sorted(self._outputs[graph]):  # a file that is not the graph its manifest lists
                raise InputError(f"'{self._files[graph]}' has outputs {found}, its manifest lists "
                                 f"{self._outputs[graph]}; re-create '{self.bundle}'")
            self._sessions[graph] = session
        return self._sessions[graph]

    def run(self, graph, feeds):
        sess = self.session(graph)
        check_input_shapes(graph, self._inputs[graph], {n: np.shape(v) for n, v in feeds.items()})
        names = [o.name for o in sess.get_outputs()]
        wanted = {i.name: i.type for i in sess.get_inputs()}
        arrays = {k: np.ascontiguousarray(_numpy(v), dtype=_ORT_TYPES.get(wanted[k], np.float32))
                  for k, v in feeds.items() if k in wanted}
        return {n: torch.from_numpy(o) for n, o in zip(names, sess.run(names, arrays))}

    def memory(self):
        return {g: sum(f.stat().st_size for f in self._files[g].parent.glob(self._files[g].name + "*"))
                for g in self._sessions}


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int32)": np.int32,
              "tensor(int64)": np.int64}


def _numpy(value) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
