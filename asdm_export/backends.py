"""Backends: one interface to run a bundle's named graphs, whatever executes them.

``backend.run(graph_name, feeds) -> outputs`` with numpy arrays in and out. ``TorchBackend`` runs the
PyTorch modules the graphs were exported from (the reference); ``OrtBackend`` runs the exported ONNX
files on an ONNX Runtime execution provider.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .artifacts import read_manifest
from .errors import InputError
from .graphs import GraphDef


class Backend:
    name = "backend"

    def graph_names(self) -> list[str]:
        raise NotImplementedError

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _require(self, graph: str) -> None:
        if graph not in self.graph_names():
            raise InputError(f"graph '{graph}' is not in this bundle (it has {', '.join(self.graph_names())})")


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
        args = [torch.from_numpy(np.ascontiguousarray(feeds[n], dtype=np.float32)) for n in g.inputs]
        with torch.inference_mode():
            out = g.module(*args)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return {n: o.float().numpy() for n, o in zip(g.outputs, outs)}

    @classmethod
    def from_bundle(cls, bundle: Path | str, model: str | None = None) -> "TorchBackend":
        """The reference modules of a bundle's graphs, rebuilt from its source models."""
        from .check import reference_graphs, reference_sources

        manifest = read_manifest(bundle, "bundle")
        return cls(list(reference_graphs(manifest, reference_sources(manifest, model)).values()))


class OrtBackend(Backend):
    """A bundle's ONNX graphs on ONNX Runtime; sessions are created on first use of each graph."""

    def __init__(self, bundle: Path | str, provider: str = "cpu"):
        self.bundle = Path(bundle)
        self.manifest = read_manifest(self.bundle, "bundle")
        self.provider = provider
        self.name = f"ort-{provider}"
        self._files = {g["name"]: self.bundle / g["file"] for g in self.manifest["graphs"]}
        self._sessions = {}

    def graph_names(self) -> list[str]:
        return list(self._files)

    def session(self, graph: str):
        from .runners import ort_session

        self._require(graph)
        if graph not in self._sessions:
            self._sessions[graph] = ort_session(self._files[graph], self.provider)
        return self._sessions[graph]

    def run(self, graph, feeds):
        sess = self.session(graph)
        names = [o.name for o in sess.get_outputs()]
        wanted = {i.name for i in sess.get_inputs()}
        outs = sess.run(names, {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in feeds.items() if k in wanted})
        return dict(zip(names, outs))
